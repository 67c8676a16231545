"""Packing: rows of whole sequences, block-diagonal masks, and the same model outputs as unpacked."""

import random

import pytest
import torch
from torch.testing import assert_close
from torch.utils._python_dispatch import TorchDispatchMode

from emu.data.packing import Batch, collate, micro_batches, pack, unpacked
from emu.data.schema import Box, Chat, Gen, Grounded, Interleaved, Pair, Phrase, Segment, TextOnly, Turn, VideoText
from emu.data.sequence import (DEFAULT_SYSTEM_MESSAGES, IGNORE, SequenceBuilder, SequenceRules, TokenSequence,
                               VisualSlot)
from emu.data.synth import world
from emu.data.tokenizer import train_tokenizer
from emu.model.config import EmuConfig, LMConfig
from emu.model.emu import EmuModel, SequenceLayout

MAX_LEN = 160


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [world.caption(world.sample_scene(rng)) for _ in range(60)]
    texts += [world.paragraph(rng) for _ in range(10)] + list(DEFAULT_SYSTEM_MESSAGES.values())
    texts += [q for scene in (world.sample_scene(rng) for _ in range(20)) for pair in world.chat_turns(scene, rng)
              for q in pair]
    return train_tokenizer(texts, 600)


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def model(tok, request):
    torch.manual_seed(0)
    return EmuModel.build(EmuConfig(lm=LMConfig(attn_implementation=request.param)), tok).eval()


def png(scene) -> bytes:
    return world.encode(world.render(scene), "png")


@pytest.fixture(scope="module")
def sequences(tok) -> list[TokenSequence]:
    """Sequences of every stage from the shapes world: pretrain pairs, video, interleaved chunks,
    grounded, text; chat (answers only); gen (last image only)."""
    n = EmuConfig().tokens_per_image()
    rules = dict(image_tokens=n, frame_tokens=n, max_len=MAX_LEN)
    pretrain = SequenceBuilder(tok, SequenceRules(mode="pretrain", **rules))
    chat = SequenceBuilder(tok, SequenceRules(mode="chat", **rules))
    gen = SequenceBuilder(tok, SequenceRules(mode="gen", **rules))
    rng = random.Random(7)
    out = []
    for i in range(4):
        scene = world.sample_scene(rng, size=16)
        out += pretrain.build(Pair(key=f"pair-{i}", images=[png(scene)], text=world.caption(scene)), rng)
    scenes, text, subtitles = world.motion(rng, 16, 3)
    frames = [png(s) for s in scenes]
    out += pretrain.build(Pair(key="video", images=frames, text=text, media="video"), rng)
    out += pretrain.build(VideoText(key="story", images=frames, subtitles=subtitles, trailing_text=text), rng)
    doc_scenes = [world.sample_scene(rng, size=16) for _ in range(5)]
    segments = [seg for j, s in enumerate(doc_scenes) for seg in (Segment(text=world.caption(s)), Segment(image=j))]
    short = SequenceBuilder(tok, SequenceRules(mode="pretrain", **{**rules, "max_len": 48}))
    chunks = short.build(Interleaved(key="doc", images=[png(s) for s in doc_scenes], segments=segments), rng)
    assert len(chunks) > 1
    out += chunks
    scene = world.sample_scene(rng, size=16)
    phrases = [Phrase(a, b, (Box(*box),)) for a, b, box in world.noun_chunks(scene)]
    grounded = Grounded(key="grounded", images=[png(scene)], text=world.caption(scene), phrases=phrases)
    out += pretrain.build(grounded, rng)
    out += pretrain.build(TextOnly(key="text", text=world.paragraph(rng, 2)), rng)
    scene = world.sample_scene(rng, size=16)
    turns = [Turn(role, content) for q, a in world.chat_turns(scene, rng, 1) for role, content in
             (("user", q), ("assistant", a))]
    turns[0] = Turn("user", "<image>\n" + turns[0].content)
    out += chat.build(Chat(key="chat", images=[png(scene)], turns=turns[:4]), rng)
    instruction, edited = world.edit(scene, rng)
    out += gen.build(Gen(key="edit", images=[png(scene), png(edited)],
                         condition=[Segment(image=0), Segment(text=instruction)], target=1), rng)
    assert all(len(s) <= MAX_LEN for s in out)
    return out


