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

import contextlib
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


def collective_device() -> torch.device:
    """Where small collectives must live: NCCL reduces only CUDA tensors, gloo only CPU ones."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: list[float], device: torch.device | None = None) -> list[float]:
    """Sum small per-rank numbers (token counts, losses) across ranks, on `device` (default: the
    process group's device: a CPU tensor on an NCCL group fails at the first step)."""
    return _all_reduce(values, "sum", device)


def all_reduce_max(values: list[float], device: torch.device | None = None) -> list[float]:
    """The largest of each per-rank number (micro-batches per step) across ranks."""
    return _all_reduce(values, "max", device)


def _all_reduce(values: list[float], op: str, device: torch.device | None) -> list[float]:
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [float(v) for v in values]
    tensor = torch.tensor(values, dtype=torch.float64, device=device or collective_device())
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
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
    if runtime.zero_stage == 3:
        config["zero_optimization"]["stage3_param_persistence_threshold"] = runtime.zero3_persistence_threshold
    if runtime.precision == "bf16" and runtime.zero_stage >= 1:
        # Accumulate and reduce gradients in fp32: a step sums many small weighted micro-batch
        # gradients (the exact token mean), which bf16's 8-bit mantissa would round away.
        # DeepSpeed offers no such mix without ZeRO (ZeRO 0 bf16 accumulates in bf16).
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if optimizer.fused and torch.cuda.is_available():
        config["optimizer"]["params"]["fused"] = True  # passed on to torch.optim.AdamW (torch_adam)
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
        """Reduce gradients, clip, update, advance the LR schedule. Records the pre-clip global
        gradient norm."""
        if self.engine.zero_optimization() or self.engine.bfloat16_enabled():
            self.engine.step()  # ZeRO and the bf16 optimizer compute the global norm inside step()
            norm = self.engine.get_global_grad_norm()
        else:
            # Plain data parallel: DeepSpeed would all-reduce inside step() and never report the
            # norm. Reduce first (the averaging all-reduce step() runs at its boundary), so the
            # norm is the global one, not this rank's; then step without a second reduction.
            self.engine.buffered_allreduce_fallback()
            grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])) if grads else 0.0
            self.engine.enable_backward_allreduce = False
            try:
                self.engine.step()
            finally:
                self.engine.enable_backward_allreduce = True
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

    def consolidated_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on CPU for rank 0 to save; None on the other ranks. ZeRO-3 gathers one
        module at a time, so no GPU holds the whole model; rank 0's host memory does hold it
        once (the module's dtype: 74 GB for Emu2-37B in bf16)."""
        import torch.distributed as dist

        if self.engine.zero_optimization_partition_weights():
            return self.engine._zero3_consolidated_16bit_state_dict()
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()}


