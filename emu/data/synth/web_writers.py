"""Writers of the shapes world in web-crawl layouts: img2dataset, GRIT, WebVid, YT-Storyboard.

Each writes exactly the files its public tool writes (docs/formats.md), so the importers read
synthetic data the way they read real data. Output is deterministic: every record draws from its
own `sample_rng` stream, tar members carry fixed metadata (mtime 0, no owner), img2dataset's
timings are fixed at 0, and videos are encoded single-threaded (see `_write_mp4`). Same config,
same bytes, on any machine with the same library versions (PyAV/FFmpeg/x264, Pillow, pyarrow).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import random
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from emu.data.synth import world
from emu.data.synth.config import SynthConfig, sample_rng

#: img2dataset names shards with `oom_shard_count` = 5 digits (its default).
SHARD_DIGITS = 5
#: Frames per second of the synthetic WebVid videos: 16 frames (SynthConfig.video_frames) = 4 s.
VIDEO_FPS = 4
#: Seconds between storyboard frames (the maker's `frame_interval = round(duration / frame_num)`).
STORYBOARD_INTERVAL_S = 2
#: Columns img2dataset appends after the additional columns, with its parquet types (1.47.0).
IMG2DATASET_COLUMNS = pa.schema([
    ("caption", pa.string()), ("url", pa.string()), ("key", pa.string()), ("status", pa.string()),
    ("error_message", pa.string()), ("width", pa.int32()), ("height", pa.int32()),
    ("original_width", pa.int32()), ("original_height", pa.int32()), ("exif", pa.string()),
    ("sha256", pa.string()),
])
#: How much larger than the stored image the synthetic "downloads" are (img2dataset resizes them
#: down to --image_size); cycled by sample index, so originals come in several sizes.
DOWNLOAD_SCALES = (2, 3, 4)
_YOUTUBE_ID_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

#: Additional img2dataset columns of one sample: (scene, its random stream, index) -> {column: value}.
ExtraColumns = Callable[[world.Scene, random.Random, int], dict[str, Any]]


def write_img2dataset(out: Path, config: SynthConfig) -> int:
    """Image-text pairs as `img2dataset --output_format webdataset --save_additional_columns
    '["scene"]'` writes them; `scene` lists the drawn shapes so later stages know the truth."""
    return _write_img2dataset_shards(out, config, "pairs", "img2dataset", _scene_column)


def write_grit(out: Path, config: SynthConfig) -> int:
    """Grounded pairs as GRIT-20M's dataset-card img2dataset command writes them: the additional
    columns id, noun_chunks, ref_exps, clip_similarity_vitb32, clip_similarity_vitl14."""
    return _write_img2dataset_shards(out, config, "grounded", "grit", _grit_columns)


def write_webvid(out: Path, config: SynthConfig) -> int:
    """Moving-shape videos: one `results_synth.csv` (WebVid ships one CSV per split) and
    `videos/{page_dir}/{videoid}.mp4` (m-bain/webvid download.py layout), H.264 at VIDEO_FPS with
    `config.video_frames` frames each."""
    count = config.count("videos")
    # yuv420p halves chroma resolution, so H.264 needs even sides.
    size = config.image_size - config.image_size % 2
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results_synth.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["videoid", "contentUrl", "duration", "page_dir", "name"])
        for i in range(count):
            scenes, text, _ = world.motion(sample_rng(config, "webvid", i), size, config.video_frames)
            videoid, page_dir = str(1_000_000 + i), _page_dir(i)
            writer.writerow([videoid, f"https://example.com/webvid/{videoid}.mp4",
                             _iso_duration(math.ceil(config.video_frames / VIDEO_FPS)), page_dir, text])
            path = out / "videos" / page_dir / f"{videoid}.mp4"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_mp4(path, [world.render(s) for s in scenes])
    return count


def _page_dir(index: int) -> str:
    """WebVid's page_dir names a range of 50 result pages, e.g. `090501_090550`."""
    first = index // 50 * 50 + 1
    return f"{first:06d}_{first + 49:06d}"


def _iso_duration(seconds: int) -> str:
    """WebVid's zero-padded ISO-8601 duration, e.g. `PT00H00M04S`."""
    return f"PT{seconds // 3600:02d}H{seconds // 60 % 60:02d}M{seconds % 60:02d}S"


def write_ytsb(out: Path, config: SynthConfig) -> int:
    """Storyboards in the layout of Emu's maker script: `%07d.tar` shards of `{vid}.{i}.png`,
    `{vid}.{i}.txt` (what was said between frame i-1 and frame i), `{vid}.{N}.txt` (after the last
    frame) and `{vid}.final_meta.json`."""
    count = config.count("storyboards")
    for shard, indices in _shards(count, config.records_per_file):
        with _open_tar(out / f"{shard:07d}.tar") as tar:
            for i in indices:
                vid, members = _storyboard(config, i)
                _add_sample(tar, vid, members)
    return count


