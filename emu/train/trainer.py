"""The training loop every stage shares: data -> step function -> optimizer step -> metrics ->
checkpoints, with exact resume and preemption handling.

Resume is exact: the DeepSpeed engine restores model, optimizer and LR scheduler; each rank
restores its data position and RNG states; and every random choice of a step comes from
generators seeded by the step (image/text order and entity dropping by (seed, step, sample),
condition dropout and diffusion noise by (seed, step, rank)), so a resumed run computes what the
uninterrupted one would have, bit for bit on CPU in fp32. Data loader workers may have read
ahead; the position saved is that of the steps trained (emu.train.loader).

SIGTERM (a preempted pod) does not kill the step in flight: the loop finishes it, every rank
agrees to stop, a checkpoint is written, and `Preempted` is raised (the CLI exits 143).
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from emu.errors import EmuError
from emu.train import checkpoint as ckpt
from emu.train.config import RuntimeConfig
from emu.train.engine import Engine, all_reduce_sum, barrier
from emu.train.loader import StepLoader
from emu.train.metrics import MetricsLog

log = logging.getLogger(__name__)


class Preempted(Exception):
    """Training stopped on SIGTERM after writing a checkpoint; re-running resumes it."""


class Diverged(EmuError):
    """The loss was non-finite for more steps in a row than runtime.nonfinite_patience allows."""


class DataSource(Protocol):
    def next_batch(self) -> list: ...
    def advance(self, steps: int = 1) -> None: ...
    def state(self) -> dict: ...
    def restore(self, state: dict) -> None: ...


class StepFn(Protocol):
    """A stage's step: `prepare` turns a rank's samples into inputs (in a data loader worker,
    emu.train.loader); calling it runs them (forward, backward) and reports."""

    def prepare(self, samples: list, step: int) -> Any: ...
    def __call__(self, prepared: Any, step: int) -> StepResult: ...


@dataclass
class StepResult:
    """What a step function reports (local to this rank); the trainer sums counts over ranks."""

    losses: dict[str, float]          # e.g. loss, text_loss, image_loss (already global means)
    samples: int = 0
    tokens: int = 0                   # positions processed (real, not padding)
    padding: int = 0                  # padding positions processed
    flops: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)



@dataclass
class TrainSummary:
    steps: int
    resumed_from: int
    seconds: float
    final: dict[str, Any]
    checkpoint: str


class Trainer:
    def __init__(self, *, engine: Engine, data: DataSource, step_fn: StepFn, out_dir: Path, steps: int,
                 runtime: RuntimeConfig, rank: int, world: int, stage: str,
                 peak_flops: float | None = None, on_step_start: Callable[[int], None] | None = None):
        self.engine = engine
        self.data = data
        self.step_fn = step_fn
        self.out_dir = Path(out_dir)
        self.steps = steps
        self.runtime = runtime
        self.rank, self.world = rank, world
        self.stage = stage
        self.peak_flops = peak_flops
        self.on_step_start = on_step_start
        self.checkpoints = self.out_dir / "checkpoints"
        self._stop_requested = False
        self._nonfinite = 0  # steps in a row with a non-finite loss

    def run(self) -> TrainSummary:
        start, tag = self._resume()
        metrics = MetricsLog(self.out_dir, self.steps, start, enabled=self.rank == 0,
                             progress=self.runtime.progress, stage=self.stage,
                             history=self.checkpoints / tag / "metrics.jsonl" if tag else None)
        self._metrics = metrics
        previous = signal.signal(signal.SIGTERM, self._request_stop)
        began = time.perf_counter()
        last: dict[str, Any] = dict(metrics.last)
        batches = iter(StepLoader(self.data, self.step_fn.prepare, start, self.steps,
                                  workers=self.runtime.loader_workers, prefetch=self.runtime.loader_prefetch))
        try:
            for step in range(start, self.steps):
                if self._agree_to_stop():
                    self._save(step)
                    raise Preempted(f"{self.stage}: stopped by SIGTERM after {step} steps; "
                                    f"checkpoint {ckpt.tag_of(step)} written, re-run to resume")
                last = self._train_step(step, batches, metrics)
                self._check_finite(step, last)
                done = step + 1
                if self.runtime.checkpoint_every and done % self.runtime.checkpoint_every == 0 and done < self.steps:
                    self._save(done)
            if start < self.steps or ckpt.latest_tag(self.checkpoints) is None:
                self._save(self.steps)
        finally:
            signal.signal(signal.SIGTERM, previous)
            metrics.close()
        return TrainSummary(steps=self.steps, resumed_from=start, seconds=time.perf_counter() - began,
                            final=last, checkpoint=str(self.checkpoints / ckpt.tag_of(self.steps)))

    # ---- one step --------------------------------------------------------------------------

    def _train_step(self, step: int, batches: Iterator[tuple[int, Any]], metrics: MetricsLog) -> dict[str, Any]:
        if self.on_step_start is not None:
            self.on_step_start(step)
        began = time.perf_counter()
        prepared_step, prepared = next(batches)
        waited = time.perf_counter() - began  # the training thread idle, waiting for its inputs
        if prepared_step != step:
            raise RuntimeError(f"{self.stage}: the data loader gave step {prepared_step} for step {step}")
        lrs = self.engine.learning_rates()
        result = self.step_fn(prepared, step)
        self.engine.step()
        seconds = time.perf_counter() - began
        samples, tokens, padding, flops = all_reduce_sum(
            [result.samples, result.tokens, result.padding, result.flops], device=self.engine.device)
        record: dict[str, Any] = {"step": step + 1, **result.losses, **{f"lr/{k}": v for k, v in lrs.items()},
                                  "grad_norm": self.engine.grad_norm, "samples_per_s": samples / seconds,
                                  "tokens_per_s": tokens / seconds,
                                  "padding_fraction": padding / max(1.0, tokens + padding),
                                  "step_seconds": seconds, "loader_wait_fraction": waited / seconds, **result.extra}
        if flops and self.peak_flops:
            record["mfu"] = flops / seconds / (self.peak_flops * self.world)
        record["tflops_per_s"] = flops / seconds / 1e12
        record["step_tflops"] = flops / 1e12  # the model FLOPs of the step, all ranks: MFU's numerator
        if step % self.runtime.log_every == 0 or step + 1 == self.steps:
            metrics.log(record)
        return record

    def _check_finite(self, step: int, record: dict[str, Any]) -> None:
        """Stop (Diverged) once the loss has been non-finite for more than nonfinite_patience steps
        in a row: training on would export a NaN model and exit 0. The loss is already the global
        mean, so every rank decides alike."""
        loss = record.get("loss")
        if loss is None or math.isfinite(loss):
            self._nonfinite = 0
            return
        self._nonfinite += 1
        if self._nonfinite > self.runtime.nonfinite_patience:
            raise Diverged(f"{self.stage}: the loss is {loss} at step {step + 1} ({self._nonfinite} non-finite step(s) in "
                           f"a row; {self.stage}.runtime.nonfinite_patience={self.runtime.nonfinite_patience}); "
                           f"lower the learning rates or check the data; the last checkpoint is kept")

    # ---- checkpoints -----------------------------------------------------------------------

    def _save(self, step: int) -> None:
        tag = ckpt.tag_of(step)
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        barrier()
        self.engine.save(self.checkpoints, tag, client_state={"step": step})
        ckpt.save_rank_state(self.checkpoints / tag, self.rank, {"step": step, "data": self.data.state()})
        self._metrics.snapshot(self.checkpoints / tag)  # the curve up to this step, for a resume elsewhere
        barrier()  # every rank has written the tag before the pointer moves
        if self.rank == 0:
            ckpt.point_latest(self.checkpoints, tag)
            ckpt.prune(self.checkpoints, self.runtime.keep_checkpoints)
        barrier()
        log.info("%s: checkpoint %s", self.stage, tag)

    def _resume(self) -> tuple[int, str | None]:
        """(step, tag) of the checkpoint resumed from; (0, None) for a fresh start."""
        tag = ckpt.latest_tag(self.checkpoints) if self.checkpoints.is_dir() else None
        if tag is None:
            return 0, None
        client = self.engine.load(self.checkpoints, tag)
        state = ckpt.load_rank_state(self.checkpoints / tag, self.rank)
        if state.get("step") != client.get("step"):
            raise RuntimeError(f"checkpoint {tag}: engine step {client.get('step')} and trainer step "
                               f"{state.get('step')} disagree")
        self.data.restore(state["data"])
        log.info("%s: resumed from %s", self.stage, tag)
        return int(state["step"]), tag

    # ---- preemption ------------------------------------------------------------------------

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True

    def _agree_to_stop(self) -> bool:
        """Every rank stops at the same step if any rank was signalled."""
        return all_reduce_sum([1.0 if self._stop_requested else 0.0], device=self.engine.device)[0] > 0
