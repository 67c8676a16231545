"""Emu2's visual decoder (§2.2.3): a diffusion UNet that decodes visual embeddings back into images.

    visual embeddings c (B, n, D_vis)  ──cross-attention──┐
    text_embeds = mean_n(c) (B, D_vis) ┐                  │
    time_ids (B, 6) ───────────────────┴─ SDXL add-embed ─┤
    noisy VAE latents z_t (B, 4, h, w) ───────────────────┴─► UNet ─► predicted noise eps
    [spatial_condition: c as a sqrt(n) x sqrt(n) grid, upsampled to (h, w), concatenated to z_t]

It is SDXL-base with the cross-attention projections resized to the visual-embedding width and
"fully trained to solve the new task of autoencoding": the visual encoder and the VAE are frozen and
only the UNet is updated (§2.2.3). All three pieces are diffusers classes (DESIGN.md convention 6):
`UNet2DConditionModel`, `AutoencoderKL`, and SDXL's noise schedule, as a `DDPMScheduler` for
`add_noise` in training and an `EulerDiscreteScheduler` for sampling (App. E: Euler, 50 steps, CFG 3.0).

SDXL's added conditioning, exactly as the official Emu2-Gen pipeline feeds it (Emu2
`demo/backend/hf_model/emu/diffusion.py`; notes/emu2_model.md §5.1):
  * `encoder_hidden_states` = the (B, n, D_vis) visual embeddings, raw (no norm, no projection);
  * `text_embeds` (SDXL's pooled text embedding) = `torch.mean(prompt_embeds, dim=1)`, the mean of
    the embeddings over the n tokens;
  * `time_ids` = (original_h, original_w, crop_top, crop_left, target_h, target_w), SDXL's size and
    crop micro-conditioning (Emu2 App. B.3.1 keeps it for its scale-and-crop augmentation); each of
    the 6 numbers gets a sinusoidal embedding of `addition_time_embed_dim`, hence
    `projection_class_embeddings_input_dim = D_vis + 6 * addition_time_embed_dim` (3328 in Emu2).

The unconditional embedding (classifier-free guidance, §2.2.3: "randomly discards image embeddings
with the probability of 10%") is an all-zero (B, n, D_vis) tensor, used both when a training
condition is dropped and as the negative at sampling, so that the model is guided away from exactly
what it learnt as "no condition". Why zeros:
  * "discards" is most literally zeroing, and zeros are what image-conditioned diffusion training
    commonly drops to (IP-Adapter's `tutorial_train.py` replaces a dropped image embedding by
    `torch.zeros_like`);
  * it is an exact null through the UNet: diffusers' cross-attention has no key/value bias, so zero
    keys give uniform attention over zero values (whatever n is) and the pooled `text_embeds` is 0;
    the unconditional prediction therefore does not depend on n, nor on which encoder produced the
    training conditions, so it stays valid when the encoder or the token count changes;
  * it needs no parameter and no encoder at sampling time.
The official Emu2-Gen inference instead uses, as its negative, the encoding of an all-zero
(normalised) image for autoencoding and the embeddings regressed from an empty prompt for
generation. Those are only right for a decoder trained to treat them as unconditional; a decoder
trained here must be sampled with `unconditional()`, which `sample()` does.

Pure torch plus diffusers (DESIGN.md convention 1): no logging setup, no distributed init; the
only I/O is `save_pretrained` / `from_pretrained` on a local folder, never the Hub.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, UNet2DConditionModel
from diffusers.utils import is_accelerate_available
from torch import nn

from emu.config import from_dict, to_dict
from emu.errors import ConfigError
from emu.model.config import DecoderConfig

#: File names of a saved decoder folder (Hugging Face layout: one subfolder per diffusers component).
CONFIG_NAME = "decoder_config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
SHARDED_INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"  # diffusers shards big UNets


def unet_kwargs(config: DecoderConfig) -> dict[str, Any]:
    """`UNet2DConditionModel` settings implied by `config`: an SDXL-style UNet whose cross-attention
    reads the visual embeddings (the Emu2 values are listed in DecoderConfig's docstring)."""
    return dict(
        sample_size=config.sample_size,
        # spatial_condition: the upsampled token grid rides along as visual_dim more input channels
        in_channels=config.latent_channels + (config.visual_dim if config.spatial_condition else 0),
        out_channels=config.latent_channels,
        down_block_types=tuple(config.unet_down_block_types),
        up_block_types=tuple(config.unet_up_block_types),
        mid_block_type="UNetMidBlock2DCrossAttn",
        block_out_channels=tuple(config.unet_block_out_channels),
        layers_per_block=config.unet_layers_per_block,
        attention_head_dim=tuple(config.unet_attention_head_dim),
        transformer_layers_per_block=tuple(config.unet_transformer_layers_per_block),
        norm_num_groups=config.unet_norm_num_groups,
        cross_attention_dim=config.visual_dim,
        use_linear_projection=True,  # SDXL and Emu2's unet/config.json
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        # pooled embedding (D_vis) + 6 sinusoidal time-id embeddings: 1792 + 6 * 256 = 3328 in Emu2
        projection_class_embeddings_input_dim=config.visual_dim + 6 * config.addition_time_embed_dim,
    )


def vae_kwargs(config: DecoderConfig) -> dict[str, Any]:
    """`AutoencoderKL` settings implied by `config` (SDXL's VAE layout at Emu2 scale)."""
    levels = len(config.vae_block_out_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(config.vae_block_out_channels),
        layers_per_block=config.vae_layers_per_block,
        norm_num_groups=config.vae_norm_num_groups,
        latent_channels=config.latent_channels,
        sample_size=config.image_size,
        scaling_factor=config.vae_scaling_factor,
    )


def scheduler_kwargs(config: DecoderConfig) -> dict[str, Any]:
    """The noise schedule shared by training (DDPM `add_noise`) and sampling (Euler): SDXL's and
    Emu2's `scheduler_config.json`. The same betas in both is what makes the sampler invert the
    corruption the UNet was trained on."""
    return dict(
        num_train_timesteps=config.num_train_timesteps,
        beta_start=config.beta_start,
        beta_end=config.beta_end,
        beta_schedule=config.beta_schedule,
        prediction_type=config.prediction_type,
        timestep_spacing=config.timestep_spacing,
        steps_offset=config.steps_offset,
    )


@dataclass
class DecoderLoss:
    """The diffusion loss of one batch and which samples had their condition dropped."""

    loss: torch.Tensor       # scalar: MSE between predicted and true noise, over all latent elements
    dropped_B: torch.Tensor  # (B,) bool: True where the UNet saw `unconditional()` instead of the condition

    @property
    def num_dropped(self) -> int:
        return int(self.dropped_B.sum())


def _randn(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Standard normal float32 noise, drawn where the generator lives (so a CPU generator gives the
    same numbers whatever device the model is on), then moved to `device`."""
    where = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=where, dtype=torch.float32).to(device)


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=where).to(device)


def _randint(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
             device: torch.device) -> torch.Tensor:
    where = generator.device if generator is not None else device
    return torch.randint(0, high, shape, generator=generator, device=where).to(device)


class VisualDecoder(nn.Module):
    """`unet` (trained), `vae` (frozen: no gradient, eval mode), `noise_scheduler` (DDPM, training
    noise) and `scheduler` (Euler, sampling). `forward` is `training_loss`, so a wrapper that calls
    the module (DeepSpeed) trains it."""

    def __init__(self, config: DecoderConfig, unet: UNet2DConditionModel, vae: AutoencoderKL,
                 scheduler: EulerDiscreteScheduler | None = None):
        super().__init__()
        self.config = config
        self.unet = unet
        # Frozen (Emu2 §2.2.3: "The Visual Encoder and VAE in SDXL are frozen").
        self.vae = vae.requires_grad_(False).eval()
        self.noise_scheduler = DDPMScheduler(**scheduler_kwargs(config))
        self.scheduler = scheduler if scheduler is not None else EulerDiscreteScheduler(
            **scheduler_kwargs(config), interpolation_type="linear", use_karras_sigmas=False)

    @classmethod
    def from_config(cls, config: DecoderConfig) -> VisualDecoder:
        """A randomly initialised decoder (seed with torch.manual_seed before calling); never
        downloads anything. SDXL-base initialisation (§2.2.3) is a folder for `from_pretrained`."""
        return cls(config, UNet2DConditionModel(**unet_kwargs(config)), AutoencoderKL(**vae_kwargs(config)))

    def train(self, mode: bool = True) -> VisualDecoder:
        """Switch the UNet's mode; the frozen VAE stays in eval mode."""
        super().train(mode)
        self.vae.eval()
        return self

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent side (SDXL: 8)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    # ---- conditioning ----------------------------------------------------------------------

    def unconditional(self, batch: int, n_tokens: int) -> torch.Tensor:
        """The "no condition" embedding (B, n, D_vis): zeros, in the UNet's dtype and device. The
        one embedding used for condition dropout in training and as the CFG negative in sampling
        (see the module docstring for why zeros); the UNet's output does not depend on n_tokens."""
        p = next(self.unet.parameters())
        return torch.zeros(batch, n_tokens, self.config.visual_dim, dtype=p.dtype, device=p.device)

    @staticmethod
    def added_conditions(condition_BND: torch.Tensor, time_ids_B6: torch.Tensor) -> dict[str, torch.Tensor]:
        """SDXL's `added_cond_kwargs`: `text_embeds` = the mean of the embeddings over tokens (the
        official pipeline's `torch.mean(prompt_embeds, dim=1)`), `time_ids` as given."""
        return {"text_embeds": condition_BND.mean(dim=1), "time_ids": time_ids_B6}

    def unet_input(self, latents_BCHW: torch.Tensor, condition_BND: torch.Tensor) -> torch.Tensor:
        """What the UNet's first convolution reads: the latents, and with `spatial_condition` the
        condition's sqrt(n) x sqrt(n) token grid upsampled (nearest: each pooled token stands for
        one block of the image) to the latent size and concatenated as channels. The all-zero
        unconditional embedding gives all-zero channels, so guidance still contrasts with nothing."""
        if not self.config.spatial_condition:
            return latents_BCHW
        batch, n_tokens, dim = condition_BND.shape
        side = math.isqrt(n_tokens)
        if side * side != n_tokens:
            raise ValueError(f"model.decoder.spatial_condition needs a square grid of visual embeddings; "
                             f"got {n_tokens} tokens")
        grid = condition_BND.transpose(1, 2).reshape(batch, dim, side, side)
        grid = F.interpolate(grid.to(latents_BCHW.dtype), size=latents_BCHW.shape[-2:], mode="nearest")
        return torch.cat([latents_BCHW, grid], dim=1)

    def _time_ids(self, time_ids: torch.Tensor | list | tuple, batch: int, device: torch.device) -> torch.Tensor:
        """(6,) or (B, 6) -> (B, 6) float32. Float32 keeps sizes such as 1023 exact (bf16 would not)."""
        ids = torch.as_tensor(time_ids, dtype=torch.float32, device=device)
        if ids.shape == (6,):
            ids = ids.expand(batch, 6)
        if ids.shape != (batch, 6):
            raise ValueError(f"time_ids must have shape (6,) or ({batch}, 6): (original_h, original_w, "
                             f"crop_top, crop_left, target_h, target_w); got {tuple(ids.shape)}")
        return ids

    def _check_condition(self, condition_BND: torch.Tensor) -> None:
        if condition_BND.ndim != 3 or condition_BND.shape[-1] != self.config.visual_dim:
            raise ValueError(f"the condition must be (B, n, {self.config.visual_dim}) visual embeddings "
                             f"(model.decoder.visual_dim); got {tuple(condition_BND.shape)}")

    # ---- training ----------------------------------------------------------------------------

    @torch.no_grad()
    def encode_latents(self, pixels_BCHW: torch.Tensor, sample: bool = True,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) pixels in [-1, 1] -> (B, latent_channels, H/f, W/f) scaled latents: a draw
        from the VAE posterior (`sample=True`, what SDXL training does) or its mean, times
        `scaling_factor` (SDXL: 0.13025) so the latents have about unit variance."""
        vae_dtype = next(self.vae.parameters()).dtype
        dist = self.vae.encode(pixels_BCHW.to(vae_dtype)).latent_dist
        latents = dist.sample(generator=generator) if sample else dist.mode()
        return latents * self.vae.config.scaling_factor

    def training_loss(self, latents_BCHW: torch.Tensor, condition_BND: torch.Tensor,
                      time_ids: torch.Tensor, condition_drop: float = 0.1, noise_offset: float = 0.1,
                      generator: torch.Generator | None = None) -> DecoderLoss:
        """Epsilon- (or v-) prediction MSE on one batch of scaled VAE latents (from `encode_latents` or the
        precompute stage) and their (B, n, D_vis) visual embeddings.

        Each sample's condition is replaced by `unconditional()` with probability `condition_drop`
        (Emu2 Table 7: 10%, for classifier-free guidance). The noise gets SDXL's noise offset,
        `noise += noise_offset * randn(B, C, 1, 1)` (diffusers' SDXL example; Emu2 Table 7: 0.1),
        which lets the model shift whole-channel brightness. Noise, offset, timesteps and dropout are
        drawn, in that order, from `generator` (torch's global RNG when None)."""
        self._check_condition(condition_BND)
        batch, channels = latents_BCHW.shape[:2]
        if condition_BND.shape[0] != batch:
            raise ValueError(f"{batch} latents but {condition_BND.shape[0]} conditions")
        if not 0.0 <= condition_drop <= 1.0:
            raise ValueError(f"condition_drop must be in [0, 1], got {condition_drop}")
        if noise_offset < 0:
            raise ValueError(f"noise_offset must be >= 0, got {noise_offset}")
        device = latents_BCHW.device
        dtype = next(self.unet.parameters()).dtype

        latents = latents_BCHW.float()
        noise = _randn(tuple(latents.shape), generator, device)
        # Drawn even when noise_offset is 0 so that the timesteps and drops do not depend on it.
        noise = noise + noise_offset * _randn((batch, channels, 1, 1), generator, device)
        timesteps_B = _randint(self.noise_scheduler.config.num_train_timesteps, (batch,), generator, device)
        dropped_B = _rand((batch,), generator, device) < condition_drop

        condition = condition_BND.to(dtype)
        condition = torch.where(dropped_B[:, None, None], self.unconditional(batch, condition.shape[1]), condition)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps_B)
        added = self.added_conditions(condition, self._time_ids(time_ids, batch, device))
        pred = self.unet(self.unet_input(noisy.to(dtype), condition), timesteps_B, encoder_hidden_states=condition,
                         added_cond_kwargs=added).sample
        # epsilon (Emu2 scheduler_config.json): the target is the noise, offset included; v_prediction:
        # the velocity of that same noise (diffusers' get_velocity, what its schedulers invert).
        goal = noise if self.config.prediction_type == "epsilon" else \
            self.noise_scheduler.get_velocity(latents, noise, timesteps_B)
        loss = F.mse_loss(pred.float(), goal, reduction="mean")
        return DecoderLoss(loss=loss, dropped_B=dropped_B)

    def forward(self, *args: Any, **kwargs: Any) -> DecoderLoss:
        return self.training_loss(*args, **kwargs)

    # ---- sampling ----------------------------------------------------------------------------

    @torch.no_grad()
    def sample(self, condition_BND: torch.Tensor, time_ids: torch.Tensor | list | tuple | None = None,
               num_inference_steps: int | None = None, guidance_scale: float | None = None,
               generator: torch.Generator | None = None,
               output_size: int | tuple[int, int] | None = None) -> torch.Tensor:
        """(B, n, D_vis) visual embeddings -> (B, 3, H, W) images in [0, 1].

        The official Emu2-Gen loop: latents = randn * init_noise_sigma; per Euler step, the UNet
        runs once on the batch [cond, uncond] and eps = eps_u + s * (eps_c - eps_u) (classifier-free
        guidance); a scale of 1.0 runs the conditional half only. `output_size` (pixels, default
        `config.image_size`) must be a multiple of the VAE factor; `time_ids` defaults to
        (H, W, 0, 0, H, W), an uncropped image at the output size (as the official pipeline).
        Deterministic given `generator`. Steps and scale default to the config (Emu2: 50, 3.0)."""
        self._check_condition(condition_BND)
        steps = self.config.num_inference_steps if num_inference_steps is None else num_inference_steps
        scale = self.config.guidance_scale if guidance_scale is None else guidance_scale
        if steps < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {steps}")
        if scale < 1.0:
            raise ValueError(f"guidance_scale must be >= 1.0 (1.0 turns guidance off), got {scale}")
        size = self.config.image_size if output_size is None else output_size
        height, width = (size, size) if isinstance(size, int) else size
        f = self.vae_scale_factor
        if height % f or width % f:
            raise ValueError(f"output_size {height}x{width} must be a multiple of the VAE factor {f}")
        batch, n_tokens = condition_BND.shape[:2]
        p = next(self.unet.parameters())
        device, dtype = p.device, p.dtype

        guided = scale > 1.0  # official: do_classifier_free_guidance = guidance_scale > 1.0
        condition = condition_BND.to(device=device, dtype=dtype)
        ids = self._time_ids([height, width, 0, 0, height, width] if time_ids is None else time_ids, batch, device)
        if guided:  # one UNet call on [cond, uncond], the official order
            condition = torch.cat([condition, self.unconditional(batch, n_tokens)])
            ids = torch.cat([ids, ids])
        added = self.added_conditions(condition, ids)

        # A fresh scheduler per call: Euler keeps a step index, so sharing one is not re-entrant.
        scheduler = EulerDiscreteScheduler.from_config(self.scheduler.config)
        scheduler.set_timesteps(steps, device=device)
        latents = _randn((batch, self.config.latent_channels, height // f, width // f), generator, device)
        latents = latents * scheduler.init_noise_sigma
        for t in scheduler.timesteps:
            model_in = torch.cat([latents, latents]) if guided else latents
            # Euler scales the noisy latents only; the condition grid goes in as it is.
            model_in = self.unet_input(scheduler.scale_model_input(model_in, t).to(dtype), condition)
            eps = self.unet(model_in, t, encoder_hidden_states=condition, added_cond_kwargs=added).sample
            if guided:
                eps_cond, eps_uncond = eps.float().chunk(2)
                eps = eps_uncond + scale * (eps_cond - eps_uncond)
            latents = scheduler.step(eps.float(), t, latents, generator=generator).prev_sample
        return self.decode_latents(latents)

    @torch.no_grad()
    def decode_latents(self, latents_BCHW: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> (B, 3, H, W) float32 images in [0, 1] (official `decode_latents`)."""
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode((latents_BCHW / self.vae.config.scaling_factor).to(vae_dtype)).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    # ---- save / load -------------------------------------------------------------------------

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a Hugging Face-style folder: `decoder_config.json`, and `unet/`, `vae/` (diffusers
        configs + safetensors) and `scheduler/` (the Euler sampler's config), each loadable by
        diffusers on its own."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(to_dict(self.config), indent=2) + "\n", encoding="utf-8")
        self.unet.save_pretrained(directory / "unet", safe_serialization=True)
        self.vae.save_pretrained(directory / "vae", safe_serialization=True)
        self.scheduler.save_pretrained(directory / "scheduler")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> VisualDecoder:
        """Load a folder written by `save_pretrained` (local only, never the Hub). Raises
        ConfigError naming the folder and what is missing, or which component disagrees with
        `decoder_config.json`."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ConfigError(f"visual decoder folder {directory} does not exist (or is not a folder)")
        required = (CONFIG_NAME, "unet/config.json", "vae/config.json", "scheduler/scheduler_config.json")
        missing = [name for name in required if not (directory / name).is_file()]
        missing += [f"{part}/{WEIGHTS_NAME}" for part in ("unet", "vae")
                    if not any((directory / part / name).is_file() for name in (WEIGHTS_NAME, SHARDED_INDEX_NAME))]
        if missing:
            raise ConfigError(f"{directory} is not a complete visual decoder folder (as written by "
                              f"VisualDecoder.save_pretrained): missing {', '.join(missing)}")
        config_path = directory / CONFIG_NAME
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{config_path} is not valid JSON: {exc}") from None
        config = from_dict(DecoderConfig, data, where="model.decoder", origin=str(config_path))

        # Low-memory loading needs accelerate; asking for it without accelerate only prints a warning.
        load = dict(local_files_only=True, use_safetensors=True, low_cpu_mem_usage=is_accelerate_available())
        unet = UNet2DConditionModel.from_pretrained(directory / "unet", **load)
        vae = AutoencoderKL.from_pretrained(directory / "vae", **load)
        scheduler = EulerDiscreteScheduler.from_pretrained(directory / "scheduler", local_files_only=True)
        for part, loaded, expected in (("unet/config.json", unet.config, unet_kwargs(config)),
                                       ("vae/config.json", vae.config, vae_kwargs(config)),
                                       ("scheduler/scheduler_config.json", scheduler.config, scheduler_kwargs(config))):
            for key, value in expected.items():
                have = loaded.get(key)
                if _plain(have) != _plain(value):
                    raise ConfigError(f"{directory / part}: {key} is {have!r} but {config_path} implies "
                                      f"{value!r}; the folder's parts do not belong together")
        return cls(config, unet, vae, scheduler)


def _plain(value: Any) -> Any:
    """Lists and tuples compare equal (diffusers stores tuples as JSON lists)."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value
