"""Generation: text via HF generate on inputs_embeds; image embeddings with and without KV cache."""

import pytest
import torch
from torch.testing import assert_close

from emu.data.tokenizer import IMG, image_placeholder, train_tokenizer
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel
from emu.model.generation import generate_image_embeddings, generate_text


@pytest.fixture(scope="module")
def setup():
    tok = train_tokenizer(["a red circle at the top left and a blue square in the center"] * 20, 400)
    torch.manual_seed(0)
    return tok, EmuModel.build(EmuConfig(), tok).eval()


def test_cached_image_generation_equals_uncached(setup):
    tok, model = setup
    ids = torch.tensor([tok("a red " + image_placeholder(4) + " circle then " + IMG, add_special_tokens=False).input_ids])
    context = torch.randn(1, 4, model.config.visual_dim)
    cached = generate_image_embeddings(model, ids, 16, image_embeds=context, use_cache=True)
    uncached = generate_image_embeddings(model, ids, 16, image_embeds=context, use_cache=False)
    assert cached.shape == (1, 16, model.config.visual_dim)
    assert_close(cached, uncached, rtol=1e-5, atol=1e-5)


def test_each_generated_embedding_is_what_the_objective_predicts(setup):
    """Feeding the generated embeddings back as an image gives the same predictions: generation and
    the training objective agree on which hidden state predicts which embedding."""
    tok, model = setup
    ids = torch.tensor([tok("a red circle " + IMG, add_special_tokens=False).input_ids])
    generated = generate_image_embeddings(model, ids, 4)
    full = torch.tensor([tok("a red circle " + image_placeholder(4), add_special_tokens=False).input_ids])
    hidden = model.hidden_states(full, generated)
    slots = (full[0] == model.token_ids.image).nonzero().flatten()
    assert_close(model.project_down(hidden[0, slots - 1]), generated[0], rtol=1e-5, atol=1e-5)


def test_left_padded_batch_matches_single_rows(setup):
    tok, model = setup
    short = tok("a red " + IMG, add_special_tokens=False).input_ids
    long = tok("a blue square in the center " + IMG, add_special_tokens=False).input_ids
    pad = tok.pad_token_id
    ids = torch.tensor([[pad] * (len(long) - len(short)) + short, long])
    mask = (ids != pad).long()
    batch = generate_image_embeddings(model, ids, 3, attention_mask=mask)
    for row, single in enumerate((short, long)):
        alone = generate_image_embeddings(model, torch.tensor([single]), 3)
        assert_close(batch[row], alone[0], rtol=1e-4, atol=1e-4)


def test_text_generation_greedy_and_beam(setup):
    tok, model = setup
    ids = torch.tensor([tok("a red " + image_placeholder(4) + " circle", add_special_tokens=False).input_ids])
    image = torch.randn(1, 4, model.config.visual_dim)
    greedy = generate_text(model, ids, image_embeds=image, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    # Greedy equals a hand-written argmax loop over the same embeddings.
    embeds = model.embed(ids, image)
    expected = []
    for _ in range(4):
        logits = model.lm(inputs_embeds=embeds).logits[:, -1]
        nxt = logits.argmax(-1)
        expected.append(int(nxt))
        embeds = torch.cat([embeds, model.lm.get_input_embeddings()(nxt)[:, None]], dim=1)
    assert greedy[0].tolist() == expected
    beams = generate_text(model, ids, image_embeds=image, max_new_tokens=4, num_beams=3,
                          pad_token_id=tok.pad_token_id)
    assert beams.shape[0] == 1 and 1 <= beams.shape[1] <= 4
