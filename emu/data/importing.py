"""Running an importer: source records in, checked samples into shards, unusable ones into rejects.jsonl.

Each format module (emu.data.formats.*) only knows its public layout: it yields Samples, or
Rejects for records it cannot turn into a sample. This module applies the checks every sample must
pass to be usable at all (images decode, texts are non-empty valid Unicode, keys valid and unique),
writes shards through ShardWriter, and records every reject with source file, key, rule, message.
Policy checks (minimum resolution, length bounds, box ranges) are the validation gate's job.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from emu.config import save_resolved
from emu.data.formats import IMPORTERS, ImportConfig
from emu.data.images import ImageProblem, inspect_image
from emu.data.reject import Reject
from emu.data.schema import KINDS_NEEDING_IMAGES, Sample
from emu.data.shards import REJECTS_FILE, SampleProblem, ShardWriter
from emu.errors import SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSummary:
    out_dir: Path
    samples: int
    rejected: int
    shards: int
    rejects_by_rule: dict[str, int]


def check_usable(sample: Sample, max_pixels: int) -> None:
    """Raise SampleProblem if the sample cannot be used by any stage."""
    if not sample.images and sample.kind in KINDS_NEEDING_IMAGES:
        raise SampleProblem("image_missing", f"a {sample.kind} sample needs at least one image")
    for i, data in enumerate(sample.images):
        try:
            inspect_image(data, max_pixels=max_pixels, decode=True)
        except ImageProblem as exc:
            raise SampleProblem(exc.rule, f"image {i}: {exc.message}") from None
    for text in sample.texts():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SampleProblem("text_not_utf8", f"text is not valid Unicode: {exc}") from None
        if not text.strip():
            raise SampleProblem("text_empty", "text is empty or only whitespace")


def run_import(fmt: str, src: Path, out_dir: Path, config: ImportConfig) -> ImportSummary:
    """Import `src` (in public format `fmt`) into a shard dataset at `out_dir`.

    Raises SourceError when the source cannot be read at all. Otherwise every record ends up
    either in a shard or in rejects.jsonl, and dataset.json is written last.
    """
    if fmt not in IMPORTERS:
        raise SourceError(f"unknown format {fmt!r}; known formats: {', '.join(IMPORTERS)}")
    src = Path(src)
    if not src.exists():
        raise SourceError(f"source {src} does not exist")
    out_dir = Path(out_dir)
    read = IMPORTERS[fmt]
    rejects_tmp = out_dir / (REJECTS_FILE + ".tmp")
    rule_counts: Counter[str] = Counter()
    written = 0
    config_file = out_dir / "import.config.yaml"
    with ShardWriter(out_dir, source_format=fmt, samples_per_shard=config.samples_per_shard,
                     max_shard_bytes=config.max_shard_bytes,
                     max_image_pixels=config.max_image_pixels) as writer:
        try:
            # backslashreplace: a lone surrogate (a non-UTF-8 file name, a bad JSON string) is
            # written as its JSON escape \udcff instead of failing the whole import.
            with open(rejects_tmp, "w", encoding="utf-8", errors="backslashreplace") as rejects:
                def reject(item: Reject) -> None:
                    rule_counts[item.rule] += 1
                    rejects.write(json.dumps(item.__dict__, ensure_ascii=False) + "\n")

                for item in read(src, config):
                    if isinstance(item, Reject):
                        reject(item)
                        continue
                    try:
                        check_usable(item, config.max_image_pixels)
                        writer.write(item)
                        written += 1
                    except SampleProblem as exc:
                        reject(Reject(item.source, item.key, exc.problem.rule, exc.problem.message))
            os.replace(rejects_tmp, out_dir / REJECTS_FILE)
            save_resolved(config, "import", config_file)
            # dataset.json last: it is the commit point, so a crash before it never leaves a
            # dataset that looks finished but lacks its rejects or its config.
            # The source path stays out of dataset.json: the same data imported from another path
            # must give the same bytes (DVC and KFP caches key on content).
            index = writer.close(extra={"rejected": sum(rule_counts.values())})
        except BaseException:
            for path in (rejects_tmp, out_dir / REJECTS_FILE, config_file):  # the writer removes its own
                path.unlink(missing_ok=True)
            raise
    summary = ImportSummary(out_dir=out_dir, samples=written, rejected=sum(rule_counts.values()),
                            shards=len(index["shards"]), rejects_by_rule=dict(rule_counts))
    log.info("imported %d samples into %d shards at %s; rejected %d %s", summary.samples,
             summary.shards, out_dir, summary.rejected, dict(rule_counts) if rule_counts else "")
    return summary
