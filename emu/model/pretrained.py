"""Start from pretrained parts, as Emu2 does (§2.1: EVA-02-CLIP-E-plus as the visual encoder,
LLaMA-33B as the LM, SDXL as the initialisation of the visual decoder, emu.model.sdxl).

    model.vision.pretrained   an EVA-CLIP checkpoint file (local or s3://) -> EmuModel.visual
    model.lm.pretrained       a Hugging Face causal-LM folder (local or s3://) -> EmuModel.lm,
                              and its tokenizer (emu.data.tokenizer.load_tokenizer) -> the model's

EVA-CLIP layouts read (key names as the public code writes them):

    eva-clip         the full CLIP checkpoint of EVA-CLIP / open_clip (baaivision/EVA,
                     EVA-CLIP/rei/eva_clip: `CustomCLIP.visual` = eva_vit_model.EVAVisionTransformer,
                     `text.*`, `logit_scale`; older `CLIP` ones keep the text tower at the top level):
                     `visual.patch_embed.proj`, `visual.cls_token`, `visual.pos_embed`,
                     `visual.blocks.N.{norm1, attn.{qkv, q_bias, v_bias, proj}, norm2, mlp.{fc1, fc2}}`,
                     and the CLIP head `visual.norm`, `visual.head` (or `visual.fc_norm`)
    eva-clip-visual  the same vision tower saved alone, without the `visual.` prefix
    emu2             the released Emu2 weights (baaivision/Emu Emu2/emu/eva_vit.py, emu.py): `visual.*`
                     (native) or `model.visual.*` (Hugging Face) next to the LM, with no CLIP head

Checkpoints wrapped as EVA-CLIP's `load_state_dict` unwraps them (a `model`, `module` or
`state_dict` entry, a `module.` prefix) are read too. The CLIP head (final LayerNorm and
projection) is left out, reported, because Emu2 reads the last block's patch tokens (the Emu2
encoder has neither); every other key must match the encoder exactly (names and shapes): missing
or unexpected keys and other shapes are one error listing them, never a partial load. The one
adaptation is the position table, interpolated when the checkpoint's patch grid differs from
the encoder's (Emu2 trains EVA-CLIP's 224 px at 448 px, §2.2.2).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from emu.errors import ConfigError
from emu.model.config import WEIGHT_SUFFIXES

log = logging.getLogger(__name__)

__all__ = ["WEIGHT_SUFFIXES", "TensorSource", "VisionLoad", "eva_clip_weights", "load_pretrained_lm",
           "load_vision_weights", "open_checkpoint", "safetensors_header"]
#: Keys of the CLIP head after EVA-CLIP's blocks (eva_vit_model.py `norm`, `fc_norm`, `head`):
#: not part of Emu2's encoder, which ends at the last block.
CLIP_HEAD = ("norm.weight", "norm.bias", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias")
#: Entries a training checkpoint wraps its state dict in (EVA-CLIP factory.py: "model|module|state_dict").
_WRAPPERS = ("model", "module", "state_dict")


# ---- reading checkpoint files ------------------------------------------------------------------

def local_file(path: str, setting: str) -> Path:
    """A local checkpoint file for a setting (an s3:// URI is fetched into the cache)."""
    from emu.artifacts.s3 import resolve_local_file

    try:
        file = resolve_local_file(path)
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    if file.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"{setting}: {file} is not a checkpoint file (expected {', '.join(WEIGHT_SUFFIXES)})")
    return file


