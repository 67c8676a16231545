"""Training observability: per-step records to JSONL and TensorBoard, a progress bar with ETA, a
final summary, and the FLOP count behind the MFU estimate.

FLOPs of one training step (forward + backward = 3 x forward; a multiply-add is 2 FLOPs):

    LM        6 * N_lm * T  +  12 * L * d * sum_s(len_s^2)  +  6 * d * V * T_text
    encoder   (6 if it trains else 2) * N_vit * P  +  (12 or 4) * L_v * d_v * P^2     per image

N_lm is the LM's parameters without embeddings and output head; T every position the LM
processes, visual tokens included (a 64-token image costs 64 positions); len_s the length of each
packed sequence (attention is block-diagonal, so packing adds no attention FLOPs); d, L, V the
LM width, depth and vocabulary; T_text the scored text targets (logits are computed only there,
emu.model.emu). N_vit and P are the ViT's parameters and tokens per image (patches + CLS). The
attention term follows PaLM (Chowdhery et al. 2022, App. B), counting the full (not causal-half)
score matrix. MFU = FLOPs / step time / peak FLOP/s of the device (RuntimeConfig.peak_tflops, or
the bf16 dense peak of a known GPU); on CPU it is left out unless a peak is configured.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

#: Dense bf16 peak TFLOP/s (vendor datasheets, SXM parts).
KNOWN_PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "A100": 312.0}


@dataclass(frozen=True)
class FlopModel:
    lm_params: int        # non-embedding LM parameters
    lm_layers: int
    lm_width: int
    vocab: int
    vit_params: int
    vit_layers: int
    vit_width: int
    vit_tokens: int       # patches + CLS per image
    encoder_trains: bool

    def step_flops(self, lm_tokens: int, sequence_lengths: list[int], text_targets: int, images: int) -> float:
        lm = 6.0 * self.lm_params * lm_tokens
        lm += 12.0 * self.lm_layers * self.lm_width * sum(n * n for n in sequence_lengths)
        lm += 6.0 * self.lm_width * self.vocab * text_targets
        return lm + self.vision_flops(images)

    def vision_flops(self, images: int) -> float:
        """The encoder's part of step_flops (reported apart: a frozen encoder's forward is cheap
        per FLOP next to the LM's matmuls, and a trained one's dominates stage 1)."""
        passes = 3.0 if self.encoder_trains else 1.0
        return passes * (2.0 * self.vit_params * self.vit_tokens
                         + 4.0 * self.vit_layers * self.vit_width * self.vit_tokens ** 2) * images


def flop_model(model, encoder_trains: bool) -> FlopModel:
    """The FlopModel of an EmuModel (emu.model.emu). Sizes are read from the full parameter
    shapes: under ZeRO-3 a parameter's own tensor is this rank's shard (or empty)."""
    lm = model.lm
    # Embedding and output head are not in N_lm (their FLOPs are the vocabulary term); a tied
    # pair is one parameter, counted once by parameters() and subtracted once here.
    heads = {id(p): p for p in (lm.get_input_embeddings().weight, lm.get_output_embeddings().weight)}
    lm_params = sum(numel(p) for p in lm.parameters()) - sum(numel(p) for p in heads.values())
    vit = model.visual
    cfg = model.config.vision
    return FlopModel(lm_params=lm_params, lm_layers=lm.config.num_hidden_layers, lm_width=lm.config.hidden_size,
                     vocab=lm.get_output_embeddings().out_features,
                     vit_params=sum(numel(p) for p in vit.parameters()), vit_layers=cfg.layers,
                     vit_width=cfg.width, vit_tokens=cfg.grid ** 2 + 1, encoder_trains=encoder_trains)


def numel(param) -> int:
    """Elements of the whole parameter, also when ZeRO-3 holds only a shard of it (`ds_numel`)."""
    return int(getattr(param, "ds_numel", param.numel()))


def peak_flops(configured_tflops: float) -> float | None:
    """Peak FLOP/s per process: the configured value, else a known GPU's bf16 dense peak."""
    if configured_tflops > 0:
        return configured_tflops * 1e12
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, tflops in KNOWN_PEAK_TFLOPS.items():
            if key in name:
                return tflops * 1e12
    return None


class MetricsLog:
    """Rank-0 sink: metrics.jsonl (one object per step), TensorBoard scalars, a tqdm bar.

    metrics.jsonl holds each step once. A fresh run (start_step 0) starts the file anew; a resumed
    one starts it from `history` (the metrics.jsonl saved in the checkpoint it resumes from, which
    holds exactly the steps up to that checkpoint), else from the file's own records up to
    start_step: the steps trained after the checkpoint by the interrupted run are trained again,
    and must not appear twice (the lineage curves are read from this file).
    """

    def __init__(self, out_dir: Path, total_steps: int, start_step: int, enabled: bool = True,
                 progress: bool = True, stage: str = "", history: Path | None = None):
        self.enabled = enabled
        self.total = total_steps
        self.stage = stage
        self.started = time.perf_counter()
        self._first_step = start_step + 1
        self._jsonl = None
        self._writer = None
        self._bar = None
        #: The last record before start_step (a stage resumed at its end reports it as final).
        self.last: dict[str, Any] = {}
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / "metrics.jsonl"
        kept = _records_up_to(history if history is not None and history.is_file() else self.path, start_step)
        self.last = json.loads(kept[-1]) if kept else {}
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        os.replace(tmp, self.path)
        self._jsonl = open(self.path, "a", encoding="utf-8")
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(out_dir / "tensorboard"))
        self._report_every = max(1, total_steps // 10)
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc=stage or "train", unit="step",
                             dynamic_ncols=True, leave=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # A diverged step logs null, not NaN: the file stays valid JSON for every reader.
        clean = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()}
        self._jsonl.write(json.dumps(clean, allow_nan=False, default=str) + "\n")
        self._jsonl.flush()
        step = record["step"]
        for name, value in record.items():
            if name != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        losses = {k: f"{record[k]:.3g}" for k in ("loss", "text_loss", "image_loss") if isinstance(record.get(k), float)}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(losses)
        elif step % self._report_every == 0 or step == self.total:
            # Not a terminal (a pipeline task's log): a line every tenth of the run, with the ETA.
            elapsed = time.perf_counter() - self.started
            done = step - self._first_step + 1
            eta = elapsed / max(1, done) * (self.total - step)
            log.info("%s step %d/%d %s; %.0f s elapsed, ETA %.0f s", self.stage or "train", step, self.total,
                     " ".join(f"{k} {v}" for k, v in losses.items()), elapsed, eta)

    def snapshot(self, folder: Path) -> None:
        """Copy metrics.jsonl (every step logged so far) into a checkpoint folder."""
        if self.enabled:
            shutil.copyfile(self.path, Path(folder) / "metrics.jsonl")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        if self._jsonl is not None:
            self._jsonl.close()


def _records_up_to(path: Path, step: int) -> list[str]:
    """The lines of a metrics.jsonl whose step is at most `step` (none for a fresh start)."""
    if step <= 0 or not path.is_file():
        return []
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [line for line in lines if json.loads(line).get("step", 0) <= step]
