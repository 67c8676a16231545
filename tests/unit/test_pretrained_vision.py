"""The visual encoder from EVA-CLIP checkpoints (`model.vision.pretrained`), in the layouts the
public code writes (tests/pretrained.py documents the key names): the full EVA-CLIP / open_clip
CLIP checkpoint (`visual.*` beside the text tower), the vision tower alone (no prefix), and the
released Emu2 weights (native `visual.*` and Hugging Face `model.visual.*`). Our forward is
compared with EVA-CLIP's, written out from its code in plain tensor ops. CPU, seconds."""

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close

from emu.data.tokenizer import train_tokenizer
from emu.errors import ConfigError
from emu.model.config import EmuConfig, VisionConfig
from emu.model.emu import EmuModel
from emu.model.pretrained import CLIP_HEAD, eva_clip_weights, load_vision_weights, open_checkpoint
from emu.model.vision import EvaVisionTransformer, interpolate_positions
from tests.pretrained import clip_text_state_dict, corpus, eva_reference_forward, eva_state_dict

VISION = dict(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(corpus(20), 300)


@pytest.fixture(scope="module")
def eva():
    return eva_state_dict(width=32, layers=2, mlp_dim=64, patch=4, grid=4)


def tower(sd):
    """The encoder's part of an EVA-CLIP vision tower: everything but the CLIP head."""
    return {k: v for k, v in sd.items() if k not in CLIP_HEAD}


def layouts(eva):
    lm = {"decoder.lm.model.embed_tokens.weight": torch.zeros(4, 8), "decoder.lm.project_up.weight": torch.zeros(8, 32)}
    return {
        # EVA-CLIP / open_clip full CLIP checkpoint (CustomCLIP: visual.*, text.*, logit_scale), .pt
        "eva-clip.pt": ({f"visual.{k}": v for k, v in eva.items()} | clip_text_state_dict(), "eva-clip"),
        # the vision tower saved alone, no prefix, CLIP head included
        "eva-clip-visual.safetensors": (dict(eva), "eva-clip-visual"),
        # a training checkpoint wrapped as EVA-CLIP's loader unwraps it ({"module": ...}, module. prefix)
        "wrapped.pth": ({"module": {f"module.visual.{k}": v for k, v in eva.items()}}, "eva-clip"),
        # Emu2 native (GitHub emu.py: visual.* beside decoder.lm.*), no CLIP head
        "emu2.bin": ({f"visual.{k}": v for k, v in tower(eva).items()} | lm, "emu2"),
        # Emu2 on the Hub (modeling_emu.py: model.visual.*, model.decoder.lm.*)
        "emu2-hf.safetensors": ({f"model.visual.{k}": v for k, v in tower(eva).items()}
                                | {"model.decoder.lm.model.norm.weight": torch.ones(8)}, "emu2"),
    }


def write(path, state):
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("name", list(layouts(eva_state_dict())))
def test_every_layout_loads_and_matches_eva_clips_forward(tmp_path, tok, eva, name):
    state, layout = layouts(eva)[name]
    file = write(tmp_path / name, state)
    model = EmuModel.build(EmuConfig(vision=VisionConfig(**VISION, pretrained=str(file)), image_tokens_side=2), tok)
    pixels = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model.visual.eval()(pixels)
    assert_close(ours, eva_reference_forward(tower(eva), pixels, heads=4))
    found = eva_clip_weights(open_checkpoint(file), {k: tuple(v.shape) for k, v in model.visual.state_dict().items()})
    assert found.layout == layout
    assert found.dropped == ([] if layout == "emu2" else ["head.bias", "head.weight", "norm.bias", "norm.weight"])
    others = {"eva-clip.pt": len(clip_text_state_dict()), "emu2.bin": 2, "emu2-hf.safetensors": 1}
    assert found.other == others.get(name, 0)  # the text tower or the LM: not read


def test_positions_are_interpolated_to_the_encoders_grid(tmp_path, eva):
    file = write(tmp_path / "eva.safetensors", eva)  # 16 px / patch 4: a 4x4 grid
    visual = EvaVisionTransformer(VisionConfig(**{**VISION, "image_size": 32}))  # an 8x8 grid
    found = load_vision_weights(visual, str(file))
    assert found.positions == (4, 8)
    assert_close(visual.pos_embed.data, interpolate_positions(eva["pos_embed"], 8))
    assert_close(visual.blocks[1].mlp.fc2.weight.data, eva["blocks.1.mlp.fc2.weight"])
    assert "interpolated from a 4x4 to a 8x8 patch grid" in found.describe()


# ---- bad input: one line naming the file and what is wrong ----------------------------------------

def refused(tmp_path, tok, state, name="bad.pt", vision=VISION) -> str:
    file = write(tmp_path / name, state)
    with pytest.raises(ConfigError) as exc:
        EmuModel.build(EmuConfig(vision=VisionConfig(**vision, pretrained=str(file)), image_tokens_side=2), tok)
    text = str(exc.value)
    assert "\n" not in text and text.startswith(f"model.vision.pretrained: {file}")
    return text


def test_missing_and_mis_shaped_keys_are_listed(tmp_path, tok, eva):
    text = refused(tmp_path, tok, {k: v for k, v in eva.items() if not k.startswith("blocks.1.")})
    assert "eva-clip-visual layout) does not match model.vision: missing 13: blocks.1.attn.proj.bias" in text
    text = refused(tmp_path, tok, eva, vision={**VISION, "mlp_dim": 48})
    assert "other shapes 6: blocks.0.mlp.fc1.bias [64] (encoder [48])" in text


def test_an_eva02_b_style_tower_is_refused_with_the_reason(tmp_path, tok, eva):
    # EVA-02-CLIP-B/L (eva_vit_model.py with subln, rope, naiveswiglu): split q/k/v, SwiGLU, rotary tables
    state = {f"visual.{k}": v for k, v in eva.items() if ".attn.qkv." not in k}
    state |= {"visual.blocks.0.attn.q_proj.weight": torch.zeros(32, 32), "visual.rope.freqs_cos": torch.zeros(16, 4)}
    text = refused(tmp_path, tok, state)
    assert "unexpected 2: blocks.0.attn.q_proj.weight, rope.freqs_cos" in text and "EVA-02-CLIP-B/L" in text
    assert "missing 2: blocks.0.attn.qkv.weight, blocks.1.attn.qkv.weight" in text


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path, tok):
    llama = {"model.embed_tokens.weight": torch.zeros(8, 4), "model.layers.0.self_attn.q_proj.weight": torch.zeros(4, 4)}
    text = refused(tmp_path, tok, llama, name="llama.safetensors")
    assert "holds no EVA-CLIP vision weights" in text and "model.embed_tokens.weight" in text


def test_truncated_and_unreadable_files(tmp_path, tok, eva):
    file = write(tmp_path / "eva.safetensors", eva)
    file.write_bytes(file.read_bytes()[:-100])
    with pytest.raises(ConfigError) as exc:
        EmuModel.build(EmuConfig(vision=VisionConfig(**VISION, pretrained=str(file)), image_tokens_side=2), tok)
    assert str(exc.value).startswith(f"model.vision.pretrained: {file}: truncated safetensors file")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match=rf"{junk}: not a readable torch checkpoint"):
        EmuModel.build(EmuConfig(vision=VisionConfig(**VISION, pretrained=str(junk)), image_tokens_side=2), tok)
    with pytest.raises(ConfigError, match="model.vision.pretrained: local file .*missing.pt does not exist"):
        EmuModel.build(EmuConfig(vision=VisionConfig(**VISION, pretrained=str(tmp_path / "missing.pt")),
                                 image_tokens_side=2), tok)
    with pytest.raises(ConfigError, match=r"model\.vision\.pretrained \('eva.zip'\) must be a checkpoint file"):
        VisionConfig(pretrained="eva.zip")
