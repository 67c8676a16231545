"""The visual decoder (Emu2 §2.2.3): conditioning, condition dropout, training step, CFG sampling,
save/load. Tiny UNet/VAE on CPU (16 px images, 8x8 latents)."""

import json
import shutil

import pytest
import torch
from diffusers import EulerDiscreteScheduler
from torch.testing import assert_close

from emu.errors import ConfigError
from emu.model.config import DecoderConfig
from emu.model.decoder import VisualDecoder, unet_kwargs

CFG = dict(sample_size=8, num_inference_steps=3)  # 8x8 latents -> 16x16 images (VAE factor 2)
B, N, D = 2, 4, 32
SIZE = 16


def build(seed: int = 0, **overrides) -> VisualDecoder:
    torch.manual_seed(seed)
    return VisualDecoder.from_config(DecoderConfig(**{**CFG, **overrides}))


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def decoder() -> VisualDecoder:
    return build().eval()


@pytest.fixture
def batch():
    torch.manual_seed(123)
    pixels = torch.rand(B, 3, SIZE, SIZE) * 2 - 1
    condition = torch.randn(B, N, D)
    time_ids = torch.tensor([[512, 384, 7, 3, SIZE, SIZE], [SIZE, SIZE, 0, 0, SIZE, SIZE]], dtype=torch.float32)
    return pixels, condition, time_ids


class UNetCalls:
    """Records what the UNet is called with (a forward pre-hook, so nothing about the call changes)."""

    def __init__(self, unet):
        self.calls = []
        self.handle = unet.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append({"sample": args[0].clone(), "t": args[1],
                           "ehs": kwargs["encoder_hidden_states"].clone(),
                           **{k: v.clone() for k, v in kwargs["added_cond_kwargs"].items()}})

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


# ---- config -------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, field", [
    (dict(visual_dim=0), "visual_dim"),
    (dict(unet_attention_head_dim=(2,)), "unet_attention_head_dim"),
    (dict(unet_attention_head_dim=(3, 4)), "unet_attention_head_dim"),
    (dict(unet_down_block_types=("DownBlock2D", "AttnDownBlock2D")), "unet_down_block_types"),
    (dict(unet_block_out_channels=(32, 48)), "unet_block_out_channels"),
    (dict(vae_block_out_channels=(16, 32)), "vae_block_out_channels"),
    (dict(sample_size=7), "sample_size"),
    (dict(beta_start=0.02), "beta_start"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(num_inference_steps=2000), "num_inference_steps"),
])
def test_config_errors_name_the_setting(overrides, field):
    with pytest.raises(ConfigError, match=f"model.decoder.{field}"):
        DecoderConfig(**overrides)


def test_unet_layout_follows_emu2():
    """SDXL text_time conditioning sized to the visual embeddings; 3328 = 1792 + 6 * 256 for Emu2."""
    emu2 = DecoderConfig(visual_dim=1792, addition_time_embed_dim=256, unet_block_out_channels=(320, 640, 1280),
                         unet_down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                         unet_up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                         unet_attention_head_dim=(5, 10, 20), unet_transformer_layers_per_block=(1, 2, 10),
                         unet_layers_per_block=2, vae_block_out_channels=(128, 256, 512, 512), sample_size=128)
    kw = unet_kwargs(emu2)
    assert kw["cross_attention_dim"] == 1792
    assert kw["addition_embed_type"] == "text_time"
    assert kw["projection_class_embeddings_input_dim"] == 3328
    assert emu2.image_size == 1024


# ---- conditioning and dropout -------------------------------------------------------------------

