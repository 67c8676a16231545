"""Initialise Emu2's visual decoder from SDXL (§2.2.3: "initialized with SDXL-base ... we adjust
the dimension of the projection layers in cross-attention modules"): an SDXL-layout diffusers
folder (`unet/`, `vae/`, optionally `scheduler/`, as stabilityai/stable-diffusion-xl-base-1.0
ships it) becomes a VisualDecoder folder that `decoder.init` names.

What is kept and what is re-initialised:

    every UNet and VAE weight whose name and shape agree          kept (copied, as float32)
    attn2.to_k / attn2.to_v of every cross-attention block        re-initialised: they read the
        (SDXL: 2048-wide text features -> here visual_dim)         visual embeddings now
    add_embedding.linear_1.weight (SDXL's text-time embedding)    its text_embeds columns (SDXL's
        input 1280 + 6 x 256 -> visual_dim + 6 x 256)              1280-wide pooled text) are
                                                                   re-initialised, the 6 x 256
                                                                   time-id columns kept

Anything else that differs (another block layout, a UNet without SDXL's text-time conditioning,
a VAE of another shape) is an error listing it: the converter never silently drops weights.
Fresh weights are diffusers' own initialisation under `seed`. The report says what it did and is
saved as `conversion.json` beside the decoder.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from emu.errors import ConfigError
from emu.model.config import DecoderConfig
from emu.model.pretrained import TensorSource, open_checkpoint

REPORT_NAME = "conversion.json"
#: Weight files of a diffusers component folder, in the order they are looked for.
_WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")
_INDEX_FILES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.fp16.safetensors.index.json")
#: Config keys that are bookkeeping or inference-only, not architecture.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "_use_default_values", "dropout",
            "force_upcast", "latents_mean", "latents_std", "sample_size"}


@dataclass
class SdxlConversion:
    """What `convert_sdxl` did."""

    source: str
    out: str
    visual_dim: int
    source_cross_attention_dim: int
    kept: int = 0                        # tensors copied whole (UNet and VAE)
    kept_parameters: int = 0
    reinitialised: list[str] = field(default_factory=list)   # UNet tensors re-initialised whole
    partly_kept: dict[str, str] = field(default_factory=dict)  # tensor -> what of it was kept
    config: dict[str, Any] = field(default_factory=dict)       # the resulting DecoderConfig

    def describe(self) -> str:
        lines = [f"{self.source} -> {self.out}: kept {self.kept} tensors ({self.kept_parameters:,} parameters); "
                 f"cross-attention {self.source_cross_attention_dim} -> {self.visual_dim} wide",
                 f"re-initialised {len(self.reinitialised)} tensors: "
                 f"{', '.join(_group(self.reinitialised))}"]
        lines += [f"partly kept {key}: {what}" for key, what in self.partly_kept.items()]
        return "\n".join(lines)


def _group(keys: list[str]) -> list[str]:
    """`... .attn2.to_k.weight` x N as one entry per suffix, for a readable report."""
    counts: dict[str, int] = {}
    for key in keys:
        suffix = ".".join(key.split(".")[-3:])
        counts[suffix] = counts.get(suffix, 0) + 1
    return [f"{n} x {suffix}" for suffix, n in counts.items()]


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON config ({exc})") from None


def _defaults(cls) -> dict[str, Any]:
    return {k: v.default for k, v in inspect.signature(cls.__init__).parameters.items() if k != "self"}


def _same(a: Any, b: Any) -> bool:
    plain = lambda v: [plain(x) for x in v] if isinstance(v, (list, tuple)) else v  # noqa: E731
    return plain(a) == plain(b) or (a in (None, False) and b in (None, False))


def _per_level(value: Any, levels: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels


def decoder_config_from_sdxl(unet: dict, vae: dict, scheduler: dict | None, visual_dim: int,
                             source: str = "SDXL") -> DecoderConfig:
    """The DecoderConfig of an SDXL-layout UNet/VAE whose cross-attention reads `visual_dim`-wide
    embeddings; other architecture settings must be ones VisualDecoder builds (diffusers'
    defaults), or a ConfigError lists them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from emu.model.decoder import unet_kwargs, vae_kwargs

    levels = len(unet.get("block_out_channels", ()))
    if unet.get("addition_embed_type") != "text_time":
        raise ConfigError(f"{source}/unet/config.json: addition_embed_type is {unet.get('addition_embed_type')!r}, "
                          "not SDXL's 'text_time' (an SD 1.x/2.x UNet? Emu2's decoder is SDXL's)")
    try:
        config = DecoderConfig(
            visual_dim=visual_dim,
            unet_block_out_channels=tuple(unet["block_out_channels"]),
            unet_layers_per_block=int(unet.get("layers_per_block", 2)),
            unet_down_block_types=tuple(unet["down_block_types"]),
            unet_up_block_types=tuple(unet["up_block_types"]),
            unet_attention_head_dim=_per_level(unet.get("attention_head_dim", 8), levels),
            unet_transformer_layers_per_block=_per_level(unet.get("transformer_layers_per_block", 1), levels),
            unet_norm_num_groups=int(unet.get("norm_num_groups", 32)),
            addition_time_embed_dim=int(unet["addition_time_embed_dim"]),
            vae_block_out_channels=tuple(vae["block_out_channels"]),
            vae_layers_per_block=int(vae.get("layers_per_block", 1)),
            vae_norm_num_groups=int(vae.get("norm_num_groups", 32)),
            latent_channels=int(vae.get("latent_channels", 4)),
            vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
            sample_size=int(unet["sample_size"]),
            **{k: scheduler[k] for k in ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule",
                                         "prediction_type", "timestep_spacing", "steps_offset")
               if scheduler and k in scheduler},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: unet/vae config.json lacks or mistypes {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{source}: not a decoder VisualDecoder can build: {exc}") from None
    ours = unet_kwargs(config)
    # cross_attention_dim and the text-time input width are what Emu2 changes; the rest must agree
    changed = {"cross_attention_dim", "projection_class_embeddings_input_dim"}
    problems = []
    for part, given, built, defaults in (("unet", unet, ours, _defaults(UNet2DConditionModel)),
                                         ("vae", vae, vae_kwargs(config), _defaults(AutoencoderKL))):
        for key, value in given.items():
            if key in _IGNORED or key in changed:
                continue
            want = built.get(key, defaults.get(key, value))
            if key in ("attention_head_dim", "transformer_layers_per_block") and part == "unet":
                value = _per_level(value, levels)
            if not _same(value, want):
                problems.append(f"{part}/config.json {key}={value!r} (the decoder builds {want!r})")
    if vae.get("shift_factor") not in (None, 0, 0.0):
        problems.append(f"vae/config.json shift_factor={vae['shift_factor']!r} (the decoder applies none)")
    if problems:
        raise ConfigError(f"{source} is not an SDXL-layout UNet/VAE the decoder can start from: {'; '.join(problems[:6])}")
    return config


def component_weights(folder: Path) -> TensorSource:
    """The tensors of a diffusers component folder (single file or sharded, safetensors or .bin,
    fp16 variant or not), read lazily."""
    for name in _INDEX_FILES:
        index = folder / name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map") or {}
            sources = {}
            for shard in sorted(set(weight_map.values())):
                if not (folder / shard).is_file():
                    raise ConfigError(f"{index} names shard {shard}, which is not in {folder}")
                sources[shard] = open_checkpoint(folder / shard)
            shapes = {k: sources[s].shapes[k] for k, s in weight_map.items()}
            return TensorSource(str(index), shapes, lambda key: sources[weight_map[key]].get_tensor(key))
    for name in _WEIGHT_FILES:
        if (folder / name).is_file():
            return open_checkpoint(folder / name)
    raise ConfigError(f"{folder} has no diffusers weights ({', '.join(_WEIGHT_FILES[:2])}, ...)")


def convert_sdxl(src: str | Path, out: str | Path, visual_dim: int, seed: int = 0) -> SdxlConversion:
    """Write a VisualDecoder folder at `out` from the SDXL-layout diffusers folder `src` (module
    docstring); returns the report, also saved as out/conversion.json."""
    from emu.model.decoder import VisualDecoder
    from emu.model.io import local_folder

    folder = local_folder(src)
    if folder.is_file() or not (folder / "unet" / "config.json").is_file() or not (folder / "vae" / "config.json").is_file():
        raise ConfigError(f"{src} is not an SDXL-layout diffusers folder (unet/config.json and vae/config.json; "
                          "a single-file checkpoint converts to one with diffusers' "
                          "StableDiffusionXLPipeline.from_single_file(...).save_pretrained)")
    unet_config, vae_config = _read_json(folder / "unet" / "config.json"), _read_json(folder / "vae" / "config.json")
    scheduler_file = folder / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file) if scheduler_file.is_file() else None
    config = decoder_config_from_sdxl(unet_config, vae_config, scheduler, visual_dim, str(folder))
    unet_source, vae_source = component_weights(folder / "unet"), component_weights(folder / "vae")

    torch.manual_seed(seed)
    decoder = VisualDecoder.from_config(config)
    report = SdxlConversion(source=str(src), out=str(out), visual_dim=visual_dim,
                            source_cross_attention_dim=int(unet_config.get("cross_attention_dim", 0)),
                            config=asdict(config))
    time_columns = 6 * config.addition_time_embed_dim
    for part, module, source in (("unet", decoder.unet, unet_source), ("vae", decoder.vae, vae_source)):
        state = module.state_dict()
        missing = sorted(set(state) - set(source.keys()))
        unexpected = sorted(set(source.keys()) - set(state))
        if missing or unexpected:
            raise ConfigError(f"{source}: the {part} weights do not match its config.json: missing {missing[:4]}, "
                              f"unexpected {unexpected[:4]}")
        new = {}
        for key, target in state.items():
            shape = tuple(source.shapes[key])
            if shape == tuple(target.shape):
                new[key] = source.get_tensor(key).to(target.dtype)
                report.kept += 1
                report.kept_parameters += target.numel()
            elif part == "unet" and (".attn2.to_k." in key or ".attn2.to_v." in key) and shape[0] == target.shape[0]:
                new[key] = target  # diffusers' fresh init: it reads visual embeddings now
                report.reinitialised.append(key)
            elif (part == "unet" and key == "add_embedding.linear_1.weight" and shape[0] == target.shape[0]
                  and shape[1] > time_columns):
                stored = source.get_tensor(key).to(target.dtype)
                new[key] = torch.cat([target[:, :visual_dim], stored[:, -time_columns:]], dim=1)
                report.partly_kept[key] = (f"its {time_columns} time-id columns; the {shape[1] - time_columns} "
                                           f"text_embeds columns re-initialised as {visual_dim}")
            else:
                raise ConfigError(f"{source}: {part} weight {key} is {list(shape)}, the decoder's {list(target.shape)}; "
                                  "only the cross-attention inputs and the text-time embedding may differ")
        module.load_state_dict(new)
    out = Path(out)
    decoder.save_pretrained(out)
    (out / REPORT_NAME).write_text(json.dumps(asdict(report), indent=2) + "\n", encoding="utf-8")
    return report

