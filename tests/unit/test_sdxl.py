"""The visual decoder initialised from SDXL (emu.model.sdxl; Emu2 §2.2.3): a toy SDXL-layout
diffusers folder (tests/pretrained.py) converted with a narrower cross-attention. CPU, seconds."""

import json

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file
from torch.testing import assert_close

from emu.errors import ConfigError
from emu.model.decoder import VisualDecoder
from emu.model.sdxl import REPORT_NAME, convert_sdxl
from tests.pretrained import sdxl_folder


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    src = sdxl_folder(tmp_path_factory.mktemp("sdxl") / "sdxl-base")
    out = tmp_path_factory.mktemp("decoder") / "decoder"
    return src, out, convert_sdxl(src, out, visual_dim=32)


def test_every_compatible_weight_is_kept_and_the_changes_reported(converted):
    src, out, report = converted
    sdxl = load_file(str(src / "unet" / "diffusion_pytorch_model.safetensors"))
    ours = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert set(ours) == set(sdxl)
    # 8 transformer blocks read the condition: 2 in the down level, 2 in the mid block, 4 in the up level
    blocks = {k.rsplit(".attn2.", 1)[0] for k in sdxl if ".attn2.to_k." in k}
    assert sorted(report.reinitialised) == sorted(f"{b}.attn2.{p}.weight" for b in blocks for p in ("to_k", "to_v"))
    for key in report.reinitialised:
        assert sdxl[key].shape[1] == 48 and ours[key].shape[1] == 32
    linear = "add_embedding.linear_1.weight"
    assert sdxl[linear].shape[1] == 24 + 48 and ours[linear].shape[1] == 32 + 48
    assert torch.equal(ours[linear][:, 32:], sdxl[linear][:, 24:]), "the 6 time-id embeddings are kept"
    kept = [k for k in sdxl if k not in report.reinitialised and k != linear]
    assert kept and all(torch.equal(ours[k], sdxl[k]) for k in kept)
    vae_sdxl = load_file(str(src / "vae" / "diffusion_pytorch_model.safetensors"))
    vae_ours = load_file(str(out / "vae" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(vae_ours[k], vae_sdxl[k]) for k in vae_sdxl) and set(vae_ours) == set(vae_sdxl)
    assert report.kept == len(kept) + len(vae_sdxl)
    assert list(report.partly_kept) == [linear]
    assert "re-initialised 16 tensors: 8 x attn2.to_k.weight, 8 x attn2.to_v.weight" in report.describe()
    assert json.loads((out / REPORT_NAME).read_text())["reinitialised"] == report.reinitialised


def test_the_converted_folder_is_a_decoder_that_matches_sdxls_vae(converted):
    src, out, _ = converted
    decoder = VisualDecoder.from_pretrained(out)
    assert decoder.config.visual_dim == 32 and decoder.unet.config.cross_attention_dim == 32
    assert decoder.config.unet_transformer_layers_per_block == (1, 2) and decoder.config.vae_scaling_factor == 0.13025
    assert (decoder.config.beta_schedule, decoder.config.steps_offset) == ("scaled_linear", 1)
    reference = AutoencoderKL.from_pretrained(src / "vae")
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert_close(decoder.encode_latents(pixels, sample=False),
                     reference.encode(pixels).latent_dist.mode() * 0.13025)
        # the UNet is diffusers' own: with the condition's projections set to SDXL's truncated to 32
        # columns, and the same time-id input, it computes what SDXL's UNet computes on zero-padded inputs
        sdxl_unet = UNet2DConditionModel.from_pretrained(src / "unet")
        cond = torch.randn(2, 5, 32)
        for name, module in decoder.unet.named_modules():
            if name.endswith(("attn2.to_k", "attn2.to_v")):
                module.weight.copy_(dict(sdxl_unet.named_modules())[name].weight[:, :32])
        linear = decoder.unet.add_embedding.linear_1
        linear.weight[:, :24].copy_(sdxl_unet.add_embedding.linear_1.weight[:, :24])
        linear.weight[:, 24:32].zero_()
        latents, t, ids = torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.tensor([[32., 32, 0, 0, 32, 32]] * 2)
        pooled = cond.mean(1)
        ours = decoder.unet(latents, t, encoder_hidden_states=cond,
                            added_cond_kwargs={"text_embeds": torch.cat([pooled[:, :24], torch.zeros(2, 8)], 1),
                                               "time_ids": ids}).sample
        ref = sdxl_unet(latents, t, encoder_hidden_states=torch.cat([cond, torch.zeros(2, 5, 16)], -1),
                        added_cond_kwargs={"text_embeds": pooled[:, :24], "time_ids": ids}).sample
    assert_close(ours, ref, rtol=1e-4, atol=1e-5)


def test_what_the_decoder_cannot_start_from_is_refused(tmp_path):
    sd15 = sdxl_folder(tmp_path / "sd15", addition_embed_type=None, projection_class_embeddings_input_dim=None,
                       addition_time_embed_dim=None)
    with pytest.raises(ConfigError, match=r"addition_embed_type is None, not SDXL's 'text_time'"):
        convert_sdxl(sd15, tmp_path / "out", visual_dim=32)
    other = sdxl_folder(tmp_path / "other", upcast_attention=True, resnet_time_scale_shift="scale_shift")
    with pytest.raises(ConfigError, match=r"not an SDXL-layout UNet/VAE the decoder can start from: ") as exc:
        convert_sdxl(other, tmp_path / "out", visual_dim=32)
    assert "upcast_attention=True (the decoder builds False)" in str(exc.value)
    assert "resnet_time_scale_shift='scale_shift' (the decoder builds 'default')" in str(exc.value)
    with pytest.raises(ConfigError, match="is not an SDXL-layout diffusers folder"):
        convert_sdxl(tmp_path / "sd15" / "unet", tmp_path / "out", visual_dim=32)
    good = sdxl_folder(tmp_path / "truncated")
    weights = good / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])
    with pytest.raises(ConfigError) as exc:
        convert_sdxl(good, tmp_path / "out", visual_dim=32)
    assert str(exc.value).startswith(f"{weights}: truncated safetensors file")
    assert not (tmp_path / "out").exists()
