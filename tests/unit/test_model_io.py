"""Saving/loading Emu models, and starting from the official Emu2 checkpoint key layout."""

import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from emu.data.tokenizer import ASSISTANT, USER, image_placeholder, train_tokenizer
from emu.errors import ConfigError
from emu.model.config import CFormerConfig, EmuConfig, VisionConfig
from emu.model.emu import EmuModel
from emu.model.io import load_model, save_model
from emu.model.official import config_from_official, convert_state_dict
from emu.model.vision import EvaVisionTransformer, pool_patches


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a red circle at the top left and a blue square in the center"] * 20, 400)


def sequence(tok, n=4):
    return torch.tensor([tok("a red " + image_placeholder(n) + " circle", add_special_tokens=False).input_ids])


@pytest.mark.parametrize("connector", ["pool", "cformer"])
def test_save_load_round_trip(tmp_path, tok, connector):
    torch.manual_seed(0)
    config = EmuConfig(connector=connector, cformer=CFormerConfig(queries=4))
    model = EmuModel.build(config, tok).eval()
    folder = save_model(model, tok, tmp_path / "m")
    assert {p.name for p in folder.iterdir()} == {"emu.json", "model.safetensors", "lm", "tokenizer"}
    loaded, tok2 = load_model(folder)
    assert loaded.config == model.config and loaded.token_ids == model.token_ids
    assert len(tok2) == len(tok) and tok2.convert_tokens_to_ids(USER) == tok.convert_tokens_to_ids(USER)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    ids, pixels = sequence(tok), torch.randn(1, 3, 32, 32)
    assert_close(loaded.hidden_states(ids, loaded.encode_images(pixels)), model.hidden_states(ids, model.encode_images(pixels)))


def test_load_errors_name_the_folder(tmp_path, tok):
    with pytest.raises(ConfigError, match="does not exist"):
        load_model(tmp_path / "nope")
    torch.manual_seed(0)
    folder = save_model(EmuModel.build(EmuConfig(), tok), tok, tmp_path / "m")
    (folder / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=r"not an Emu model folder: model.safetensors is missing"):
        load_model(folder)
    folder = save_model(EmuModel.build(EmuConfig(), tok), tok, tmp_path / "m2")
    meta = json.loads((folder / "emu.json").read_text())
    meta["config"]["vision"]["width"] = 48  # weights no longer fit the config
    (folder / "emu.json").write_text(json.dumps(meta))
    with pytest.raises((ConfigError, RuntimeError), match="size mismatch|does not match"):
        load_model(folder)


class OfficialEmu2(nn.Module):
    """The module tree of the Hugging Face Emu2 release (modeling_emu.py), tiny: EmuForCausalLM
    with .model.visual (EVA), .model.decoder.lm (LlamaForCausalLM), .project_up, .project_down."""

    def __init__(self, vision: VisionConfig, vocab: int, hidden: int = 64):
        super().__init__()
        self.model = nn.Module()
        self.model.visual = EvaVisionTransformer(vision)
        self.model.decoder = nn.Module()
        self.model.decoder.lm = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, tie_word_embeddings=False, rms_norm_eps=1e-6))
        self.project_up = nn.Linear(vision.width, hidden, bias=False)
        self.project_down = nn.Linear(hidden, vision.width, bias=False)

    def hidden(self, ids, pixels, image_id, side):
        """The official forward (emu.py): encode, drop CLS, avg-pool, project_up into <image> rows."""
        embeds = self.model.decoder.lm.model.embed_tokens(ids).clone()
        visual = pool_patches(self.model.visual(pixels), side)
        embeds[ids == image_id] = self.project_up(visual.reshape(-1, visual.shape[-1]))
        return self.model.decoder.lm.model(inputs_embeds=embeds).last_hidden_state


def official_checkpoint(tok, vision, layout: str):
    torch.manual_seed(1)
    base_vocab = len(tok) - 2  # the base release lacks [USER] and [ASSISTANT]
    assert tok.convert_tokens_to_ids(USER) == base_vocab and tok.convert_tokens_to_ids(ASSISTANT) == base_vocab + 1
    official = OfficialEmu2(vision, base_vocab).eval()
    sd = dict(official.state_dict())
    for i in range(2):  # the vendored transformers 4.31 Llama saved its rotary buffers
        sd[f"model.decoder.lm.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    if layout == "native":
        sd = {k.replace("model.visual.", "visual.").replace("model.decoder.lm.", "decoder.lm.")
               .replace("project_up.", "vl_adapter.projection.").replace("project_down.", "decoder.lm.stu_regress_head."): v
              for k, v in sd.items()}
        sd = {"module": sd}
    return official, sd


@pytest.mark.parametrize("layout", ["huggingface", "native"])
def test_official_layout_loads_and_computes_the_same(tok, layout):
    vision = VisionConfig()
    official, checkpoint = official_checkpoint(tok, vision, layout)
    model = EmuModel.build(EmuConfig(vision=vision), tok).eval()
    converted = convert_state_dict(checkpoint, vocab_size=len(tok))
    model.load_state_dict(converted, strict=True)
    ids, pixels = sequence(tok), torch.randn(1, 3, 32, 32)
    expected = official.hidden(ids, pixels, model.token_ids.image, model.config.image_tokens_side)
    assert_close(model.hidden_states(ids, model.encode_images(pixels)), expected)
    emb = model.lm.get_input_embeddings().weight
    assert_close(emb[-2:], official.model.decoder.lm.model.embed_tokens.weight.mean(0).expand(2, -1))


def test_unknown_official_keys_are_refused(tok):
    with pytest.raises(KeyError, match="not in the official Emu2 layout: \\['vision_tower.x'\\]"):
        convert_state_dict({"vision_tower.x": torch.zeros(1)})


def test_config_from_the_released_config_json():
    """Numbers from BAAI/Emu2 config.json (vision_config of EVA-02-CLIP-E-plus, LLaMA-33B)."""
    released = {"vocab_size": 32272, "hidden_size": 6656, "intermediate_size": 17920, "num_attention_heads": 52,
                "num_key_value_heads": 52, "num_hidden_layers": 60, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
                "max_position_embeddings": 2048, "d_model": 1792,
                "vision_config": {"image_size": 448, "patch_size": 14, "width": 1792, "layers": 64, "head_width": 112,
                                  "mlp_ratio": 8.571428571428571, "intermediate_size": 15360, "postnorm": True,
                                  "qkv_bias": True, "layer_norm_eps": 1e-06, "n_query": 64, "v_query": 64}}
    config = config_from_official(released)
    assert (config.vision.heads, config.vision.grid, config.vision.mlp_dim) == (16, 32, 15360)
    assert config.tokens_per_image() == 64 and config.visual_dim == 1792
    chat = config_from_official({**released, "vision_config": {**released["vision_config"], "n_query": 256}})
    assert chat.tokens_per_image() == 256 and chat.video_tokens_side == 8


def test_lm_from_a_pretrained_hugging_face_folder(tmp_path, tok):
    """`model.lm.pretrained` starts the LM from any local HF causal-LM folder (weights kept)."""
    from emu.model.config import LMConfig

    torch.manual_seed(3)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2))
    base.save_pretrained(tmp_path / "llama")
    model = EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(tmp_path / "llama"))), tok)
    assert torch.equal(model.lm.lm_head.weight, base.lm_head.weight)
    assert model.project_up.out_features == 32
    with pytest.raises(ConfigError, match="does not exist"):
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(tmp_path / "missing"))), tok)
