"""Start from the released Emu2 weights: map the official checkpoint key layout onto EmuModel.

Layouts handled (official code, baaivision/Emu `Emu2/emu/emu.py` and the Hugging Face
`modeling_emu.py` of BAAI/Emu2, Emu2-Chat, Emu2-Gen/multimodal_encoder):

    Hugging Face                     native (GitHub)                      ours
    model.visual.<eva>               visual.<eva>                         visual.<eva>   (same EVA names)
    model.decoder.lm.<llama>         decoder.lm.<llama>                   lm.<llama>
    project_up.weight                decoder.lm.project_up.weight         project_up.weight
    project_down.weight              decoder.lm.project_down.weight       project_down.weight

Older training checkpoints name the heads `decoder.lm.stu_regress_head` (project_down) and
`vl_adapter.projection` (project_up), as the official loader renames; a DeepSpeed `{"module": ...}`
wrapper is unwrapped; `rotary_emb.inv_freq` buffers (saved by the transformers 4.31 Llama the
release vendored) are dropped. The base models have 32,272 vocabulary rows and Emu2-Chat 32,274
(`[USER]`, `[ASSISTANT]`); our tokenizer always has the chat tokens, so missing rows are added,
initialised to the mean embedding (what `resize_token_embeddings` does for new tokens).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from emu.model.config import EmuConfig, LMConfig, VisionConfig

_PREFIXES = (
    ("model.visual.", "visual."),
    ("model.decoder.lm.", "lm."),
    ("decoder.lm.project_up.", "project_up."),
    ("decoder.lm.project_down.", "project_down."),
    ("decoder.lm.stu_regress_head.", "project_down."),
    ("vl_adapter.projection.", "project_up."),
    ("decoder.lm.", "lm."),
    ("visual.", "visual."),
    ("project_up.", "project_up."),
    ("project_down.", "project_down."),
)
_VOCAB_KEYS = ("lm.model.embed_tokens.weight", "lm.lm_head.weight")


def convert_state_dict(official: Mapping[str, torch.Tensor], vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Official Emu2 keys -> EmuModel keys. Unknown keys raise, so nothing is silently dropped
    except the rotary buffers. With `vocab_size`, vocabulary rows are padded up to it."""
    if "module" in official and isinstance(official["module"], Mapping):
        official = official["module"]
    converted: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in official.items():
        if key.endswith("rotary_emb.inv_freq"):
            continue
        for prefix, ours in _PREFIXES:
            if key.startswith(prefix):
                converted[ours + key[len(prefix):]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise KeyError(f"keys not in the official Emu2 layout: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}")
    if vocab_size is not None:
        for key in _VOCAB_KEYS:
            if key in converted and converted[key].shape[0] < vocab_size:
                rows = converted[key]
                extra = rows.mean(dim=0, keepdim=True).expand(vocab_size - rows.shape[0], -1)
                converted[key] = torch.cat([rows, extra.to(rows.dtype)])
    return converted


def config_from_official(hf_config: Mapping) -> EmuConfig:
    """EmuConfig from the released `config.json` (its `vision_config` and LLaMA fields)."""
    vision = hf_config["vision_config"]
    mlp_dim = vision.get("intermediate_size") or int(vision["width"] * vision["mlp_ratio"])
    n_query, v_query = vision.get("n_query", 64), vision.get("v_query", 64)
    return EmuConfig(
        vision=VisionConfig(image_size=vision["image_size"], patch_size=vision["patch_size"],
                            width=vision["width"], layers=vision["layers"],
                            heads=vision["width"] // vision["head_width"], mlp_dim=mlp_dim,
                            postnorm=vision.get("postnorm", True), qkv_bias=vision.get("qkv_bias", True),
                            layer_norm_eps=vision.get("layer_norm_eps", 1e-6)),
        lm=LMConfig(vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
                    intermediate_size=hf_config["intermediate_size"], layers=hf_config["num_hidden_layers"],
                    heads=hf_config["num_attention_heads"],
                    kv_heads=hf_config.get("num_key_value_heads", hf_config["num_attention_heads"]),
                    max_positions=hf_config.get("max_position_embeddings", 2048),
                    rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6), rope_theta=hf_config.get("rope_theta", 10000.0)),
        image_tokens_side=math.isqrt(n_query), video_tokens_side=math.isqrt(v_query),
    )
