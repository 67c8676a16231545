"""One optimizer step of visual-decoder training (Emu2 §2.2.3).

Each image gets SDXL's augmentation, "ratio-preserving random scaling followed by random
cropping of a square portion" (Emu2 App. B.3.1), with the original size and crop corner passed
to the UNet as size/crop conditions. The frozen encoder turns the crop (at the encoder's input
resolution) into the condition embeddings; the frozen VAE turns the same crop (at the output
resolution) into latents; the UNet learns to denoise those latents given the embeddings: an
autoencoder of the visual embeddings, with 10% of conditions dropped for guidance.
"""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image

from emu.data.schema import Gen, Sample
from emu.model.decoder import VisualDecoder
from emu.model.emu import EmuModel
from emu.model.vision import preprocess
from emu.train.config import DecoderTrainConfig
from emu.train.engine import Engine, all_reduce_sum
from emu.train.trainer import StepResult

#: Random scaling range of the short side relative to the output size (SDXL-style augmentation).
MAX_SCALE = 1.25


def target_image(sample: Sample) -> Image.Image:
    """The image a sample contributes: a generation instruction's target, otherwise its first."""
    index = sample.target if isinstance(sample, Gen) else 0
    return Image.open(io.BytesIO(sample.images[index])).convert("RGB")


def scale_and_crop(image: Image.Image, size: int, rng: random.Random) -> tuple[Image.Image, list[float]]:
    """Scale keeping the aspect ratio so the short side is size x U(1, MAX_SCALE), cut a random
    size x size square. Returns the crop and SDXL's time ids (original h, w, crop top, left,
    target h, w)."""
    width, height = image.size
    short = size * rng.uniform(1.0, MAX_SCALE)
    factor = short / min(width, height)
    scaled_w, scaled_h = max(size, round(width * factor)), max(size, round(height * factor))
    scaled = image.resize((scaled_w, scaled_h), Image.BICUBIC)
    left, top = rng.randint(0, scaled_w - size), rng.randint(0, scaled_h - size)
    crop = scaled.crop((left, top, left + size, top + size))
    return crop, [float(height), float(width), float(top), float(left), float(size), float(size)]


def to_unit_range(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], what the VAE encodes."""
    arrays = np.stack([np.asarray(img, dtype=np.float32) / 127.5 - 1.0 for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


class DecoderStep:
    def __init__(self, *, engine: Engine, decoder: VisualDecoder, encoder: EmuModel, config: DecoderTrainConfig,
                 rank: int, world: int):
        self.engine, self.decoder, self.encoder, self.config = engine, decoder, encoder, config
        self.rank, self.world = rank, world

    def inputs(self, samples: list[Sample], step: int, generator: torch.Generator):
        """(latents, conditions, time ids) of the step's samples; no gradient reaches the encoder or VAE."""
        rng = random.Random(f"{self.config.runtime.seed}:{self.rank}:{step}")
        crops, time_ids = zip(*(scale_and_crop(target_image(s), self.config.output_size, rng) for s in samples))
        with torch.no_grad():
            pixels = preprocess(list(crops), self.encoder.visual.config).to(self.engine.device)
            conditions = self.encoder.encode_images(pixels)
            latents = self.decoder.encode_latents(to_unit_range(list(crops)).to(self.engine.device), generator=generator)
        return latents, conditions, torch.tensor(time_ids)

    def __call__(self, samples: list[Sample], step: int) -> StepResult:
        generator = torch.Generator().manual_seed(self.config.runtime.seed * 1_000_003 + self.rank * 7_919 + step)
        latents, conditions, time_ids = self.inputs(samples, step, generator)
        total = all_reduce_sum([len(samples)])[0]
        loss_sum = dropped = 0.0
        micro = self.config.runtime.micro_batch_size
        for start in range(0, len(samples), micro):
            part = slice(start, start + micro)
            out = self.engine.engine(latents[part], conditions[part], time_ids[part].to(self.engine.device),
                                     condition_drop=self.config.condition_drop,
                                     noise_offset=self.config.noise_offset, generator=generator)
            n = latents[part].shape[0]
            self.engine.backward(out.loss * (n * self.world / total))
            loss_sum += float(out.loss.detach()) * n
            dropped += out.num_dropped
        loss_total, dropped_total = all_reduce_sum([loss_sum, dropped])
        return StepResult(losses={"loss": loss_total / total}, samples=len(samples),
                          extra={"condition_dropped": dropped_total})
