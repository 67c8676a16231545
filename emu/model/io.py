"""Save and load an EmuModel as a Hugging Face-style folder, the form every stage exports:

    emu.json            format version, EmuConfig, visual token ids
    model.safetensors   visual encoder, C-Former, project_up, project_down
    lm/                 the causal LM (transformers `save_pretrained`: config.json + safetensors shards)
    tokenizer/          the tokenizer, Emu2 special tokens included

The LM keeps its own folder so any Hugging Face tool can open it alone, and large LMs shard.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from emu.config import from_dict, to_dict
from emu.errors import ConfigError
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel, VisualTokenIds
from emu.model.vision import interpolate_positions

FORMAT = "emu-model"
VERSION = 1
CONFIG_FILE = "emu.json"
WEIGHTS_FILE = "model.safetensors"


def save_model(model: EmuModel, tokenizer, folder: Path, state_dict: dict[str, torch.Tensor] | None = None,
               config: EmuConfig | None = None) -> Path:
    """Write the model and its tokenizer into `folder` (created; existing files are replaced).

    `state_dict` / `config` replace the module's own (a trainer passes the weights it gathered
    from ZeRO partitions, and the config of the resolution it finished at)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model.state_dict() if state_dict is None else state_dict
    rest = {k: v.detach().contiguous().cpu() for k, v in state.items() if not k.startswith("lm.")}
    save_file(rest, str(folder / WEIGHTS_FILE))
    lm_state = {k[len("lm."):]: v for k, v in state.items() if k.startswith("lm.")}
    model.lm.save_pretrained(str(folder / "lm"), state_dict=lm_state)
    tokenizer.save_pretrained(str(folder / "tokenizer"))
    meta = {"format": FORMAT, "version": VERSION, "config": to_dict(config or model.config),
            "token_ids": {"image": model.token_ids.image, "frame": model.token_ids.frame}}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return folder


def load_model(path: str | Path, dtype: torch.dtype | None = None, image_size: int | None = None,
               load_weights: WeightLoader | None = None) -> tuple[EmuModel, object]:
    """Load (model, tokenizer) from a folder written by `save_model`, or an s3:// URI of one.

    `image_size`: build the encoder for that input size, its stored position embeddings
    interpolated to the new patch grid (Emu2 raises the resolution between stages, §2.2.2).
    `load_weights(model, file, resize=...)` fills the non-LM weights from model.safetensors; the
    default loads them whole (the trainer passes a loader that fills ZeRO-3 partitions from rank 0).
    """
    from transformers import AutoModelForCausalLM

    from emu.data.tokenizer import load_model_tokenizer

    folder = local_folder(path)
    meta = _read_meta(folder)
    config = from_dict(EmuConfig, meta["config"], where="model", origin=str(folder / CONFIG_FILE))
    tokenizer = load_model_tokenizer(folder / "tokenizer")
    lm = AutoModelForCausalLM.from_pretrained(str(folder / "lm"), local_files_only=True, dtype=dtype,
                                              attn_implementation=config.lm.attn_implementation)
    if lm.get_input_embeddings().num_embeddings != len(tokenizer):
        raise ConfigError(f"{folder}: the LM has {lm.get_input_embeddings().num_embeddings} embedding rows "
                          f"but the tokenizer {len(tokenizer)} tokens")
    resize = {}
    if image_size is not None and image_size != config.vision.image_size:
        vision = dataclasses.replace(config.vision, image_size=image_size)
        config = dataclasses.replace(config, vision=vision)
        resize["visual.pos_embed"] = lambda stored: interpolate_positions(stored, vision.grid)
    model = EmuModel(config, VisualTokenIds(**meta["token_ids"]), lm)
    (load_weights or load_weights_whole)(model, folder / WEIGHTS_FILE, resize=resize)
    if dtype is not None and any(p.dtype != dtype for p in model.parameters()):
        model.to(dtype)  # (the LM is already loaded in it; the rest is built in fp32)
    return model, tokenizer


#: fills a model's non-LM weights from a safetensors file: (model, file, resize={key: fn}) -> None
WeightLoader = Callable[..., None]


def load_weights_whole(model: nn.Module, file, resize: dict[str, Callable] | None = None) -> None:
    """The non-LM weights of `file` (a safetensors file, or an emu.model.pretrained.TensorSource)
    into `model`, all at once (one process, or ZeRO 0-2)."""
    resize = resize or {}
    stored = ({k: file.get_tensor(k) for k in file.keys()} if hasattr(file, "get_tensor")
              else load_file(str(file)))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.startswith("lm.")}
    check_state_keys(file, expected, {k: tuple(v.shape) for k, v in stored.items()}, set(resize))
    model.load_state_dict({k: resize[k](v) if k in resize else v for k, v in stored.items()}, strict=False)


def check_state_keys(file: Path, expected: dict[str, tuple], stored: dict[str, tuple], resized: set[str]) -> None:
    """Refuse a weights file whose keys or shapes differ from the model's (no silent partial load);
    `resized` keys are adapted to the model's shape on load, so only their presence counts."""
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    shapes = [f"{k} {stored[k]} (model {expected[k]})" for k in sorted(set(expected) & set(stored))
              if k not in resized and stored[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ConfigError(f"{file} does not match its emu.json: missing {missing[:5]}, unexpected "
                          f"{unexpected[:5]}, other shapes {shapes[:5]}")


def _read_meta(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    for needed in (path, folder / WEIGHTS_FILE, folder / "lm" / "config.json", folder / "tokenizer"):
        if not needed.exists():
            raise ConfigError(f"{folder} is not an Emu model folder: {needed.name} is missing")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ConfigError(f"{path}: expected format {FORMAT!r} version {VERSION}, got "
                          f"{meta.get('format')!r} version {meta.get('version')!r}")
    return meta


def local_folder(path: str | Path) -> Path:
    """A local folder for `path`; s3:// URIs are fetched into the cache by the S3 adapter."""
    if str(path).startswith("s3://"):
        from emu.artifacts.s3 import resolve_local

        return resolve_local(str(path))
    folder = Path(path)
    if not folder.is_dir():
        raise ConfigError(f"model folder {folder} does not exist")
    return folder
