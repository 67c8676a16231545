"""What a precompute RayJob runs on the Ray cluster: `python -m emu.precompute.remote --job JSON`
(the driver; emu.cluster.ray_launch.precompute builds the RayJob, emu.cluster.rayjob runs it).

A `PrecomputeJob` names its inputs by DVC md5, so the driver needs nothing but the image and the
platform's settings (EMU_DVC_REMOTE, the S3 credentials) that every pod of the RayCluster has:
  * the dataset: only its metadata (dataset.json, the per-shard manifests) is pulled to the
    driver; the shards are not: each Ray task reads its shard's object straight from the DVC
    remote (emu.precompute.sources), so no node ever holds a copy of the dataset;
  * the model: `md5:<model md5>`, pulled (all but its LM) once by the driver and once per worker node;
  * the parts: written by the driver into a local folder mirroring `out` (s3://), each uploaded
    as soon as it is committed; the config and the summary when the run ends (the summary only
    when it finished). A retried job first fetches what an earlier attempt uploaded, so its
    finished parts are kept (the stage's own up-to-date check).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emu.precompute.content import SUMMARY_FILE


@dataclass
class PrecomputeJob:
    #: the resolved `precompute` section
    config: dict[str, Any]
    #: DVC md5 of the dataset artifact, and the folders under it to precompute
    dataset: str
    sources: list[str] = field(default_factory=list)
    #: DVC md5 of the stage-1 model (the exported folder the encoder is read from)
    model: str = ""
    #: s3:// prefix the parts go to
    out: str = ""

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> PrecomputeJob:
        return cls(**json.loads(text))


def run(job: PrecomputeJob, workdir: Path):
    """Precompute the job's data on the Ray cluster this driver runs in; returns its summary."""
    from emu.artifacts.dvc import ArtifactStore
    from emu.artifacts.s3 import delete_object, download_prefix, has_objects, upload_file
    from emu.config import from_dict
    from emu.precompute.config import PrecomputeConfig
    from emu.precompute.job import run_precompute
    from emu.precompute.sources import model_reference

    config = from_dict(PrecomputeConfig, job.config, where="precompute", origin="the precompute job")
    metadata = workdir / "dataset"
    files = ArtifactStore(os.environ.get("EMU_DVC_REMOTE") or None).pull_files(
        job.dataset, metadata, wanted=lambda relpath: not relpath.endswith(".tar"))
    shards = {metadata / f.relpath: f.uri for f in files if f.relpath.endswith(".tar")}
    out = workdir / "out"
    prefix = job.out.rstrip("/")
    if has_objects(prefix):
        download_prefix(prefix, out)
        delete_object(f"{prefix}/{SUMMARY_FILE}")  # written again only if this attempt finishes

    def upload_part(tensors: Path, index: Path) -> None:
        # As each part is committed, so a driver that is killed (its task pod deleted, the head
        # lost) leaves every finished part for the retry; the index, the part's commit marker, last.
        for path in (tensors, index):
            upload_file(path, f"{prefix}/{path.relative_to(out).as_posix()}")

    try:
        return run_precompute([metadata / s for s in job.sources], model_reference(job.model), out, config,
                              shard_sources=shards, on_part=upload_part)
    finally:
        # The config and, when the run finished, precompute.json (the parts are up already).
        for path in sorted(out.glob("*")) if out.is_dir() else []:
            if path.is_file() and not path.name.startswith(".emu-s3"):
                upload_file(path, f"{prefix}/{path.name}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu.precompute.remote", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the PrecomputeJob as JSON")
    parser.add_argument("--workdir", default="", help="local folder for the metadata and the parts (default: one "
                                                      "per job under the temp dir)")
    args = parser.parse_args(argv)
    import logging

    from emu.errors import EmuError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    job = PrecomputeJob.from_json(args.job)
    digest = hashlib.sha256(args.job.encode()).hexdigest()[:16]
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"emu-precompute-{digest}")
    # KubeRay stops a driver with SIGTERM (its RayJob deleted with the task's pod): end through
    # the `finally` clauses, which upload what this attempt finished.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        summary = run(job, workdir)
    except EmuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(summary.describe(), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)  # everything is in S3; the head's disk is shared by every run
    return 0


if __name__ == "__main__":
    sys.exit(main())
