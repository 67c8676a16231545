"""The LM from a Hugging Face causal-LM folder with its own tokenizer (`model.lm.pretrained`):
tiny LLaMA-2, Mistral, Llama-3 and Qwen2 checkpoints written by transformers' `save_pretrained`
(the official layout) beside their tokenizers, loaded through EmuModel.build, compared with the
Hugging Face model itself. CPU, seconds."""

import json

import pytest
import torch
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    CLIPVisionConfig,
    CLIPVisionModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from emu.data.tokenizer import SPECIAL_TOKENS, base_vocab_size, load_model_tokenizer, load_tokenizer, train_tokenizer
from emu.errors import ConfigError
from emu.model.config import EmuConfig, LMConfig
from emu.model.emu import EmuModel
from emu.model.io import load_model, save_model
from tests.pretrained import byte_level_folder, corpus, sentencepiece_folder

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=128)


def _llama2(folder):
    sentencepiece_folder(folder, corpus())
    return LlamaForCausalLM(LlamaConfig(vocab_size=700, num_key_value_heads=4, **SMALL))


def _mistral(folder):
    sentencepiece_folder(folder, corpus())
    return MistralForCausalLM(MistralConfig(vocab_size=700, num_key_value_heads=2, sliding_window=16, **SMALL))


def _llama3(folder):
    byte_level_folder(folder, corpus(), bos="<|begin_of_text|>", eos="<|end_of_text|>",
                      extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}
    return LlamaForCausalLM(LlamaConfig(vocab_size=400, num_key_value_heads=2, rope_scaling=rope, rope_theta=500000.0,
                                        **SMALL))


def _qwen2(folder):
    # Qwen2 ships no BOS, pads <|endoftext|>, ties its embeddings, and pads the embedding table past
    # the tokenizer (151,936 rows for ~151.6k tokens): 410 rows here for a 400-token tokenizer.
    byte_level_folder(folder, corpus(), bos=None, eos="<|endoftext|>", pad="<|endoftext|>",
                      extra=("<|im_start|>", "<|im_end|>"))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=410, num_key_value_heads=2, tie_word_embeddings=True, **SMALL))


FAMILIES = {"llama2": _llama2, "mistral": _mistral, "llama3": _llama3, "qwen2": _qwen2}


def checkpoint(tmp_path, family: str):
    """A folder as the Hub has them: config.json + model.safetensors + the tokenizer files."""
    folder = tmp_path / family
    torch.manual_seed(0)
    hf = FAMILIES[family](folder)
    with torch.no_grad():  # weights far from an init, so a misplaced row would show
        for p in hf.parameters():
            p.normal_(0, 0.3)
    hf.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lm_and_its_tokenizer_load_with_the_emu_tokens_added(tmp_path, family):
    folder = checkpoint(tmp_path, family)
    tok = load_tokenizer(folder, "model.lm.pretrained")
    base = base_vocab_size(tok)
    assert len(tok) == base + len(SPECIAL_TOKENS) and tok.pad_token == "[PAD]"
    assert tok.bos_token_id is not None and tok.eos_token_id is not None
    model = EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder), attn_implementation="eager")), tok).eval()
    reference = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                     attn_implementation="eager").eval()
    assert type(model.lm) is type(reference)
    assert model.lm.get_input_embeddings().num_embeddings == len(tok)
    ids = torch.tensor([[tok.bos_token_id, *tok("a red circle above a blue square", add_special_tokens=False).input_ids]])
    with torch.no_grad():
        ours = model.lm(ids).logits
        ref = reference(ids).logits
        # the EmuModel path (hidden states of the LM body, then the output embeddings) agrees too
        via_emu = model.lm.get_output_embeddings()(model.hidden_states(ids))
    assert_close(ours[..., :base], ref[..., :base])
    assert_close(via_emu, ours)
    # old rows unchanged; new rows (input and output embeddings) at the mean of the old ones
    emb_in = model.lm.get_input_embeddings().weight
    assert_close(emb_in[:base], reference.get_input_embeddings().weight[:base])
    for weight in (emb_in, model.lm.get_output_embeddings().weight):
        mean = weight[:base].mean(dim=0, keepdim=True).expand(len(tok) - base, -1)
        assert_close(weight[base:], mean, atol=1e-3, rtol=0)
    if family == "qwen2":  # no BOS of its own: sequences begin with its EOS; padding rows dropped
        assert tok.bos_token == tok.eos_token == "<|endoftext|>"
        assert reference.get_input_embeddings().num_embeddings == 410 > base
        assert model.lm.lm_head.weight.data_ptr() == emb_in.data_ptr(), "tied embeddings stay tied"


def test_saved_model_reloads_with_the_same_vocabulary(tmp_path):
    folder = checkpoint(tmp_path, "llama2")
    tok = load_tokenizer(folder, "model.lm.pretrained")
    model = EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), tok).eval()
    again, tok2 = load_model(save_model(model, tok, tmp_path / "emu"))
    assert len(tok2) == len(tok) and tok2.convert_tokens_to_ids("<image>") == tok.convert_tokens_to_ids("<image>")
    assert type(tok2).__name__ == "LlamaTokenizer"
    assert torch.equal(again.lm.get_input_embeddings().weight, model.lm.get_input_embeddings().weight)


