"""Fixtures the training tests share, made once per test session: the synthetic shapes world in
the public formats, imported as shards, and a model that stage 1 initialised (2 steps) to start
later stages from. Tests only read them."""

from pathlib import Path

import pytest

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.prepare import import_sources
from emu.data.synth import SynthConfig, generate


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    generate(root / "raw", resolve(SynthConfig, "synth", "tiny"))
    import_sources(root / "raw", root / "shards", resolve(ImportConfig, "import", "tiny"))
    return root / "shards"


@pytest.fixture(scope="session")
def init_model(world, tmp_path_factory) -> Path:
    from emu.model.config import EmuConfig
    from emu.train.config import Stage1Config
    from emu.train.stages import stage1

    out = tmp_path_factory.mktemp("stage1")
    config = resolve(Stage1Config, "stage1", "tiny", ["steps=2", "runtime.progress=false"])
    stage1(config, resolve(EmuConfig, "model", "tiny"), [world / "img2dataset", world / "webvid"], out)
    return out / "model"
