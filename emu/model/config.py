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
#: File types a pretrained checkpoint file may have (emu.model.pretrained).
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


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
    #: EVA-CLIP checkpoint file (local path or s3:// URI) a model built from scratch (stage 1
    #: without `init`) starts its encoder from: an EVA-CLIP / open_clip state dict, with or
    #: without the `visual.` prefix, or the released Emu2 weights (emu.model.pretrained). The
    #: sizes above must match it (the position table is interpolated to `image_size`). Empty:
    #: random initialisation. Emu2: EVA-02-CLIP-E-plus (§2.1).
    pretrained: str = ""

    def __post_init__(self) -> None:
        if self.pretrained and not self.pretrained.endswith(WEIGHT_SUFFIXES):
            raise ConfigError(f"model.vision.pretrained ({self.pretrained!r}) must be a checkpoint file "
                              f"({', '.join(WEIGHT_SUFFIXES)}), local or s3://")
        if self.image_size % self.patch_size:
            raise ConfigError(f"model.vision.image_size ({self.image_size}) must be a multiple of "
                              f"model.vision.patch_size ({self.patch_size})")
        if self.width % self.heads:
            raise ConfigError(f"model.vision.width ({self.width}) must be divisible by model.vision.heads ({self.heads})")
        if self.width % 4:  # the 2D sin-cos initial positions give a quarter of the channels to each of sin/cos x row/column
            raise ConfigError(f"model.vision.width ({self.width}) must be divisible by 4")
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

    #: Hugging Face causal-LM folder (local or s3://: config.json, safetensors weights and the
    #: LM's tokenizer) a model built from scratch starts from: any architecture transformers'
    #: AutoModelForCausalLM loads (LLaMA, Llama-2/3, Mistral, Qwen2, ...). Its own tokenizer is
    #: used (stage1.tokenizer empty), with the Emu2 special tokens added and the embeddings grown
    #: to match (emu.model.emu.build_lm). Emu2: LLaMA-33B (§2.1).
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


#: UNet blocks a DecoderConfig may name; the cross-attention ones read the visual embeddings.
DECODER_DOWN_BLOCKS = ("DownBlock2D", "CrossAttnDownBlock2D")
DECODER_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


