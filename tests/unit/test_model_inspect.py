"""`emu model inspect` / emu.model.inspection: what a checkpoint holds and what it can start, for
each format this platform reads; bad input is one line naming the file. CPU, seconds."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from emu.data.tokenizer import train_tokenizer
from emu.errors import ConfigError
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel
from emu.model.inspection import inspect_path
from emu.model.io import save_model
from emu.model.sdxl import convert_sdxl
from tests.pretrained import clip_text_state_dict, corpus, eva_state_dict, sdxl_folder, sentencepiece_folder

EMU = Path(sys.executable).parent / "emu"


def test_hugging_face_llm_folder_with_its_tokenizer(tmp_path):
    folder = sentencepiece_folder(tmp_path / "llama2", corpus())
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2))
    lm.to(torch.bfloat16).save_pretrained(folder)
    report = inspect_path(folder)
    assert report.format == "hf-causal-lm" and report.parameters == sum(p.numel() for p in lm.parameters())
    assert report.dtypes == {"bfloat16": report.parameters} and report.files == 1
    assert report.details["architecture"] == "LlamaForCausalLM" and report.details["vocab_size"] == 700
    assert report.tokenizer["class"] == "LlamaTokenizer" and report.tokenizer["legacy"] is True
    assert report.tokenizer["tokens"] == 700 and report.tokenizer["pad"] is None
    assert report.tokenizer["Emu2 tokens to add"] == 274
    assert report.initialises == ["model.lm.pretrained (with its tokenizer)"]
    text = report.describe()
    assert f"{folder}: hf-causal-lm" in text and "initialises: model.lm.pretrained" in text


def test_eva_clip_files_in_each_layout(tmp_path):
    eva = eva_state_dict(width=32, layers=3, mlp_dim=64, patch=4, grid=4)
    full = tmp_path / "EVA-CLIP.pt"
    torch.save({f"visual.{k}": v for k, v in eva.items()} | clip_text_state_dict(), full)
    report = inspect_path(full)
    assert report.format == "eva-clip"
    assert report.details["vision tower"] == {"image_size": 16, "patch_size": 4, "width": 32, "layers": 3,
                                              "mlp_dim": 64, "qkv_bias": True}
    assert report.details["CLIP head"] is True and report.details["other keys"] == len(clip_text_state_dict())
    assert report.initialises[0].startswith("model.vision.pretrained")
    assert report.dtypes == {"float32": report.parameters}
    visual = tmp_path / "visual.safetensors"
    save_file({k: v.half() for k, v in eva.items()}, str(visual))
    assert inspect_path(visual).format == "eva-clip-visual" and list(inspect_path(visual).dtypes) == ["float16"]
    rope = tmp_path / "eva02-b.safetensors"
    save_file(eva | {"rope.freqs_cos": torch.zeros(4, 4)}, str(rope))
    assert inspect_path(rope).initialises == [] and "rotary" in inspect_path(rope).notes[0]


def test_emu_model_decoder_and_sdxl_folders(tmp_path):
    tok = train_tokenizer(corpus(20), 300)
    model = EmuModel.build(EmuConfig(), tok)
    report = inspect_path(save_model(model, tok, tmp_path / "emu"))
    assert report.format == "emu-model" and report.parameters == sum(p.numel() for p in model.state_dict().values())
    assert report.tokenizer["tokens"] == len(tok) and report.tokenizer["pad"] == "[PAD]"
    assert "stage1/stage2/instruct init" in report.initialises
    sdxl = sdxl_folder(tmp_path / "sdxl")
    report = inspect_path(sdxl)
    assert report.format == "diffusers-sdxl" and report.details["UNet"]["cross_attention_dim"] == 48
    assert report.initialises[0].startswith(f"the visual decoder: emu model convert-sdxl {sdxl}")
    convert_sdxl(sdxl, tmp_path / "decoder", visual_dim=32)
    report = inspect_path(tmp_path / "decoder")
    assert report.format == "emu-visual-decoder" and report.details["visual_dim"] == 32
    assert report.details["converted from"] == str(sdxl) and report.initialises[0] == "decoder.init"


def test_what_it_cannot_start_and_bad_files(tmp_path):
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(tmp_path / "bert")
    report = inspect_path(tmp_path / "bert")
    assert report.format == "hf-model" and report.initialises == [] and "not a causal LM" in report.notes[0]
    llama = tmp_path / "llama.safetensors"
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(llama))
    assert inspect_path(llama).format == "state-dict" and inspect_path(llama).initialises == []
    llama.write_bytes(llama.read_bytes()[:-8])
    with pytest.raises(ConfigError, match=rf"^{llama}: truncated safetensors file"):
        inspect_path(llama)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a checkpoint folder this platform reads"):
        inspect_path(tmp_path / "empty")


def test_the_cli_prints_the_report_and_one_line_errors(tmp_path):
    eva = tmp_path / "eva.safetensors"
    save_file(eva_state_dict(), str(eva))
    done = subprocess.run([str(EMU), "model", "inspect", str(eva), "--json"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["format"] == "eva-clip-visual"
    eva.write_bytes(eva.read_bytes()[:100])
    done = subprocess.run([str(EMU), "model", "inspect", str(eva)], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {eva}: truncated safetensors file")
    sdxl = sdxl_folder(tmp_path / "sdxl")
    done = subprocess.run([str(EMU), "model", "convert-sdxl", str(sdxl), "--out", str(tmp_path / "dec"),
                           "--visual-dim", "32"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "re-initialised 16 tensors" in done.stdout and (tmp_path / "dec" / "decoder_config.json").is_file()
