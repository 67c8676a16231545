"""Resume across pipeline runs: a training task keeps its checkpoints in a folder named by its
stage and cache key, not in its run's artifact folder, so that a run interrupted mid-stage (a
SIGKILL, a lost node, `emu run cancel`) leaves checkpoints that the next run with the same
inputs finds and resumes from, instead of training again from step 0.

The key is a hash of what KFP's cache keys the task on, in content terms: the stage, its
resolved config (before the run-specific input paths are filled in), the DVC md5 of every
input, and the stage's code version (emu.pipeline.code_version). Same key, same training: resuming is exact (the trainer restores
model, optimizer, schedule, data position and RNG; emu.train.trainer).

`checkpoint_location` is the one place that says where the folder lives on this machine
($EMU_HOME/checkpoints/<stage>/<key>); a cluster mirrors that folder to object storage (S3) so that
a retried pod resumes from it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def checkpoint_location(stage: str, key: str) -> Path:
    """The checkpoint folder of `stage` for cache key `key` on this machine."""
    from emu.home import emu_home

    return emu_home() / "checkpoints" / stage / key


def resume_key(stage: str, **parts: Any) -> str:
    """The task's cache key in content terms (module docstring): `parts` are its config dicts and
    input md5s."""
    from emu.pipeline.code_version import stage_code_version

    canonical = json.dumps({"stage": stage, "code_version": stage_code_version(stage), **parts}, sort_keys=True,
                           default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def attach_checkpoints(out: Path, stage: str, key: str, folders: tuple[str, ...] = ("checkpoints",)) -> Path:
    """Make each of `out`/`folders` (the folders the stage's trainers checkpoint into) a link to
    the stable location for `key`; say so when an interrupted execution left checkpoints there.
    Two runs that would train the same stage on the same inputs (same key) at once do not both
    write there: the second waits for the first to end (a lock held for the life of the task
    process, released by the kernel however it ends), then resumes from what it left, usually
    its final checkpoint, so it reuses the work instead of doing it again. Returns the location."""
    location = checkpoint_location(stage, key)
    _lock(location, stage, key)
    for folder in folders:
        target = location / folder
        target.mkdir(parents=True, exist_ok=True)
        link = Path(out) / folder
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() and link.resolve() == target.resolve():
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists; a task's checkpoint folder must be its own")
        link.symlink_to(target, target_is_directory=True)
        latest = target / "latest"
        if latest.is_file():
            log.info("%s: resuming an interrupted execution with the same cache key %s from its checkpoint %s "
                     "(%s)", stage, key, latest.read_text(encoding="utf-8").strip(), target)
    return location


#: Lock files held by this process, by location (a task trains one stage, then exits: the kernel
#: releases them). flock conflicts between two opens of one file even in one process, so a
#: location this process holds already is not locked again.
_HELD: dict[Path, object] = {}


def _lock(location: Path, stage: str, key: str) -> None:
    import fcntl

    location.mkdir(parents=True, exist_ok=True)
    if location.resolve() in _HELD:
        return
    handle = open(location / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log.info("%s: another run is training this stage on the same inputs (cache key %s); waiting for it, "
                 "then resuming from its checkpoints", stage, key)
        fcntl.flock(handle, fcntl.LOCK_EX)
    _HELD[location.resolve()] = handle
