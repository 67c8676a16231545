"""Reading the files of the JSON-based formats (MMC4, LLaVA, text, VQAv2, COCO): JSON Lines streamed
line by line (also inside MMC4's `.jsonl.zip`), whole JSON files, and the image files their records
name by relative path.

A broken line, record or image file becomes a Reject that names the file (relative to SRC) and the
line; only a source that cannot be read at all raises SourceError (docs/formats.md).
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from emu.data.reject import Reject
from emu.data.shards import SampleProblem, sanitize_key
from emu.errors import SourceError

JSONL_SUFFIXES = (".jsonl", ".jsonl.zip")
_NUMBER_CHARS = re.compile(r"[0-9.eE+\-]*")
_WHITESPACE = re.compile(r"[ \t\r\n]*")  # JSON's whitespace (RFC 8259 §2)


def reject(source: str, key: str, rule: str, message: str) -> Reject:
    """A Reject for the import runner."""

    return Reject(source=source, key=key, rule=rule, message=message)


def source_name(src: Path, path: Path) -> str:
    """`path` as samples and rejects name it: relative to SRC, or the file name when SRC is the file."""
    return path.name if path == src else path.relative_to(src).as_posix()


def natural_sorted(paths: Iterable[Path]) -> list[Path]:
    """Paths in shard order (docs_shard_2 before docs_shard_10), so reading order is the numbering."""
    def key(path: Path) -> list[Any]:
        return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]
    return sorted(paths, key=key)


def resolve_dir(base: Path, setting: str | None, default: Path) -> Path:
    """A folder setting: `default` when unset, else relative to `base` (an absolute path stays)."""
    return default if setting is None else base / setting


def jsonl_files(src: Path, layout: str) -> list[Path]:
    """SRC itself when it is a JSON Lines file, else its *.jsonl and *.jsonl.zip files in shard order."""
    if src.is_file():
        if not src.name.endswith(JSONL_SUFFIXES):
            raise SourceError(f"{src} is not a .jsonl or .jsonl.zip file (expected {layout})")
        return [src]
    try:
        files = [p for p in src.iterdir() if p.is_file() and p.name.endswith(JSONL_SUFFIXES)]
    except OSError as exc:
        raise SourceError(f"cannot list {src}: {exc.strerror or exc}") from None
    if not files:
        raise SourceError(f"{src} holds no *.jsonl or *.jsonl.zip files (expected {layout})")
    return natural_sorted(files)


def jsonl_stem(path: Path) -> str:
    """The file name without `.jsonl` / `.jsonl.zip`: the `<file stem>` of fallback keys."""
    for suffix in JSONL_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.stem


@dataclass(frozen=True)
class Line:
    """One parsed JSON Lines record and where it came from."""

    source: str   # "<file>:<line>", lines counted from 1 as editors do
    key: str      # "<file stem>-<line>", the key of records that carry no id of their own
    value: Any


def iter_jsonl(path: Path, name: str) -> Iterator[Line | Reject]:
    """Stream the records of a .jsonl file, or of the one .jsonl inside a .jsonl.zip (MMC4 ships
    its shards zipped). Blank lines are skipped. A line that is not UTF-8 (`text_not_utf8`) or not
    JSON (`record_not_json`) is a reject; a file that breaks off mid-read (I/O error, corrupt zip)
    is one `file_unreadable` reject, and the import goes on with the next file."""
    stem = sanitize_key(jsonl_stem(path))
    number = 0
    try:
        with _open_binary_lines(path) as lines:
            for number, raw in enumerate(lines, start=1):
                if raw.strip():
                    yield _parse_line(raw, f"{name}:{number}", f"{stem}-{number}", first=number == 1)
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        yield reject(name, stem, "file_unreadable", f"{name} could not be read after line {number}: {exc}")


@contextlib.contextmanager
def _open_binary_lines(path: Path) -> Iterator[IO[bytes]]:
    if not path.name.endswith(".zip"):
        with open(path, "rb") as handle:
            yield handle
        return
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".jsonl")]
        if len(members) != 1:
            raise zipfile.BadZipFile(f"expected one .jsonl member, found {len(members)}")
        with archive.open(members[0]) as handle:
            yield handle


def _parse_line(raw: bytes, source: str, key: str, first: bool) -> Line | Reject:
    try:
        # A byte-order mark may open a file written on Windows; anywhere else it is an error.
        text = raw.decode("utf-8-sig" if first else "utf-8")
    except UnicodeDecodeError as exc:
        return reject(source, key, "text_not_utf8", f"line is not valid UTF-8: {exc}")
    try:
        return Line(source=source, key=key, value=json.loads(text))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError; so are huge ints
        return reject(source, key, "record_not_json", f"line is not JSON: {exc}")


def load_json(path: Path) -> Any:
    """A whole JSON file (VQAv2 and COCO ship one JSON object, and joining their sections needs all
    of it). A file that cannot be read or parsed makes the source unusable: SourceError."""
    try:
        with open(path, "rb") as handle:
            return json.load(handle)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    except (ValueError, RecursionError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from None


def iter_json_array(path: Path, what: str = "a JSON array") -> Iterator[Any]:
    """The elements of a file holding one JSON array, parsed one at a time: LLaVA's mix665k is a
    1 GB array, which json.load would hold as Python objects all at once. SourceError when the
    file cannot be read or is not a JSON array; past the start it is raised lazily, after the
    elements before the error."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:
            yield from _ArrayReader(handle, path, what)
    except OSError as exc:
        raise SourceError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SourceError(f"{path} is not UTF-8 text: {exc}") from None


