"""Settings of the precompute stage (the `precompute` section of a preset).

Emu2 freezes the visual encoder after stage 1 (§2.2.2: stage 2, the decoder §2.2.3, instruction
tuning §2.3), so every image's pooled embeddings are a fixed function of its bytes: they are
computed once here and read back by training (emu.precompute.store) instead of running the ViT on
every image every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from emu.errors import ConfigError

#: Storage dtypes of the written tensors (the encoder itself runs in the model's float32).
DTYPES = ("float32", "bfloat16")


@dataclass
class PrecomputeConfig:
    """How `emu precompute` encodes the images of shard datasets with a frozen encoder."""

    #: Pooled grid sides to store per image (Emu2: 8 -> 64 tokens in pretraining, 16 -> 256 in chat
    #: tuning, §2.3.1). Empty: the model's image_tokens_side and video_tokens_side. Each side must
    #: divide the patch grid (image_size / patch_size). Every image (video frames included) is
    #: stored at every side: one ViT forward serves them all, pooling is nearly free.
    sides: list[int] = field(default_factory=list)
    #: Encoder input resolution in pixels; 0 = the model's (model.vision.image_size). Must equal the
    #: training stage's `image_size`, which the store checks.
    image_size: int = 0
    #: Images per encoder forward in each actor.
    batch_size: int = 32
    #: Encoder actors (each loads the encoder once). 0 = auto: one per GPU of the Ray cluster when
    #: it has GPUs, else one per spare CPU (the rest read and decode the shards), at least one.
    actors: int = 0
    #: GPUs reserved per actor; -1 = auto: 1 when the Ray cluster has GPUs, else 0 (CPU). A
    #: fraction (0.5) packs several actors on one GPU.
    gpus_per_actor: float = -1.0
    #: CPUs reserved per actor (its torch threads on CPU).
    cpus_per_actor: float = 1.0
    #: Also store VAE latents of a center crop, and the embeddings of that same crop, for decoder
    #: training (Emu2 §2.2.3 trains the UNet to autoencode: condition and target are one image).
    latents: bool = False
    #: Visual decoder folder (VisualDecoder.save_pretrained) whose frozen VAE makes the latents.
    decoder: str = ""
    #: Side in pixels of the latent crop; 0 = the decoder's output size (sample_size x VAE factor).
    latent_size: int = 0
    #: Ray cluster to run on (`ray://host:10001` or `host:6379`); empty = $RAY_ADDRESS (set in a
    #: RayJob's driver) or, without it, a local in-process Ray.
    #: Workers must reach the shard files and the model path.
    ray_address: str = ""
    #: Storage dtype of the embeddings and latents (bfloat16 halves the size).
    dtype: Literal["float32", "bfloat16"] = "float32"

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> ConfigError:
            return ConfigError(f"precompute.{name} ({getattr(self, name)!r}) {why}")

        if any(not isinstance(s, int) or s < 1 for s in self.sides):
            raise fail("sides", "must be positive integers (pooled grid sides, e.g. [8, 16])")
        if len(set(self.sides)) != len(self.sides):
            raise fail("sides", "must not repeat a side")
        if self.image_size < 0:
            raise fail("image_size", "must be >= 0 (0 = the model's input size)")
        if self.batch_size < 1:
            raise fail("batch_size", "must be >= 1")
        if self.actors < 0:
            raise fail("actors", "must be >= 0 (0 = auto)")
        if self.gpus_per_actor != -1 and self.gpus_per_actor < 0:
            raise fail("gpus_per_actor", "must be >= 0, or -1 for auto")
        if self.cpus_per_actor <= 0:
            raise fail("cpus_per_actor", "must be > 0")
        if self.latent_size < 0:
            raise fail("latent_size", "must be >= 0 (0 = the decoder's output size)")
        if self.latents and not self.decoder:
            raise fail("decoder", "must name a visual decoder folder when precompute.latents is true")
        if self.dtype not in DTYPES:
            raise fail("dtype", f"must be one of {', '.join(DTYPES)}")
