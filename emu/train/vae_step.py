"""The VAE phase of the decoder stage: train the decoder's AutoencoderKL on the stage's images
before the UNet, when no pretrained VAE is named (`decoder.init` empty; emu.model.vae says why).

    out/vae/metrics.jsonl, out/vae/tensorboard/, out/vae/checkpoints/   this phase's trainer
    then the UNet phase in out/ on the latents of the VAE, frozen from here on (Emu2 §2.2.3)

The phase is an ordinary Trainer run with its own engine and checkpoints, so it resumes exactly
like any stage; a finished phase is not run again when the UNet phase resumes. Inputs are the
crops the UNet phase sees (SDXL's random scale-and-crop when `decoder.augment`, else the center
crop), pixels in [-1, 1]. Multi-rank: as in emu.train.decoder_step, every rank runs the step's
largest micro-batch count, the extra ones zero-weight.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import random
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from emu.data.schema import Sample
from emu.model.decoder import VisualDecoder
from emu.model.vae import VAEObjective, latent_scaling_factor
from emu.precompute.encoder import center_crop, unit_range
from emu.train import engine as engine_mod
from emu.train.config import DecoderTrainConfig
from emu.train.data import build_mixture
from emu.train.decoder_step import scale_and_crop, target
from emu.train.metrics import peak_flops
from emu.train.schedule import multiplier
from emu.train.trainer import StepResult, Trainer

log = logging.getLogger(__name__)

#: Images whose latents set the scaling factor (LDM: the first batch; more gives a steadier std).
SCALE_IMAGES = 64
#: Offset of the VAE phase's noise seeds from the UNet phase's (same seed, rank and step).
VAE_STREAM = 500_000_009


class VAEStep:
    """One optimizer step of the VAE on a rank's samples."""

    def __init__(self, *, engine: engine_mod.Engine, config: DecoderTrainConfig, rank: int, world: int):
        self.engine, self.config, self.rank, self.world = engine, config, rank, world

    def prepare(self, samples: list[Sample], step: int) -> list[Sample]:
        return samples  # crops need the step's generator, so they run with the step

    def pixels(self, samples: list[Sample], rng: random.Random) -> torch.Tensor:
        size = self.config.output_size
        if self.config.augment:
            crops = [scale_and_crop(Image.open(io.BytesIO(target(s)[2])).convert("RGB"), size, rng)[0] for s in samples]
        else:
            crops = [center_crop(target(s)[2], size)[0] for s in samples]
        return unit_range(crops).to(self.engine.device)

    def __call__(self, samples: list[Sample], step: int) -> StepResult:
        seed = self.config.runtime.seed
        # Seeded by (seed, rank, step) like the UNet phase, offset into a stream of its own.
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + self.rank * 7_919 + step + VAE_STREAM)
        rng = random.Random(f"vae:{seed}:{self.rank}:{step}")
        micro = self.config.runtime.micro_batch_size
        parts = [samples[i:i + micro] for i in range(0, len(samples), micro)]
        counts = engine_mod.all_reduce_sum(
            [len(samples)] + [len(parts) if r == self.rank else 0 for r in range(self.world)], device=self.engine.device)
        total, rounds = counts[0], int(max(counts[1:]))
        sums = torch.zeros(3, device=self.engine.device)
        size = self.config.output_size
        for i in range(rounds):
            if i < len(parts):
                pixels, weight = self.pixels(parts[i], rng), len(parts[i]) * self.world / total
            else:  # a zero-weight micro-batch: every rank runs as many backward passes
                pixels, weight = torch.zeros(1, 3, size, size, device=self.engine.device), 0.0
            out = self.engine.engine(pixels, generator=generator)
            self.engine.backward(out.loss * weight)
            if weight:
                sums += torch.stack([out.loss.detach(), out.reconstruction.detach(), out.kl.detach()]).float() * len(parts[i])
        loss, reconstruction, kl = engine_mod.all_reduce_sum(sums.tolist(), device=self.engine.device)
        return StepResult(losses={"loss": loss / total, "reconstruction": reconstruction / total, "kl": kl / total},
                          samples=len(samples))


def train_vae(config: DecoderTrainConfig, decoder: VisualDecoder, data: list[Path], out: Path, rank: int,
              world: int) -> dict[str, Any]:
    """Train `decoder.vae` for `config.vae_steps` steps (a Trainer in `out`, resuming from its checkpoints), freeze
    it, and set its latent scaling factor from the trained encoder (in `decoder.vae.config` and
    `decoder.config`, so the exported folder is consistent). Returns the phase's summary."""
    objective = VAEObjective(decoder.vae.requires_grad_(True).train(), kl_weight=config.vae_kl_weight)
    engine = engine_mod.Engine(objective, [{"name": "vae", "lr": config.vae_lr, "params": list(decoder.vae.parameters())}],
                               config.runtime, config.optimizer,
                               lambda s: multiplier(s, config.vae_steps, config.schedule))
    summary = Trainer(engine=engine, data=build_mixture(data, config.batch_sizes, config.runtime.seed, rank, world),
                      step_fn=VAEStep(engine=engine, config=config, rank=rank, world=world), out_dir=out,
                      steps=config.vae_steps, runtime=config.runtime, rank=rank, world=world, stage="decoder-vae",
                      peak_flops=peak_flops(config.runtime.peak_tflops)).run()
    decoder.vae.requires_grad_(False).eval()
    factor = latent_scaling_factor(decoder.vae, _scale_pixels(config, data, engine.device))
    decoder.vae.register_to_config(scaling_factor=factor)
    decoder.config = dataclasses.replace(decoder.config, vae_scaling_factor=factor)
    log.info("decoder-vae: trained %d steps, latent scaling factor %.4f", config.vae_steps, factor)
    return {"steps": config.vae_steps, "resumed_from": summary.resumed_from, "seconds": round(summary.seconds, 2),
            "scaling_factor": factor,
            "final": {k: summary.final[k] for k in ("loss", "reconstruction", "kl") if k in summary.final}}


def _scale_pixels(config: DecoderTrainConfig, data: list[Path], device: torch.device) -> torch.Tensor:
    """The first SCALE_IMAGES center crops of the global data order: the same on every rank, so
    every rank sets the same factor."""
    mixture = build_mixture(data, config.batch_sizes, config.runtime.seed, 0, 1)
    crops: list = []
    while len(crops) < SCALE_IMAGES:
        crops += [center_crop(target(s)[2], config.output_size)[0] for s in mixture.next_batch()]
    return unit_range(crops[:SCALE_IMAGES]).to(device)