class PartitionedInit:
    """Where models are built for a stage: under ZeRO-3, inside `deepspeed.zero.Init` (each module's
    parameters are partitioned as soon as it is constructed) with transformers told about ZeRO-3
    (`HfDeepSpeedConfig`: its from_pretrained reads checkpoints on rank 0 into the partitions and
    initialises fresh weights gathered), so host memory holds one partition per rank instead of a
    whole fp32 model per rank (DESIGN.md multi-rank rules). Other ZeRO stages: plain construction.

        with PartitionedInit(runtime, optimizer) as init:
            model, tokenizer = load_model(path, load_weights=init.load_weights)
    """

    def __init__(self, runtime: RuntimeConfig, optimizer: OptimizerConfig):
        self.enabled = runtime.zero_stage == 3
        self._config = deepspeed_config(runtime, optimizer)
        self._zero_init = None
        self._hf_config = None

    def __enter__(self) -> PartitionedInit:
        if self.enabled:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
            # transformers keeps only a weak reference: it must live while models are built and resized.
            self._hf_config = HfDeepSpeedConfig(self._config)
            self._zero_init = deepspeed.zero.Init(config_dict_or_path=self._config)
            self._zero_init.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._zero_init is not None:
            self._zero_init.__exit__(*exc)
            self._zero_init = None
        # Models are built: transformers forgets ZeRO-3, so nothing built later in this process
        # (another stage, a test) is partitioned by accident.
        if self._hf_config is not None:
            from transformers.integrations.deepspeed import unset_hf_deepspeed_config

            unset_hf_deepspeed_config()
            self._hf_config = None

    @contextlib.contextmanager
    def unpartitioned(self):
        """Construction outside `deepspeed.zero.Init`, transformers still told about ZeRO-3: where
        an LM's vocabulary is resized (transformers builds the new embedding as a plain tensor and
        fills it from the gathered old one; inside zero.Init it would come out partitioned and
        empty). DeepSpeed partitions such parameters when the engine starts."""
        if self._zero_init is None:
            yield
            return
        import deepspeed

        self._zero_init.__exit__(None, None, None)
        try:
            yield
        finally:
            self._zero_init = deepspeed.zero.Init(config_dict_or_path=self._config)
            self._zero_init.__enter__()

    def load_weights(self, model: nn.Module, file: Path, skip_prefix: str = "lm.",
                     resize: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> None:
        """Copy a safetensors file's tensors into `model` (keys = its state-dict names, except those
        under `skip_prefix`, which another loader fills), refusing missing or unexpected keys and
        other shapes. `resize[key]` adapts a stored tensor to the model's shape (positions
        interpolated to the stage's input size). Partitioned (ZeRO-3): rank 0 alone reads the
        file, tensor by tensor, into each module's gathered parameters."""
        from emu.model.io import check_state_keys, load_weights_whole

        if not self.enabled:
            load_weights_whole(model, file, resize)
            return
        resize = resize or {}
        expected = {k: tuple(getattr(v, "ds_shape", v.shape)) for k, v in _named_tensors(model)
                    if not k.startswith(skip_prefix)}
        import deepspeed
        import torch.distributed as dist
        from safetensors import safe_open

        rank = dist.get_rank()
        # a safetensors file, or already a source with the same interface (emu.model.pretrained.TensorSource)
        handle = (file if hasattr(file, "get_tensor") else safe_open(str(file), framework="pt")) if rank == 0 else None
        problem: list[str | None] = [None]
        if rank == 0:
            try:
                check_state_keys(file, expected, {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()},
                                 set(resize))
            except Exception as exc:  # every rank must learn of it, or the others wait in a gather forever
                problem = [str(exc)]
        dist.broadcast_object_list(problem, src=0)
        if problem[0] is not None:
            from emu.errors import ConfigError

            raise ConfigError(problem[0])
        for prefix, module in model.named_modules():
            if prefix == skip_prefix.rstrip(".") or prefix.startswith(skip_prefix):
                continue
            params = dict(module.named_parameters(recurse=False))
            buffers = {n: b for n, b in module.named_buffers(recurse=False) if n not in module._non_persistent_buffers_set}
            if not params and not buffers:
                continue
            stored, problem = {}, [None]
            if rank == 0:
                try:
                    for name in [*params, *buffers]:
                        key = f"{prefix}.{name}" if prefix else name
                        stored[name] = resize[key](handle.get_tensor(key)) if key in resize else handle.get_tensor(key)
                except Exception as exc:  # e.g. a truncated file: all ranks stop, none waits in the gather
                    problem = [f"{file}: cannot read the weights of {prefix or 'the model'}: {exc}"]
            dist.broadcast_object_list(problem, src=0)
            if problem[0] is not None:
                from emu.errors import ConfigError

                raise ConfigError(problem[0])
            with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=0), torch.no_grad():
                if rank == 0:
                    for name, param in params.items():
                        param.data.copy_(stored[name])
            for name, buffer in buffers.items():  # buffers are not partitioned: every rank takes rank 0's
                value = (stored[name] if rank == 0 else torch.empty_like(buffer)).to(collective_device(), buffer.dtype)
                dist.broadcast(value, src=0)
                with torch.no_grad():
                    buffer.copy_(value.to(buffer.device))


def _named_tensors(model: nn.Module):
    """State-dict entries (parameters and persistent buffers) without materialising ZeRO-3 ones."""
    yield from model.named_parameters()
    for prefix, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{prefix}.{name}" if prefix else name), buffer


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
