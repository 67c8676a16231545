"""YT-Storyboard-1B tars -> `video_text` samples (docs/formats.md, "YT-Storyboard").

The layout is what Emu's public maker script writes (baaivision/Emu
`data/yt-sb-1b/video_webdataset_maker_YT1b_sb.py`): per video `{vid}.{i}.txt` and `{vid}.{i}.png`
for every frame i (the txt holds the subtitles spoken after frame i-1 and before frame i, often
empty), an optional trailing `{vid}.{N}.txt`, and `{vid}.final_meta.json`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats.img2dataset import find_tars, source_of
from emu.data.reject import Reject
from emu.data.schema import VideoText
from emu.data.shards import RawSample, SampleProblem, iter_raw_samples, sanitize_key

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

META_MEMBER = "final_meta.json"
#: `{i}.png` / `{i}.txt` with i written as the maker writes it (no leading zeros).
_INDEXED = re.compile(r"^(0|[1-9][0-9]*)\.(png|txt)$")


@dataclass
class Options:
    """YT-Storyboard has no settings: frames and subtitles are taken as the maker script wrote them."""


def read(src: Path, config: ImportConfig) -> Iterator[VideoText | Reject]:
    """Yield one VideoText per video of every `*.tar` in `src`, or a Reject naming the rule."""

    for tar in find_tars(src, "YT-Storyboard shards"):
        for raw in iter_raw_samples(tar, check_keys=False):
            source = source_of(src, tar, raw.key)
            key = sanitize_key(raw.key) if raw.key else ""
            try:
                yield _sample(raw, key, source)
            except SampleProblem as exc:
                yield Reject(source, key, exc.problem.rule, exc.problem.message)


def _sample(raw: RawSample, key: str, source: str) -> VideoText:
    if raw.problems:
        raise SampleProblem(raw.problems[0].rule, raw.problems[0].message)
    meta = _final_meta(raw)
    frames, texts = _indexed_members(raw)
    n = len(frames)
    _check_indices(raw.key, frames, texts, meta["frame_num"])
    return VideoText(key=key, images=[frames[i] for i in range(n)], source=source, meta=meta,
                     subtitles=[_text(raw.key, i, texts[i]) for i in range(n)],
                     trailing_text=_text(raw.key, n, texts[n]) if n in texts else "")


def _check_indices(key: str, frames: dict[int, bytes], texts: dict[int, bytes], frame_num: int) -> None:
    """Frames 0..N-1 without a gap, N == frame_num, a text for every frame and at most a trailing
    `{N}.txt` after them, as the maker script writes them."""
    n = len(frames)
    # With n frames and a gap, some index below n is missing; the indices come from member names,
    # so they are never used to size anything (`{vid}.99999999999.png` must not allocate).
    missing = [i for i in range(n) if i not in frames]
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (f" and {len(missing) - 10} more" if len(missing) > 10 else "")
        raise SampleProblem("frame_missing", f"frame(s) {shown} missing before frame {max(frames)}")
    if frame_num != n:
        raise SampleProblem("frame_count_mismatch",
                            f"{META_MEMBER} frame_num is {frame_num}, the tar holds {n} frames")
    no_text = [i for i in range(n) if i not in texts]
    if no_text:
        # The maker writes `{i}.txt` for every frame, empty when nothing was said.
        raise SampleProblem("subtitle_missing", f"frame {no_text[0]} has no {key}.{no_text[0]}.txt")
    beyond = sorted(i for i in texts if i > n)
    if beyond:
        raise SampleProblem("member_unexpected",
                            f"{key}.{beyond[0]}.txt comes after the trailing text {key}.{n}.txt")


def _final_meta(raw: RawSample) -> dict[str, Any]:
    """final_meta.json (id, sb, subtitle, duration, frame_num), kept whole as the sample's meta."""
    if META_MEMBER not in raw.members:
        raise SampleProblem("record_missing", f"no {raw.key}.{META_MEMBER} member")
    try:
        meta = json.loads(raw.members[META_MEMBER].decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise SampleProblem("record_not_utf8", f"{raw.key}.{META_MEMBER} is not UTF-8: {exc}") from None
    except json.JSONDecodeError as exc:
        raise SampleProblem("record_not_json", f"{raw.key}.{META_MEMBER} is not JSON: {exc}") from None
    if not isinstance(meta, dict):
        raise SampleProblem("record_invalid", f"{raw.key}.{META_MEMBER} must hold an object")
    frame_num = meta.get("frame_num")
    if isinstance(frame_num, bool) or not isinstance(frame_num, int):
        raise SampleProblem("record_invalid",
                            f"{raw.key}.{META_MEMBER} frame_num must be an integer, got {frame_num!r}")
    return meta


def _indexed_members(raw: RawSample) -> tuple[dict[int, bytes], dict[int, bytes]]:
    """Frames and texts by index. Members the maker never writes are refused, not dropped."""
    frames: dict[int, bytes] = {}
    texts: dict[int, bytes] = {}
    for suffix, data in raw.members.items():
        if suffix == META_MEMBER:
            continue
        match = _INDEXED.match(suffix)
        if match is None:
            raise SampleProblem("member_unexpected", f"{raw.key}.{suffix} is not a YT-Storyboard member "
                                                     "({i}.png, {i}.txt, final_meta.json)")
        index = int(match.group(1))
        (frames if match.group(2) == "png" else texts)[index] = data
    return frames, texts


def _text(key: str, index: int, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleProblem("text_not_utf8", f"{key}.{index}.txt is not UTF-8: {exc}") from None
