"""What every rank of a distributed training task runs: `python -m emu.cluster.node --job JSON`,
under torchrun (over one pod's GPUs, or on every node of a Kubeflow Trainer TrainJob).

A `NodeJob` is one training stage with its resolved configs, self-contained so that a node with
nothing but the image and the platform's settings can run it:
  * inputs are local paths (one pod: the task's own files) or DVC md5s (TrainJob nodes: pulled
    from the DVC remote, EMU_DVC_REMOTE, into a local folder, once per node);
  * config values that name an input are written `{input:NAME}/rest` and resolved on the node;
  * `out` is a local folder, or an s3:// URI: then the node trains into a local folder and global
    rank 0 uploads the result (export, metrics, summary; checkpoints stay apart) there.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: The stages this runs and the config sections each takes (its own first).
STAGE_SECTIONS = {"stage1": ("stage1", "model"), "stage2": ("stage2",), "decoder": ("decoder", "visual_decoder"),
                  "instruct": ("instruct",)}
_REF = re.compile(r"\{input:([A-Za-z0-9_]+)\}")
#: What rank 0 uploads of a finished stage: everything but the checkpoints (resume state only,
#: terabytes at 37B; emu.artifacts.checkpoint_sync keeps those).
RESULT_EXCLUDE = ("checkpoints",)


@dataclass
class NodeJob:
    stage: str
    configs: dict[str, dict[str, Any]]
    #: input name -> a local path, or `md5:<DVC md5>` of an artifact in the DVC remote
    inputs: dict[str, str] = field(default_factory=dict)
    #: the training data: folders under the `dataset` input
    sources: list[str] = field(default_factory=list)
    out: str = ""

    def __post_init__(self) -> None:
        if self.stage not in STAGE_SECTIONS:
            raise ValueError(f"unknown stage {self.stage!r}; stages: {', '.join(STAGE_SECTIONS)}")
        missing = [s for s in STAGE_SECTIONS[self.stage] if s not in self.configs]
        if missing:
            raise ValueError(f"the {self.stage} job lacks the config sections {missing}")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> NodeJob:
        return cls(**json.loads(text))


def for_paths(stage: str, configs: dict[str, dict[str, Any]], inputs: dict[str, tuple[Path, str]],
              sources: list[Path], out: str, by_md5: bool) -> NodeJob:
    """A job for `configs` whose values may name the local `inputs` (name -> (path, md5)): kept as
    paths (`by_md5` false: the ranks share this file system) or turned into `{input:NAME}`
    references pulled by md5 on each node."""
    text = json.dumps(configs)
    refs = {}
    for name, (path, md5) in inputs.items():
        if by_md5:
            if not md5:
                raise ValueError(f"input {name} ({path}) has no DVC md5: a TrainJob node could not fetch it")
            text = text.replace(json.dumps(str(path))[1:-1], "{input:%s}" % name)
        refs[name] = f"md5:{md5}" if by_md5 else str(path)
    dataset = Path(inputs["dataset"][0])
    return NodeJob(stage=stage, configs=json.loads(text), inputs=refs,
                   sources=[str(Path(s).relative_to(dataset)) for s in sources], out=out)


def resolve_inputs(job: NodeJob, cache: Path) -> dict[str, Path]:
    """Local folders of the job's inputs, pulling DVC md5s into `cache` once per node (the first
    rank pulls, the node's other ranks wait on its lock)."""
    from emu.artifacts.dvc import ArtifactStore

    local = {}
    for name, ref in job.inputs.items():
        if ref.startswith("md5:"):
            local[name] = ArtifactStore(os.environ.get("EMU_DVC_REMOTE") or None).pull_cached(ref[len("md5:"):], cache)
        else:
            local[name] = Path(ref)
    return local


def substitute(configs: dict[str, Any], local: dict[str, Path]) -> dict[str, Any]:
    def one(match: re.Match) -> str:
        if match.group(1) not in local:
            raise ValueError(f"config names input {match.group(1)!r}, which the job does not have")
        return json.dumps(str(local[match.group(1)]))[1:-1]

    return json.loads(_REF.sub(one, json.dumps(configs)))


def run(job: NodeJob, workdir: Path) -> Path:
    """Train the job's stage on this rank; returns the local output folder."""
    from emu.config import from_dict
    from emu.sections import SECTIONS
    from emu.train import stages
    from emu.train.engine import init_distributed, shutdown_distributed

    local = resolve_inputs(job, workdir / "inputs")
    configs = substitute(job.configs, local)
    built = [from_dict(SECTIONS[s](), configs[s], where=s, origin=f"the {job.stage} job")
             for s in STAGE_SECTIONS[job.stage]]
    sources = [local["dataset"] / s for s in job.sources]
    out = Path(job.out) if not job.out.startswith("s3://") else workdir / "out"
    rank, _ = init_distributed()
    try:
        function = {"stage1": stages.stage1, "stage2": stages.stage2, "decoder": stages.train_decoder,
                    "instruct": stages.instruct}[job.stage]
        if len(built) == 2:
            function(built[0], built[1], sources, out)
        else:
            function(built[0], sources, out)
    finally:
        shutdown_distributed()
    if rank == 0 and job.out.startswith("s3://"):
        from emu.artifacts.s3 import upload_folder

        staged = workdir / "result"
        shutil.copytree(out, staged, ignore=lambda d, names: [n for n in names if Path(d) == out
                                                               and n in RESULT_EXCLUDE], dirs_exist_ok=True)
        upload_folder(staged, job.out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m emu.cluster.node", description=__doc__.splitlines()[0])
    parser.add_argument("--job", required=True, help="the NodeJob as JSON")
    parser.add_argument("--workdir", default="", help="local folder for inputs and output (default: one per "
                                                      "job under the temp dir, shared by the node's ranks)")
    args = parser.parse_args(argv)
    from emu.errors import EmuError
    from emu.train.trainer import Preempted

    job = NodeJob.from_json(args.job)
    digest = hashlib.sha256(args.job.encode()).hexdigest()[:16]
    workdir = Path(args.workdir or Path(tempfile.gettempdir()) / f"emu-{job.stage}-{digest}")
    try:
        run(job, workdir)
    except Preempted as exc:
        print(str(exc), file=sys.stderr)
        return 143
    except EmuError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
