"""WebVid CSV + downloaded mp4 files -> video `pair` samples (docs/formats.md, "WebVid").

The CSV is WebVid's `videoid,contentUrl,duration,page_dir,name`; m-bain/webvid's download.py puts
each video at `videos/{page_dir}/{videoid}.mp4`. Each video is decoded with PyAV and
`num_frames` frames are kept, sampled uniformly, as PNG (or JPEG) images in time order.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from emu.data.formats.img2dataset import source_of
from emu.data.images import DEFAULT_MAX_PIXELS
from emu.data.reject import Reject
from emu.data.schema import Pair
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import ConfigError, SourceError

if TYPE_CHECKING:
    from PIL import Image

    from emu.data.formats import ImportConfig

log = logging.getLogger(__name__)

COLUMNS = ("videoid", "contentUrl", "duration", "page_dir", "name")
FRAME_FORMATS = ("png", "jpg")
#: ISO-8601 durations as WebVid writes them (`PT00H00M10S`); the pattern consumers use
#: (m-bain/webvid issue #16), anchored, with optional fractional seconds.
DURATION = re.compile(r"^PT(?:(\d+)H)?(?:(\d+)M)?(?:(\d+(?:\.\d+)?)S)?$")


@dataclass
class Options:
    """Settings of the WebVid importer (`import.webvid.*`)."""

    # Frames kept per video: the middle frame of each of num_frames equal segments (Emu2 App. B.1: 8).
    num_frames: int = 8
    # How kept frames are stored: png (lossless from the decoded video) or jpg (quality 95).
    frame_format: str = "png"
    # Folder of the downloaded videos, relative to SRC unless absolute (download.py: `videos`).
    videos_dir: str = "videos"
    # Seconds the CSV's duration may differ from the decoded video's before the row is rejected
    # (`duration_mismatch`): WebVid writes whole seconds, so a correct row is off by up to 1 s.
    duration_tolerance_s: float = 1.0

    def __post_init__(self) -> None:
        if self.num_frames < 1:
            raise ConfigError(f"import.webvid.num_frames must be >= 1, got {self.num_frames}")
        if self.frame_format not in FRAME_FORMATS:
            raise ConfigError(f"import.webvid.frame_format must be one of {', '.join(FRAME_FORMATS)}, "
                              f"got {self.frame_format!r}")
        if not self.videos_dir:
            raise ConfigError("import.webvid.videos_dir must not be empty (use '.' for SRC itself)")
        if not self.duration_tolerance_s >= 0:  # also refuses NaN
            raise ConfigError(f"import.webvid.duration_tolerance_s must be >= 0 seconds, got {self.duration_tolerance_s}")


def read(src: Path, config: ImportConfig) -> Iterator[Pair | Reject]:
    """Yield one video Pair per CSV row, or a Reject naming the row and the broken rule."""
    options = config.webvid
    csvs = _find_csvs(src)
    videos = src / options.videos_dir  # an absolute videos_dir replaces src
    if not videos.is_dir():
        raise SourceError(f"no videos folder {videos} (download.py writes SRC/videos; "
                          "set import.webvid.videos_dir)")
    for path in csvs:
        for line, row in _rows(src, path):
            source = source_of(src, path, str(line))
            key = sanitize_key(row["videoid"] or "")
            try:
                yield _sample(row, key, source, videos, options, config.max_image_pixels)
            except SampleProblem as exc:
                yield Reject(source, key, exc.problem.rule, exc.problem.message)


def _find_csvs(src: Path) -> list[Path]:
    if not src.is_dir():
        raise SourceError(f"source {src} must be a folder holding WebVid CSV files (*.csv)")
    csvs = sorted(src.glob("*.csv"))
    if not csvs:
        raise SourceError(f"source {src} holds no WebVid CSV files (*.csv)")
    return csvs


def _rows(src: Path, path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) of one CSV, streamed; the line is where the row starts."""
    name = source_of(src, path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise SourceError(f"{name} lacks the WebVid column(s) {', '.join(missing)}; "
                                  f"expected the header {','.join(COLUMNS)}")
            line = reader.line_num + 1
            for row in reader:
                yield line, row
                line = reader.line_num + 1
    except UnicodeDecodeError as exc:
        raise SourceError(f"{name} is not UTF-8: {exc}") from None
    except csv.Error as exc:
        raise SourceError(f"{name} is not a readable CSV: {exc}") from None


def _sample(row: dict[str, Any], key: str, source: str, videos: Path, options: Options,
            max_pixels: int = DEFAULT_MAX_PIXELS) -> Pair:
    duration_s = _duration_seconds(row["duration"])
    path = _video_path(videos, row["page_dir"] or "", row["videoid"] or "")
    frames, indices, total, decoded_s = decode_frames(path, options.num_frames, options.frame_format, max_pixels)
    if decoded_s is not None and abs(decoded_s - duration_s) > options.duration_tolerance_s:
        raise SampleProblem("duration_mismatch",
                            f"the CSV says {row['duration']} ({duration_s:g} s) but {path.name} lasts {decoded_s:.2f} s "
                            f"(more than import.webvid.duration_tolerance_s={options.duration_tolerance_s:g} apart)")
    meta = {"videoid": row["videoid"], "contentUrl": row["contentUrl"], "page_dir": row["page_dir"],
            "duration": row["duration"], "duration_s": duration_s, "video_frames": total,
            "frame_indices": indices}
    return Pair(key=key, images=frames, text=row["name"] or "", media="video", source=source, meta=meta)


def _duration_seconds(text: Any) -> float:
    match = DURATION.match(text or "")
    if match is None or not any(match.groups()):
        raise SampleProblem("duration_invalid", f"duration {text!r} is not an ISO-8601 duration like PT00H00M10S")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def _video_path(videos: Path, page_dir: str, videoid: str) -> Path:
    """`videos/{page_dir}/{videoid}.mp4` (download.py), else `videos/{videoid}.mp4`. CSV values
    are names, not paths: one that could point outside the videos folder is refused."""
    for part in (page_dir, videoid):
        if part in (".", "..") or "/" in part or "\\" in part:
            raise SampleProblem("video_missing", f"page_dir {page_dir!r} / videoid {videoid!r} is not a plain "
                                                 "name; videos are only looked up inside the videos folder")
    candidates = [videos / page_dir / f"{videoid}.mp4", videos / f"{videoid}.mp4"]
    for path in candidates:
        if path.is_file():
            return path
    raise SampleProblem("video_missing", f"no video at {candidates[0]} or {candidates[1]}")


def sample_indices(total: int, num_frames: int) -> list[int]:
    """The middle frame of each of `num_frames` equal segments of `total` frames (docs/formats.md).
    A video shorter than `num_frames` repeats frames, so every sample has the same frame count."""
    return [(2 * i + 1) * total // (2 * num_frames) for i in range(num_frames)]


def decode_frames(path: Path, num_frames: int, frame_format: str,
                  max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[list[bytes], list[int], int, float | None]:
    """Decode `path` once, front to back, keeping only the sampled frames.

    Returns (encoded frames in time order, their indices, the video's frame count, its duration
    in seconds, None when the container states none). Raises
    SampleProblem("video_undecodable") for anything PyAV cannot read, and
    SampleProblem("image_decompression_bomb") for a declared frame size above `max_pixels`,
    checked before any frame is decoded.
    """
    import av  # PyAV is only needed by this importer

    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise SampleProblem("video_undecodable", f"{path.name} has no video stream")
            stream = container.streams.video[0]
            width, height = stream.codec_context.width, stream.codec_context.height
            if width * height > max_pixels:
                raise SampleProblem("image_decompression_bomb",
                                    f"{path.name} declares {width}x{height} frames, above the limit of "
                                    f"{max_pixels} pixels")
            # mp4 stores the frame count in its sample table; other containers may not.
            total = stream.frames or _count_frames(path)
            if total < 1:
                raise SampleProblem("video_undecodable", f"{path.name} holds no video frames")
            seconds = _duration_of(container, stream)
            indices = sample_indices(total, num_frames)
            wanted = {i: None for i in indices}
            for index, frame in enumerate(container.decode(stream)):
                if index in wanted:
                    wanted[index] = _encode(frame.to_image(), frame_format)
                if index >= indices[-1]:
                    break
    except av.FFmpegError as exc:
        raise SampleProblem("video_undecodable", f"{path.name}: {exc}") from None
    missing = [i for i, data in wanted.items() if data is None]
    if missing:
        raise SampleProblem("video_undecodable",
                            f"{path.name} declares {total} frames but frame {missing[0]} could not be decoded")
    return [wanted[i] for i in indices], indices, total, seconds


def _duration_of(container, stream) -> float | None:
    """The video stream's duration as its container states it, else the container's."""
    import av

    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return None


def _count_frames(path: Path) -> int:
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def _encode(image: Image.Image, frame_format: str) -> bytes:
    out = io.BytesIO()
    if frame_format == "png":
        image.save(out, format="PNG")
    else:
        image.save(out, format="JPEG", quality=95)
    return out.getvalue()
