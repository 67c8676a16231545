"""Where precompute's readers find their inputs: a local path, an s3:// URI, or (on a Ray
cluster, emu.precompute.remote) an artifact of the DVC remote named by its md5.

A Ray worker may run on any node of the cluster, so neither the shards nor the model can be
paths of the driver's disk there: the driver hands workers each shard's object in the DVC remote
(read straight from S3, one shard at a time, nothing else of the dataset) and the model as
`md5:<folder md5>/<path inside>`, pulled once per node.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

#: How a model input is named by its DVC md5: `md5:<md5>.dir/<path inside the folder>`.
MD5_PREFIX = "md5:"


def model_reference(md5: str, inside: str = "") -> str:
    return f"{MD5_PREFIX}{md5}/{inside}".rstrip("/")


def local_model(reference: str) -> str:
    """A folder (or s3:// URI) load_encoder reads: `md5:` references are pulled from the DVC
    remote ($EMU_DVC_REMOTE) into this machine's cache once (emu.artifacts.dvc.pull_cached), all
    but the LM."""
    if not reference.startswith(MD5_PREFIX):
        return reference
    from emu.artifacts.dvc import ArtifactStore
    from emu.artifacts.s3 import default_cache_dir

    md5, _, inside = reference[len(MD5_PREFIX):].partition("/")
    # Without the LM (`lm/` of an Emu model folder): precompute reads the encoder only.
    folder = ArtifactStore(os.environ.get("EMU_DVC_REMOTE") or None).pull_cached(
        md5, default_cache_dir() / "dvc", skip=("lm/",))
    return str(folder / inside) if inside else str(folder)


@contextlib.contextmanager
def local_shard(source: str) -> Iterator[Path]:
    """The shard as a local file while the caller reads it: a local path as it is; an s3:// object
    downloaded into a temporary folder that is removed afterwards (a worker keeps one shard)."""
    if not source.lower().startswith("s3://"):
        yield Path(source)
        return
    from emu.artifacts.s3 import resolve_local_file

    folder = tempfile.mkdtemp(prefix="emu-shard-")
    try:
        yield resolve_local_file(source, cache_dir=folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
