"""The Emu2 multimodal LM and its unified objective, on tiny configs (CPU, seconds)."""

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaForCausalLM

from emu.data.tokenizer import GIMG, IMAGE, IMG, image_placeholder, train_tokenizer, video_placeholder
from emu.model.config import CFormerConfig, EmuConfig, VisionConfig
from emu.model.emu import IGNORE, EmuModel
from emu.errors import ConfigError
from emu.model.vision import EvaVisionTransformer, pool_patches, sincos_positions


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["a red circle at the top left and a blue square in the center"] * 20, 400)


@pytest.fixture()
def model(tok):
    torch.manual_seed(0)
    return EmuModel.build(EmuConfig(), tok).eval()


def ids_of(tok, text: str) -> torch.Tensor:
    return torch.tensor([tok(text, add_special_tokens=False).input_ids])


def next_token_targets(ids: torch.Tensor, tok) -> torch.Tensor:
    """Every next token is a target except visual placeholders (they are regressed, not classified)."""
    targets = torch.full_like(ids, IGNORE)
    targets[:, :-1] = ids[:, 1:]
    visual = torch.tensor([tok.convert_tokens_to_ids(IMAGE), tok.convert_tokens_to_ids(GIMG)])
    targets[torch.isin(targets, visual)] = IGNORE
    return targets


def test_text_only_matches_plain_hugging_face_llama(tok, model):
    ids = ids_of(tok, "a red circle at the top left and a blue square")
    ours = model(ids, next_token_targets(ids, tok))
    reference = model.lm(input_ids=ids, labels=ids)  # HF shifts labels inside
    assert_close(ours.text_loss, reference.loss)
    assert ours.image_targets == 0 and ours.image_loss == 0
    assert_close(model.hidden_states(ids), model.lm.model(input_ids=ids).last_hidden_state)


def test_images_fill_placeholders_with_project_up(tok, model):
    ids = ids_of(tok, "a red " + image_placeholder(4) + " circle " + image_placeholder(4))
    embeds = torch.randn(2, 4, model.config.visual_dim)
    filled = model.embed(ids, embeds)
    slots = ids[0] == tok.convert_tokens_to_ids(IMAGE)
    assert_close(filled[0, slots], model.project_up(embeds.reshape(-1, embeds.shape[-1])))
    assert_close(filled[0, ~slots], model.lm.get_input_embeddings()(ids)[0, ~slots])
    with pytest.raises(ValueError, match="8 visual placeholders .* 4 visual embeddings"):
        model.embed(ids, embeds[:1])


def test_regression_loss_equals_hand_computed_mse(tok, model):
    ids = ids_of(tok, "a red " + image_placeholder(4) + " circle " + image_placeholder(4) + " at")
    embeds = torch.randn(2, 4, model.config.visual_dim)
    regress = torch.tensor([False, True])
    out = model(ids, torch.full_like(ids, IGNORE), image_embeds=embeds, image_regress=regress)
    hidden = model.hidden_states(ids, embeds)[0]
    second = (ids[0] == tok.convert_tokens_to_ids(IMAGE)).nonzero().flatten()[4:]
    # [IMG] predicts the first embedding, each visual position the next one.
    assert (ids[0, second[0] - 1] == tok.convert_tokens_to_ids(IMG))
    expected = ((model.project_down(hidden[second - 1]) - embeds[1]) ** 2).mean()
    assert_close(out.image_loss, expected)
    assert out.image_targets == 4 and out.text_targets == 0


def test_supervision_masks_select_exactly_their_targets(tok, model):
    """Answer-only text targets and last-image-only regression score exactly those positions."""
    ids = ids_of(tok, "a red " + image_placeholder(4) + " circle " + image_placeholder(4) + " at the top")
    embeds = torch.randn(2, 4, model.config.visual_dim)
    answer_only = torch.full_like(ids, IGNORE)
    answer_only[:, -4:-1] = ids[:, -3:]
    hidden = model.hidden_states(ids, embeds)[0]
    slots = (ids[0] == model.token_ids.image).nonzero().flatten()
    for regress, image in (([False, True], 1), ([True, False], 0)):
        out = model(ids, answer_only, image_embeds=embeds, image_regress=torch.tensor(regress))
        scored = answer_only[0] != IGNORE
        expected_text = F.cross_entropy(model.lm.lm_head(hidden[scored]), answer_only[0, scored])
        mine = slots[4 * image: 4 * image + 4]
        expected_image = F.mse_loss(model.project_down(hidden[mine - 1]), embeds[image])
        assert out.text_targets == 3 and out.image_targets == 4
        assert_close(out.text_loss, expected_text)
        assert_close(out.image_loss, expected_image)
    none = model(ids, answer_only, image_embeds=embeds, image_regress=torch.tensor([False, False]))
    assert none.image_targets == 0 and none.image_loss == 0