def safetensors_header(file: Path) -> dict[str, dict]:
    """The tensor table of a safetensors file (name -> dtype, shape, data_offsets), after checking
    that the file holds every byte its header describes: a truncated download is an error naming
    the file, not a deserialisation failure deep inside a loader."""
    file = Path(file)
    size = file.stat().st_size
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ConfigError(f"{file}: truncated safetensors file ({size} bytes: not even its 8-byte header length)")
        length = int.from_bytes(prefix, "little")
        if length > size - 8:
            raise ConfigError(f"{file}: truncated safetensors file: its header alone is {length} bytes, the file "
                              f"has {size}")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ConfigError(f"{file}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{file}: not a safetensors file (its header is not a table of tensors)")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    try:
        end = max((int(v["data_offsets"][1]) for v in tensors.values()), default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise ConfigError(f"{file}: not a safetensors file (a tensor entry has no data_offsets)") from None
    if 8 + length + end > size:
        raise ConfigError(f"{file}: truncated safetensors file: {size} bytes, its header describes "
                          f"{8 + length + end} (an interrupted download or copy?)")
    return tensors


class TensorSource:
    """Named tensors read on demand, under (possibly renamed) keys: what the weight loaders read
    (emu.model.io.load_weights_whole, and under ZeRO-3 emu.train.engine.PartitionedInit.load_weights,
    which reads `keys()`, `get_slice(k).get_shape()` and `get_tensor(k)` as of a safetensors handle)."""

    def __init__(self, name: str, shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], torch.Tensor],
                 dtypes: Mapping[str, str] | None = None):
        self.name = name
        self.shapes = dict(shapes)
        self.dtypes = dict(dtypes or {})  # key -> torch dtype name ("float16"), where known without reading
        self._read = read

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get_slice(self, key: str) -> _Shape:
        return _Shape(self.shapes[key])

    def get_tensor(self, key: str) -> torch.Tensor:
        return self._read(key)

    def renamed(self, names: Mapping[str, str]) -> TensorSource:
        """The tensors of `names` (new key -> key here) under their new keys."""
        return TensorSource(self.name, {new: self.shapes[old] for new, old in names.items()},
                            lambda key: self._read(names[key]),
                            {new: self.dtypes[old] for new, old in names.items() if old in self.dtypes})

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class _Shape:
    shape: tuple[int, ...]

    def get_shape(self) -> list[int]:
        return list(self.shape)


