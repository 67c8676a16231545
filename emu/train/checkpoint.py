"""Checkpoints that a crash can never corrupt: write a new tag folder, then atomically switch the
`latest` pointer to it, then prune old tags.

    <out>/checkpoints/step-00000040/     DeepSpeed model/optimizer/scheduler states
                         trainer-rank0.json   step, data position (per rank), metrics totals
                         rng-rank0.pt         python/numpy/torch (and CUDA) RNG states (per rank)
    <out>/checkpoints/latest             the tag of the last complete checkpoint

A run killed while writing step-00000080 still resumes from step-00000040: `latest` names a tag
only after every rank has finished writing it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

LATEST = "latest"


def tag_of(step: int) -> str:
    return f"step-{step:08d}"


def latest_tag(folder: Path) -> str | None:
    """The tag `latest` points to, or None for a fresh run. A pointer to a missing tag is an error:
    it means the checkpoint folder was damaged by something other than this code."""
    pointer = Path(folder) / LATEST
    if not pointer.is_file():
        return None
    tag = pointer.read_text(encoding="utf-8").strip()
    if not (Path(folder) / tag).is_dir():
        raise FileNotFoundError(f"{pointer} names {tag!r} but {folder / tag} does not exist")
    return tag


def point_latest(folder: Path, tag: str) -> None:
    """Atomically make `tag` the checkpoint to resume from (rank 0, after all ranks saved)."""
    tmp = Path(folder) / (LATEST + ".tmp")
    tmp.write_text(tag + "\n", encoding="utf-8")
    os.replace(tmp, Path(folder) / LATEST)


def prune(folder: Path, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete tags, never the one `latest` names."""
    current = latest_tag(folder)
    tags = sorted(p.name for p in Path(folder).glob("step-*") if p.is_dir())
    doomed = [t for t in tags[:-keep] if t != current] if keep > 0 else []
    for tag in doomed:
        shutil.rmtree(Path(folder) / tag, ignore_errors=True)
    return doomed


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_rank_state(tag_dir: Path, rank: int, trainer_state: dict[str, Any]) -> None:
    tag_dir.mkdir(parents=True, exist_ok=True)
    (tag_dir / f"trainer-rank{rank}.json").write_text(json.dumps(trainer_state, indent=1), encoding="utf-8")
    torch.save(rng_state(), tag_dir / f"rng-rank{rank}.pt")


def load_rank_state(tag_dir: Path, rank: int) -> dict[str, Any]:
    path = tag_dir / f"trainer-rank{rank}.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the checkpoint was written by a run with fewer "
                                f"processes, or is incomplete")
    restore_rng(torch.load(tag_dir / f"rng-rank{rank}.pt", weights_only=False))
    return json.loads(path.read_text(encoding="utf-8"))