def test_causality_later_tokens_and_images_never_change_earlier_states(tok, model):
    prefix = "a red circle " + image_placeholder(4) + " at"
    a = ids_of(tok, prefix + " the top " + image_placeholder(4))
    b = ids_of(tok, prefix + " the left " + image_placeholder(4))
    n = ids_of(tok, prefix).shape[1]
    first = torch.randn(1, 4, model.config.visual_dim)
    ha = model.hidden_states(a, torch.cat([first, torch.randn(1, 4, model.config.visual_dim)]))
    hb = model.hidden_states(b, torch.cat([first, torch.randn(1, 4, model.config.visual_dim)]))
    assert_close(ha[:, :n], hb[:, :n])
    assert not torch.allclose(ha[:, n:], hb[:, n:])
    # Per-position losses of the prefix do not move either.
    targets = next_token_targets(a, tok)
    targets[:, n - 1:] = IGNORE
    la = model(a, targets, image_embeds=torch.cat([first, torch.randn(1, 4, model.config.visual_dim)]),
               image_regress=torch.tensor([True, False]))
    lb = model(a, targets, image_embeds=torch.cat([first, torch.randn(1, 4, model.config.visual_dim)]),
               image_regress=torch.tensor([True, False]))
    assert_close(la.loss, lb.loss)


def test_video_frames_use_frame_placeholders_and_their_own_pooling(tok):
    torch.manual_seed(0)
    model = EmuModel.build(EmuConfig(image_tokens_side=4, video_tokens_side=2), tok).eval()
    ids = ids_of(tok, "a " + image_placeholder(16) + " moves " + video_placeholder(3, 4))
    images, frames = torch.randn(1, 3, 32, 32), torch.randn(3, 3, 32, 32)
    out = model(ids, next_token_targets(ids, tok), images=images, frames=frames,
                image_regress=torch.tensor([False]), frame_regress=torch.tensor([True, True, True]))
    assert out.image_targets == 12  # 3 frames x 2x2 tokens
    assert model.encode_images(frames, 2).shape == (3, 4, model.config.visual_dim)


def test_frozen_encoder_gets_no_gradient_and_runs_without_autograd(tok, model):
    model.train()
    for p in model.visual.parameters():
        p.requires_grad_(False)
    ids = ids_of(tok, "a " + image_placeholder(4) + " red")
    out = model(ids, next_token_targets(ids, tok), images=torch.randn(1, 3, 32, 32),
                image_regress=torch.tensor([True]))
    out.loss.backward()
    assert all(p.grad is None for p in model.visual.parameters())
    assert model.project_up.weight.grad is not None and model.project_down.weight.grad is not None
    assert model.lm.model.layers[0].self_attn.q_proj.weight.grad is not None


def test_regression_targets_are_detached(tok, model):
    """With project_up zeroed, embeddings reach the loss only as regression targets; a detached
    target then passes no gradient back (an undetached one would train the encoder toward
    whatever the LM finds easy to predict)."""
    with torch.no_grad():
        model.project_up.weight.zero_()
    ids = ids_of(tok, "a " + image_placeholder(4))
    embeds = torch.randn(1, 4, model.config.visual_dim, requires_grad=True)
    out = model(ids, torch.full_like(ids, IGNORE), image_embeds=embeds, image_regress=torch.tensor([True]))
    assert out.loss > 0
    grad, = torch.autograd.grad(out.loss, embeds, allow_unused=True)
    assert grad is None or grad.abs().max() == 0


def test_pooling_is_a_row_major_grid_average():
    grid = torch.arange(16, dtype=torch.float32).reshape(1, 16, 1)
    tokens = torch.cat([torch.full((1, 1, 1), -1.0), grid], dim=1)  # CLS first
    pooled = pool_patches(tokens, 2)[0, :, 0]
    assert pooled.tolist() == [2.5, 4.5, 10.5, 12.5]
    with pytest.raises(ValueError, match="cannot pool"):
        pool_patches(tokens, 3)


