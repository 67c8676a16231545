"""The DeepSpeed adapter: the only module that imports DeepSpeed (DESIGN.md convention 5).

It turns a stage's runtime/optimizer settings into a DeepSpeed config, builds the engine with
the stage's parameter groups and LR multiplier, and exposes the few operations the trainer
needs. Gradient accumulation is driven by the trainer (a step's packed rows vary in number), so
DeepSpeed runs unmanaged (`managed_gradient_accumulation: false`, DeepSpeed 0.19): backward only
accumulates, and `step()` reduces gradients and updates, once per trainer step.

CPU notes (../shared/ENVIRONMENT.md): AdamW with `torch_adam` avoids compiling FusedAdam; the
shared-memory all-reduce op is disabled so gloo needs no C++ build.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from emu.train.config import OptimizerConfig, RuntimeConfig


def init_distributed() -> tuple[int, int]:
    """Join (or, alone, create) the process group: gloo on CPU, NCCL on GPU. Launchers (deepspeed,
    torchrun) set RANK/WORLD_SIZE/MASTER_*; a plain single process gets local defaults. Called by
    the CLI entry point only. Returns (rank, world size)."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   verbose=False)
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Barrier then destroy: without it a rank may abort at exit (../shared/ENVIRONMENT.md)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: list[float]) -> list[float]:
    """Sum small per-rank numbers (token counts) across ranks."""
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor)
    return tensor.tolist()


def deepspeed_config(runtime: RuntimeConfig, optimizer: OptimizerConfig) -> dict[str, Any]:
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,  # rows per micro-batch vary; DeepSpeed only logs this
        "gradient_accumulation_steps": 1,
        "managed_gradient_accumulation": False,  # step() is the boundary: micro-batches per step vary
        "gradient_clipping": optimizer.grad_clip,
        "zero_optimization": {"stage": runtime.zero_stage},
        "bf16": {"enabled": runtime.precision == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": 1.0, "betas": list(optimizer.betas), "eps": optimizer.eps,
            "weight_decay": optimizer.weight_decay, "torch_adam": True}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    return config


class Engine:
    """A DeepSpeed engine with per-group learning rates under one LR multiplier."""

    def __init__(self, model: nn.Module, param_groups: list[dict[str, Any]], runtime: RuntimeConfig,
                 optimizer: OptimizerConfig, lr_multiplier: Callable[[int], float]):
        import deepspeed

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        groups = [g for g in param_groups if any(p.requires_grad for p in g["params"])]
        for group in groups:
            group["params"] = [p for p in group["params"] if p.requires_grad]
            group.setdefault("initial_lr", group["lr"])
        self.group_names = [g.get("name", f"group{i}") for i, g in enumerate(groups)]
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=groups, config=deepspeed_config(runtime, optimizer),
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier))
        self._grad_norm: float | None = None

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate this micro-batch's gradients (the loss is already weighted by the trainer)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """Clip, update, advance the LR schedule. Records the pre-clip global gradient norm."""
        norm = None
        if not self.engine.zero_optimization():  # ZeRO 0 does not expose it: use the full local grads
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) if grads else 0.0
        self.engine.step()
        if norm is None:  # ZeRO computes it inside step()
            norm = self.engine.get_global_grad_norm()
        self._grad_norm = None if norm is None else float(norm)

    @property
    def grad_norm(self) -> float | None:
        return self._grad_norm

    def learning_rates(self) -> dict[str, float]:
        return {name: group["lr"] for name, group in zip(self.group_names, self.optimizer.param_groups)}

    def save(self, folder: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Model, optimizer, LR scheduler and `client_state` under folder/tag (every rank calls)."""
        self.engine.save_checkpoint(str(folder), tag=tag, client_state=client_state, save_latest=False)

    def load(self, folder: Path, tag: str) -> dict[str, Any]:
        path, client_state = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag} under {folder}")
        return client_state or {}

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights on every rank (ZeRO-3 gathers its partitions first)."""
        import deepspeed

        module = self.engine.module
        if self.engine.zero_optimization_partition_weights():
            with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
                return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}
        return {k: v.detach().cpu() for k, v in module.state_dict().items()}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