@pytest.fixture(scope="module")
def embeddings(sequences, model):
    """A visual embedding (n, D) per slot, keyed like precomputed embeddings: (key, index, kind)."""
    g = torch.Generator().manual_seed(1)
    n = model.config.tokens_per_image()
    return {(v.key, v.index, v.kind): torch.randn(n, model.config.visual_dim, generator=g)
            for s in sequences for v in s.visuals}


def model_inputs(batch: Batch, embeddings, model) -> dict:
    def stack(slots):
        return torch.stack([embeddings[(v.key, v.index, v.kind)] for v in slots]) if slots else None

    mask = batch.attention_mask_for(model.config.lm.attn_implementation)
    return dict(input_ids=batch.input_ids, text_targets=batch.targets, attention_mask=mask,
                position_ids=batch.position_ids, image_embeds=stack(batch.image_slots),
                frame_embeds=stack(batch.frame_slots), image_regress=batch.image_regress,
                frame_regress=batch.frame_regress)


def fake(key: str, n: int) -> TokenSequence:
    return TokenSequence(key=key, data_type="text", ids=list(range(3, 3 + n)), targets=[IGNORE] * n, visuals=[])


# ---- pack ------------------------------------------------------------------------------------

def test_pack_is_first_fit_decreasing_of_whole_sequences():
    seqs = [fake(k, n) for k, n in zip("abcdefg", (2, 5, 3, 1, 4, 3, 2))]
    rows = pack(seqs, 8)
    # longest first, each into the first row with room:
    # b(5)->row0; e(4)->row1; c(3)->row0 (8); f(3)->row1 (7); a(2)->row2; g(2)->row2; d(1)->row1 (8)
    assert [[s.key for s in row] for row in rows] == [["b", "c"], ["d", "e", "f"], ["a", "g"]]
    assert pack(seqs, 8) == rows  # deterministic
    assert pack([], 8) == []


def test_pack_rows_fit_and_hold_every_sequence_exactly_once(sequences):
    rows = pack(sequences, MAX_LEN)
    assert all(sum(len(s) for s in row) <= MAX_LEN for row in rows)
    packed_ids = sorted(id(s) for row in rows for s in row)
    assert packed_ids == sorted(id(s) for s in sequences)
    assert len(rows) < len(sequences)
    again = pack(list(sequences), MAX_LEN)
    assert [[id(s) for s in row] for row in again] == [[id(s) for s in row] for row in rows]
    rng = random.Random(0)
    lengths = [rng.randint(1, 100) for _ in range(300)]
    rows = pack([fake(str(i), n) for i, n in enumerate(lengths)], 128)
    assert all(sum(len(s) for s in row) <= 128 for row in rows)
    assert sorted(int(s.key) for row in rows for s in row) == list(range(300))
    assert len(rows) <= 11 / 9 * (sum(lengths) / 128) + 1  # FFD's worst-case bound against the volume bound


def with_visuals(key: str, n: int, visuals: int) -> TokenSequence:
    seq = fake(key, n)
    seq.visuals = [VisualSlot(kind="image", key=key, index=i, data=b"", regress=False) for i in range(visuals)]
    return seq


def test_pack_and_micro_batches_keep_to_the_visual_budget():
    """At most `max_visuals` images per row (and per micro-batch of rows); a sequence holding more
    is placed alone rather than refused; no cap packs by tokens only."""
    seqs = [with_visuals(k, 2, v) for k, v in zip("abcdef", (1, 2, 1, 5, 0, 2))]
    rows = pack(seqs, 100, max_visuals=3)
    assert [[s.key for s in row] for row in rows] == [["a", "b", "e"], ["c", "f"], ["d"]]
    assert len(pack(seqs, 100)) == 1
    groups = micro_batches(rows, max_rows=2, max_visuals=3)
    assert [[[s.key for s in row] for row in group] for group in groups] == [[["a", "b", "e"]], [["c", "f"]], [["d"]]]
    assert len(micro_batches(rows, max_rows=2)) == 2