def _write_img2dataset_shards(out: Path, config: SynthConfig, count_name: str, stream: str,
                              extra_columns: ExtraColumns) -> int:
    count = config.count(count_name)
    # img2dataset's compute_key: shard id then the index in the shard, in
    # ceil(log10(number_sample_per_shard)) digits (4 with its default of 10000 per shard).
    index_digits = math.ceil(math.log10(config.records_per_file))
    for shard, indices in _shards(count, config.records_per_file):
        rows = []
        name = f"{shard:0{SHARD_DIGITS}d}"
        with _open_tar(out / f"{name}.tar") as tar:
            for i in indices:
                true_key = shard * 10 ** index_digits + i % config.records_per_file
                key = f"{true_key:0{SHARD_DIGITS + index_digits}d}"
                rng = sample_rng(config, stream, i)
                scene = world.sample_scene(rng, config.image_size, max_shapes=config.max_shapes)
                original, download, image = _download_and_resize(scene, i)
                row = {**extra_columns(scene, rng, i),
                       **_img2dataset_fields(scene, original, download, key, stream)}
                _add_sample(tar, key, {"jpg": image, "txt": row["caption"].encode("utf-8"),
                                       "json": json.dumps(row, indent=4).encode("utf-8")})
                rows.append(row)
        _write_parquet(out / f"{name}.parquet", rows)
        _write_stats(out / f"{name}_stats.json", len(rows))
    return count


def _download_and_resize(scene: world.Scene, index: int) -> tuple[world.Scene, bytes, bytes]:
    """(the "downloaded" scene, its JPEG, the stored JPEG) of one sample, as img2dataset makes them
    with its defaults: the download is the scene drawn DOWNLOAD_SCALES[i % 3] times larger; it is
    resized down to the scene's size (`--resize_mode border`: aspect kept, square scenes need no
    border; cv2.INTER_AREA, which PIL's box filter equals for whole-number factors) and
    re-encoded at quality 95, so the stored bytes never hash to the download's sha256."""
    original = replace(scene, size=scene.size * DOWNLOAD_SCALES[index % len(DOWNLOAD_SCALES)])
    downloaded = world.encode(world.render(original), "jpg")
    with Image.open(io.BytesIO(downloaded)) as decoded:
        resized = decoded.convert("RGB").resize((scene.size, scene.size), Image.Resampling.BOX)
    return original, downloaded, world.encode(resized, "jpg")


def _img2dataset_fields(scene: world.Scene, original: world.Scene, download: bytes, key: str,
                        stream: str) -> dict[str, Any]:
    """The fields img2dataset appends to every successful sample, in its order: the size after
    resizing, the original download's size, and the sha256 of the download (img2dataset hashes
    before it resizes)."""
    return {
        "caption": world.caption(scene),
        "url": f"https://example.com/{stream}/{key}.jpg",
        "key": key,
        "status": "success",
        "error_message": None,
        "width": scene.size,
        "height": scene.size,
        "original_width": original.size,
        "original_height": original.size,
        "exif": "{}",
        "sha256": hashlib.sha256(download).hexdigest(),
    }


def _scene_column(scene: world.Scene, rng: random.Random, index: int) -> dict[str, Any]:
    """The drawn shapes, so that evaluation can check generated answers against the truth."""
    return {"scene": [{"kind": s.kind, "color": s.color, "row": s.row, "col": s.col} for s in scene.shapes]}


def _grit_columns(scene: world.Scene, rng: random.Random, index: int) -> dict[str, Any]:
    """GRIT's entries `[start, end, x_min, y_min, x_max, y_max, score]`, all float64 as in GRIT-20M.
    A shape's noun chunk ("a red circle") and its referring expression ("a red circle at the top
    left") share one box and GLIP score, as GRIT copies a chunk's box to its expansion."""
    scores = [round(rng.uniform(0.3, 0.95), 4) for _ in scene.shapes]

    def entries(spans: list[tuple[int, int, tuple[float, float, float, float]]]) -> list[list[float]]:
        return [[float(start), float(end), *box, score] for (start, end, box), score in zip(spans, scores)]

    return {
        "id": index,
        "noun_chunks": entries(world.noun_chunks(scene)),
        "ref_exps": entries(world.referring_expressions(scene)),
        "clip_similarity_vitb32": round(rng.uniform(0.25, 0.4), 4),
        "clip_similarity_vitl14": round(rng.uniform(0.2, 0.35), 4),
    }


