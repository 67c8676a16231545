"""Import every source of a folder described by `sources.json` (what `emu data synth` writes, or a
hand-written list for real data) into one shard dataset per source: OUT/<name>/."""

from __future__ import annotations

import json
from pathlib import Path

from emu.data.formats import IMPORTERS, ImportConfig
from emu.data.importing import ImportSummary, run_import
from emu.data.synth import SOURCES_FILE
from emu.errors import SourceError


def read_sources(src_dir: Path) -> list[dict]:
    """The [{name, format, path}] entries of SRC/sources.json, checked."""
    path = Path(src_dir) / SOURCES_FILE
    if not path.is_file():
        raise SourceError(f"{src_dir} has no {SOURCES_FILE} listing its sources (name, format, path)")
    try:
        sources = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(sources, list):
        raise SourceError(f"{path} must hold a list of sources")
    names = set()
    for i, entry in enumerate(sources):
        if not isinstance(entry, dict) or not {"name", "format", "path"} <= set(entry):
            raise SourceError(f"{path}: entry {i} needs name, format and path")
        wrong = [field for field in ("name", "format", "path") if not isinstance(entry[field], str)]
        if wrong:
            raise SourceError(f"{path}: entry {i}: {wrong[0]} must be a string, got {entry[wrong[0]]!r}")
        if entry["format"] not in IMPORTERS:
            raise SourceError(f"{path}: entry {entry['name']!r} has unknown format {entry['format']!r}; "
                              f"known formats: {', '.join(IMPORTERS)}")
        name = entry["name"]
        if Path(name).name != name or name in (".", "..") or name in names:
            raise SourceError(f"{path}: entry {i} has an invalid or repeated name {name!r}")
        names.add(name)
    return sources


def import_sources(src_dir: Path, out_dir: Path, config: ImportConfig) -> list[ImportSummary]:
    """Import each listed source into OUT/<name>, in the listed order."""
    return [run_import(entry["format"], Path(src_dir) / entry["path"], Path(out_dir) / entry["name"], config)
            for entry in read_sources(src_dir)]