def test_pack_rejects_a_sequence_longer_than_a_row():
    with pytest.raises(ValueError, match="'long'.*9 tokens, longer than the row length 8"):
        pack([fake("a", 3), fake("long", 9)], 8)


# ---- collate ---------------------------------------------------------------------------------

def test_collate_lays_out_rows_with_restarting_positions_and_block_diagonal_mask(tok):
    a, b, c = fake("a", 3), fake("b", 2), fake("c", 4)
    a.targets = [4, 5, IGNORE]
    batch = collate([[a, b], [c]], pad_id=0)
    assert batch.input_ids.tolist() == [[3, 4, 5, 3, 4], [3, 4, 5, 6, 0]]
    assert batch.targets.tolist() == [[4, 5, IGNORE, IGNORE, IGNORE], [IGNORE] * 5]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    expected = torch.tensor([
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]],
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [0, 0, 0, 0, 1]],  # pad: itself
    ], dtype=torch.bool)
    assert batch.attention_mask.dtype == torch.bool and batch.attention_mask.shape == (2, 1, 5, 5)
    assert torch.equal(batch.attention_mask[:, 0], expected)
    assert (batch.real_tokens, batch.padding_tokens, batch.padding_fraction()) == (9, 1, 0.1)
    assert batch.keys == [["a", "b"], ["c"]]
    wide = collate([[a, b], [c]], pad_id=0, length=8)
    assert wide.input_ids.shape == (2, 8) and wide.padding_tokens == 7
    assert wide.attention_mask.any(-1).all()  # no all-False row: padding attends to itself
    with pytest.raises(ValueError, match="5 tokens, more than the batch length 4"):
        collate([[a, b]], pad_id=0, length=4)
    with pytest.raises(ValueError, match="no empty row"):
        collate([[a], []], pad_id=0)


def test_attention_mask_for_each_attention_implementation():
    batch = collate([[fake("a", 2), fake("b", 1)]], pad_id=0, length=4)
    assert torch.equal(batch.attention_mask_for("sdpa"), batch.attention_mask)
    bias = batch.attention_mask_for("eager", torch.bfloat16)
    assert bias.dtype == torch.bfloat16 and bias.shape == (1, 1, 4, 4)
    assert torch.equal(bias == 0, batch.attention_mask)
    assert (bias[~batch.attention_mask] == torch.finfo(torch.bfloat16).min).all()
    assert batch.attention_mask_for("flex_attention") is None  # the position ids carry the packing
    with pytest.raises(ValueError, match="supported: sdpa, eager, flex_attention"):
        batch.attention_mask_for("flash_attention_2")


def test_batch_visual_slots_follow_their_blocks_in_row_major_order(tok, sequences):
    rows = pack(sequences, MAX_LEN)
    batch = collate(rows, tok.pad_token_id)
    img, end = tok.convert_tokens_to_ids("[IMG]"), tok.convert_tokens_to_ids("[/IMG]")
    image, frame = tok.convert_tokens_to_ids("<image>"), tok.convert_tokens_to_ids("[gIMG]")
    n = EmuConfig().tokens_per_image()
    kinds = []  # block kinds read off input_ids, row-major
    for row in batch.input_ids.tolist():
        for i, t in enumerate(row):
            if t == img:
                body = row[i + 1:i + 2 + n]
                assert body[-1] == end and len(set(body[:-1])) == 1 and body[0] in (image, frame)  # span intact
                kinds.append("image" if body[0] == image else "frame")
    assert [v.kind for r in rows for s in r for v in s.visuals] == kinds
    assert [v.kind for v in batch.image_slots] == ["image"] * kinds.count("image")
    assert len(batch.frame_slots) == kinds.count("frame") > 0
    want = [v for r in rows for s in r for v in s.visuals]
    assert batch.image_slots == [v for v in want if v.kind == "image"]
    assert batch.frame_slots == [v for v in want if v.kind == "frame"]
    assert batch.image_regress.tolist() == [v.regress for v in batch.image_slots]
    assert batch.frame_regress.tolist() == [v.regress for v in batch.frame_slots]
    # regression flags by stage survive packing: gen only its target, chat none, pretrain all
    flags = {(v.key, v.index): v.regress for v in batch.image_slots}
    assert flags[("edit", 0)] is False and flags[("edit", 1)] is True and flags[("chat", 0)] is False
    assert all(flags[(f"pair-{i}", 0)] for i in range(4)) and batch.frame_regress.all()