def _write_parquet(path: Path, rows: list[dict[str, Any]]) -> None:
    """The shard's parquet: additional columns first (types inferred, as img2dataset keeps the
    input's arrow types), then img2dataset's own columns with its types."""
    extra = [name for name in rows[0] if name not in IMG2DATASET_COLUMNS.names]
    columns = {name: pa.array([r[name] for r in rows]) for name in extra}
    columns.update({f.name: pa.array([r[f.name] for r in rows], type=f.type) for f in IMG2DATASET_COLUMNS})
    pq.write_table(pa.table(columns), path)


def _write_stats(path: Path, successes: int) -> None:
    """`{shard}_stats.json` as img2dataset's logger writes it; times fixed at 0 for reproducibility."""
    stats = {"count": successes, "successes": successes, "failed_to_download": 0, "failed_to_resize": 0,
             "duration": 0.0, "start_time": 0.0, "end_time": 0.0, "status_dict": {"success": successes}}
    path.write_text(json.dumps(stats, indent=4), encoding="utf-8")


def _storyboard(config: SynthConfig, index: int) -> tuple[str, dict[str, bytes]]:
    """One storyboard's members. The narration of frame i starts 1 s after it and is merged into
    the texts exactly as the maker script does (`_merge_timeline`)."""
    rng = sample_rng(config, "ytsb", index)
    vid = "".join(rng.choice(_YOUTUBE_ID_CHARS) for _ in range(11))
    scenes, text, narration = world.motion(rng, config.image_size, config.storyboard_frames)
    subtitles = [{"text": text[0].upper() + text[1:], "start": 0.0, "duration": 1.0}]
    for i, line in enumerate(narration):
        if i == 0 or line != narration[i - 1]:  # silence while the shape stays in its cell
            subtitles.append({"text": line + ".", "start": float(i * STORYBOARD_INTERVAL_S + 1), "duration": 1.0})
    frame_num = len(scenes)
    texts = _merge_timeline(frame_num, STORYBOARD_INTERVAL_S, subtitles)
    members = {f"{i}.png": world.encode(world.render(s), "png") for i, s in enumerate(scenes)}
    members.update({f"{i}.txt": t.encode("utf-8") for i, t in enumerate(texts)})
    cols = min(frame_num, 5)
    meta = {"id": vid,
            "sb": {"0": [config.image_size, config.image_size, cols, math.ceil(frame_num / cols), frame_num,
                         "image/webp"]},
            "subtitle": subtitles,
            "duration": frame_num * STORYBOARD_INTERVAL_S,
            "frame_num": frame_num}
    members["final_meta.json"] = json.dumps(meta).encode("utf-8")
    return vid, members


def _merge_timeline(frame_num: int, interval: int, subtitles: list[dict[str, Any]]) -> list[str]:
    """The maker script's merge: frame i at `i * interval`, subtitles at their start, sorted stably
    (a subtitle starting on a frame's time comes after it); each frame's text is what came since the
    previous frame, space-joined; a trailing text is kept only when non-empty."""
    timeline = [(i * interval, None) for i in range(frame_num)]
    timeline += [(s["start"], s["text"]) for s in subtitles]
    texts, pending = [], []
    for _, text in sorted(timeline, key=lambda item: item[0]):
        if text is None:
            texts.append(" ".join(pending))
            pending = []
        else:
            pending.append(text)
    return texts + ([" ".join(pending)] if pending else [])


def _write_mp4(path: Path, frames: list[Any]) -> None:
    """H.264 (libx264, as WebVid's previews) in yuv420p. One encoder thread: x264's output depends
    on its thread count, which defaults to the machine's cores, so fixing it makes the bytes the
    same on every machine (for one FFmpeg/x264 build; the mp4 names the muxer version)."""
    import av  # only the WebVid writer encodes video

    codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream(codec, rate=VIDEO_FPS)
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            # Lossless (qp 0): imported frames equal the rendered ones exactly, so the shards are
            # deterministic even where x264's bitstream is not (seen rarely across processes).
            stream.options = {"qp": "0", "x264-params": "threads=1:lookahead-threads=1:sliced-threads=0"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())


def _shards(count: int, per_file: int) -> Iterator[tuple[int, range]]:
    for shard, start in enumerate(range(0, count, per_file)):
        yield shard, range(start, min(start + per_file, count))


def _open_tar(path: Path) -> tarfile.TarFile:
    path.parent.mkdir(parents=True, exist_ok=True)
    return tarfile.open(path, "w", format=tarfile.USTAR_FORMAT)


def _add_sample(tar: tarfile.TarFile, key: str, members: dict[str, bytes]) -> None:
    """`{key}.{suffix}` members in sorted suffix order, as webdataset's TarWriter writes a sample,
    with fixed metadata so the tar's bytes depend on the contents only."""
    for suffix in sorted(members):
        info = tarfile.TarInfo(f"{key}.{suffix}")
        info.size = len(members[suffix])
        info.mtime = 0
        info.mode = 0o444
        tar.addfile(info, io.BytesIO(members[suffix]))
