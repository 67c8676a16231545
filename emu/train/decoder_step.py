"""One optimizer step of visual-decoder training (Emu2 §2.2.3).

The UNet learns to denoise an image's VAE latents given the visual embeddings of that same image:
an autoencoder of the visual embeddings, with 10% of conditions dropped for guidance. Encoder and
VAE are frozen (§2.2.3), so a step's inputs come from one of two places:

  * online (`decoder.precomputed` empty): each image is cropped, with SDXL's augmentation,
    "ratio-preserving random scaling followed by random cropping of a square portion" (Emu2
    App. B.3.1; `decoder.augment`), or with the precompute's center crop; the original size and
    crop corner go to the UNet as SDXL's time ids. The frozen encoder turns the crop (at its input
    resolution) into the condition embeddings, the frozen VAE the crop (at the output resolution)
    into latents: a posterior draw when augmenting (SDXL training), else the posterior mode. Both
    run one micro-batch (`runtime.micro_batch_size`) at a time, just before that micro-batch's
    UNet pass: a rank's whole batch at 1024 px through the VAE at once does not fit in memory;
  * precomputed: the latents, crop embeddings and time ids that `emu precompute` stored for the
    image's center crop (emu.precompute.store.latent_lookup). They equal online encoding with
    `decoder.augment=false`, and the diffusion noise is drawn from the same generator in the same
    order, so both give the same losses.

Multi-rank (DESIGN.md): a rank's batch may hold one sample more than another's, hence one
micro-batch more. Every rank runs the largest micro-batch count of the step; the extra ones are
zero-weight micro-batches that still run the UNet forward and backward, so that every rank's
gradient reduction (ZeRO-2 reduces in backward hooks) sees the same sequence of backward passes.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable

import torch
from PIL import Image

from emu.data.schema import Gen, Sample
from emu.model.decoder import VisualDecoder
from emu.model.vision import preprocess
from emu.precompute.encoder import Encoder, center_crop, unit_range
from emu.train.config import DecoderTrainConfig
from emu.train.engine import Engine, all_reduce_sum
from emu.train.trainer import StepResult

#: Random scaling range of the short side relative to the output size (SDXL-style augmentation).
MAX_SCALE = 1.25

#: (key, image index, image bytes): how the precompute store addresses an image.
Item = tuple[str, int, bytes]
#: latent_lookup's callable: items -> (latents (N, C, h, w), conditions (N, n, D), time ids (N, 6)).
Lookup = Callable[[list[Item]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def target(sample: Sample) -> Item:
    """The image a sample contributes: a generation instruction's target, otherwise its first."""
    index = sample.target if isinstance(sample, Gen) else 0
    return sample.key, index, sample.images[index]


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