def test_packing_reduces_padding(tok, sequences):
    packed = collate(pack(sequences, MAX_LEN), tok.pad_token_id)
    baseline = unpacked(sequences, tok.pad_token_id)
    assert packed.real_tokens == baseline.real_tokens == sum(len(s) for s in sequences)
    assert packed.padding_fraction() < baseline.padding_fraction()
    assert baseline.input_ids.shape[0] == len(sequences)


# ---- the model sees each packed sequence as if alone ------------------------------------------

@torch.no_grad()
def test_packed_hidden_states_equal_each_sequence_alone(tok, sequences, model, embeddings):
    rows = pack(sequences, MAX_LEN)
    batch = collate(rows, tok.pad_token_id)
    inputs = model_inputs(batch, embeddings, model)
    hidden = model.hidden_states(batch.input_ids, inputs["image_embeds"], inputs["frame_embeds"],
                                 inputs["attention_mask"], batch.position_ids)
    assert torch.isfinite(hidden).all()  # padding rows included
    checked = 0
    for r, row in enumerate(rows):
        start = 0
        for s in row:
            alone = collate([[s]], tok.pad_token_id)
            alone_inputs = model_inputs(alone, embeddings, model)
            expected = model.hidden_states(torch.tensor([s.ids]), alone_inputs["image_embeds"],
                                           alone_inputs["frame_embeds"])[0]
            assert_close(hidden[r, start:start + len(s)], expected, atol=1e-5, rtol=1e-4)
            start += len(s)
            checked += 1
    assert checked == len(sequences) and any(len(row) > 1 for row in rows)
    # control: a plain causal mask over the row lets later sequences see earlier ones
    causal = collate([[fake("row", batch.input_ids.shape[1])]] * len(rows), tok.pad_token_id)
    leaky = model.hidden_states(batch.input_ids, inputs["image_embeds"], inputs["frame_embeds"],
                                causal.attention_mask_for(model.config.lm.attn_implementation), batch.position_ids)
    assert not torch.allclose(leaky, hidden, atol=1e-3)


@torch.no_grad()
def test_packed_and_unpacked_batches_give_the_same_loss(tok, sequences, model, embeddings):
    packed = model(**model_inputs(collate(pack(sequences, MAX_LEN), tok.pad_token_id), embeddings, model))
    plain = model(**model_inputs(unpacked(sequences, tok.pad_token_id), embeddings, model))
    assert packed.text_targets == plain.text_targets == sum(s.text_targets for s in sequences)
    assert packed.image_targets == plain.image_targets > 0
    assert_close(packed.text_loss, plain.text_loss)
    assert_close(packed.image_loss, plain.image_loss)
    assert_close(packed.loss, plain.loss)
    # and the batch from collate runs without an attention mask as well (sequences alone, row by row)
    one = sequences[0]
    alone = model(**{**model_inputs(collate([[one]], tok.pad_token_id), embeddings, model),
                     "attention_mask": None, "position_ids": None})
    masked = model(**model_inputs(collate([[one]], tok.pad_token_id), embeddings, model))
    assert_close(alone.loss, masked.loss)


