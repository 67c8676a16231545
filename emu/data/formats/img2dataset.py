"""img2dataset webdataset output -> `pair` samples (docs/formats.md, "img2dataset").

`img2dataset --output_format webdataset` (checked against img2dataset 1.47.0) writes per shard
`NNNNN.tar` ({key}.jpg|png|webp, {key}.txt, {key}.json), `NNNNN.parquet` (one row per input row,
failed downloads included) and `NNNNN_stats.json`. GRIT-20M is this same layout with extra
columns, so `iter_records` is shared with emu.data.formats.grit.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from emu.data.formats import webdataset
from emu.data.images import ImageProblem, inspect_image
from emu.data.reject import Reject
from emu.data.schema import Pair
from emu.data.shards import RawSample, SampleProblem, iter_raw_samples, sanitize_key
from emu.errors import SourceError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

log = logging.getLogger(__name__)

#: Image members img2dataset writes (its `encode_format`), in the order we look for them.
IMAGE_EXTENSIONS = ("jpg", "png", "webp")
#: The hash field is named after img2dataset's `compute_hash` (sha256 by default; older versions wrote md5).
HASH_FIELDS = {"sha256": hashlib.sha256, "sha512": hashlib.sha512, "md5": hashlib.md5}
#: Fields img2dataset itself appends to each sample json; every other field is an additional column.
OWN_FIELDS = frozenset({"caption", "url", "key", "status", "error_message", "width", "height",
                        "original_width", "original_height", "exif", *HASH_FIELDS})
#: What `meta` keeps of img2dataset's own fields (docs/formats.md); additional columns are kept too.
META_FIELDS = ("url", "original_width", "original_height", *HASH_FIELDS)
#: Parquet rows are streamed in batches of this many rows, so a shard's table is never held whole.
PARQUET_BATCH_ROWS = 4096


@dataclass
class Options:
    """Settings of `--format img2dataset` (the `import.img2dataset` group)."""

    #: Compare the json's sha256 (md5, sha512) with the stored image. img2dataset hashes the
    #: original download, before it resizes and re-encodes (its default `--resize_mode border`
    #: at 256 px re-encodes every image), so by default the hash is kept in meta and not compared.
    #: Set true for output written with `--resize_mode no --skip_reencode True`, whose stored
    #: bytes are the download's: then a differing hash is an `image_hash_mismatch`.
    verify_hash: bool = False


@dataclass
class Record:
    """One downloaded sample of an img2dataset shard, checked against its own json."""

    source: str               # "<tar relative to SRC>:<member key>"
    key: str                  # sanitised member key
    image: bytes
    caption: str
    meta: dict[str, Any]      # META_FIELDS present in the json, plus every additional column


def read(src: Path, config: ImportConfig) -> Iterator[Pair | Reject]:
    """Yield one image-text `Pair` per downloaded sample, and a Reject per failed row or bad sample."""
    for item in iter_records(src, config):
        if isinstance(item, Record):
            yield Pair(key=item.key, images=[item.image], text=item.caption, source=item.source,
                       meta=item.meta)
        else:
            yield item


def iter_records(src: Path, config: ImportConfig) -> Iterator[Record | Reject]:
    """Stream the samples of every shard of an img2dataset output folder, shard by shard.

    Raises SourceError when `src` is not a folder of img2dataset shards or a shard's parquet
    cannot be read; every per-sample problem becomes a Reject.
    """
    tars = find_tars(src, "img2dataset shards")
    for tar in tars:  # before anything is imported, so an unreadable parquet stops the import at once
        _check_parquet(src, tar.with_suffix(".parquet"))
    for tar in tars:
        found = yield from _tar_records(src, tar, config)
        yield from _failed_rows(src, tar.with_suffix(".parquet"))
        _check_stats(src, tar, found)


def find_tars(src: Path, what: str) -> list[Path]:
    """The `*.tar` files directly in `src`, in name order; SourceError when there are none."""
    if not src.is_dir():
        raise SourceError(f"source {src} must be a folder of {what} (*.tar)")
    tars = sorted(src.glob("*.tar"))
    if not tars:
        raise SourceError(f"source {src} holds no {what} (*.tar)")
    return tars


def source_of(src: Path, path: Path, position: str = "") -> str:
    """`<file relative to SRC>[:<line or member key>]`, as every Sample and Reject names its origin."""
    relative = path.relative_to(src).as_posix()
    return f"{relative}:{position}" if position else relative


def _tar_records(src: Path, tar: Path, config: ImportConfig) -> Iterator[Record | Reject]:
    """Records and rejects of one tar; returns how many samples the tar held (for _stats.json)."""

    found = 0
    for raw in iter_raw_samples(tar, check_keys=False):
        if raw.key:  # a file that is not a tar at all yields one keyless problem
            found += 1
        source = source_of(src, tar, raw.key)
        key = sanitize_key(raw.key) if raw.key else ""
        try:
            yield _record(raw, source, key, config)
        except SampleProblem as exc:
            yield Reject(source, key, exc.problem.rule, exc.problem.message)
    return found


def _record(raw: RawSample, source: str, key: str, config: ImportConfig) -> Record:
    if raw.problems:
        raise SampleProblem(raw.problems[0].rule, raw.problems[0].message)
    fields = webdataset.json_member(raw, required=True)
    webdataset.check_key(raw, fields)
    image = webdataset.image_member(raw, IMAGE_EXTENSIONS)
    try:
        # header only; the runner decodes
        info = inspect_image(image, max_pixels=config.max_image_pixels, decode=False)
    except ImageProblem as exc:
        raise SampleProblem(exc.rule, exc.message) from None
    if config.img2dataset.verify_hash:
        _check_hash(fields, image)
    _check_size(fields, info.width, info.height)
    meta = {name: value for name, value in fields.items() if name not in OWN_FIELDS}
    meta.update({name: fields[name] for name in META_FIELDS if name in fields})
    return Record(source=source, key=key, image=image, caption=_caption(raw, fields), meta=meta)


def _caption(raw: RawSample, fields: dict[str, Any]) -> str:
    """The `.txt` member (img2dataset writes it with --caption_col), else the json `caption`."""
    if "txt" in raw.members:
        try:
            return raw.members["txt"].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SampleProblem("text_not_utf8", f"{raw.key}.txt is not UTF-8: {exc}") from None
    caption = fields.get("caption")
    if not isinstance(caption, str):
        raise SampleProblem("text_empty", f"no {raw.key}.txt member and no caption in {raw.key}.json")
    return caption


def _check_hash(fields: dict[str, Any], image: bytes) -> None:
    for name, algorithm in HASH_FIELDS.items():
        expected = fields.get(name)
        if expected is None:
            continue
        actual = algorithm(image).hexdigest()
        if expected != actual:
            raise SampleProblem("image_hash_mismatch",
                                f"json {name} {expected!r} differs from the {name} of the image bytes {actual}")


def _check_size(fields: dict[str, Any], width: int, height: int) -> None:
    for name in ("width", "height"):
        value = fields.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value <= 0 or value != int(value):
            raise SampleProblem("size_invalid", f"json {name} must be a positive whole number, got {value!r}")
    if (fields["width"], fields["height"]) != (width, height):
        raise SampleProblem("size_mismatch",
                            f"json says {fields['width']}x{fields['height']}, the image is {width}x{height}")


def _check_parquet(src: Path, path: Path) -> None:
    """Raise SourceError unless a shard's parquet has a readable footer with img2dataset's key and
    status columns. A missing parquet only loses the failure rows: that is logged."""
    if not path.exists():
        log.warning("%s: no %s next to the tar; download failures of this shard are not reported",
                    source_of(src, path.with_suffix(".tar")), path.name)
        return
    try:
        with pq.ParquetFile(path) as parquet:
            names = set(parquet.schema_arrow.names)
    except (OSError, ValueError, pa.ArrowException) as exc:  # a corrupt footer can raise UnicodeDecodeError
        raise SourceError(f"{source_of(src, path)} is not a readable parquet file: {exc}") from None
    missing = {"key", "status"} - names
    if missing:
        raise SourceError(f"{source_of(src, path)} lacks the img2dataset column(s) {', '.join(sorted(missing))}")


def _failed_rows(src: Path, path: Path) -> Iterator[Reject]:
    """One `source_failed` Reject per parquet row img2dataset could not download or resize, read in
    batches of a few columns."""

    if not path.exists():
        return
    try:
        with pq.ParquetFile(path) as parquet:
            columns = [c for c in ("key", "status", "error_message", "url") if c in parquet.schema_arrow.names]
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
                for row in batch.to_pylist():
                    if row["status"] != "success":
                        key = str(row["key"])
                        yield Reject(source_of(src, path, key), sanitize_key(key), "source_failed",
                                     f"img2dataset status {row['status']!r} for {row.get('url')!r}: "
                                     f"{row.get('error_message')}")
    except (OSError, ValueError, pa.ArrowException) as exc:  # a corrupt footer can raise UnicodeDecodeError
        raise SourceError(f"{source_of(src, path)} cannot be read: {exc}") from None


def _check_stats(src: Path, tar: Path, found: int) -> None:
    """img2dataset writes `_stats.json` when a shard is done; a count that disagrees with the tar
    means a shard was cut short or replaced, which the import log reports (docs/formats.md)."""
    path = tar.with_name(tar.stem + "_stats.json")
    name = source_of(src, tar)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        log.warning("%s: no %s; img2dataset may not have finished this shard", name, path.name)
        return
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        log.warning("%s: %s is unreadable: %s", name, path.name, exc)
        return
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if successes != found:
        log.warning("%s: %s counts %r successes but the tar holds %d samples", name, path.name,
                    successes, found)