class DecoderStep:
    """Trains `decoder.unet` through `engine` on inputs encoded online by the frozen `encoder`, or
    read from `precomputed` (a latent_lookup); exactly one of the two is given.

    It puts every module in the state training needs: the UNet in train mode (diffusers'
    from_pretrained returns it in eval mode), with gradient checkpointing when
    `runtime.gradient_checkpointing`; the VAE and the encoder in eval mode without gradients; the
    encoder on the engine's device in the UNet's dtype (the runtime precision: DeepSpeed's bf16
    mode has cast the decoder, not the encoder)."""

    def __init__(self, *, engine: Engine, decoder: VisualDecoder, config: DecoderTrainConfig, rank: int,
                 world: int, encoder: Encoder | None = None, precomputed: Lookup | None = None):
        if (encoder is None) == (precomputed is None):
            raise ValueError("DecoderStep encodes online with `encoder` or reads `precomputed`: give exactly one")
        self.engine, self.decoder, self.config = engine, decoder, config
        self.rank, self.world = rank, world
        self.device = engine.device
        self.precomputed = precomputed
        decoder.train()  # the UNet; VisualDecoder.train keeps the VAE in eval mode
        decoder.vae.requires_grad_(False)
        if config.runtime.gradient_checkpointing:
            decoder.unet.enable_gradient_checkpointing()
        self.encoder = encoder
        if encoder is not None:
            dtype = next(decoder.unet.parameters()).dtype
            for module in encoder.modules().values():
                if module is not None:
                    module.requires_grad_(False).eval().to(self.device, dtype)

    # ---- inputs ------------------------------------------------------------------------------

    def inputs(self, items: list[Item], rng: random.Random,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, conditions, time ids) of one micro-batch, on the engine's device."""
        if self.precomputed is not None:
            latents, conditions, time_ids = self.precomputed(items)
        else:
            size = self.config.output_size
            if self.config.augment:
                crops, ids = zip(*(scale_and_crop(Image.open(io.BytesIO(data)).convert("RGB"), size, rng)
                                   for _, _, data in items))
            else:  # the precompute's own crop (same function), so both paths see the same pixels
                crops, ids = zip(*(center_crop(data, size) for _, _, data in items))
            with torch.no_grad():
                conditions = self._encode(preprocess(list(crops), self.encoder.visual.config))
                latents = self.decoder.encode_latents(unit_range(list(crops)).to(self.device),
                                                      sample=self.config.augment, generator=generator)
            time_ids = torch.tensor(ids, dtype=torch.float32)
        return latents.to(self.device), conditions.to(self.device), time_ids.to(self.device)

    def _encode(self, pixels_BCHW: torch.Tensor) -> torch.Tensor:
        """(B, n, D) conditions at the encoder's image_tokens_side, what the precompute stores.
        Encoder.encode runs in inference mode; the clone is an ordinary tensor, which autograd
        may save for the UNet's backward (its cross-attention keys and values read it)."""
        side = self.encoder.config.image_tokens_side
        dtype = next(self.encoder.visual.parameters()).dtype
        return self.encoder.encode(pixels_BCHW.to(self.device, dtype), [side])[side].clone()

    def padding(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One all-zero sample with the unconditional embedding, for a zero-weight micro-batch: it
        runs through every UNet layer like a real one, its loss counts for nothing."""
        side = self.config.output_size // self.decoder.vae_scale_factor
        latents = torch.zeros(1, self.decoder.config.latent_channels, side, side, device=self.device)
        size = float(self.config.output_size)
        time_ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=self.device)
        return latents, self.decoder.unconditional(1, 1), time_ids

    # ---- the step ----------------------------------------------------------------------------

    def prepare(self, samples: list[Sample], step: int) -> list[Sample]:
        """What the data loader hands over: the samples themselves (crops and encoding need the
        step's generators, so they run with the step)."""
        return samples

    def __call__(self, samples: list[Sample], step: int) -> StepResult:
        seed = self.config.runtime.seed
        # Every random draw of the step is seeded by (seed, rank, step), so a resumed run repeats it.
        # The generator lives on the CPU whatever the device: emu.model.decoder draws on the
        # generator's device and moves the numbers, so CPU and GPU runs share one noise stream.
        generator = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + self.rank * 7_919 + step)
        rng = random.Random(f"{seed}:{self.rank}:{step}")
        micro = self.config.runtime.micro_batch_size
        parts = [[target(s) for s in samples[i:i + micro]] for i in range(0, len(samples), micro)]
        # One collective for the global sample count and every rank's micro-batch count (rank r's
        # count in slot r, zeros elsewhere: the sum lists them all).
        counts = all_reduce_sum([len(samples)] + [len(parts) if r == self.rank else 0 for r in range(self.world)],
                                device=self.device)
        total, rounds = counts[0], int(max(counts[1:]))
        loss_sum = torch.zeros((), device=self.device)
        dropped = torch.zeros((), device=self.device)
        for i in range(rounds):
            if i < len(parts):
                latents, conditions, time_ids = self.inputs(parts[i], rng, generator)
                # Each sample weighs 1/total of the global mean; DeepSpeed averages over ranks.
                weight = len(parts[i]) * self.world / total
            else:
                latents, conditions, time_ids = self.padding()
                weight = 0.0
            out = self.engine.engine(latents, conditions, time_ids, condition_drop=self.config.condition_drop,
                                     noise_offset=self.config.noise_offset, generator=generator)
            self.engine.backward(out.loss * weight)
            if weight:
                loss_sum += out.loss.detach().float() * len(parts[i])
                dropped += out.dropped_B.sum()
        loss_total, dropped_total = all_reduce_sum([float(loss_sum), float(dropped)], device=self.device)
        return StepResult(losses={"loss": loss_total / total}, samples=len(samples),
                          extra={"condition_dropped": dropped_total})
