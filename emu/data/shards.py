"""Webdataset tar shards with a per-shard parquet manifest: writing (atomic) and reading (streaming, safe).

Dataset folder layout (one per import):

  dataset.json               index: format version, source format, shard list in read order, counts.
                             Written last: a folder without it is an unfinished import.
  shard-000000.tar           webdataset shard: `{key}.json` record + `{key}.{i}.{ext}` images
  shard-000000.parquet       manifest: one row per sample (emu.data.manifest)
  rejects.jsonl              samples the importer could not use (source, key, rule, message)
  import.config.yaml         resolved import config

A shard and its manifest are written under temporary names and renamed only when complete, so a
crash never leaves a half-written shard that looks valid. Reading streams one tar member at a
time; it never extracts to disk and reports unsafe or malformed members per sample instead of
raising.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from emu.data import manifest as manifest_mod
from emu.data.images import DEFAULT_MAX_PIXELS, sniff_format
from emu.data.schema import Sample, from_record, to_record
from emu.errors import DatasetError

FORMAT_VERSION = 1
DATASET_FILE = "dataset.json"
REJECTS_FILE = "rejects.jsonl"
#: Keys become tar member prefixes and webdataset splits member names at the first dot. Used with
#: fullmatch: `$` in `match` would also accept a key ending in a newline.
KEY_PATTERN = re.compile(r"[A-Za-z0-9_\-]{1,200}")


@dataclass
class Problem:
    """A per-sample problem: `rule` is a stable name, `message` says what exactly was wrong."""

    rule: str
    message: str

    def __str__(self) -> str:
        return f"{self.rule}: {self.message}"


class SampleProblem(Exception):
    def __init__(self, rule: str, message: str):
        super().__init__(f"{rule}: {message}")
        self.problem = Problem(rule, message)

    def __reduce__(self):  # pickled by its two fields (a data loader worker sends it to training)
        return SampleProblem, (self.problem.rule, self.problem.message)


@dataclass
class RawSample:
    """The tar members of one sample as read, before decoding, and what was wrong with them."""

    shard: str
    key: str
    members: dict[str, bytes] = field(default_factory=dict)  # member suffix ("json", "0.png") -> bytes
    problems: list[Problem] = field(default_factory=list)


@dataclass(frozen=True)
class ShardEntry:
    name: str
    manifest: str
    samples: int
    bytes: int
    sha256: str
    md5: str = ""  # the shard's DVC md5 (md5 of its bytes): lineage names shards by it


def sanitize_key(raw: str) -> str:
    """Map a source identifier to a valid shard key (letters, digits, `_`, `-`)."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", raw.strip())[:200]
    return key or "_"


def encode_sample(sample: Sample) -> dict[str, bytes]:
    """Tar members (suffix -> bytes) of a sample: the JSON record and one member per image."""
    if not KEY_PATTERN.fullmatch(sample.key):
        raise SampleProblem("key_invalid", f"key {sample.key!r} must match {KEY_PATTERN.pattern}")
    record = to_record(sample)
    image_members = []
    members: dict[str, bytes] = {}
    for i, data in enumerate(sample.images):
        ext = sniff_format(data) or "bin"
        name = f"{i}.{ext}"
        image_members.append(name)
        members[name] = data
    record["image_members"] = image_members
    try:
        members["json"] = json.dumps(record, ensure_ascii=False, sort_keys=True).encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate (JSON "\ud800") in a field the importer did not check as text, e.g. a
        # source field kept in meta: the record cannot be stored as UTF-8.
        raise SampleProblem("record_not_utf8", f"a field of the record is not valid Unicode: {exc}") from None
    return members


