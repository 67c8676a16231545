"""Architecture settings of the Emu model pieces (the `model` section of a preset).

Sizes default to a tiny model that runs in seconds on a CPU; the `emu2-37b` preset sets the
released architecture (EVA-02-CLIP-E-plus 448 px + LLaMA-33B, official configs quoted there).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from emu.errors import ConfigError

#: OpenAI CLIP normalisation, used by EVA-CLIP and Emu2's preprocessing (official chat.py).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """An EVA-CLIP-style ViT. Emu2: 448 px, patch 14, width 1792, 64 layers, 16 heads, MLP 15360,
    post-norm blocks, q/v biases, LayerNorm eps 1e-6, no final norm (official eva_vit.py)."""

    image_size: int = 32
    patch_size: int = 4
    width: int = 32
    layers: int = 2
    heads: int = 2
    mlp_dim: int = 64
    postnorm: bool = True
    qkv_bias: bool = True
    layer_norm_eps: float = 1e-6
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.vision.image_size ({self.image_size}) must be a multiple of "
                              f"model.vision.patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ConfigError(f"model.vision.width ({self.width}) must be divisible by model.vision.heads ({self.heads})")
        for name in ("layers", "mlp_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.vision.{name} must be >= 1")

    @property
    def grid(self) -> int:
        """Patches per side (Emu2: 448 / 14 = 32)."""
        return self.image_size // self.patch_size


@dataclass
class CFormerConfig:
    """Emu1's Causal Transformer: learned causal queries cross-attending the ViT features through a
    randomly initialised T5 decoder (official causal_former.py: 32 queries, T5-base decoder)."""

    queries: int = 32
    width: int = 32
    layers: int = 2
    heads: int = 2
    ffn_dim: int = 64

    def __post_init__(self) -> None:
        if self.queries < 1 or self.layers < 1:
            raise ConfigError("model.cformer.queries and model.cformer.layers must be >= 1")
        if self.width % self.heads:
            raise ConfigError(f"model.cformer.width ({self.width}) must be divisible by model.cformer.heads")


@dataclass
class LMConfig:
    """The causal LM (LLaMA by default). With `pretrained` set, weights and architecture come from
    that Hugging Face folder (local path or s3:// URI) and the size fields are ignored."""

    pretrained: str = ""
    vocab_size: int = 576     # grown to fit the tokenizer (special tokens included) at build time
    hidden_size: int = 64
    intermediate_size: int = 128
    layers: int = 2
    heads: int = 4
    kv_heads: int = 4
    max_positions: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        if not self.pretrained:
            if self.hidden_size % self.heads or self.heads % self.kv_heads:
                raise ConfigError("model.lm.hidden_size must be divisible by model.lm.heads, and heads by kv_heads")


@dataclass
class EmuConfig:
    """The multimodal LM: visual encoder -> connector -> project_up -> LM -> project_down (Emu2 §2.1)."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    lm: LMConfig = field(default_factory=LMConfig)
    #: `pool`: Emu2's mean pooling of the patch grid; `cformer`: Emu1's Causal Transformer.
    connector: Literal["pool", "cformer"] = "pool"
    cformer: CFormerConfig = field(default_factory=CFormerConfig)
    #: Pooled grid side per image: 8 -> 64 tokens in pretraining; chat tuning uses 16 (Emu2 §2.3.1).
    image_tokens_side: int = 2
    #: Pooled grid side per video frame (Emu2 keeps 8x8 = 64 per frame, official chat.py v_query).
    video_tokens_side: int = 2

    def __post_init__(self) -> None:
        for name in ("image_tokens_side", "video_tokens_side"):
            side = getattr(self, name)
            if side < 1 or self.vision.grid % side:
                raise ConfigError(f"model.{name} ({side}) must divide the patch grid side "
                                  f"({self.vision.grid} = image_size / patch_size)")

    @property
    def visual_dim(self) -> int:
        """Width of a visual embedding: what project_up reads and project_down regresses."""
        return self.cformer.width if self.connector == "cformer" else self.vision.width

    def tokens_per_image(self, side: int | None = None) -> int:
        if self.connector == "cformer":
            return self.cformer.queries
        side = self.image_tokens_side if side is None else side
        return side * side
