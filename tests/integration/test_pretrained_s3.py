"""Pretrained parts named by s3:// URIs (a real S3 server, SeaweedFS): an EVA-CLIP checkpoint
file (`model.vision.pretrained`) and a Hugging Face LM folder with its tokenizer
(`model.lm.pretrained`) load as from local paths."""

import pytest
import torch
from safetensors.torch import save_file
from torch.testing import assert_close
from transformers import LlamaConfig, LlamaForCausalLM

from emu.artifacts.s3 import S3Settings, client, resolve_local_file, upload_folder
from emu.data.tokenizer import load_tokenizer
from emu.errors import ConfigError, SourceError
from emu.model.config import EmuConfig, LMConfig, VisionConfig
from emu.model.emu import EmuModel
from emu.model.io import local_folder
from tests.pretrained import corpus, eva_state_dict, sentencepiece_folder


@pytest.fixture
def env(s3_server, tmp_path, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("EMU_CACHE_DIR", str(tmp_path / "cache"))
    return S3Settings(endpoint_url=s3_server.endpoint_url, region=s3_server.region,
                      access_key_id=s3_server.access_key, secret_access_key=s3_server.secret_key)


def test_eva_clip_file_and_hf_lm_folder_from_s3(s3_server, env, tmp_path):
    source = tmp_path / "upload"
    (source / "eva").mkdir(parents=True)
    save_file(eva_state_dict(), str(source / "eva" / "EVA-CLIP.safetensors"))
    (source / "eva" / "unrelated.bin").write_bytes(b"x" * 10)  # beside it; a file URI fetches only its object
    llama = source / "llama"
    sentencepiece_folder(llama, corpus())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=700, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(llama)
    base = f"s3://{s3_server.bucket}/pretrained"
    upload_folder(source, base, env)

    vision = dict(image_size=16, patch_size=4, width=32, layers=2, heads=4, mlp_dim=64)
    remote = EmuConfig(vision=VisionConfig(**vision, pretrained=f"{base}/eva/EVA-CLIP.safetensors"),
                       lm=LMConfig(pretrained=f"{base}/llama"), image_tokens_side=2)
    local = EmuConfig(vision=VisionConfig(**vision, pretrained=str(source / "eva" / "EVA-CLIP.safetensors")),
                      lm=LMConfig(pretrained=str(llama)), image_tokens_side=2)
    tok = load_tokenizer(local_folder(remote.lm.pretrained), "model.lm.pretrained")
    a, b = EmuModel.build(remote, tok).eval(), EmuModel.build(local, load_tokenizer(llama)).eval()
    pixels = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert_close(a.visual(pixels), b.visual(pixels))
    assert torch.equal(a.lm.get_input_embeddings().weight[:700], b.lm.get_input_embeddings().weight[:700])
    cached = resolve_local_file(remote.vision.pretrained)
    assert cached.read_bytes() == (source / "eva" / "EVA-CLIP.safetensors").read_bytes()
    assert not (cached.parent / "unrelated.bin").exists()
    stamp = cached.stat().st_mtime_ns
    assert resolve_local_file(remote.vision.pretrained) == cached and cached.stat().st_mtime_ns == stamp

    # the object changes: fetched again
    client(env).put_object(Bucket=s3_server.bucket, Key="pretrained/eva/EVA-CLIP.safetensors", Body=b"new")
    assert resolve_local_file(remote.vision.pretrained).read_bytes() == b"new"


def test_missing_objects_are_one_line_errors(s3_server, env):
    with pytest.raises(SourceError, match=r"cannot download s3://.*/nothing/here.pt from .*: no such object"):
        resolve_local_file(f"s3://{s3_server.bucket}/nothing/here.pt")
    with pytest.raises(ConfigError, match="names a bucket, not an object"):
        resolve_local_file(f"s3://{s3_server.bucket}")