def test_encode_latents_scales_the_vae_posterior(decoder, batch):
    pixels = batch[0]
    mean = decoder.encode_latents(pixels, sample=False)
    assert mean.shape == (B, 4, SIZE // 2, SIZE // 2) and not mean.requires_grad
    assert_close(mean, decoder.vae.encode(pixels).latent_dist.mode() * 0.13025)
    assert_close(decoder.encode_latents(pixels, generator=gen(1)), decoder.encode_latents(pixels, generator=gen(1)))
    assert not torch.equal(decoder.encode_latents(pixels, generator=gen(1)), mean)


def test_training_conditioning_is_condition_mean_and_time_ids(decoder, batch):
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels)
    with UNetCalls(decoder.unet) as rec:
        out = decoder.training_loss(latents, condition, time_ids, condition_drop=0.0, generator=gen(0))
    (call,) = rec.calls
    assert out.num_dropped == 0 and not out.dropped_B.any()
    assert torch.equal(call["ehs"], condition)
    assert_close(call["text_embeds"], condition.mean(dim=1))
    assert torch.equal(call["time_ids"], time_ids)
    assert call["t"].shape == (B,) and call["t"].dtype == torch.long


def test_condition_drop_one_feeds_exactly_the_unconditional_embedding(decoder, batch):
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels)
    with UNetCalls(decoder.unet) as rec:
        out = decoder.training_loss(latents, condition, time_ids, condition_drop=1.0, generator=gen(0))
    (call,) = rec.calls
    assert out.dropped_B.all() and out.num_dropped == B
    assert torch.equal(call["ehs"], decoder.unconditional(B, N))
    assert torch.equal(call["ehs"], torch.zeros(B, N, D))
    assert torch.equal(call["text_embeds"], torch.zeros(B, D))
    assert torch.equal(call["time_ids"], time_ids)  # size/crop conditioning is kept when dropping


def test_condition_drop_is_per_sample_and_reported():
    decoder = build()
    many = 64
    condition = torch.randn(many, N, D) + 1.0
    latents = torch.randn(many, 4, 4, 4)
    with UNetCalls(decoder.unet) as rec:
        out = decoder.training_loss(latents, condition, [SIZE, SIZE, 0, 0, SIZE, SIZE], condition_drop=0.5,
                                    generator=gen(3))
    ehs = rec.calls[0]["ehs"]
    dropped = out.dropped_B
    assert 0 < out.num_dropped < many
    assert torch.equal(ehs[dropped], torch.zeros_like(ehs[dropped]))
    assert torch.equal(ehs[~dropped], condition[~dropped])


def test_unconditional_prediction_does_not_depend_on_token_count(decoder):
    """Zeros have no key/value bias to attend to: the null condition is the same for any n."""
    z = torch.randn(B, 4, 8, 8)
    t = torch.tensor([10, 900])
    ids = torch.tensor([SIZE, SIZE, 0, 0, SIZE, SIZE], dtype=torch.float32).expand(B, 6)
    with torch.no_grad():
        preds = [decoder.unet(z, t, encoder_hidden_states=decoder.unconditional(B, n),
                              added_cond_kwargs=decoder.added_conditions(decoder.unconditional(B, n), ids)).sample
                 for n in (1, 7)]
    assert_close(preds[0], preds[1])


# ---- training -----------------------------------------------------------------------------------

def test_training_steps_lower_the_loss_and_leave_the_vae_untouched(batch):
    decoder = build(seed=1).train()
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels, generator=gen(0))
    vae_before = {k: v.clone() for k, v in decoder.vae.state_dict().items()}
    unet_before = {k: v.clone() for k, v in decoder.unet.state_dict().items()}
    # All parameters go to the optimizer: AdamW skips those without a gradient, so the VAE can only
    # stay unchanged if it truly receives none.
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01)

    def loss() -> torch.Tensor:  # the same noise, offset, timesteps and drops every time
        return decoder.training_loss(latents, condition, time_ids, condition_drop=0.1, noise_offset=0.1,
                                     generator=gen(7)).loss

    with torch.no_grad():
        first = loss().item()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    with torch.no_grad():
        last = loss().item()

    assert last < first * 0.9, (first, last)
    assert all(p.grad is None and not p.requires_grad for p in decoder.vae.parameters())
    assert not decoder.vae.training and decoder.unet.training
    assert all(torch.equal(v, vae_before[k]) for k, v in decoder.vae.state_dict().items())
    assert any(not torch.equal(v, unet_before[k]) for k, v in decoder.unet.state_dict().items())