def open_checkpoint(file: Path) -> TensorSource:
    """A checkpoint file's tensors without reading them: safetensors lazily through its header,
    a torch pickle memory-mapped (weights only: no code runs) and unwrapped as EVA-CLIP does."""
    file = Path(file)
    if file.suffix == ".safetensors":
        header = safetensors_header(file)
        from safetensors import safe_open

        handle = safe_open(str(file), framework="pt")
        return TensorSource(str(file), {k: tuple(v["shape"]) for k, v in header.items()}, handle.get_tensor,
                            {k: _SAFETENSORS_DTYPES.get(v.get("dtype"), str(v.get("dtype"))) for k, v in header.items()})
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:  # the legacy (pre-zip) torch format cannot be memory-mapped
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file; all mean one thing
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{file}: not a readable torch checkpoint of tensors ({type(exc).__name__}: {first})") from None
    for wrapper in _WRAPPERS:  # EVA-CLIP factory.py load_state_dict: model_key 'model|module|state_dict'
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
            break
    if not isinstance(state, Mapping):
        raise ConfigError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DataParallel/DeepSpeed wrapper
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return TensorSource(str(file), {k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__,
                        {k: str(v.dtype).removeprefix("torch.") for k, v in tensors.items()})


#: safetensors dtype codes -> torch dtype names.
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


# ---- the visual encoder from EVA-CLIP ------------------------------------------------------------

@dataclass
class VisionLoad:
    """What `eva_clip_weights` found: the layout, the keys it maps onto the encoder, what it left
    out (the CLIP head; the other towers of a whole checkpoint) and the position table's grids."""

    file: str
    layout: str                     # eva-clip, eva-clip-visual or emu2 (module docstring)
    source: TensorSource            # the encoder's tensors, under the encoder's own keys
    dropped: list[str] = field(default_factory=list)   # CLIP-head keys left out
    other: int = 0                  # keys of other parts of the checkpoint (text tower, LM), not read
    positions: tuple[int, int] | None = None           # (checkpoint grid, encoder grid) when interpolated

    def resize(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """The loaders' `resize` argument: the position table interpolated to the encoder's grid."""
        if self.positions is None:
            return {}
        from emu.model.vision import interpolate_positions

        grid = self.positions[1]
        return {"pos_embed": lambda stored: interpolate_positions(stored, grid)}

    def describe(self) -> str:
        parts = [f"{len(self.source.keys())} tensors from {self.file} ({self.layout} layout)"]
        if self.dropped:
            parts.append(f"CLIP head left out ({', '.join(self.dropped)})")
        if self.other:
            parts.append(f"{self.other} keys of other parts not read")
        if self.positions:
            parts.append(f"positions interpolated from a {self.positions[0]}x{self.positions[0]} to a "
                         f"{self.positions[1]}x{self.positions[1]} patch grid")
        return "; ".join(parts)


def eva_clip_weights(source: TensorSource, expected: Mapping[str, tuple[int, ...]],
                     setting: str = "model.vision.pretrained") -> VisionLoad:
    """Map an EVA-CLIP / Emu2 checkpoint onto an encoder whose state-dict shapes are `expected`
    (module docstring), or raise one ConfigError listing every missing, unexpected and
    mis-shaped key."""
    keys = source.keys()
    found = eva_layout(keys)
    if found is not None:
        prefix, layout = found
    else:
        sample = ", ".join(sorted(keys)[:4]) or "no tensors"
        raise ConfigError(f"{setting}: {source} holds no EVA-CLIP vision weights (neither visual.* keys nor the "
                          f"cls_token / pos_embed / blocks.N.* of a vision tower saved alone); it has {sample}: "
                          f"a checkpoint of another architecture?")
    visual = {k[len(prefix):]: k for k in keys if k.startswith(prefix)}
    other = len(keys) - len(visual)
    dropped = sorted(k for k in visual if k in CLIP_HEAD)
    for k in dropped:
        del visual[k]
    missing = sorted(set(expected) - set(visual))
    unexpected = sorted(set(visual) - set(expected))
    shapes, positions = [], None
    for key in sorted(set(expected) & set(visual)):
        have, want = tuple(source.shapes[visual[key]]), tuple(expected[key])
        if have == want:
            continue
        if key == "pos_embed" and _square(have) and _square(want) and have[-1] == want[-1]:
            positions = (_square(have), _square(want))
            continue
        shapes.append(f"{key} {list(have)} (encoder {list(want)})")
    if missing or unexpected or shapes:
        problems = [f"{name} {len(items)}: {', '.join(items[:6])}{' ...' if len(items) > 6 else ''}"
                    for name, items in (("missing", missing), ("unexpected", unexpected), ("other shapes", shapes))
                    if items]
        hint = ""
        if any("rope" in k or "q_proj" in k or "w1" in k or "gamma_" in k or "rel_pos" in k for k in unexpected):
            hint = (" (rotary positions, split q/k/v, SwiGLU, layer scale or relative positions: an EVA-02-CLIP-B/L "
                    "style tower, which this encoder does not implement; Emu2 uses EVA-02-CLIP-E)")
        raise ConfigError(f"{setting}: {source} ({layout} layout) does not match model.vision: "
                          f"{'; '.join(problems)}{hint}")
    return VisionLoad(file=str(source), layout=layout, source=source.renamed(visual), dropped=dropped,
                      other=other, positions=positions)


def eva_layout(keys) -> tuple[str, str] | None:
    """(key prefix of the vision tower, layout name) of a checkpoint's keys, or None when it holds
    no EVA-CLIP vision tower (module docstring)."""
    keys = list(keys)
    if any(k.startswith("model.visual.") for k in keys):
        return "model.visual.", "emu2"
    if any(k.startswith("visual.") for k in keys):
        emu2 = any(k.startswith(("decoder.lm.", "project_up.", "project_down.")) for k in keys)
        return "visual.", "emu2" if emu2 else "eva-clip"
    if any(k in ("cls_token", "pos_embed") or k.startswith(("blocks.", "patch_embed.")) for k in keys):
        return "", "eva-clip-visual"
    return None


def _square(shape: tuple[int, ...]) -> int:
    """The patch-grid side of a (1, 1 + side^2, D) position table, else 0."""
    if len(shape) != 3 or shape[0] != 1:
        return 0
    side = round((shape[1] - 1) ** 0.5)
    return side if side * side == shape[1] - 1 else 0


def encoder_shapes(visual: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of an encoder, also when ZeRO-3 has partitioned it (`ds_shape`)."""
    return {name: tuple(getattr(p, "ds_shape", p.shape)) for name, p in visual.named_parameters()}


def load_vision_weights(visual: torch.nn.Module, path: str, load: Callable | None = None,
                        setting: str = "model.vision.pretrained") -> VisionLoad:
    """Fill an EvaVisionTransformer from an EVA-CLIP checkpoint file (local or s3://).
    `load(module, source, resize=...)` copies the tensors (default: all at once; the stage-1
    trainer passes the ZeRO-3 loader, emu.train.engine.PartitionedInit.load_weights)."""
    from emu.model.io import load_weights_whole

    file = local_file(path, setting)
    try:
        source = open_checkpoint(file)
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    found = eva_clip_weights(source, encoder_shapes(visual), setting)
    (load or load_weights_whole)(visual, found.source, resize=found.resize())
    log.info("visual encoder: %s", found.describe())
    return found


# ---- the LM from a Hugging Face folder -----------------------------------------------------------

def lm_folder(path: str, setting: str = "model.lm.pretrained") -> Path:
    """The local Hugging Face folder of a pretrained LM (s3:// fetched), checked to be one."""
    from emu.model.io import local_folder

    try:
        folder = local_folder(path)
    except ConfigError as exc:
        raise ConfigError(f"{setting}: {exc}") from None
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{setting}: {folder} is not a Hugging Face model folder (no config.json)")
    return folder


def causal_lm_config(folder: Path, setting: str = "model.lm.pretrained"):
    """The transformers config of a folder, refused unless AutoModelForCausalLM can build it."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{setting}: {folder / 'config.json'}: {_first_line(exc)}") from None
    saved_as = list(getattr(config, "architectures", None) or [])
    causal = {name for names in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
              for name in ((names,) if isinstance(names, str) else names)}
    # A model saved without its LM head (BertModel: AutoModelForCausalLM would build BertLMHeadModel
    # and invent the head) is not a causal LM either.
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING or (saved_as and not causal & set(saved_as)):
        kinds = ", ".join(saved_as) or "no architectures listed"
        raise ConfigError(f"{setting}: {folder / 'config.json'} describes a {config.model_type!r} model ({kinds}), "
                          "not a causal LM (AutoModelForCausalLM has no class for it)")
    return config


def check_weight_files(folder: Path, setting: str) -> list[Path]:
    """The safetensors files of a model folder, each checked complete; shards an index names
    must all be there."""
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ConfigError(f"{setting}: {index} is not a safetensors index (no weight_map)") from None
        absent = sorted(s for s in shards if not (folder / s).is_file())
        if absent:
            raise ConfigError(f"{setting}: {index} names shards that are not in {folder}: {', '.join(absent[:4])}")
    files = sorted(folder.glob("*.safetensors"))
    for file in files:
        try:
            safetensors_header(file)
        except ConfigError as exc:
            raise ConfigError(f"{setting}: {exc}") from None
    return files


def load_pretrained_lm(path: str, attn_implementation: str = "sdpa", setting: str = "model.lm.pretrained"):
    """A causal LM from a Hugging Face folder (any architecture AutoModelForCausalLM knows: LLaMA,
    Llama-2/3, Mistral, Qwen2, ...), in float32 (the engine casts for bf16), every weight loaded:
    missing, unexpected or mis-shaped weights are one error naming the folder. Built with
    `from_pretrained`, so transformers' ZeRO-3 integration loads it partitioned."""
    from transformers import AutoModelForCausalLM

    folder = lm_folder(path, setting)
    causal_lm_config(folder, setting)
    check_weight_files(folder, setting)
    try:
        lm, info = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32,
                                                        attn_implementation=attn_implementation,
                                                        output_loading_info=True)
    except (OSError, RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(f"{setting}: cannot load {folder}: {_first_line(exc)}") from None
    problems = [f"{name} {', '.join(map(str, keys[:5]))}{' ...' if len(keys) > 5 else ''}"
                for name, keys in (("missing", sorted(info.get("missing_keys", []))),
                                   ("unexpected", sorted(info.get("unexpected_keys", []))),
                                   ("other shapes", sorted(info.get("mismatched_keys", []))))
                if keys]
    if problems:
        raise ConfigError(f"{setting}: the weights in {folder} do not match its config.json: {'; '.join(problems)}")
    return lm


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