def decode_sample(raw: RawSample) -> Sample:
    """Build a Sample from its members, or raise SampleProblem naming the first broken rule."""
    if raw.problems:
        p = raw.problems[0]
        raise SampleProblem(p.rule, p.message)
    if "json" not in raw.members:
        names = ", ".join(sorted(raw.members)) or "none"
        raise SampleProblem("record_missing", f"no {raw.key}.json record for members {names}")
    try:
        text = raw.members["json"].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SampleProblem("record_not_utf8", f"{raw.key}.json is not UTF-8: {exc}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SampleProblem("record_not_json", f"{raw.key}.json is not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise SampleProblem("record_invalid", f"{raw.key}.json must hold an object")
    image_members = record.pop("image_members", [])
    if not isinstance(image_members, list) or not all(isinstance(m, str) for m in image_members):
        raise SampleProblem("record_invalid", "image_members must be a list of member names")
    missing = [m for m in image_members if m not in raw.members]
    if missing:
        raise SampleProblem("image_member_missing",
                            f"record lists {', '.join(missing)} but the shard has no such member")
    orphans = sorted(set(raw.members) - set(image_members) - {"json"})
    if orphans:
        raise SampleProblem("member_orphan",
                            f"members {', '.join(orphans)} are not referenced by {raw.key}.json")
    images = [raw.members[m] for m in image_members]
    if record.get("key") != raw.key:
        raise SampleProblem("record_invalid",
                            f"record key {record.get('key')!r} differs from member key {raw.key!r}")
    try:
        return from_record(record, images)
    except (KeyError, TypeError, ValueError) as exc:
        raise SampleProblem("record_invalid", f"{type(exc).__name__}: {exc}") from None


def iter_raw_samples(tar_path: Path, check_keys: bool = True) -> Iterator[RawSample]:
    """Stream a tar's samples (consecutive members sharing a key), never extracting anything.

    Unsafe members (symlinks, hard links, devices, absolute or `..` names) are not read; they
    become problems of the sample they name. A truncated tar yields what was complete and then a
    final sample carrying a `shard_truncated` problem. `check_keys=False` is for source tars of
    public formats: their keys need not match KEY_PATTERN, importers sanitise them.
    """
    shard = tar_path.name
    seen_keys: set[str] = set()
    current: RawSample | None = None
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for info in tar:
                name = info.name
                key, _, suffix = Path(name).name.partition(".")
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = RawSample(shard=shard, key=key)
                    if key in seen_keys:
                        current.problems.append(Problem(
                            "key_duplicate", f"key {key!r} appears twice in {shard}"))
                    seen_keys.add(key)
                problem = _member_problem(info)
                if problem is not None:
                    current.problems.append(problem)
                    continue
                if suffix in current.members:
                    current.problems.append(Problem("member_duplicate", f"member {name!r} appears twice"))
                    continue
                extracted = tar.extractfile(info)
                current.members[suffix] = extracted.read() if extracted is not None else b""
                if check_keys and not KEY_PATTERN.fullmatch(key):
                    current.problems.append(Problem("key_invalid", f"key {key!r} must match {KEY_PATTERN.pattern}"))
    except (tarfile.TarError, EOFError, OSError) as exc:
        truncated = current or RawSample(shard=shard, key="")
        truncated.problems.append(Problem("shard_truncated", f"{shard} is truncated or corrupt: {exc}"))
        current = truncated
    if current is not None:
        yield current


def _member_problem(info: tarfile.TarInfo) -> Problem | None:
    name = info.name
    if info.issym() or info.islnk():
        return Problem("member_not_regular", f"member {name!r} is a link to {info.linkname!r}")
    if not info.isfile():
        return Problem("member_not_regular", f"member {name!r} is not a regular file")
    parts = Path(name).parts
    if name.startswith("/") or ".." in parts or (parts and parts[0].endswith(":")):
        return Problem("member_path_unsafe", f"member name {name!r} is absolute or climbs out with '..'")
    return None


class ShardWriter:
    """Writes samples into shards of at most `samples_per_shard` samples / `max_shard_bytes` bytes.

    Use as a context manager. On error the shard in progress is deleted and no dataset.json is
    written, so the folder is never mistaken for a finished dataset.
    """

    def __init__(self, out_dir: Path, source_format: str, samples_per_shard: int = 1000,
                 max_shard_bytes: int = 1 << 30, prefix: str = "shard",
                 max_image_pixels: int = DEFAULT_MAX_PIXELS):
        self.out_dir = Path(out_dir)
        self.source_format = source_format
        self.samples_per_shard = samples_per_shard
        self.max_shard_bytes = max_shard_bytes
        self.max_image_pixels = max_image_pixels  # the import's limit, so manifest facts agree with it
        self.prefix = prefix
        self.entries: list[ShardEntry] = []
        self.kind_counts: dict[str, int] = {}
        self.keys: set[str] = set()
        self._tar: tarfile.TarFile | None = None
        self._tmp_tar: Path | None = None
        self._created: list[Path] = []
        self._rows: list[dict[str, Any]] = []
        self._bytes = 0

    def __enter__(self) -> ShardWriter:
        ensure_empty_dataset_dir(self.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._abort()

    def write(self, sample: Sample) -> None:
        """Append a sample. Raises SampleProblem (nothing written) if its key is invalid or taken."""
        if sample.key in self.keys:
            raise SampleProblem("key_duplicate", f"key {sample.key!r} was already written")
        members = encode_sample(sample)
        size = sum(len(v) for v in members.values())
        if self._tar is not None and (len(self._rows) >= self.samples_per_shard
                                      or self._bytes + size > self.max_shard_bytes):
            self._finish_shard()
        if self._tar is None:
            self._start_shard()
        assert self._tar is not None
        for suffix in sorted(members):
            data = members[suffix]
            info = tarfile.TarInfo(f"{sample.key}.{suffix}")
            info.size = len(data)
            info.mode = 0o444
            info.mtime = 0  # deterministic bytes: same samples -> same shard md5 (DVC, KFP cache)
            self._tar.addfile(info, io.BytesIO(data))
        self._bytes += size
        self.keys.add(sample.key)
        self.kind_counts[sample.kind] = self.kind_counts.get(sample.kind, 0) + 1
        # The importer has already decoded every image (emu.data.importing); header facts suffice.
        self._rows.append(manifest_mod.row_for_sample(self._shard_name(), sample, decode_images=False,
                                                      max_pixels=self.max_image_pixels))

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Finish the last shard and write dataset.json (the commit point). Returns the index."""
        if self._tar is not None:
            self._finish_shard()
        index = {
            "format_version": FORMAT_VERSION,
            "source_format": self.source_format,
            "samples": sum(e.samples for e in self.entries),
            "kinds": dict(sorted(self.kind_counts.items())),
            "shards": [e.__dict__ for e in self.entries],
            **(extra or {}),
        }
        _atomic_write_bytes(self.out_dir / DATASET_FILE,
                            json.dumps(index, indent=2, sort_keys=False).encode("utf-8"))
        return index

    def _shard_name(self) -> str:
        return f"{self.prefix}-{len(self.entries):06d}.tar"

    def _start_shard(self) -> None:
        self._tmp_tar = self.out_dir / (self._shard_name() + ".tmp")
        self._created.append(self._tmp_tar)
        self._tar = tarfile.open(self._tmp_tar, mode="w", format=tarfile.USTAR_FORMAT)
        self._rows = []
        self._bytes = 0

    def _finish_shard(self) -> None:
        assert self._tar is not None and self._tmp_tar is not None
        self._tar.close()
        self._tar = None
        name = self._shard_name()
        manifest_name = name[: -len(".tar")] + ".parquet"
        tmp_manifest = self.out_dir / (manifest_name + ".tmp")
        final = self.out_dir / name
        self._created += [tmp_manifest, self.out_dir / manifest_name, final]
        pq.write_table(manifest_mod.to_table(self._rows), tmp_manifest)
        os.replace(tmp_manifest, self.out_dir / manifest_name)
        os.replace(self._tmp_tar, final)
        self._tmp_tar = None
        self.entries.append(ShardEntry(name=name, manifest=manifest_name, samples=len(self._rows),
                                       bytes=final.stat().st_size, sha256=file_sha256(final),
                                       md5=file_md5(final)))
        self._rows = []

    def _abort(self) -> None:
        """Remove everything this writer created: a failed import leaves no shard behind, so the
        folder can be reused and nothing in it can be mistaken for imported data."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        for path in self._created:  # only what this writer made: other files in the folder stay
            path.unlink(missing_ok=True)


def ensure_empty_dataset_dir(out_dir: Path) -> None:
    """Refuse to write a dataset over an existing one: nothing already written may be lost."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DatasetError(f"output {out_dir} exists and is not a folder")
    if (out_dir / DATASET_FILE).exists() or any(out_dir.glob("*.tar")):
        raise DatasetError(f"output folder {out_dir} already holds a dataset; choose an empty folder")


def read_index(dataset_dir: Path) -> dict[str, Any]:
    """Read and check dataset.json; raise DatasetError if the folder is not a finished dataset."""
    path = Path(dataset_dir) / DATASET_FILE
    if not path.is_file():
        raise DatasetError(f"{dataset_dir} has no {DATASET_FILE}: not a dataset, or its import did not finish")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(index, dict) or index.get("format_version") != FORMAT_VERSION:
        raise DatasetError(f"{path}: unsupported format_version {index.get('format_version') if isinstance(index, dict) else None!r} "
                           f"(this version reads {FORMAT_VERSION})")
    return index


def list_shards(dataset_dir: Path, require_files: bool = True) -> list[Path]:
    """The dataset's shard files in their deterministic read order (as recorded in dataset.json).
    `require_files` false: the folder holds the dataset's metadata only and the shards are read
    from elsewhere (a DVC remote, emu.precompute.remote), so their absence is not an error."""
    index = read_index(dataset_dir)
    shards = []
    for entry in index.get("shards", []):
        name = entry.get("name", "") if isinstance(entry, dict) else ""
        if not name or Path(name).name != name:
            raise DatasetError(f"{dataset_dir}/{DATASET_FILE}: invalid shard name {name!r}")
        path = Path(dataset_dir) / name
        if require_files and not path.is_file():
            raise DatasetError(f"{dataset_dir}/{DATASET_FILE} lists {name} but the file is missing")
        shards.append(path)
    return shards


def iter_samples(dataset_dir: Path) -> Iterator[Sample]:
    """Stream every sample of a dataset in shard order. Raises SampleProblem on the first bad
    sample: training reads validated data, and bad data must stop it loudly, not be skipped."""
    for shard in list_shards(dataset_dir):
        for raw in iter_raw_samples(shard):
            try:
                yield decode_sample(raw)
            except SampleProblem as exc:
                raise SampleProblem(exc.problem.rule, f"{shard.name} key {raw.key!r}: {exc.problem.message}") from None


def file_sha256(path: Path) -> str:
    return _file_digest(path, hashlib.sha256())


def file_md5(path: Path) -> str:
    """What DVC records for a file (the md5 of its bytes)."""
    return _file_digest(path, hashlib.md5())


def _file_digest(path: Path, digest) -> str:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
