"""The frozen pieces a precompute runs: the visual encoder (without the LM) and the decoder's VAE.

`load_encoder` reads only `emu.json` and the `visual.*` / `cformer.*` tensors of `model.safetensors`
(emu.model.io layout): the LM (`lm/`, tens of GB for Emu2) is never loaded, neither by the driver
(which hashes the encoder) nor by the actors. The encoder computes exactly what
`EmuModel.encode_images` computes: the ViT's patch tokens, mean-pooled to each side (or the
C-Former's queries), from the same `preprocess`.
"""

from __future__ import annotations

import dataclasses
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from emu.config import from_dict
from emu.errors import ConfigError
from emu.model.config import EmuConfig
from emu.model.vision import EvaVisionTransformer, pool_patches, resize_position_embeddings
from emu.precompute.content import HASH_DTYPES, module_sha256
from emu.precompute.sources import MD5_PREFIX, local_model

MODEL_CONFIG = "emu.json"    # emu.model.io.CONFIG_FILE
MODEL_WEIGHTS = "model.safetensors"  # emu.model.io.WEIGHTS_FILE (everything but the LM)


def local_folder(path: str | Path) -> Path:
    """A local folder for a model path; s3:// URIs are fetched by the S3 adapter (as emu.model.io
    does, without importing the LM code), `md5:` references pulled from the DVC remote."""
    if str(path).startswith(MD5_PREFIX):
        return Path(local_model(str(path)))
    if str(path).startswith("s3://"):
        from emu.artifacts.s3 import resolve_local

        return resolve_local(str(path))
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist")
    return folder


@dataclass
class Encoder:
    """The frozen visual encoder of an Emu model, at the input size it runs at."""

    config: EmuConfig          # vision.image_size is the input size used here
    visual: EvaVisionTransformer
    cformer: nn.Module | None

    def modules(self) -> dict[str, nn.Module | None]:
        """The modules the weights hash covers, named as in EmuModel."""
        return {"visual": self.visual, "cformer": self.cformer}

    def weights_sha256(self) -> dict[str, str]:
        return {name: module_sha256(self.modules(), dtype) for name, dtype in HASH_DTYPES.items()}

    def to(self, device: torch.device | str) -> Encoder:
        self.visual.to(device)
        if self.cformer is not None:
            self.cformer.to(device)
        return self

    @torch.inference_mode()
    def encode(self, pixels_BCHW: torch.Tensor, sides: list[int]) -> dict[int, torch.Tensor]:
        """side -> (B, side*side, D) embeddings from one ViT forward (C-Former: its queries, the
        same at every side), as EmuModel.encode_images(pixels, side)."""
        tokens = self.visual(pixels_BCHW)
        if self.cformer is not None:
            queries = self.cformer(tokens)
            return {side: queries for side in sides}
        return {side: pool_patches(tokens, side) for side in sides}


def read_model_config(folder: Path) -> EmuConfig:
    path = folder / MODEL_CONFIG
    for needed in (path, folder / MODEL_WEIGHTS):
        if not needed.is_file():
            raise ConfigError(f"{folder} is not an Emu model folder: {needed.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(meta, dict) or "config" not in meta:
        raise ConfigError(f"{path} has no model config")
    return from_dict(EmuConfig, meta["config"], where="model", origin=str(path))


def load_encoder(model: str | Path, image_size: int = 0) -> Encoder:
    """The encoder of a saved Emu model (folder or s3:// URI), with positions resized for
    `image_size` (0 = the model's) exactly as a training stage resizes them
    (emu.model.io.load_model with image_size), so its weights hash equals the stage model's."""
    from safetensors import safe_open

    folder = local_folder(model)
    config = read_model_config(folder)
    visual = EvaVisionTransformer(config.vision)
    cformer = None
    if config.connector == "cformer":
        from emu.model.cformer import CausalFormer

        cformer = CausalFormer(config.cformer, config.vision.width, config.vision.layer_norm_eps)
    wanted = {"visual": visual, "cformer": cformer}
    states: dict[str, dict[str, torch.Tensor]] = {name: {} for name, m in wanted.items() if m is not None}
    with safe_open(str(folder / MODEL_WEIGHTS), framework="pt") as handle:
        for key in handle.keys():
            prefix, _, rest = key.partition(".")
            if prefix in states:
                states[prefix][rest] = handle.get_tensor(key)
    for name, state in states.items():
        try:
            wanted[name].load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise ConfigError(f"{folder / MODEL_WEIGHTS}: the {name} weights do not match {MODEL_CONFIG}: {exc}") from None
    if image_size and image_size != config.vision.image_size:
        if image_size % config.vision.patch_size:
            raise ConfigError(f"precompute.image_size ({image_size}) must be a multiple of the model's patch size "
                              f"({config.vision.patch_size})")
        resize_position_embeddings(visual, image_size)
        config = dataclasses.replace(config, vision=visual.config)
    for module in (visual, cformer):
        if module is not None:
            module.requires_grad_(False).eval()
    return Encoder(config=config, visual=visual, cformer=cformer)


# ---- VAE latents (decoder training) ------------------------------------------------------------

def load_vae(decoder: str | Path):
    """The frozen visual decoder of `decoder` (VisualDecoder.from_pretrained) with its UNet
    dropped: only the VAE encodes. Imports diffusers (through emu.model.decoder, its one home)."""
    from emu.model.decoder import VisualDecoder

    model = VisualDecoder.from_pretrained(local_folder(decoder))
    model.unet = None  # not needed to encode; frees its memory in every actor
    model.vae.requires_grad_(False).eval()
    return model


def vae_sha256(decoder) -> dict[str, str]:
    return {name: module_sha256({"vae": decoder.vae}, dtype) for name, dtype in HASH_DTYPES.items()}


def center_crop(data: bytes, size: int):
    """Scale so the short side is `size` (bicubic, keeping the aspect ratio) and cut the centred
    size x size square: the deterministic version of decoder training's scale-and-crop
    (emu.train.decoder_step). Returns the crop and SDXL's time ids (original h, w, crop top, left,
    target h, w)."""
    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    width, height = image.size
    factor = size / min(width, height)
    scaled_w, scaled_h = max(size, round(width * factor)), max(size, round(height * factor))
    scaled = image.resize((scaled_w, scaled_h), Image.BICUBIC)
    left, top = (scaled_w - size) // 2, (scaled_h - size) // 2
    crop = scaled.crop((left, top, left + size, top + size))
    return crop, [float(height), float(width), float(top), float(left), float(size), float(size)]


def unit_range(images) -> torch.Tensor:
    """PIL images -> (B, 3, H, W) in [-1, 1], what the VAE encodes (decoder training reads the same)."""
    arrays = np.stack([np.asarray(img, dtype=np.float32) / 127.5 - 1.0 for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()
