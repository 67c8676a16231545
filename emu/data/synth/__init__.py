"""`emu data synth`: the shapes world (emu.data.synth.world) written in the public formats.

Each source goes to its own subfolder in the layout its public tool writes (docs/formats.md), so
the importers are exercised exactly as with real data. `sources.json` lists the subfolders and
their formats; `emu data prepare` imports all of them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from emu.config import save_resolved
from emu.data.synth import doc_writers, web_writers
from emu.data.synth.config import SynthConfig, size_to_scale
from emu.errors import DatasetError

__all__ = ["SynthConfig", "SynthSummary", "generate", "size_to_scale", "SOURCES_FILE"]

log = logging.getLogger(__name__)
SOURCES_FILE = "sources.json"

#: (source name, import format, writer). The name is the subfolder.
SOURCES: tuple[tuple[str, str, Callable[[Path, SynthConfig], int]], ...] = (
    ("img2dataset", "img2dataset", web_writers.write_img2dataset),
    ("grit", "grit", web_writers.write_grit),
    ("webvid", "webvid", web_writers.write_webvid),
    ("ytsb", "ytsb", web_writers.write_ytsb),
    ("mmc4", "mmc4", doc_writers.write_mmc4),
    ("llava-chat", "llava", doc_writers.write_llava_chat),
    ("llava-edit", "llava", doc_writers.write_llava_edit),
    ("text", "text", doc_writers.write_text),
    ("vqav2", "vqav2", doc_writers.write_vqav2),
    ("coco", "coco", doc_writers.write_coco),
)


@dataclass(frozen=True)
class SynthSummary:
    out_dir: Path
    records: dict[str, int]
    seconds: float

    def describe(self) -> str:
        parts = ", ".join(f"{name}: {n}" for name, n in self.records.items())
        return f"wrote the shapes world to {self.out_dir} in {self.seconds:.1f} s ({parts})"


def generate(out_dir: Path, config: SynthConfig) -> SynthSummary:
    """Write every source into `out_dir/<name>/` and `out_dir/sources.json` (written last)."""
    out_dir = Path(out_dir)
    if (out_dir / SOURCES_FILE).exists():
        raise DatasetError(f"{out_dir} already holds a synthetic world ({SOURCES_FILE}); choose an empty folder")
    start = time.perf_counter()
    records: dict[str, int] = {}
    for name, fmt, write in SOURCES:
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        records[name] = write(target, config)
        log.info("synth %s: %d records", name, records[name])
    save_resolved(config, "synth", out_dir / "synth.config.yaml")
    sources = [{"name": name, "format": fmt, "path": name, "records": records[name]} for name, fmt, _ in SOURCES]
    (out_dir / SOURCES_FILE).write_text(json.dumps(sources, indent=2), encoding="utf-8")
    return SynthSummary(out_dir=out_dir, records=records, seconds=time.perf_counter() - start)