def test_patch_positions_start_as_2d_sincos_so_each_pooled_token_carries_its_cell():
    positions = sincos_positions(4, 4)  # 4x4 grid, width 4: one frequency (1) per axis, sin then cos
    index = torch.arange(4.0)
    rows, cols = index.repeat_interleave(4), index.repeat(4)
    assert_close(positions, torch.stack([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1))
    torch.manual_seed(0)
    visual = EvaVisionTransformer(VisionConfig(image_size=64, patch_size=8, width=64, layers=2, heads=2, mlp_dim=128))
    assert_close(visual.pos_embed[0, 1:].detach(), sincos_positions(8, 64))
    # Pooled to 4x4, the 16 tokens of a blank image are still 16 distinct vectors (with N(0, 0.02)
    # starts they differed by about 1% of their norm): the LM can read the cell from the token.
    with torch.no_grad():
        tokens = pool_patches(visual(torch.zeros(1, 3, 64, 64)), 4)[0]
    distances = torch.cdist(tokens, tokens) + torch.eye(16) * 1e9
    assert distances.min() > 0.1 * tokens.norm(dim=-1).mean()
    with pytest.raises(ConfigError, match=r"model.vision.width \(66\) must be divisible by 4"):
        VisionConfig(width=66, heads=2)


def test_eva_pre_norm_matches_transformers_clip_vision():
    """With postnorm=False our EVA block is CLIP's pre-norm block; check against transformers."""
    cfg = VisionConfig(image_size=16, patch_size=4, width=16, layers=2, heads=2, mlp_dim=32, postnorm=False)
    torch.manual_seed(0)
    eva = EvaVisionTransformer(cfg).eval()
    with torch.no_grad():
        eva.patch_embed.proj.bias.zero_()  # CLIP's patch conv has no bias
    clip = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, image_size=16, patch_size=4,
                                            hidden_act="gelu", layer_norm_eps=1e-6)).eval()
    clip.pre_layrnorm = torch.nn.Identity()  # EVA has no pre-norm
    sd = {"embeddings.patch_embedding.weight": eva.patch_embed.proj.weight,
          "embeddings.class_embedding": eva.cls_token[0, 0],
          "embeddings.position_embedding.weight": eva.pos_embed[0]}
    for i, blk in enumerate(eva.blocks):
        q, k, v = blk.attn.qkv.weight.chunk(3)
        p = f"encoder.layers.{i}."
        sd.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                   p + "self_attn.v_proj.weight": v, p + "self_attn.q_proj.bias": blk.attn.q_bias,
                   p + "self_attn.k_proj.bias": torch.zeros(16), p + "self_attn.v_proj.bias": blk.attn.v_bias,
                   p + "self_attn.out_proj.weight": blk.attn.proj.weight, p + "self_attn.out_proj.bias": blk.attn.proj.bias,
                   p + "layer_norm1.weight": blk.norm1.weight, p + "layer_norm1.bias": blk.norm1.bias,
                   p + "layer_norm2.weight": blk.norm2.weight, p + "layer_norm2.bias": blk.norm2.bias,
                   p + "mlp.fc1.weight": blk.mlp.fc1.weight, p + "mlp.fc1.bias": blk.mlp.fc1.bias,
                   p + "mlp.fc2.weight": blk.mlp.fc2.weight, p + "mlp.fc2.bias": blk.mlp.fc2.bias})
    with torch.no_grad():
        for blk in eva.blocks:  # give the biases non-trivial values
            blk.attn.q_bias.normal_()
            blk.attn.v_bias.normal_()
        missing, unexpected = clip.load_state_dict(sd, strict=False)
    assert not unexpected and all(k.startswith("post_layernorm") for k in missing)
    pixels = torch.randn(2, 3, 16, 16)
    assert_close(eva(pixels), clip(pixel_values=pixels).last_hidden_state, rtol=1e-5, atol=1e-5)


def test_eva_post_norm_normalises_the_branches_not_the_stream():
    cfg = VisionConfig(image_size=16, patch_size=4, width=16, layers=1, heads=2, mlp_dim=32, postnorm=True)
    eva = EvaVisionTransformer(cfg).eval()
    block = eva.blocks[0]
    x = torch.randn(2, 17, 16)
    h = x + block.norm1(block.attn(x))
    assert_close(block(x), h + block.norm2(block.mlp(h)))


