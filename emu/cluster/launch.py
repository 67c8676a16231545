"""How a training task uses what its pod or cluster has (DESIGN.md, "At scale").

    one process          no GPU or one (here, kfp.local, tests): the stage function in process
    torchrun, one pod    several GPUs in the task's pod: torchrun --standalone over them
    TrainJob, N nodes    pipeline.resources.<stage>.nodes > 1: a Kubeflow Trainer TrainJob whose
                         nodes run the same NodeJob under torchrun; the task waits for it, streams
                         its logs and fails with it, then fetches the result from S3

The pipeline tells each task its layout in $EMU_LAUNCH (pipelines/emu_pipeline.py); without it a
task runs in process, or over the GPUs it sees.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emu.cluster.node import NodeJob, for_paths
from emu.cluster.results import fetch_result, remote_prefix

log = logging.getLogger(__name__)

LAUNCH_ENV = "EMU_LAUNCH"


@dataclass
class Launch:
    """One training task's layout (from pipeline.resources.<stage>)."""

    nodes: int = 1
    #: processes per node; 0 = one per GPU the pod sees (in process when it sees none or one)
    procs_per_node: int = 0
    #: the TrainJob's nodes: image, runtime, per-node resources, extra environment
    image: str = ""
    runtime: str = "emu-torch"
    resources: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> Launch:
        text = os.environ.get(LAUNCH_ENV)
        return cls(**json.loads(text)) if text else cls()

    def to_env(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_command(job: NodeJob, procs: int) -> list[str]:
    """torchrun over `procs` processes of this pod."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}",
            "-m", "emu.cluster.node", "--job", job.to_json()]


def node_command(job: NodeJob) -> list[str]:
    """What every TrainJob node runs: torchrun takes nodes, processes per node, node rank and the
    rendezvous from the PET_* variables the Trainer's torch plugin sets on each node."""
    return ["torchrun", "-m", "emu.cluster.node", "--job", job.to_json()]


def train(stage: str, configs: dict[str, Any], inputs: dict[str, tuple[Path, str]], sources: list[Path],
          out: Path, in_process: Callable[[], Any], checkpoints: Path | None = None) -> None:
    """Run the training stage where the task's layout says; `configs` are its resolved config
    objects (section -> dataclass), `inputs` name -> (local path, DVC md5), `in_process` the plain
    call of the stage function, `checkpoints` the task's checkpoint location, mirrored to S3 while
    it trains when EMU_CHECKPOINT_REMOTE is set (emu.artifacts.checkpoint_sync)."""
    from emu.artifacts.checkpoint_sync import mirrored

    with mirrored(checkpoints):
        _train(stage, configs, inputs, sources, out, in_process)


def _train(stage: str, configs: dict[str, Any], inputs: dict[str, tuple[Path, str]], sources: list[Path],
           out: Path, in_process: Callable[[], Any]) -> None:
    from emu.config import to_dict

    launch = Launch.from_env()
    procs = launch.procs_per_node or local_gpus()
    if launch.nodes == 1 and procs <= 1:
        in_process()
        return
    dicts = {section: to_dict(config) for section, config in configs.items()}
    if launch.nodes == 1:
        job = for_paths(stage, dicts, inputs, sources, str(out), by_md5=False)
        log.info("%s: torchrun over %d processes in this pod", stage, procs)
        done = subprocess.run(torchrun_command(job, procs), check=False)
        if done.returncode:
            raise RuntimeError(f"{stage}: torchrun over {procs} processes exited with {done.returncode} "
                               f"(the ranks' errors are above)")
        return
    from emu.cluster import kube, trainjob

    prefix = remote_prefix(f"{stage} runs on {launch.nodes} nodes, which write")
    result = f"{prefix}/results/{stage}-{uuid.uuid4().hex[:12]}"
    job = for_paths(stage, dicts, inputs, sources, result, by_md5=True)
    body = trainjob.build(name=kube.job_name(stage), namespace=kube.own_namespace(), runtime=launch.runtime,
                          image=launch.image, command=node_command(job), nodes=launch.nodes,
                          procs_per_node=procs, resources=launch.resources, env=launch.env)
    trainjob.run(body)
    fetch_result(result, out)
