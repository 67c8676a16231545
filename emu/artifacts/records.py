"""`.dvc` records of pipeline outputs, so that `dvc gc` keeps them.

Pipeline outputs go straight into the DVC remote (emu.artifacts.dvc) and are known to the
lineage store, not to any DVC project: `dvc gc -w -c` on the shared remote keeps only what the
project's `.dvc` files and `dvc.lock` name, so it would delete every model. `write_records` gives
each output artifact of a run a `.dvc` file in a folder of the project (commit it, or write it
before every gc), one per artifact:

    <out>/<run_id>/<stage>-<role>.dvc     outs: [{md5, size, nfiles, hash: md5, path: <stage>-<role>}]

That is the `.dvc` file `dvc add` writes for the same bytes, so `dvc gc` keeps the object (a
folder's files too: DVC reads the `.dir` listing from the remote) and `dvc pull <file>.dvc`
restores it, as `emu artifacts pull RUN_ID` does. Records are written atomically and only
rewritten when their content changes; records of other runs in `out` are left alone.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from emu.artifacts.dvc import check_md5
from emu.errors import SourceError

_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")


def write_records(run_id: str, artifacts: Iterable[Mapping[str, Any]], out: str | os.PathLike[str]) -> list[Path]:
    """Write `out/<run_id>/<stage>-<role>.dvc` for each artifact (mappings with stage, role, md5,
    size and optionally type and nfiles, as emu.artifacts.cli.run_artifacts lists them); returns
    the record paths."""
    folder = Path(out) / run_id
    written = []
    for artifact in artifacts:
        md5 = check_md5(artifact["md5"])
        name = f"{artifact['stage']}-{artifact['role']}"
        if not _NAME_RE.match(name):
            raise SourceError(f"run {run_id}: artifact {md5} has no usable name ({name!r})")
        entry: dict[str, Any] = {"md5": md5}
        if artifact.get("size") is not None:
            entry["size"] = int(artifact["size"])
        if artifact.get("nfiles") is not None and md5.endswith(".dir"):
            entry["nfiles"] = int(artifact["nfiles"])
        entry.update(hash="md5", path=name)
        text = (f"# emu run {run_id}: {artifact['stage']}/{artifact['role']} ({artifact.get('type') or 'artifact'}),"
                f" kept from `dvc gc` (emu.artifacts.records)\n") + yaml.safe_dump({"outs": [entry]}, sort_keys=False)
        path = folder / f"{name}.dvc"
        if not (path.is_file() and path.read_text(encoding="utf-8") == text):
            folder.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, path)
        written.append(path)
    if not written:
        raise SourceError(f"run {run_id} has no artifacts to keep")
    return written
