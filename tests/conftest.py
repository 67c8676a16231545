"""Shared test setup: every test runs offline and quiet, as the `emu` entry point does."""

import os

from emu.cli import OFFLINE_ENVIRONMENT

for name, value in OFFLINE_ENVIRONMENT.items():
    os.environ.setdefault(name, value)
