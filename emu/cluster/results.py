"""Where tasks that run elsewhere (a TrainJob's nodes, a RayJob's driver) leave their result: an
S3 prefix under $EMU_CHECKPOINT_REMOTE, which the task fetches into its own output folder."""

from __future__ import annotations

import os
from pathlib import Path

# The S3 prefix of checkpoints is also the one for results (infra/k8s/base/settings.env).
from emu.artifacts.checkpoint_sync import REMOTE_ENV as CHECKPOINT_REMOTE_ENV


def fetch_result(uri: str, out: Path) -> None:
    """The files under `uri` into `out`, without the download's own bookkeeping (its manifest
    records times, which would change the artifact's md5 from one run to the next)."""
    import shutil
    import tempfile

    from emu.artifacts.s3 import download_prefix

    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".emu-result-", dir=out.parent))
    try:
        download_prefix(uri, staging)
        for path in sorted(staging.rglob("*")):
            relative = path.relative_to(staging)
            if path.is_file() and not relative.name.startswith(".emu-s3"):  # manifest, lock, temporaries
                (out / relative).parent.mkdir(parents=True, exist_ok=True)
                os.replace(path, out / relative)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def remote_prefix(what: str) -> str:
    """$EMU_CHECKPOINT_REMOTE, or a RuntimeError saying `what` needs it."""
    prefix = os.environ.get(CHECKPOINT_REMOTE_ENV, "").rstrip("/")
    if not prefix.startswith("s3://"):
        raise RuntimeError(f"{what} their result to S3: set {CHECKPOINT_REMOTE_ENV}=s3://bucket/prefix "
                           f"(infra/k8s/base/settings.env)")
    return prefix
