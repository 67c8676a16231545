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

#: (source name, import format, the SynthConfig count it writes, writer). The name is the subfolder.
SOURCES: tuple[tuple[str, str, str, Callable[[Path, SynthConfig], int]], ...] = (
    ("img2dataset", "img2dataset", "pairs", web_writers.write_img2dataset),
    ("grit", "grit", "grounded", web_writers.write_grit),
    ("webvid", "webvid", "videos", web_writers.write_webvid),
    ("ytsb", "ytsb", "storyboards", web_writers.write_ytsb),
    ("mmc4", "mmc4", "documents", doc_writers.write_mmc4),
    ("llava-chat", "llava", "chats", doc_writers.write_llava_chat),
    ("llava-edit", "llava", "edits", doc_writers.write_llava_edit),
    ("text", "text", "texts", doc_writers.write_text),
    ("vqav2", "vqav2", "vqa_images", doc_writers.write_vqav2),
    ("coco", "coco", "caption_images", doc_writers.write_coco),
    ("vqav2-train", "vqav2", "vqa_train_images", doc_writers.write_vqav2_train),
    ("coco-train", "coco", "caption_train_images", doc_writers.write_coco_train),
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
    """Write every source into `out_dir/<name>/` and `out_dir/sources.json` (written last).

    A source whose count is 0 is neither written nor listed: an empty folder is no valid source
    of its format (no shards, no CSV), so `emu data prepare` could not import it.
    """
    out_dir = Path(out_dir)
    if (out_dir / SOURCES_FILE).exists():
        raise DatasetError(f"{out_dir} already holds a synthetic world ({SOURCES_FILE}); choose an empty folder")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        # Leftovers of an interrupted run (e.g. a 00007.tar a smaller world does not rewrite)
        # would be listed in sources.json and imported with the new world.
        raise DatasetError(f"{out_dir} is not an empty folder; choose an empty or new folder")
    start = time.perf_counter()
    records: dict[str, int] = {}
    sources = []
    for name, fmt, count, write in SOURCES:
        if config.count(count) == 0:
            records[name] = 0
            continue
        target = out_dir / name
        target.mkdir(parents=True, exist_ok=True)
        records[name] = write(target, config)
        sources.append({"name": name, "format": fmt, "path": name, "records": records[name]})
        log.info("synth %s: %d records", name, records[name])
    save_resolved(config, "synth", out_dir / "synth.config.yaml")
    (out_dir / SOURCES_FILE).write_text(json.dumps(sources, indent=2), encoding="utf-8")
    return SynthSummary(out_dir=out_dir, records=records, seconds=time.perf_counter() - start)
