"""GRIT-20M -> `grounded` samples (docs/formats.md, "GRIT").

GRIT is downloaded with img2dataset (its dataset card's command saves the additional columns
id, noun_chunks, ref_exps, clip_similarity_vitb32, clip_similarity_vitl14), so the shards are read
by emu.data.formats.img2dataset and only the box columns are interpreted here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats import img2dataset
from emu.data.reject import Reject
from emu.data.schema import Box, Grounded, Phrase
from emu.data.shards import SampleProblem
from emu.errors import ConfigError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

#: The two box columns of the GRIT dataset card: noun chunks and their referring expressions.
BOX_COLUMNS = ("noun_chunks", "ref_exps")


@dataclass
class Options:
    """Settings of the GRIT importer (`import.grit.*`)."""

    # Entries whose GLIP score is below this are dropped and counted in meta["dropped_boxes"].
    # 0.0 keeps everything; Kosmos-2 trains with 0.65 (unilm kosmos-2 `--box-score-threshold`).
    min_box_score: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.min_box_score <= 1.0:  # also false for NaN
            raise ConfigError(f"import.grit.min_box_score must be in [0, 1], got {self.min_box_score}")


def read(src: Path, config: ImportConfig) -> Iterator[Grounded | Reject]:
    """Yield one `Grounded` sample per downloaded GRIT image, or a Reject naming the broken rule."""

    for item in img2dataset.iter_records(src, config):
        if not isinstance(item, img2dataset.Record):
            yield item
            continue
        try:
            yield _grounded(item, config.grit.min_box_score)
        except SampleProblem as exc:
            yield Reject(item.source, item.key, exc.problem.rule, exc.problem.message)


def _grounded(record: img2dataset.Record, min_score: float) -> Grounded:
    meta = dict(record.meta)
    kept: dict[str, list[Phrase]] = {}
    dropped = 0
    for column in BOX_COLUMNS:
        phrases = _phrases(column, meta.pop(column, None))
        kept[column] = [p for p in phrases if p.score >= min_score]
        dropped += len(phrases) - len(kept[column])
    meta["dropped_boxes"] = dropped
    return Grounded(key=record.key, images=[record.image], text=record.caption, source=record.source,
                    meta=meta, phrases=kept["noun_chunks"], referring_expressions=kept["ref_exps"])


def _phrases(column: str, entries: Any) -> list[Phrase]:
    if not isinstance(entries, list):
        raise SampleProblem("box_malformed", f"{column} must be a list of entries, got {entries!r}")
    return [_phrase(f"{column}[{i}]", entry) for i, entry in enumerate(entries)]


def _phrase(where: str, entry: Any) -> Phrase:
    """`[start_char, end_char, x_min, y_min, x_max, y_max, score]`; GRIT stores all seven as
    float64, so whole-number offsets such as 19.0 are valid. Out-of-range spans and boxes are kept:
    the validation gate reports them."""
    if not isinstance(entry, list) or len(entry) != 7 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in entry):
        raise SampleProblem("box_malformed",
                            f"{where} must be 7 numbers [start, end, x_min, y_min, x_max, y_max, score], got {entry!r}")
    start, end, x_min, y_min, x_max, y_max, score = entry
    if not all(math.isfinite(v) and v == int(v) for v in (start, end)):
        raise SampleProblem("box_malformed",
                            f"{where} character offsets must be whole numbers, got {start!r}, {end!r}")
    if not all(math.isfinite(v) for v in (x_min, y_min, x_max, y_max, score)):
        raise SampleProblem("box_not_finite",
                            f"{where} holds a non-finite box coordinate or score: {entry!r}")
    return Phrase(start=int(start), end=int(end), score=float(score),
                  boxes=(Box(float(x_min), float(y_min), float(x_max), float(y_max)),))
