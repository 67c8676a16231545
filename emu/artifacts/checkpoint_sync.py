"""Checkpoints mirrored to S3 as they are written, so a retried task on a fresh pod resumes.

A training task's checkpoint location (emu.pipeline.resume: one folder per stage and cache key)
holds one or more checkpoint folders (`checkpoints/`, the decoder's `vae/checkpoints/`), each with
tag folders and a `latest` pointer (emu.train.checkpoint). With $EMU_CHECKPOINT_REMOTE set
(s3://bucket/prefix; infra/k8s/base/settings.env), `mirrored(location)` (the location being
<...>/<stage>/<key>):

  * on entry, when the local folder has no checkpoint, restores the remote one
    (<prefix>/<stage>/<key>/...): a retried pod starts where the lost one last checkpointed;
  * while training, polls every `latest` pointer; when one names a new tag, uploads that tag,
    then the pointer, then deletes remote tags the trainer pruned. The remote pointer therefore
    only ever names a tag that is completely uploaded, as the local one does;
  * on exit (also on failure), syncs once more.

Without the setting it does nothing: one machine keeps its checkpoints on its own disk.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

REMOTE_ENV = "EMU_CHECKPOINT_REMOTE"
#: Seconds between two looks at the `latest` pointers (default 10: a checkpoint every few minutes
#: at scale makes a finer poll pointless).
INTERVAL_ENV = "EMU_CHECKPOINT_SYNC_S"
LATEST = "latest"  # emu.train.checkpoint.LATEST


def remote_for(location: Path, prefix: str | None = None) -> str | None:
    """<prefix>/<stage>/<key> for the location <...>/<stage>/<key>, or None when no remote is set."""
    prefix = (prefix if prefix is not None else os.environ.get(REMOTE_ENV, "")).rstrip("/")
    return f"{prefix}/{Path(location).parent.name}/{Path(location).name}" if prefix else None


class CheckpointMirror:
    def __init__(self, location: Path, remote: str, interval_s: float = 10.0) -> None:
        self.location, self.remote, self.interval_s = Path(location), remote.rstrip("/"), interval_s
        self._uploaded: dict[str, str] = {}   # checkpoint folder (relative) -> tag uploaded
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def restore(self) -> str | None:
        """Download the remote checkpoints when there are none here; returns what was restored."""
        from emu.artifacts.s3 import download_prefix, has_objects

        if any(self.location.rglob(LATEST)):
            return None
        if not has_objects(self.remote):  # a first attempt: nothing to resume
            return None
        download_prefix(self.remote, self.location)
        restored = sorted(str(p.relative_to(self.location)) for p in self.location.rglob(LATEST))
        for pointer in restored:
            folder = str(Path(pointer).parent)
            self._uploaded[folder] = (self.location / pointer).read_text(encoding="utf-8").strip()
        if restored:
            log.info("restored checkpoints %s from %s", ", ".join(
                f"{k}/{v}" for k, v in sorted(self._uploaded.items())), self.remote)
        return ", ".join(restored) or None

    def sync(self) -> None:
        """Upload every checkpoint folder whose `latest` moved since the last sync."""
        from emu.artifacts.s3 import S3Location, client, upload_folder

        for pointer in sorted(self.location.rglob(LATEST)):
            if not pointer.is_file():
                continue
            folder = pointer.parent
            relative = str(folder.relative_to(self.location))
            tag = pointer.read_text(encoding="utf-8").strip()
            if self._uploaded.get(relative) == tag or not (folder / tag).is_dir():
                continue
            base = f"{self.remote}/{relative}" if relative != "." else self.remote
            upload_folder(folder / tag, f"{base}/{tag}")
            location = S3Location.parse(f"{base}/{LATEST}")
            s3 = client()
            s3.put_object(Bucket=location.bucket, Key=location.prefix, Body=(tag + "\n").encode())
            # The tag just uploaded stays even when the trainer pruned it locally meanwhile (an upload
            # slower than two checkpoints): the remote pointer names it.
            kept = {p.name for p in folder.glob("step-*") if p.is_dir()} | {tag}
            self._prune(s3, S3Location.parse(base), kept)
            self._uploaded[relative] = tag
            log.info("checkpoint %s/%s mirrored to %s", relative, tag, base)

    @staticmethod
    def _prune(s3, base, kept: set[str]) -> None:
        """Delete remote tags the trainer deleted locally (keep_checkpoints)."""
        paginator = s3.get_paginator("list_objects_v2")
        doomed = []
        for page in paginator.paginate(Bucket=base.bucket, Prefix=base.prefix + "/"):
            for obj in page.get("Contents", []):
                tag = obj["Key"][len(base.prefix) + 1:].split("/", 1)[0]
                if tag.startswith("step-") and tag not in kept:
                    doomed.append({"Key": obj["Key"]})
        for start in range(0, len(doomed), 1000):
            s3.delete_objects(Bucket=base.bucket, Delete={"Objects": doomed[start:start + 1000]})

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.wait(self.interval_s):
                try:
                    self.sync()
                except Exception as exc:  # a failed upload is retried next tick; training goes on
                    log.warning("checkpoint mirror to %s: %s: %s", self.remote, type(exc).__name__, exc)

        self._thread = threading.Thread(target=loop, name="emu-checkpoint-mirror", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sync()


@contextmanager
def mirrored(location: Path | None) -> Iterator[CheckpointMirror | None]:
    """Restore, then mirror `location` to $EMU_CHECKPOINT_REMOTE/<stage>/<key> while the body runs."""
    remote = remote_for(location) if location is not None else None
    if remote is None:
        yield None
        return
    mirror = CheckpointMirror(location, remote, float(os.environ.get(INTERVAL_ENV) or 10.0))
    mirror.restore()
    mirror.start()
    try:
        yield mirror
    finally:
        mirror.stop()
