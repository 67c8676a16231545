"""Checks that run before a stage trains, so a wrong setting fails in seconds, not after hours.

The manifests tell how many images and frames each sample has, hence how many positions its
visual tokens take at the stage's pooling (an Emu2-Chat image is 258 positions with its markers).
A sample whose visual tokens alone exceed `sequence.max_len` can never fit a row; with
`sequence.too_long=error` that stops the stage before the first step, naming samples, and with
`skip` the count is logged. Text length is only known after tokenising; a sequence whose text
makes it too long is handled by the same setting when it is built (emu.data.sequence).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.parquet as pq

from emu.data.datatypes import data_type
from emu.errors import ConfigError
from emu.train.data import discover

log = logging.getLogger(__name__)

#: Kinds split at segment boundaries when long: only a single image block must fit a row.
SPLITTABLE = ("interleaved",)


def visual_positions(kind: str, n_images: int, n_frames: int, image_tokens: int, frame_tokens: int) -> int:
    """Positions taken by a sample's visual blocks plus `<s>` and `</s>`."""
    if n_frames:  # a video: [VIDEO] then [IMG] + tokens + [/IMG] per frame
        return 2 + 1 + n_frames * (frame_tokens + 2)
    if kind in SPLITTABLE:
        return 2 + (image_tokens + 2 if n_images else 0)
    return 2 + n_images * (image_tokens + 2)


def check_visual_budget(stage: str, data: list[Path], batch_sizes: dict[str, int], max_len: int,
                        image_tokens: int, frame_tokens: int, too_long: str, max_frames: int | None = None) -> int:
    """Raise ConfigError (too_long=error) if any sample of a used data type cannot fit max_len for
    its visual tokens alone; return how many such samples there are. `max_frames`: frames kept
    per video (stage 1 samples `video_frames` of them)."""
    used = {t for t, n in batch_sizes.items() if n > 0}
    offenders: list[str] = []
    count = 0
    for refs in discover(data).values():
        for ref in refs:
            for shard in ref.shards:
                table = pq.read_table(shard.manifest, columns=["key", "kind", "n_images", "n_frames"]).to_pylist()
                for row in table:
                    if data_type(row["kind"], bool(row["n_frames"])) not in used:
                        continue
                    frames = row["n_frames"] or 0
                    if max_frames is not None:
                        frames = min(frames, max_frames)
                    need = visual_positions(row["kind"], row["n_images"] or 0, frames, image_tokens, frame_tokens)
                    if need > max_len:
                        count += 1
                        if len(offenders) < 5:
                            offenders.append(f"{shard.path.name}:{row['key']} ({need} positions)")
    if count and too_long == "error":
        raise ConfigError(f"{stage}: {count} samples need more than {stage}.sequence.max_len={max_len} positions "
                          f"for their images alone, e.g. {', '.join(offenders)}; raise {stage}.sequence.max_len, "
                          f"pool images to fewer tokens, or set {stage}.sequence.too_long=skip")
    if count:
        log.warning("%s: %d samples cannot fit sequence.max_len=%d and will be skipped", stage, count, max_len)
    return count
