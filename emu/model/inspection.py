"""`emu model inspect PATH`: what a checkpoint folder or file holds, so a user can check it
before a long run: its format, parameter count and dtypes, the architecture its files describe,
its tokenizer, and which settings of this platform it can initialise.

Formats recognised (local paths or s3:// URIs):

    emu-model            a folder written by emu.model.io.save_model (emu.json)
    emu-visual-decoder   a folder written by VisualDecoder.save_pretrained (decoder_config.json)
    diffusers-sdxl       an SDXL-layout diffusers folder (unet/, vae/): `emu model convert-sdxl`
    hf-causal-lm         a Hugging Face causal-LM folder (config.json): model.lm.pretrained
    hf-model             another Hugging Face model folder (not a causal LM: nothing to start)
    eva-clip, eva-clip-visual, emu2
                         a checkpoint file with an EVA-CLIP vision tower: model.vision.pretrained
    state-dict           any other checkpoint file (nothing to start)

Only headers are read where the format allows (safetensors); torch pickles are memory-mapped.
A truncated or unreadable file is a ConfigError naming it.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from emu.errors import ConfigError
from emu.model.config import WEIGHT_SUFFIXES
from emu.model.pretrained import CLIP_HEAD, TensorSource, eva_layout, open_checkpoint, safetensors_header


@dataclass
class Inspection:
    path: str
    format: str
    parameters: int = 0
    dtypes: dict[str, int] = field(default_factory=dict)   # dtype -> parameters
    files: int = 0
    bytes: int = 0
    details: dict[str, Any] = field(default_factory=dict)
    tokenizer: dict[str, Any] | None = None
    initialises: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        dtypes = ", ".join(f"{d} {n:,}" for d, n in sorted(self.dtypes.items(), key=lambda kv: -kv[1]))
        lines = [f"{self.path}: {self.format}",
                 f"  parameters: {self.parameters:,} ({_human(self.parameters)}; {dtypes or 'none'}) "
                 f"in {self.files} file{'s' if self.files != 1 else ''}, {_bytes(self.bytes)}"]
        for key, value in self.details.items():
            lines.append(f"  {key}: {_plain(value)}")
        if self.tokenizer is not None:
            lines.append("  tokenizer: " + ", ".join(f"{k} {_plain(v)}" for k, v in self.tokenizer.items()))
        lines.append(f"  initialises: {'; '.join(self.initialises) if self.initialises else 'nothing on this platform'}")
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)


def _plain(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(map(_plain, value)) + "]"
    return str(value)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _bytes(n: int) -> str:
    for unit, scale in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# ---- tensors of files --------------------------------------------------------------------------

def _count(result: Inspection, source: TensorSource, files: list[Path]) -> None:
    for key, shape in source.shapes.items():
        n = math.prod(shape)
        result.parameters += n
        result.dtypes[source.dtypes.get(key, "unknown")] = result.dtypes.get(source.dtypes.get(key, "unknown"), 0) + n
    result.files += len(files)
    result.bytes += sum(f.stat().st_size for f in files)


def _weights(folder: Path, result: Inspection, stems: tuple[str, ...] = ("model", "diffusion_pytorch_model",
                                                                          "pytorch_model")) -> None:
    """Count the weight files of a (transformers or diffusers) folder: safetensors preferred, as
    their loaders do; a `.fp16` variant only when no full-precision file is there."""
    files = sorted(f for f in folder.glob("*.safetensors") if f.name.split(".")[0].split("-")[0] in stems)
    if any(".fp16." not in f.name for f in files):
        files = [f for f in files if ".fp16." not in f.name]
    if not files:
        files = sorted(f for f in folder.glob("*.bin") if f.name.split(".")[0].split("-")[0] in stems)
        if any(".fp16." not in f.name for f in files):
            files = [f for f in files if ".fp16." not in f.name]
    for file in files:
        _count(result, open_checkpoint(file), [file])


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not a readable JSON file ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return data


def _tokenizer(folder: Path, strict: bool) -> dict[str, Any] | None:
    """What a tokenizer folder holds; None when it has no tokenizer files."""
    from emu.data.tokenizer import SPECIAL_TOKENS

    names = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")
    if not any((folder / n).is_file() for n in names):
        return None
    if strict:
        from emu.data.tokenizer import load_model_tokenizer

        tok = load_model_tokenizer(folder)
    else:
        from emu.data.tokenizer import _read_tokenizer

        tok = _read_tokenizer(folder, str(folder))
    vocab = tok.get_vocab()
    info = {"class": type(tok).__name__, "tokens": len(tok), "bos": tok.bos_token, "eos": tok.eos_token,
            "pad": tok.pad_token}
    missing = sum(t not in vocab for t in SPECIAL_TOKENS)
    if not strict:
        info["Emu2 tokens to add"] = missing
        if getattr(tok, "legacy", None) is not None:
            info["legacy"] = tok.legacy
    return info


# ---- formats -----------------------------------------------------------------------------------

def _emu_model(folder: Path) -> Inspection:
    from emu.model.io import WEIGHTS_FILE, _read_meta

    meta = _read_meta(folder)
    result = Inspection(str(folder), "emu-model")
    _count(result, open_checkpoint(folder / WEIGHTS_FILE), [folder / WEIGHTS_FILE])
    _weights(folder / "lm", result)
    config = meta["config"]
    vision, lm_config = config.get("vision", {}), _json(folder / "lm" / "config.json")
    result.details = {
        "encoder": {k: vision.get(k) for k in ("image_size", "patch_size", "width", "layers", "heads")},
        "connector": config.get("connector"),
        "tokens per image": config.get("image_tokens_side", 0) ** 2,
        "LM": {"architecture": ", ".join(lm_config.get("architectures") or []), "hidden": lm_config.get("hidden_size"),
               "layers": lm_config.get("num_hidden_layers"), "vocabulary": lm_config.get("vocab_size")},
    }
    started = {k: v for k, v in (("encoder", vision.get("pretrained")), ("LM", config.get("lm", {}).get("pretrained")))
               if v}
    if started:
        result.details["started from"] = started
    result.tokenizer = _tokenizer(folder / "tokenizer", strict=True)
    result.initialises = ["stage1/stage2/instruct init", "decoder.encoder", "emu precompute --model",
                          "emu evaluate --model"]
    return result


def _visual_decoder(folder: Path) -> Inspection:
    from emu.model.decoder import CONFIG_NAME

    config = _json(folder / CONFIG_NAME)
    result = Inspection(str(folder), "emu-visual-decoder")
    for part in ("unet", "vae"):
        _weights(folder / part, result)
    result.details = {"visual_dim": config.get("visual_dim"),
                      "UNet channels": config.get("unet_block_out_channels"),
                      "output px": config.get("sample_size", 0) * 2 ** (len(config.get("vae_block_out_channels", [0])) - 1)}
    if (folder / "conversion.json").is_file():
        result.details["converted from"] = _json(folder / "conversion.json").get("source")
    result.initialises = ["decoder.init", "emu evaluate --decoder"]
    return result


def _diffusers(folder: Path) -> Inspection:
    from emu.model.sdxl import decoder_config_from_sdxl

    unet, vae = _json(folder / "unet" / "config.json"), _json(folder / "vae" / "config.json")
    result = Inspection(str(folder), "diffusers-sdxl")
    for part in ("unet", "vae"):
        _weights(folder / part, result)
    result.details = {"UNet": {"channels": unet.get("block_out_channels"), "cross_attention_dim": unet.get("cross_attention_dim"),
                               "addition_embed_type": unet.get("addition_embed_type")},
                      "VAE": {"channels": vae.get("block_out_channels"), "scaling_factor": vae.get("scaling_factor")}}
    try:
        decoder_config_from_sdxl(unet, vae, None, int(unet.get("cross_attention_dim") or 1), str(folder))
    except ConfigError as exc:
        result.format = "diffusers"
        result.notes.append(f"cannot initialise the visual decoder: {exc}")
        return result
    result.initialises = [f"the visual decoder: emu model convert-sdxl {folder} --out DIR, then decoder.init=DIR"]
    return result


def _hf(folder: Path) -> Inspection:
    from emu.model.pretrained import causal_lm_config

    config = _json(folder / "config.json")
    result = Inspection(str(folder), "hf-causal-lm")
    _weights(folder, result)
    result.details = {"architecture": ", ".join(config.get("architectures") or []) or "-",
                      "model_type": config.get("model_type")}
    text = config.get("text_config", config)
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "max_position_embeddings", "tie_word_embeddings", "torch_dtype", "dtype"):
        if key in text:
            result.details[key] = text[key]
    try:
        causal_lm_config(folder, str(folder))
    except ConfigError as exc:
        result.format = "hf-model"
        result.notes.append(str(exc).split(": ", 1)[-1])
        return result
    result.tokenizer = _tokenizer(folder, strict=False)
    if result.tokenizer is None:
        result.initialises = ["model.lm.pretrained (no tokenizer here: set stage1.tokenizer to the LM's)"]
    else:
        result.initialises = ["model.lm.pretrained (with its tokenizer)"]
    if result.files == 0:
        result.notes.append("no weight files (model*.safetensors / pytorch_model*.bin)")
        result.initialises = []
    return result


def _file(file: Path) -> Inspection:
    source = open_checkpoint(file)
    result = Inspection(str(file), "state-dict")
    _count(result, source, [file])
    found = eva_layout(source.keys())
    if found is None:
        result.notes.append(f"no EVA-CLIP vision tower; keys such as {', '.join(sorted(source.keys())[:3])}")
        return result
    prefix, layout = found
    result.format = layout
    shapes = {k[len(prefix):]: v for k, v in source.shapes.items() if k.startswith(prefix)}
    blocks = {int(k.split(".")[1]) for k in shapes if k.startswith("blocks.") and k.split(".")[1].isdigit()}
    pos, patch = shapes.get("pos_embed"), shapes.get("patch_embed.proj.weight")
    vision: dict[str, Any] = {}
    if pos and patch:
        grid = round((pos[1] - 1) ** 0.5)
        vision = {"image_size": grid * patch[-1], "patch_size": patch[-1], "width": pos[-1], "layers": len(blocks),
                  "mlp_dim": shapes.get("blocks.0.mlp.fc1.weight", (None,))[0],
                  "qkv_bias": "blocks.0.attn.q_bias" in shapes}
    vision_params = sum(math.prod(v) for k, v in shapes.items() if k not in CLIP_HEAD)
    result.details = {"vision tower": vision, "vision parameters": f"{vision_params:,}",
                      "CLIP head": any(k in CLIP_HEAD for k in shapes),
                      "other keys": len(source.keys()) - len(shapes)}
    unsupported = sorted({k.split(".")[-2] if "." in k else k for k in shapes
                          if any(m in k for m in ("rope", "q_proj", "mlp.w1", "gamma_", "rel_pos"))})
    if unsupported:
        result.notes.append(f"EVA-02-CLIP-B/L-style tower ({', '.join(unsupported[:4])}): rotary positions / split "
                            "q,k,v / SwiGLU are not implemented by this encoder")
        return result
    result.initialises = ["model.vision.pretrained (set model.vision to the sizes above; heads and post-norm are not "
                          "stored in the weights: EVA-02-CLIP-E-plus has 16 heads, post-norm)"]
    if layout == "emu2":
        result.notes.append("the released Emu2 weights: the LM and projections map onto EmuModel with "
                            "emu.model.official.convert_state_dict")
    return result


def inspect_path(path: str | Path) -> Inspection:
    """The Inspection of a checkpoint folder or file (module docstring)."""
    text = str(path)
    if text.startswith("s3://"):
        from emu.artifacts.s3 import resolve_local, resolve_local_file

        local = resolve_local_file(text) if text.endswith(WEIGHT_SUFFIXES) else resolve_local(text)
    else:
        local = Path(text).expanduser()
        if not local.exists():
            raise ConfigError(f"{text} does not exist")
    if local.is_file():
        if local.suffix not in WEIGHT_SUFFIXES:
            raise ConfigError(f"{local}: not a checkpoint file ({', '.join(WEIGHT_SUFFIXES)})")
        return _file(local)
    for file in sorted(local.rglob("*.safetensors")):  # truncation anywhere: say so first, naming the file
        safetensors_header(file)
    if (local / "emu.json").is_file():
        return _emu_model(local)
    if (local / "decoder_config.json").is_file():
        return _visual_decoder(local)
    if (local / "unet" / "config.json").is_file() and (local / "vae" / "config.json").is_file():
        return _diffusers(local)
    if (local / "config.json").is_file():
        return _hf(local)
    kinds = Counter(f.suffix for f in local.iterdir() if f.is_file())
    raise ConfigError(f"{local}: not a checkpoint folder this platform reads (no emu.json, decoder_config.json, "
                      f"unet/ + vae/ or config.json; it holds {dict(kinds) or 'no files'})")