class _ArrayReader:
    """Parses a JSON array element by element with json's raw_decode over a sliding text buffer."""

    CHUNK_CHARS = 1 << 20

    def __init__(self, handle: IO[str], path: Path, what: str):
        self.handle, self.path, self.what = handle, path, what
        self.decoder = json.JSONDecoder()
        self.buffer, self.pos, self.consumed, self.eof = "", 0, 0, False

    def __iter__(self) -> Iterator[Any]:
        self._expect("[", self.what)
        if self._peek() != "]":
            while True:
                self._peek()  # raw_decode does not skip whitespace
                yield self._element()
                if self._peek() != ",":
                    break
                self.pos += 1
        self._expect("]", "',' or ']' after an array element")
        self._expect("", "the end of the file after the array")

    def _expect(self, char: str, what: str) -> None:
        found = self._peek()
        if found != char:
            raise SourceError(f"{self.path} is not valid JSON: expected {what} at character "
                              f"{self.consumed + self.pos}, found {repr(found) if found else 'the end of the file'}")
        self.pos += len(char)

    def _element(self) -> Any:
        while True:
            try:
                value, end = self.decoder.raw_decode(self.buffer, self.pos)
            except (ValueError, RecursionError) as exc:
                if self._fill():  # the element may run on past the buffer: read more, parse again
                    continue
                reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
                raise SourceError(f"{self.path} is not valid JSON: the array element at character "
                                  f"{self.consumed + self.pos}: {reason}") from None
            # A number cut by the buffer's end ("12" of "12.5") parses as a shorter one: parse again
            # with more text unless something other than number characters follows it.
            if _NUMBER_CHARS.match(self.buffer, end).end() == len(self.buffer) and self._fill():
                continue
            self.pos = end
            return value

    def _peek(self) -> str:
        """The next non-whitespace character, not consumed ("" at the end of the file)."""
        while True:
            self.pos = _WHITESPACE.match(self.buffer, self.pos).end()
            if self.pos < len(self.buffer) or not self._fill():
                return self.buffer[self.pos:self.pos + 1]

    def _fill(self) -> bool:
        """Append the next chunk, dropping what was consumed; False at the end of the file."""
        chunk = "" if self.eof else self.handle.read(self.CHUNK_CHARS)
        self.eof = not chunk
        self.consumed += self.pos
        self.buffer, self.pos = self.buffer[self.pos:] + chunk, 0
        return bool(chunk)


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    names = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
             float: "number", type(None): "null"}
    return names.get(type(value), type(value).__name__)


class ImageFiles:
    """Reads the image files that records name relative to a folder (MMC4's images/, LLaVA's
    image folder, COCO's val2014/), looked for in each of `roots` in turn: public datasets are
    unpacked in more than one layout, and a record must not fail because its image sits in the
    other usual place.

    Names that are absolute or climb out with `..` are refused: a record must not pull arbitrary
    files into a dataset. With `keep`, the last `keep` files read stay in memory, because VQAv2
    asks several questions about one image in a row and LLaVA records share images; never more.
    A missing image's message lists every path tried, then `hint` (the setting that says where).
    """

    def __init__(self, roots: Path | list[Path], keep: int = 0, hint: str = ""):
        self.roots = [roots] if isinstance(roots, Path) else list(dict.fromkeys(roots))
        # Folders that do not exist are named in messages but never searched (a stat per image each).
        self._present = [root for root in self.roots if root.is_dir()]
        self.hint = hint
        self._read = functools.lru_cache(maxsize=keep)(self._read_file) if keep else self._read_file

    def read(self, name: str, *alternatives: str) -> bytes:
        """The bytes of the first `root/name` (or `root/alternative`) that exists; SampleProblem
        `image_path_unsafe`, `image_file_missing` or `image_file_unreadable` otherwise."""
        return self._read((name, *alternatives))

    def _read_file(self, names: tuple[str, ...]) -> bytes:
        relatives = [_safe_relative(name) for name in names]
        for root in self._present:
            for relative in relatives:
                path = root / relative
                try:
                    return path.read_bytes()
                except (FileNotFoundError, NotADirectoryError):
                    continue
                except OSError as exc:
                    raise SampleProblem("image_file_unreadable",
                                        f"cannot read image file {path}: {exc.strerror or exc}") from None
        tried = [str(root / relative) for root in self.roots for relative in relatives]
        where = tried[0] if len(tried) == 1 else "any of " + ", ".join(tried)
        raise SampleProblem("image_file_missing",
                            f"image file {names[0]} not found: looked for {where}" + (f" ({self.hint})" if self.hint else ""))


def _safe_relative(name: str) -> PurePosixPath:
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or not relative.parts or "\0" in name:
        # A NUL byte is no valid file name: the OS call would raise ValueError, not OSError.
        raise SampleProblem("image_path_unsafe",
                            f"image path {name!r} is empty, absolute, climbs out with '..' or holds a NUL byte")
    return relative


def relative_name(base: Path, path: Path) -> str:
    """`path` as samples and rejects name it: relative to `base` when inside it, else in full (a
    file given by an absolute setting)."""
    return path.relative_to(base).as_posix() if path.is_relative_to(base) else str(path)