def test_training_loss_is_reproducible_with_a_generator(decoder, batch):
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels, sample=False)
    with torch.no_grad():
        a = decoder.training_loss(latents, condition, time_ids, generator=gen(5)).loss
        b = decoder.training_loss(latents, condition, time_ids, generator=gen(5)).loss
        c = decoder.training_loss(latents, condition, time_ids, generator=gen(6)).loss
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_inputs_are_refused(decoder, batch):
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels)
    with pytest.raises(ValueError, match="visual embeddings"):
        decoder.training_loss(latents, condition[..., :5], time_ids)
    with pytest.raises(ValueError, match="time_ids"):
        decoder.training_loss(latents, condition, time_ids[:, :4])
    with pytest.raises(ValueError, match="multiple of the VAE factor"):
        decoder.sample(condition, output_size=15)


# ---- sampling -----------------------------------------------------------------------------------

def manual_sample(decoder, condition, scale, steps, seed):
    """The official Emu2-Gen loop written out, with the two CFG halves as separate UNet calls."""
    scheduler = EulerDiscreteScheduler.from_config(decoder.scheduler.config)
    scheduler.set_timesteps(steps)
    latents = torch.randn(B, 4, SIZE // 2, SIZE // 2, generator=gen(seed)) * scheduler.init_noise_sigma
    ids = torch.tensor([SIZE, SIZE, 0, 0, SIZE, SIZE], dtype=torch.float32).expand(B, 6)
    uncond = torch.zeros_like(condition)

    def eps(x, t, c):
        return decoder.unet(x, t, encoder_hidden_states=c,
                            added_cond_kwargs={"text_embeds": c.mean(1), "time_ids": ids}).sample

    with torch.no_grad():
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(latents, t)
            e_cond = eps(x, t, condition)
            e = e_cond if scale == 1.0 else eps(x, t, uncond) + scale * (e_cond - eps(x, t, uncond))
            latents = scheduler.step(e, t, latents).prev_sample
        return (decoder.vae.decode(latents / 0.13025).sample / 2 + 0.5).clamp(0, 1)


def test_sample_shape_range_and_determinism(decoder, batch):
    condition = batch[1]
    a = decoder.sample(condition, num_inference_steps=3, guidance_scale=3.0, generator=gen(0))
    b = decoder.sample(condition, num_inference_steps=3, guidance_scale=3.0, generator=gen(0))
    c = decoder.sample(condition, num_inference_steps=3, guidance_scale=3.0, generator=gen(1))
    assert a.shape == (B, 3, SIZE, SIZE) and a.dtype == torch.float32
    assert a.min() >= 0 and a.max() <= 1
    assert torch.equal(a, b) and not torch.equal(a, c)
    wide = decoder.sample(condition, num_inference_steps=2, generator=gen(0), output_size=(8, 24))
    assert wide.shape == (B, 3, 8, 24)


def test_sample_applies_the_guidance_formula(decoder, batch):
    condition = batch[1]
    for scale in (1.0, 3.0):
        with UNetCalls(decoder.unet) as rec:
            got = decoder.sample(condition, num_inference_steps=2, guidance_scale=scale, generator=gen(4))
        assert_close(got, manual_sample(decoder, condition, scale, steps=2, seed=4), atol=1e-5, rtol=1e-4)
        # one UNet call per step: batch [cond, uncond] under guidance, the conditional half alone at 1.0
        assert len(rec.calls) == 2
        assert all(call["ehs"].shape[0] == (2 * B if scale > 1 else B) for call in rec.calls)
    stronger = decoder.sample(condition, num_inference_steps=2, guidance_scale=6.0, generator=gen(4))
    assert not torch.allclose(stronger, got)


def test_sample_conditioning(decoder, batch):
    condition = batch[1]
    with UNetCalls(decoder.unet) as rec:
        decoder.sample(condition, num_inference_steps=1, guidance_scale=3.0, generator=gen(0))
    (call,) = rec.calls
    assert torch.equal(call["ehs"], torch.cat([condition, decoder.unconditional(B, N)]))  # [cond, uncond]
    assert_close(call["text_embeds"], torch.cat([condition.mean(1), torch.zeros(B, D)]))
    assert torch.equal(call["time_ids"], torch.tensor([[SIZE, SIZE, 0, 0, SIZE, SIZE]] * (2 * B), dtype=torch.float32))
    with UNetCalls(decoder.unet) as rec:
        decoder.sample(condition, time_ids=[1024, 768, 12, 0, SIZE, SIZE], num_inference_steps=1, guidance_scale=1.0)
    expected = torch.tensor([[1024, 768, 12, 0, SIZE, SIZE]] * B, dtype=torch.float32)
    assert torch.equal(rec.calls[0]["time_ids"], expected)


# ---- save / load --------------------------------------------------------------------------------

def test_save_pretrained_round_trips(decoder, batch, tmp_path):
    folder = decoder.save_pretrained(tmp_path / "decoder")
    assert (folder / "decoder_config.json").is_file()
    for part in ("unet", "vae"):
        assert (folder / part / "config.json").is_file()
        assert (folder / part / "diffusion_pytorch_model.safetensors").is_file()
    assert (folder / "scheduler" / "scheduler_config.json").is_file()

    loaded = VisualDecoder.from_pretrained(folder).eval()
    assert loaded.config == decoder.config
    mine, theirs = decoder.state_dict(), loaded.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert all(not p.requires_grad for p in loaded.vae.parameters())
    condition = batch[1]
    assert torch.equal(loaded.sample(condition, num_inference_steps=2, generator=gen(2)),
                       decoder.sample(condition, num_inference_steps=2, generator=gen(2)))


def test_from_pretrained_refuses_missing_or_incomplete_folders(decoder, tmp_path):
    with pytest.raises(ConfigError, match="nowhere"):
        VisualDecoder.from_pretrained(tmp_path / "nowhere")
    folder = decoder.save_pretrained(tmp_path / "partial")
    shutil.rmtree(folder / "vae")
    with pytest.raises(ConfigError, match=r"partial.*missing vae/config.json, vae/diffusion_pytorch_model"):
        VisualDecoder.from_pretrained(folder)

    folder = decoder.save_pretrained(tmp_path / "mismatch")
    data = json.loads((folder / "decoder_config.json").read_text())
    (folder / "decoder_config.json").write_text(json.dumps({**data, "visual_dim": 64}))
    with pytest.raises(ConfigError, match="cross_attention_dim"):
        VisualDecoder.from_pretrained(folder)
    (folder / "decoder_config.json").write_text(json.dumps({**data, "widht": 3}))
    with pytest.raises(ConfigError, match="widht"):
        VisualDecoder.from_pretrained(folder)


def test_v_prediction_trains_on_the_velocity():
    """prediction_type v_prediction: the target is diffusers' velocity of the same noise."""
    config = DecoderConfig(prediction_type="v_prediction")
    torch.manual_seed(0)
    decoder = VisualDecoder.from_config(config)
    latents = torch.randn(2, config.latent_channels, config.sample_size, config.sample_size)
    condition = torch.randn(2, 3, config.visual_dim)
    ids = [16.0, 16.0, 0.0, 0.0, 16.0, 16.0]
    loss = decoder.training_loss(latents, condition, ids, generator=torch.Generator().manual_seed(1)).loss
    g = torch.Generator().manual_seed(1)  # redraw what training_loss drew, in its order
    noise = torch.randn(latents.shape, generator=g) + 0.1 * torch.randn((2, config.latent_channels, 1, 1), generator=g)
    t = torch.randint(0, config.num_train_timesteps, (2,), generator=g)
    dropped = torch.rand((2,), generator=g) < 0.1
    cond = torch.where(dropped[:, None, None], torch.zeros_like(condition), condition)
    pred = decoder.unet(decoder.noise_scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=cond,
                        added_cond_kwargs=decoder.added_conditions(cond, decoder._time_ids(ids, 2, latents.device))).sample
    velocity = decoder.noise_scheduler.get_velocity(latents, noise, t)
    assert torch.allclose(loss, torch.nn.functional.mse_loss(pred, velocity), atol=1e-6)
    assert not torch.allclose(loss, torch.nn.functional.mse_loss(pred, noise), atol=1e-3)


# ---- spatial conditioning -----------------------------------------------------------------------

def test_spatial_condition_lays_each_token_over_its_block_of_the_latents():
    """spatial_condition: token k of a 2x2 grid covers the k-th (raster order) 4x4 block of 8x8
    latents, as visual_dim channels after the latent ones; zeros (the unconditional) give zeros."""
    decoder = build(spatial_condition=True)
    assert decoder.unet.config.in_channels == 4 + D and decoder.unet.config.out_channels == 4
    assert build().unet.config.in_channels == 4  # off by default: Emu2's UNet reads latents only
    latents = torch.randn(1, 4, 8, 8)
    condition = torch.arange(4 * D, dtype=torch.float32).reshape(1, 4, D)
    got = decoder.unet_input(latents, condition)
    assert got.shape == (1, 4 + D, 8, 8) and torch.equal(got[:, :4], latents)
    for k, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        block = got[0, 4:, 4 * row:4 * row + 4, 4 * col:4 * col + 4]
        assert torch.equal(block, condition[0, k][:, None, None].expand(D, 4, 4)), k
    assert not decoder.unet_input(latents, decoder.unconditional(1, 4))[:, 4:].any()
    with pytest.raises(ValueError, match="square grid.*3 tokens"):
        decoder.unet_input(latents, torch.randn(1, 3, D))


def test_spatial_condition_reaches_the_unet_in_training_and_sampling(batch):
    decoder = build(spatial_condition=True)
    pixels, condition, time_ids = batch
    latents = decoder.encode_latents(pixels, generator=gen(0))
    with UNetCalls(decoder.unet) as rec:
        loss = decoder.training_loss(latents, condition, time_ids, condition_drop=0.0, generator=gen(1)).loss
        images = decoder.sample(condition, num_inference_steps=2, guidance_scale=3.0, generator=gen(2))
    assert torch.isfinite(loss) and images.shape == (B, 3, SIZE, SIZE)
    train_call, *sample_calls = rec.calls
    assert torch.equal(train_call["sample"][:, 4:], decoder.unet_input(latents, condition)[:, 4:])
    for call in sample_calls:  # [cond, uncond]: the unconditional half's grid is all zeros
        assert call["sample"].shape == (2 * B, 4 + D, 8, 8)
        assert torch.equal(call["sample"][:B, 4:], decoder.unet_input(latents, condition)[:, 4:])
        assert not call["sample"][B:, 4:].any()


def test_a_spatial_decoder_folder_does_not_load_as_a_cross_attention_one(tmp_path, batch):
    folder = build(spatial_condition=True).save_pretrained(tmp_path / "spatial")
    loaded = VisualDecoder.from_pretrained(folder)
    assert loaded.config.spatial_condition and loaded.unet.config.in_channels == 4 + D
    data = json.loads((folder / "decoder_config.json").read_text())
    (folder / "decoder_config.json").write_text(json.dumps({**data, "spatial_condition": False}))
    with pytest.raises(ConfigError, match="in_channels is 36 but .* implies 4"):
        VisualDecoder.from_pretrained(folder)
