"""Inputs handed over by md5 (emu.pipeline.handoff): pulled once, and a missing one named."""

from __future__ import annotations

import pytest

from emu.artifacts.dvc import ArtifactStore
from emu.errors import SourceError
from emu.pipeline.handoff import input_folder


@pytest.fixture
def remote(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMU_DVC_REMOTE", str(tmp_path / "remote"))
    monkeypatch.setenv("EMU_INPUT_CACHE", str(tmp_path / "inputs"))
    return ArtifactStore(str(tmp_path / "remote"), workdir=tmp_path / "dvc-state")


def test_an_input_is_pulled_once_and_then_read_locally(remote, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 100)
    md5 = remote.push(folder).md5
    first = input_folder(md5, "init")
    assert (first / "weights.bin").read_bytes() == b"w" * 100
    (first / "weights.bin").write_bytes(b"local")  # a second call must not pull again
    assert (input_folder(md5, "init") / "weights.bin").read_bytes() == b"local"


def test_a_missing_input_is_named_with_its_role_and_what_to_do(remote):
    with pytest.raises(SourceError, match=r"input 'init' \(0{32}\.dir\) is not in the DVC remote .*emu artifacts keep"):
        input_folder("0" * 32 + ".dir", "init")
    with pytest.raises(SourceError, match="input 'dataset' has no md5"):
        input_folder("", "dataset")