@torch.no_grad()
def test_flex_attention_without_a_dense_mask_equals_the_dense_reference(tok, sequences, embeddings):
    """The packed path for CUDA (runtime.attention=flex_attention): no (rows, 1, L, L) mask, the
    block mask derived from the restarting position ids. Forward only: FlexAttention has no
    backward on CPU. Image blocks and padding rows included."""
    torch.manual_seed(0)
    dense = EmuModel.build(EmuConfig(lm=LMConfig(attn_implementation="sdpa")), tok).eval()
    flex = EmuModel.build(EmuConfig(lm=LMConfig(attn_implementation="sdpa")), tok).eval()
    flex.load_state_dict(dense.state_dict())
    flex.lm.set_attn_implementation("flex_attention")
    batch = collate(pack(sequences, MAX_LEN), tok.pad_token_id)
    inputs = model_inputs(batch, embeddings, dense)
    assert batch.padding_tokens > 0 and batch.image_slots
    reference = dense.hidden_states(batch.input_ids, inputs["image_embeds"], inputs["frame_embeds"],
                                    inputs["attention_mask"], batch.position_ids)
    varlen = flex.hidden_states(batch.input_ids, inputs["image_embeds"], inputs["frame_embeds"],
                                batch.attention_mask_for("flex_attention"), batch.position_ids)
    assert_close(varlen, reference, atol=1e-5, rtol=1e-4)
    packed = flex(**{**inputs, "attention_mask": None})
    plain = dense(**model_inputs(unpacked(sequences, tok.pad_token_id), embeddings, dense))
    assert_close(packed.text_loss, plain.text_loss)
    assert_close(packed.image_loss, plain.image_loss)
    # varlen rows (what LMBatcher makes for flex_attention): no padding, the same losses. Compiled
    # for each length: inductor's CPU flex kernel for dynamic shapes fails to compile (torch 2.13).
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        for row in pack(sequences, 2 * MAX_LEN):
            varlen_row = collate([row], tok.pad_token_id)
            assert varlen_row.padding_tokens == 0
            one_row = flex(**{**model_inputs(varlen_row, embeddings, flex), "attention_mask": None})
            alone = dense(**model_inputs(unpacked(row, tok.pad_token_id), embeddings, dense))
            assert_close(one_row.text_loss, alone.text_loss)
            assert_close(one_row.image_loss, alone.image_loss)


class _DeviceReads(TorchDispatchMode):
    """Records the ops that make the host wait for the device: reading a value back
    (`.item()`, `bool()`, `int()`), and what needs a result's size before it can be allocated
    (`nonzero`, boolean indexing, `masked_select` / `masked_scatter`)."""

    SYNCING = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.item", "aten.nonzero", "aten.masked_select",
               "aten.masked_scatter")

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith("aten.index") and any(
            isinstance(a, (list, tuple)) and any(isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in a)
            for a in args)
        if bool_index or name.startswith(self.SYNCING):
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


def test_training_forward_and_backward_never_read_from_the_device(tok, sequences):
    """With the layout computed on the host (what LMBatcher ships), a packed micro-batch's forward
    and backward queue kernels without waiting for any: the dispatcher sees no op that syncs.
    The same batch without a layout does sync, which shows the probe sees what it looks for.
    (sdpa with the dense mask: torch.compile, which flex_attention needs, refuses dispatch modes;
    scripts/gpu-check runs the flex path under torch.cuda.set_sync_debug_mode.)"""
    torch.manual_seed(0)
    model = EmuModel.build(EmuConfig(lm=LMConfig(attn_implementation="sdpa")), tok)
    batch = collate(pack(sequences, MAX_LEN), tok.pad_token_id)
    g = torch.Generator().manual_seed(1)
    visuals = {(v.key, v.index, v.kind): torch.randn(model.config.tokens_per_image(), model.config.visual_dim,
                                                    generator=g) for s in sequences for v in s.visuals}
    inputs = model_inputs(batch, visuals, model)
    layout = SequenceLayout.of(batch.input_ids, batch.targets, model.token_ids, batch.image_regress,
                               batch.frame_regress)
    reference = model(**inputs)
    with _DeviceReads() as probe:
        out = model(**inputs, layout=layout)
        out.loss.backward()
    assert probe.ops == []
    assert (out.text_targets, out.image_targets) == (reference.text_targets, reference.image_targets) != (0, 0)
    assert_close(out.loss, reference.loss)
    with _DeviceReads() as probe:
        model(**inputs)
    assert "aten.nonzero.default" in probe.ops
