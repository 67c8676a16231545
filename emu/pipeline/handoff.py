"""How pipeline tasks hand artifacts to each other: by DVC md5, through the DVC remote (S3 on a
cluster), never as KFP artifact copies.

A task returns the md5 of what it made; the next task takes that string and pulls the bytes from
the remote into this machine's input cache (`input_folder`, once per md5 per machine). So:
  * KFP's cache keys on content alone: a task whose inputs have the same md5s is served from the
    cache even when an upstream task ran again (a recurring run's `prepare` re-reads its source
    at every firing; the same data gives the same md5 and nothing downstream re-runs);
  * on a cluster nothing large goes through KFP's artifact store: each task's output artifact is
    a small pointer file (md5, size, remote URI); the folder it points at is written beside it
    (`work_folder`), where KFP does not upload from, and pushed to the remote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

#: Where pulled inputs live on this machine (default $EMU_HOME/inputs).
INPUT_CACHE_ENV = "EMU_INPUT_CACHE"
#: The DVC remote every task pushes to and pulls from (a folder, or s3://bucket/prefix).
REMOTE_ENV = "EMU_DVC_REMOTE"


def input_cache() -> Path:
    from emu.home import emu_home

    return Path(os.environ.get(INPUT_CACHE_ENV) or emu_home() / "inputs")


def input_folder(md5: str, role: str, skip: tuple[str, ...] = ()) -> Path:
    """The local copy of input `role` (DVC md5 `md5`), pulled from the remote unless this machine
    has it complete already; `skip`: folders of it the task never reads."""
    from emu.artifacts.dvc import ArtifactStore
    from emu.errors import SourceError

    if not md5:
        raise SourceError(f"input {role!r} has no md5: the task that makes it returned none")
    store = ArtifactStore(os.environ.get(REMOTE_ENV) or None)
    try:
        return store.pull_cached(md5, input_cache(), skip=skip)
    except SourceError:
        # Asked only when the pull failed: a complete local copy needs no look at the remote
        # (which, for a dataset of many shards, lists every one of them).
        if store.exists(md5):
            raise
        raise SourceError(f"input {role!r} ({md5}) is not in the DVC remote {store.remote}: was it garbage-"
                          f"collected (`emu artifacts keep RUN` protects a run's artifacts from `dvc gc`)?") from None


def work_folder(artifact) -> Path:
    """The folder a task writes an output into: beside its KFP artifact, whose own path holds only
    the pointer (`write_pointer`)."""
    return Path(artifact.path).with_suffix(".d")


def write_pointer(artifact, described: dict, role: str) -> None:
    """The KFP artifact of an output (`described`: its md5 and remote URI, with its size and file
    count when known, as emu.artifacts.dvc.ArtifactRef.to_json gives them): what it is and where
    the bytes are (the KFP UI shows this)."""
    path = Path(artifact.path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"role": role, **described,
                                "restore": f"emu artifacts get {described['md5']} --out DIR"}, indent=1) + "\n",
                    encoding="utf-8")
