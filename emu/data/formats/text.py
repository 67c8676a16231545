"""Plain text (`--format text`) → `text` samples (docs/formats.md).

SRC is a `.jsonl` file or a folder of them (`.jsonl.zip` too), streamed line by line. Each line is
an object with the text under `text.field` and optionally `id`. Key: the sanitised `id`, else
`<file stem>-<line>`. The record's other fields (the original `id` included) are kept in `meta`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from emu.data.formats._files import Line, iter_jsonl, json_type, jsonl_files, reject, source_name
from emu.data.reject import Reject
from emu.data.schema import TextOnly
from emu.data.shards import sanitize_key
from emu.errors import ConfigError

if TYPE_CHECKING:
    from emu.data.formats import ImportConfig

LAYOUT = "one JSON object per line with a text field"


@dataclass
class Options:
    """Settings of `--format text` (the `import.text` group)."""

    field: str = "text"  # the record field holding the text ("content", "raw_content" in some dumps)

    def __post_init__(self) -> None:
        if not self.field:
            raise ConfigError("import.text.field must name a record field, got an empty string")


def read(src: Path, config: ImportConfig) -> Iterator[TextOnly | Reject]:
    """Stream `text` samples from SRC; SourceError when SRC holds no JSON Lines file."""
    files = jsonl_files(src, LAYOUT)
    return _samples(src, files, config.text.field)


def _samples(src: Path, files: list[Path], field: str) -> Iterator[TextOnly | Reject]:
    for path in files:
        for line in iter_jsonl(path, source_name(src, path)):
            yield _sample(line, field) if isinstance(line, Line) else line


def _sample(line: Line, field: str) -> TextOnly | Reject:
    record = line.value
    if not isinstance(record, dict):
        return reject(line.source, line.key, "record_invalid", f"line holds a JSON {json_type(record)}, not an object")
    text = record.get(field)
    if not isinstance(text, str):
        found = "no such field" if field not in record else f"a JSON {json_type(text)}"
        return reject(line.source, line.key, "record_invalid", f"field {field!r} must be a string, found {found}")
    record_id = record.get("id")
    if record_id is not None and (isinstance(record_id, bool) or not isinstance(record_id, (str, int))):
        return reject(line.source, line.key, "record_invalid",
                      f"id must be a string or integer, found a JSON {json_type(record_id)}")
    key = line.key if record_id in (None, "") else sanitize_key(str(record_id))
    meta = {name: value for name, value in record.items() if name != field}
    return TextOnly(key=key, text=text, source=line.source, meta=meta)
