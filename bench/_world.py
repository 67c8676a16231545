"""The data every benchmark here runs on: the tiny synthetic shapes world, written in the public
formats and imported as shards, under a folder the caller owns."""

from pathlib import Path

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.prepare import import_sources
from emu.data.synth import SynthConfig, generate

#: The stage-2 mixture: one dataset per data type.
MIXTURE = ("img2dataset", "webvid", "mmc4", "ytsb", "grit", "text")


def synthetic_mixture(root: Path) -> list[Path]:
    """Generate and import the tiny world under `root`; the datasets of MIXTURE."""
    generate(root / "raw", resolve(SynthConfig, "synth", "tiny"))
    import_sources(root / "raw", root / "shards", resolve(ImportConfig, "import", "tiny"))
    return [root / "shards" / name for name in MIXTURE]
