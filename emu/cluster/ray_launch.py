"""How the precompute task uses what the cluster has (DESIGN.md, "At scale"):

    Ray in the pod   the default (here, kfp.local, tests): the stage function in process
    RayJob           pipeline.resources.precompute.ray_cluster names a KubeRay RayCluster: a RayJob
                     on it runs the precompute driver (emu.precompute.remote), which reads the shards
                     from the DVC remote and writes the parts to S3; the task streams its log, fails
                     with it, then fetches the parts

The pipeline tells the task its RayCluster in $EMU_RAY_CLUSTER (pipelines/emu_pipeline.py).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emu.cluster.image import DIGEST_ENV
from emu.cluster.results import fetch_result, remote_prefix

#: The KFP run id the task's pod has as environment (emu.pipeline.tasks.KFP_RUN_ENV).
KFP_RUN_ENV = "KFP_RUN_ID"

#: The KubeRay RayCluster the precompute task runs its RayJob on (pipeline.resources.precompute.ray_cluster).
RAY_CLUSTER_ENV = "EMU_RAY_CLUSTER"


def precompute(config: Any, dataset: tuple[Path, str], model: tuple[Path, str], sources: list[Path], out: Path,
               in_process: Callable[[], Any]) -> None:
    """Run precompute where the pipeline says: Ray inside the task's pod, or, with
    $EMU_RAY_CLUSTER naming a KubeRay RayCluster (pipeline.resources.precompute.ray_cluster), as a
    RayJob on it whose driver (emu.precompute.remote) reads the shards from the DVC remote and
    writes the parts to S3, fetched here into `out`. `dataset` and `model` are (path, DVC md5)."""
    from emu.config import to_dict

    cluster = os.environ.get(RAY_CLUSTER_ENV, "")
    if not cluster:
        in_process()
        return
    from emu.cluster import kube, rayjob
    from emu.precompute.remote import PrecomputeJob

    for name, (path, md5) in (("dataset", dataset), ("model", model)):
        if not md5:
            raise RuntimeError(f"precompute on RayCluster {cluster}: input {name} ({path}) has no DVC md5 to "
                               f"fetch it by")
    if config.latents and not str(config.decoder).startswith(("s3://", "md5:")):
        raise RuntimeError(f"precompute on RayCluster {cluster}: precompute.decoder ({config.decoder}) must be an "
                           f"s3:// URI or an md5: reference, which every Ray node can read")
    namespace = kube.own_namespace()
    # The cache key says which code this task runs: the cluster must run that code too.
    digest, image = os.environ.get(DIGEST_ENV, ""), rayjob.head_image(cluster, namespace)
    if digest and digest not in image:
        raise RuntimeError(f"RayCluster {namespace}/{cluster} runs the image {image}, not this task's ({digest}): "
                           f"the precompute would run other code; deploy the cluster with the pipeline's image "
                           f"(infra/image.ref, scripts/build-image)")
    job = PrecomputeJob(config=to_dict(config), dataset=dataset[1],
                        sources=[str(Path(s).relative_to(dataset[0])) for s in sources], model=model[1])
    # Same run and inputs, same prefix: a retried task's driver resumes from the parts its last
    # attempt uploaded; another run never shares (nor deletes) them.
    key = hashlib.sha256((os.environ.get(KFP_RUN_ENV, "") + job.to_json()).encode()).hexdigest()[:16]
    job.out = f"{remote_prefix(f'precompute on RayCluster {cluster} writes')}/results/precompute-{key}"
    body = rayjob.build(name=kube.job_name("precompute"), namespace=namespace, cluster=cluster,
                        entrypoint=remote_command(job))
    rayjob.run(body)
    fetch_result(job.out, out)


def remote_command(job: Any) -> list[str]:
    """The RayJob's entrypoint: the precompute driver, run by `ray job submit` on the head."""
    return ["python", "-m", "emu.precompute.remote", "--job", job.to_json()]


