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
from emu.errors import DatasetError, SourceError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImportSummary:
    out_dir: Path
    samples: int
    rejected: int
    shards: int
    rejects_by_rule: dict[str, int]


class TooFewKept(DatasetError):
    """The import kept nothing, or less than import.min_kept_fraction of the source's records."""


#: Rejects that are the source's own record of a failed download (img2dataset's parquet rows),
#: not records this import could have kept: the kept fraction leaves them out.
SOURCE_LOSSES = frozenset({"source_failed"})


def _check_kept(fmt: str, src: Path, out_dir: Path, kept: int, rejects: Counter[str], min_fraction: float) -> None:
    """Raise TooFewKept when the import kept nothing or too small a fraction (ImportConfig)."""
    considered = kept + sum(n for rule, n in rejects.items() if rule not in SOURCE_LOSSES)
    if kept and kept >= min_fraction * considered:
        return
    below = f" ({kept / considered:.1%}, below import.min_kept_fraction={min_fraction:g})" if kept else ""
    why = (f"rejected: {', '.join(f'{rule}: {n}' for rule, n in rejects.most_common(5))}; every reject is in "
           f"{out_dir / REJECTS_FILE} (source, key, rule, message)" if rejects else "the source holds no records")
    raise TooFewKept(f"{fmt} import of {src} kept {kept} of {considered} records{below}; {why}. "
                     f"No dataset was written")


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
    either in a shard or in rejects.jsonl, and dataset.json is written last; TooFewKept (no
    dataset.json, no shards, rejects.jsonl kept) when too few records were usable.
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
            _check_kept(fmt, src, out_dir, written, rule_counts, config.min_kept_fraction)
            save_resolved(config, "import", config_file)
            # dataset.json last: it is the commit point, so a crash before it never leaves a
            # dataset that looks finished but lacks its rejects or its config.
            # The source path stays out of dataset.json: the same data imported from another path
            # must give the same bytes (DVC and KFP caches key on content).
            index = writer.close(extra={"rejected": sum(rule_counts.values())})
        except TooFewKept:
            raise  # the writer removes its shards; rejects.jsonl stays: it is the reason
        except BaseException:
            for path in (rejects_tmp, out_dir / REJECTS_FILE, config_file):  # the writer removes its own
                path.unlink(missing_ok=True)
            raise
    summary = ImportSummary(out_dir=out_dir, samples=written, rejected=sum(rule_counts.values()),
                            shards=len(index["shards"]), rejects_by_rule=dict(rule_counts))
    log.info("imported %d samples into %d shards at %s; rejected %d %s", summary.samples,
             summary.shards, out_dir, summary.rejected, dict(rule_counts) if rule_counts else "")
    return summary