def test_an_lm_folder_that_already_has_the_emu_tokens_keeps_their_rows(tmp_path):
    """E.g. the LM of a released Emu2 checkpoint, whose tokenizer ships the special tokens: its
    trained rows for them stay (no padding rows dropped, nothing re-initialised)."""
    folder = checkpoint(tmp_path, "llama2")
    tok = load_tokenizer(folder, "model.lm.pretrained")
    first = EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), tok)
    with torch.no_grad():
        first.lm.get_input_embeddings().weight[700:].normal_()  # "trained" rows for the Emu2 tokens
    first.lm.save_pretrained(tmp_path / "emu-lm")
    tok.save_pretrained(tmp_path / "emu-lm")
    again_tok = load_tokenizer(tmp_path / "emu-lm", "model.lm.pretrained")
    assert base_vocab_size(again_tok) == len(again_tok) == len(tok)
    again = EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(tmp_path / "emu-lm"))), again_tok)
    assert torch.equal(again.lm.get_input_embeddings().weight, first.lm.get_input_embeddings().weight)


def test_an_lm_whose_vocabulary_would_shrink_is_refused(tmp_path):
    folder = checkpoint(tmp_path, "llama2")
    small = train_tokenizer(corpus(50), 300)  # 300 + 274 tokens < the LM's 700 rows
    with pytest.raises(ConfigError, match=r"model\.lm\.pretrained .*700 token embeddings but the tokenizer 574 "
                                          r"tokens.*shrink"):
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), small)


def test_a_tokenizer_larger_than_the_lm_is_not_its_own(tmp_path):
    folder = checkpoint(tmp_path, "llama3")  # 400 rows
    config = json.loads((folder / "config.json").read_text())
    config["vocab_size"] = 300
    (folder / "config.json").write_text(json.dumps(config))
    LlamaForCausalLM(LlamaConfig(**{k: v for k, v in config.items() if k in LlamaConfig().to_dict()})
                     ).save_pretrained(folder)
    with pytest.raises(ConfigError, match="tokenizer has 400 tokens but the LM only 300"):
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), load_tokenizer(folder, "model.lm.pretrained"))


# ---- bad input: one line naming the file and the problem ------------------------------------------

def one_line(exc) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=32, patch_size=8)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ConfigError) as exc:
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(tmp_path / "clip"))), train_tokenizer(corpus(20), 300))
    assert f"{tmp_path / 'clip' / 'config.json'} describes a 'clip_vision_model' model (CLIPVisionModel), not a " \
           "causal LM" in one_line(exc)


def test_a_truncated_safetensors_file_is_refused_naming_it(tmp_path):
    folder = checkpoint(tmp_path, "llama2")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError) as exc:
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), load_tokenizer(folder, "model.lm.pretrained"))
    assert f"model.lm.pretrained: {weights}: truncated safetensors file" in one_line(exc)


def test_weights_that_do_not_match_the_config_are_refused(tmp_path):
    folder = checkpoint(tmp_path, "llama2")
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = 3  # the weights have 2
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(folder))), load_tokenizer(folder, "model.lm.pretrained"))
    assert f"the weights in {folder} do not match its config.json: missing model.layers.2." in one_line(exc)


def test_not_a_model_folder_and_no_tokenizer(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model\.lm\.pretrained: .*empty is not a Hugging Face model folder"):
        EmuModel.build(EmuConfig(lm=LMConfig(pretrained=str(tmp_path / "empty"))), train_tokenizer(corpus(20), 300))
    with pytest.raises(ConfigError) as exc:
        load_tokenizer(tmp_path / "empty", "model.lm.pretrained")
    assert f"model.lm.pretrained: {tmp_path / 'empty'} holds no tokenizer" in one_line(exc)


def test_a_tokenizer_without_eos_is_refused(tmp_path):
    folder = byte_level_folder(tmp_path / "tok", corpus(20), bos=None, eos="<|endoftext|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["eos_token"] = None
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:
        load_tokenizer(folder, "model.lm.pretrained")
    assert f"model.lm.pretrained ({folder}): the tokenizer has no EOS token" in one_line(exc)


def test_a_model_folder_whose_tokenizer_has_no_pad_token_is_refused(tmp_path):
    tok = train_tokenizer(corpus(20), 300)
    folder = save_model(EmuModel.build(EmuConfig(), tok), tok, tmp_path / "emu")
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["pad_token"] = None
    config_file.write_text(json.dumps(config))
    with pytest.raises(ConfigError) as exc:
        load_model(folder)
    assert f"{config_file}: the tokenizer has no pad token" in one_line(exc)
    with pytest.raises(ConfigError, match="no pad token"):
        load_model_tokenizer(folder / "tokenizer")