@dataclass
class DecoderConfig:
    """Emu2's visual decoder (§2.2.3): an SDXL-style diffusers UNet whose cross-attention reads the
    N visual embeddings, SDXL's frozen VAE, and SDXL's noise schedule. Sizes default to a tiny
    model that runs in seconds on a CPU.

    emu2 (the released Emu2-Gen `unet/config.json`, diffusers 0.21.2; notes/emu2_model.md §5.3):
        block_out_channels [320, 640, 1280], layers_per_block 2,
        down_block_types [DownBlock2D, CrossAttnDownBlock2D, CrossAttnDownBlock2D],
        up_block_types [CrossAttnUpBlock2D, CrossAttnUpBlock2D, UpBlock2D],
        transformer_layers_per_block [1, 2, 10], attention_head_dim [5, 10, 20],
        cross_attention_dim 1792, use_linear_projection true, addition_embed_type text_time,
        addition_time_embed_dim 256, projection_class_embeddings_input_dim 3328 = 1792 + 6 * 256,
        sample_size 128 (1024 px through the x8 VAE);
        VAE: block_out_channels [128, 256, 512, 512], layers_per_block 2, latent_channels 4,
        scaling_factor 0.13025; scheduler: Euler, scaled_linear 0.00085-0.012 over 1000 steps,
        epsilon, leading spacing, steps_offset 1.
    """

    #: Width of a visual embedding = the UNet's cross_attention_dim (Emu2: 1792, the EVA width;
    #: "adjust the dimension of the projection layers in cross-attention modules", §2.2.3).
    visual_dim: int = 32
    #: UNet channels per resolution level (Emu2/SDXL: 320, 640, 1280).
    unet_block_out_channels: tuple[int, ...] = (32, 64)
    #: ResNet (and transformer) layers per UNet level (Emu2/SDXL: 2).
    unet_layers_per_block: int = 1
    #: One down block per level: DownBlock2D (no attention) or CrossAttnDownBlock2D.
    unet_down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D")
    #: One up block per level, deepest first (the mirror of the down blocks).
    unet_up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "UpBlock2D")
    #: Attention heads per level. diffusers calls this `attention_head_dim` but, for SD/SDXL UNets,
    #: uses it as the number of heads (SDXL [5, 10, 20] = 64-wide heads on 320/640/1280 channels).
    unet_attention_head_dim: tuple[int, ...] = (2, 4)
    #: Transformer blocks per cross-attention level (Emu2/SDXL: 1, 2, 10).
    unet_transformer_layers_per_block: tuple[int, ...] = (1, 1)
    #: GroupNorm groups in the UNet (diffusers/SDXL: 32); must divide every level's channels.
    unet_norm_num_groups: int = 32
    #: Width of each sinusoidal embedding of the 6 SDXL size/crop conditions (Emu2/SDXL: 256).
    addition_time_embed_dim: int = 8
    #: VAE channels per level; the VAE downsamples by 2 ** (levels - 1) (SDXL: 128, 256, 512, 512 -> x8).
    vae_block_out_channels: tuple[int, ...] = (32, 64)
    #: ResNet layers per VAE level (SDXL: 2).
    vae_layers_per_block: int = 1
    #: GroupNorm groups in the VAE (SDXL: 32); must divide every level's channels.
    vae_norm_num_groups: int = 32
    #: Latent channels (SDXL: 4).
    latent_channels: int = 4
    #: Latents are multiplied by this after encoding and divided before decoding (SDXL VAE: 0.13025).
    vae_scaling_factor: float = 0.13025
    #: Latent side the UNet is built for; output pixels = sample_size * VAE factor (Emu2: 128 -> 1024).
    sample_size: int = 16
    #: Diffusion steps of the training noise schedule (SDXL / Emu2 scheduler_config: 1000).
    num_train_timesteps: int = 1000
    #: First beta of the schedule (SDXL: 0.00085).
    beta_start: float = 0.00085
    #: Last beta of the schedule (SDXL: 0.012).
    beta_end: float = 0.012
    #: How betas go from start to end (SDXL: scaled_linear, i.e. linear in sqrt(beta)).
    beta_schedule: Literal["scaled_linear", "linear"] = "scaled_linear"
    #: What the UNet predicts: the noise (epsilon: Emu2's scheduler_config, SDXL) or the velocity
    #: sqrt(a)*eps - sqrt(1-a)*x0 (v_prediction, Salimans & Ho 2022 §4; SD 2.x). A decoder
    #: trained from scratch in few steps learns the image from its condition faster with v: at
    #: high noise epsilon's target is almost the noisy input, v's is almost the clean image.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    #: Also give the UNet the visual embeddings where they belong in the image: the n tokens, the
    #: encoder's sqrt(n) x sqrt(n) pooled grid in raster order, are upsampled (nearest) to the latent
    #: size and concatenated to the noisy latents as visual_dim extra input channels, besides the
    #: cross-attention. LDM §3.3 conditions on spatially aligned inputs by concatenation, as SD's
    #: inpainting and x4-upscaler UNets do. Emu2 uses cross-attention only (false): its UNet starts
    #: from SDXL and trains on billions of images; a UNet trained from scratch for minutes learns
    #: what the tokens say long before where each one sits, and draws shapes in the wrong place.
    spatial_condition: bool = False
    #: How the sampler spaces its inference timesteps (SDXL / Emu2: leading).
    timestep_spacing: Literal["leading", "trailing", "linspace"] = "leading"
    #: Offset added to leading-spaced inference timesteps (SDXL / Emu2: 1).
    steps_offset: int = 1
    #: Classifier-free guidance scale at sampling; 1.0 turns guidance off (Emu2 App. E: 3.0).
    guidance_scale: float = 3.0
    #: Euler sampling steps (Emu2 App. E: 50).
    num_inference_steps: int = 50

    def __post_init__(self) -> None:
        def fail(name: str, why: str) -> ConfigError:
            return ConfigError(f"model.decoder.{name} ({getattr(self, name)!r}) {why}")

        positive = ("visual_dim", "unet_layers_per_block", "unet_norm_num_groups", "addition_time_embed_dim",
                    "vae_layers_per_block", "vae_norm_num_groups", "latent_channels", "sample_size",
                    "num_train_timesteps", "num_inference_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise fail(name, "must be >= 1")
        levels = len(self.unet_block_out_channels)
        if levels < 1:
            raise fail("unet_block_out_channels", "must name at least one level")
        for name in ("unet_down_block_types", "unet_up_block_types", "unet_attention_head_dim",
                     "unet_transformer_layers_per_block"):
            if len(getattr(self, name)) != levels:
                raise fail(name, f"must have one entry per UNet level ({levels}, as unet_block_out_channels)")
        for name, allowed in (("unet_down_block_types", DECODER_DOWN_BLOCKS),
                              ("unet_up_block_types", DECODER_UP_BLOCKS)):
            if any(block not in allowed for block in getattr(self, name)):
                raise fail(name, f"may only contain {', '.join(allowed)}")
        for channels, heads in zip(self.unet_block_out_channels, self.unet_attention_head_dim):
            if channels < 1 or channels % self.unet_norm_num_groups:
                raise fail("unet_block_out_channels", f"must be positive multiples of unet_norm_num_groups "
                                                      f"({self.unet_norm_num_groups})")
            if heads < 1 or channels % heads:
                raise fail("unet_attention_head_dim", "must be positive and divide each level's channels "
                                                      "(it is the number of heads)")
        if any(n < 1 for n in self.unet_transformer_layers_per_block):
            raise fail("unet_transformer_layers_per_block", "must all be >= 1")
        if not self.vae_block_out_channels:
            raise fail("vae_block_out_channels", "must name at least one level")
        if any(c < 1 or c % self.vae_norm_num_groups for c in self.vae_block_out_channels):
            raise fail("vae_block_out_channels", f"must be positive multiples of vae_norm_num_groups "
                                                 f"({self.vae_norm_num_groups})")
        if self.vae_scaling_factor <= 0:
            raise fail("vae_scaling_factor", "must be > 0")
        if self.sample_size % 2 ** (levels - 1):
            raise fail("sample_size", f"must be divisible by 2 ** (UNet levels - 1) = {2 ** (levels - 1)}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise fail("beta_start", f"must satisfy 0 < beta_start < beta_end ({self.beta_end}) < 1")
        if self.steps_offset < 0:
            raise fail("steps_offset", "must be >= 0")
        if self.num_inference_steps > self.num_train_timesteps:
            raise fail("num_inference_steps", f"must be <= num_train_timesteps ({self.num_train_timesteps})")
        if self.guidance_scale < 1.0:
            raise fail("guidance_scale", "must be >= 1.0 (1.0 turns classifier-free guidance off)")

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent side (SDXL: 2 ** 3 = 8)."""
        return 2 ** (len(self.vae_block_out_channels) - 1)

    @property
    def image_size(self) -> int:
        """Default output side in pixels (Emu2: 128 * 8 = 1024)."""
        return self.sample_size * self.vae_scale_factor
