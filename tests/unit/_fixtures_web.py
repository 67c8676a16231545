"""Helpers for tests/unit/test_formats_web.py: read and rewrite source tars, import, read results.

Source tars are read and rewritten with plain `tarfile` here, independently of the importers'
reader, so a round trip compares the importer against the bytes the writer actually put on disk.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.importing import ImportSummary, run_import
from emu.data.schema import Sample
from emu.data.shards import REJECTS_FILE, iter_samples

#: Member edit: (name, bytes) -> new bytes, or None to drop the member.
MemberEdit = Callable[[str, bytes], "bytes | None"]


def tar_members(path: Path) -> dict[str, bytes]:
    """Every regular member of a tar, name -> bytes, in tar order."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def samples_by_key(members: dict[str, bytes]) -> dict[str, dict[str, bytes]]:
    """Group members as webdataset does: key up to the first dot, suffix after it."""
    grouped: dict[str, dict[str, bytes]] = {}
    for name, data in members.items():
        key, _, suffix = name.partition(".")
        grouped.setdefault(key, {})[suffix] = data
    return grouped


def write_tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> None:
    """Write members in order: (name, bytes) for a regular file, or a prepared TarInfo (a link)."""
    with tarfile.open(path, "w") as tar:
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, data = member
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def rewrite_tar(path: Path, edit: MemberEdit, extra: list[tarfile.TarInfo | tuple[str, bytes]] = ()) -> None:
    """Apply `edit` to every member, then append `extra` members."""
    kept = []
    for name, data in tar_members(path).items():
        new = edit(name, data)
        if new is not None:
            kept.append((name, new))
    write_tar(path, kept + list(extra))


def edit_json(name: str, change: Callable[[dict[str, Any]], None]) -> MemberEdit:
    """A MemberEdit that applies `change` to the JSON member called `name`."""
    def edit(member: str, data: bytes) -> bytes:
        if member != name:
            return data
        record = json.loads(data)
        change(record)
        return json.dumps(record).encode("utf-8")
    return edit


def symlink(name: str, target: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = target
    return info


def import_source(fmt: str, src: Path, out: Path, *overrides: str) -> tuple[ImportSummary, list[Sample], list[dict]]:
    """Import with `key=value` overrides of the import section; return summary, samples, rejects."""
    config = resolve(ImportConfig, "import", None, list(overrides))
    summary = run_import(fmt, src, out, config)
    rejects = [json.loads(line) for line in (out / REJECTS_FILE).read_text(encoding="utf-8").splitlines()]
    return summary, list(iter_samples(out)), rejects


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, relative posix path -> bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