def test_cformer_connector_is_causal_over_queries(tok):
    torch.manual_seed(0)
    model = EmuModel.build(EmuConfig(connector="cformer", cformer=CFormerConfig(queries=6)), tok).eval()
    pixels = torch.randn(2, 3, 32, 32)
    before = model.encode_images(pixels)
    assert before.shape == (2, 6, model.config.cformer.width) and model.config.tokens_per_image() == 6
    with torch.no_grad():
        model.cformer.queries[:, 3] += 1.0
    after = model.encode_images(pixels)
    assert_close(after[:, :3], before[:, :3])
    assert not torch.allclose(after[:, 3:], before[:, 3:])
    ids = ids_of(tok, "a " + image_placeholder(6) + " red")
    out = model(ids, next_token_targets(ids, tok), images=pixels[:1], image_regress=torch.tensor([True]))
    assert out.image_targets == 6


def test_lm_is_a_plain_llama(model):
    assert isinstance(model.lm, LlamaForCausalLM)
    assert model.project_up.bias is None and model.project_down.bias is None


def test_position_embeddings_follow_the_input_resolution():
    """Stage 1 raises the resolution mid-schedule (224 -> 448 px in Emu2): positions interpolate,
    and baking them into the parameter gives the same outputs."""
    from emu.model.vision import resize_position_embeddings

    torch.manual_seed(0)
    eva = EvaVisionTransformer(VisionConfig(image_size=16, patch_size=4, width=16, layers=1, heads=2, mlp_dim=32)).eval()
    big = torch.randn(1, 3, 32, 32)
    dynamic = eva(big)
    assert dynamic.shape == (1, 65, 16)
    resize_position_embeddings(eva, 32)
    assert eva.config.image_size == 32 and eva.pos_embed.shape == (1, 65, 16)
    assert_close(eva(big), dynamic)


def test_uint8_pixels_are_normalised_by_the_model_exactly_as_preprocess_does(model):
    """The data loader ships uint8 pixels (a quarter of the bytes); the model normalises them on
    their device, bit for bit what preprocess gives on the host."""
    import io

    import numpy as np
    from PIL import Image

    from emu.model.vision import preprocess, resize_images

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (40 + i, 52, 3), dtype=np.uint8)) for i in range(3)]
    images = [Image.open(io.BytesIO(_png(img))) for img in images]
    config = model.visual.config
    floats = preprocess(images, config)
    raw = resize_images(images, config.image_size)
    assert raw.dtype == torch.uint8 and raw.shape == floats.shape
    with torch.no_grad():
        assert torch.equal(model.encode_images(raw), model.encode_images(floats))


@pytest.mark.parametrize("stored, side", [((64, 64), 224), ((256, 256), 224), ((52, 40), 32), ((30, 48), 64)])
def test_device_resize_gives_pils_bicubic_pixels(stored, side):
    """A loader may ship images at their stored size for the GPU to resize (LMBatcher's
    resize_on_device): resize_pixels must give the pixels PIL gives on the host, up and down,
    square or not: within 2 levels on noise, 1 on flat shapes (Pillow rounds in fixed point)."""
    import numpy as np
    from PIL import Image

    from emu.model.vision import resize_images, resize_pixels, stack_pixels

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (3, stored[1], stored[0], 3), dtype=np.uint8)
    shapes = np.full((2, stored[1], stored[0], 3), 30, dtype=np.uint8)
    shapes[0, : stored[1] // 2, : stored[0] // 3] = (255, 0, 0)
    shapes[1, stored[1] // 3:, stored[0] // 4:] = (0, 200, 60)
    for arrays, tolerance in ((noise, 2), (shapes, 1)):
        images = [Image.fromarray(a) for a in arrays]
        host = resize_images(images, side)
        device = resize_pixels(stack_pixels(images), side)
        assert device.dtype == torch.uint8 and device.shape == host.shape == (len(images), 3, side, side)
        difference = (device.int() - host.int()).abs()
        assert difference.max() <= tolerance and difference.float().mean() < 0.02
    at_size = torch.zeros(1, 3, side, side, dtype=torch.uint8)
    assert resize_pixels(at_size, side) is at_size, "already at the size: not copied"


def _png(image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
