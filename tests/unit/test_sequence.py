"""Sequence building: exact token layouts, text targets and regression flags per stage (CPU, seconds)."""

import random

import pytest

from emu.data.schema import (
    VQA,
    Box,
    Captions,
    Chat,
    Gen,
    Grounded,
    Interleaved,
    Pair,
    Phrase,
    Segment,
    TextOnly,
    Turn,
    VideoText,
)
from emu.data.sequence import (
    DEFAULT_SYSTEM_MESSAGES,
    IGNORE,
    SequenceBuilder,
    SequenceRules,
    TokenSequence,
)
from emu.data.synth import world
from emu.data.tokenizer import image_placeholder, train_tokenizer
from emu.errors import ConfigError

N, M = 3, 2  # <image> tokens per image, [gIMG] tokens per frame (small, so layouts stay readable)


@pytest.fixture(scope="module")
def tok():
    rng = random.Random(0)
    texts = [world.caption(world.sample_scene(rng)) for _ in range(50)]
    texts += [world.paragraph(rng) for _ in range(10)] + list(DEFAULT_SYSTEM_MESSAGES.values())
    return train_tokenizer(texts, 500)


def png(seed: int = 0) -> bytes:
    return world.encode(world.render(world.sample_scene(random.Random(seed), size=8)), "png")


def builder(tok, mode, **kw) -> SequenceBuilder:
    kw.setdefault("max_len", 512)
    kw.setdefault("image_tokens", N)
    return SequenceBuilder(tok, SequenceRules(mode=mode, frame_tokens=M, **kw))


def build1(b: SequenceBuilder, sample, seed: int = 0) -> TokenSequence:
    seqs = b.build(sample, random.Random(seed))
    assert len(seqs) == 1
    s = seqs[0]
    assert len(s.ids) == len(s.targets) and s.targets[-1] == IGNORE
    return s


# Expected layouts are written as parts: (text, supervised) or ([token, ...], supervised).
def expected(tok, *parts) -> tuple[list[int], list[int]]:
    ids, supervised = [], []
    for piece, sup in parts:
        new = (tok.convert_tokens_to_ids(piece) if isinstance(piece, list)
               else tok(piece, add_special_tokens=False).input_ids)
        ids += new
        supervised += [sup] * len(new)
    targets = [ids[t + 1] if supervised[t + 1] else IGNORE for t in range(len(ids) - 1)] + [IGNORE]
    return ids, targets


def block(markers_supervised: bool, n: int = N, placeholder: str = "<image>"):
    return [(["[IMG]"], markers_supervised), ([placeholder] * n, False), (["[/IMG]"], markers_supervised)]


def assert_layout(tok, seq: TokenSequence, text: str, *parts):
    assert tok.decode(seq.ids) == text
    ids, targets = expected(tok, *parts)
    assert seq.ids == ids
    assert seq.targets == targets


def frames(n: int) -> str:
    return "[VIDEO]" + ("[IMG]" + "[gIMG]" * M + "[/IMG]") * n


IMG_BLOCK = image_placeholder(N)
BOS, EOS = (["<s>"], False), (["</s>"], True)


# ---- caption (stage 1) ---------------------------------------------------------------------

def test_caption_image_pair_supervises_only_the_caption_and_eos(tok):
    s = build1(builder(tok, "caption"), Pair(key="p1", images=[png()], text=" a red circle at the top left. "))
    assert_layout(tok, s, f"<s>{IMG_BLOCK} a red circle at the top left.</s>",
                  BOS, *block(False), (" a red circle at the top left.", True), EOS)
    assert tok.decode([t for t in s.targets if t != IGNORE]) == " a red circle at the top left.</s>"
    assert [(v.key, v.index, v.kind, v.regress) for v in s.visuals] == [("p1", 0, "image", False)]
    assert s.visuals[0].data == png() and s.data_type == "image_text"


def test_caption_video_pair_puts_frames_first(tok):
    s = build1(builder(tok, "caption"), Pair(key="v", images=[png(1), png(2)], text="a blue square moves up.",
                                             media="video"))
    assert_layout(tok, s, f"<s>{frames(2)} a blue square moves up.</s>",
                  BOS, (["[VIDEO]"], False), *block(False, M, "[gIMG]"), *block(False, M, "[gIMG]"),
                  (" a blue square moves up.", True), EOS)
    assert [(v.index, v.kind, v.regress) for v in s.visuals] == [(0, "frame", False), (1, "frame", False)]
    assert s.data_type == "video_text"


def test_caption_mode_rejects_other_kinds(tok):
    b = builder(tok, "caption")
    with pytest.raises(ValueError, match=r"'doc-7'.*'interleaved'.*'caption'"):
        b.build(Interleaved(key="doc-7", images=[png()], segments=[Segment(image=0)]), random.Random(0))
    with pytest.raises(ValueError, match=r"'t1'.*'text'.*'caption'"):
        b.build(TextOnly(key="t1", text="hello"), random.Random(0))


# ---- pretrain (stage 2) --------------------------------------------------------------------

def test_pretrain_pair_supervises_every_text_token_and_regresses_the_image(tok):
    pair = Pair(key="p", images=[png()], text="a red circle.")
    first = build1(builder(tok, "pretrain", image_text_order_p=1.0), pair)
    assert_layout(tok, first, f"<s>{IMG_BLOCK} a red circle.</s>", BOS, *block(True), (" a red circle.", True), EOS)
    last = build1(builder(tok, "pretrain", image_text_order_p=0.0), pair)
    assert_layout(tok, last, f"<s> a red circle.{IMG_BLOCK}</s>", BOS, (" a red circle.", True), *block(True), EOS)
    for s in (first, last):
        assert [v.regress for v in s.visuals] == [True]
        # every position but <s> and the <image> placeholders is a text target
        supervised = {t + 1 for t, y in enumerate(s.targets) if y != IGNORE}
        image_id = tok.convert_tokens_to_ids("<image>")
        assert supervised == {i for i in range(1, len(s.ids)) if s.ids[i] != image_id}


@pytest.mark.parametrize("p", [0.5, 0.2])
def test_pretrain_pair_order_follows_the_rng_with_probability_p(tok, p):
    b = builder(tok, "pretrain", image_text_order_p=p)
    pair = Pair(key="p", images=[png()], text="a red circle.")
    img = tok.convert_tokens_to_ids("[IMG]")
    rng = random.Random(1)
    firsts = [b.build(pair, rng)[0].ids[1] == img for _ in range(3000)]
    assert abs(sum(firsts) / len(firsts) - p) < 0.03
    again = random.Random(1)
    assert firsts[:50] == [b.build(pair, again)[0].ids[1] == img for _ in range(50)]  # deterministic per rng


def test_pretrain_video_pair_regresses_every_frame(tok):
    s = build1(builder(tok, "pretrain", image_text_order_p=0.0),
               Pair(key="v", images=[png(1), png(2), png(3)], text="a square moves.", media="video"))
    assert_layout(tok, s, f"<s> a square moves.{frames(3)}</s>",
                  BOS, (" a square moves.", True), (["[VIDEO]"], True), *block(True, M, "[gIMG]") * 3, EOS)
    assert [(v.kind, v.regress) for v in s.visuals] == [("frame", True)] * 3


def test_pretrain_interleaved_image_first_keeps_segment_order(tok):
    doc = Interleaved(key="d", images=[png(1), png(2)], segments=[
        Segment(text="A square has four corners."), Segment(image=0), Segment(text="  a red circle.\n"),
        Segment(text="A circle has no corners."), Segment(image=1)])
    s = build1(builder(tok, "pretrain", image_text_order_p=1.0), doc)
    assert_layout(tok, s,
                  f"<s> A square has four corners.{IMG_BLOCK} a red circle. A circle has no corners.{IMG_BLOCK}</s>",
                  BOS, (" A square has four corners.", True), *block(True), (" a red circle.", True),
                  (" A circle has no corners.", True), *block(True), EOS)
    assert [(v.index, v.regress) for v in s.visuals] == [(0, True), (1, True)]
    assert s.data_type == "interleaved"
    # text first: image 0 moves after its text (the next segment, as the mmc4 importer matches
    # it); image 1 has no text after it and stays last
    after = build1(builder(tok, "pretrain", image_text_order_p=0.0), doc)
    assert tok.decode(after.ids) == (f"<s> A square has four corners. a red circle.{IMG_BLOCK}"
                                     f" A circle has no corners.{IMG_BLOCK}</s>")
    assert [v.index for v in after.visuals] == [0, 1]


def _blocks_intact(tok, ids: list[int], n: int = N) -> bool:
    img, end, ph = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[/IMG]", "<image>"))
    for i, t in enumerate(ids):
        if t == img and ids[i + 1:i + 2 + n] != [ph] * n + [end]:
            return False
    return ids.count(ph) == n * ids.count(img)


def test_long_interleaved_document_splits_at_segment_boundaries(tok):
    rng = random.Random(3)
    segments, images = [], []
    for i in range(8):
        segments.append(Segment(text=world.caption(world.sample_scene(rng))))
        segments.append(Segment(image=i))
        images.append(png(i))
    doc = Interleaved(key="long-doc", images=images, segments=segments)
    whole = build1(builder(tok, "pretrain", max_len=4096, image_text_order_p=1.0), doc)
    max_len = 40
    chunks = builder(tok, "pretrain", max_len=max_len, image_text_order_p=1.0).build(doc, random.Random(0))
    assert len(chunks) > 2
    bos, eos, ph = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("<image>")
    for c in chunks:
        assert len(c) <= max_len and c.ids[0] == bos and c.ids[-1] == eos and c.key == "long-doc"
        assert _blocks_intact(tok, c.ids)
        assert len(c.visuals) == c.ids.count(tok.convert_tokens_to_ids("[IMG]"))
        assert all(v.regress for v in c.visuals)
        # each chunk is a sequence of its own: every text token after <s> (its own </s> included)
        assert {t + 1 for t, y in enumerate(c.targets) if y != IGNORE} == {
            i for i in range(1, len(c)) if c.ids[i] != ph}
    # the chunks are the document, in order, each wrapped in its own <s> ... </s>
    assert [t for c in chunks for t in c.ids[1:-1]] == whole.ids[1:-1]
    assert [v.index for c in chunks for v in c.visuals] == list(range(8))
    # greedy over whole segments: the expected cut points from the segments' own token counts
    sizes = [len(tok(" " + s.text, add_special_tokens=False).input_ids) if s.text else N + 2 for s in segments]
    expected_lengths, used = [], 0
    for n in sizes:
        if used + n > max_len - 2:
            expected_lengths.append(used + 2)
            used = 0
        used += n
    expected_lengths.append(used + 2)
    assert [len(c) for c in chunks] == expected_lengths


def test_video_text_writes_each_frame_before_or_after_its_subtitle(tok):
    video = VideoText(key="yt", images=[png(1), png(2), png(3)],
                      subtitles=["the red circle is at the top", "", "it moves"], trailing_text="the end")
    s = build1(builder(tok, "pretrain", image_text_order_p=0.0), video)  # time order: subtitle i, then frame i
    one = "[IMG]" + "[gIMG]" * M + "[/IMG]"
    assert_layout(tok, s, f"<s>[VIDEO] the red circle is at the top{one}{one} it moves{one} the end</s>",
                  BOS, (["[VIDEO]"], True), (" the red circle is at the top", True), *block(True, M, "[gIMG]"),
                  *block(True, M, "[gIMG]"), (" it moves", True), *block(True, M, "[gIMG]"), (" the end", True), EOS)
    assert [(v.index, v.kind, v.regress) for v in s.visuals] == [(i, "frame", True) for i in range(3)]
    assert s.data_type == "video_interleaved"
    first = build1(builder(tok, "pretrain", image_text_order_p=1.0), video)
    assert tok.decode(first.ids) == f"<s>[VIDEO]{one} the red circle is at the top{one}{one} it moves the end</s>"
    assert [v.index for v in first.visuals] == [0, 1, 2]


# ---- image/text order randomisation (App. A.1) -----------------------------------------------

ORDER_TEXTS = ["a red circle.", "a blue square.", "a green triangle."]


def order_doc() -> Interleaved:
    """mmc4 layout: each image right before its matched sentence; images 1 and 2 share one; image 3
    follows the last sentence (no text of its own)."""
    t0, t1, t2 = (Segment(text=t) for t in ORDER_TEXTS)
    return Interleaved(key="order", images=[png(i) for i in range(4)], segments=[
        Segment(image=0), t0, Segment(image=1), Segment(image=2), t1, t2, Segment(image=3)])


def _find(ids: list[int], sub: list[int]) -> int:
    return next(i for i in range(len(ids)) if ids[i:i + len(sub)] == sub)


def interleaved_firsts(tok, seq: TokenSequence) -> list[bool]:
    """For images 0, 1, 2 of order_doc(): whether each stands before its sentence."""
    img = tok.convert_tokens_to_ids("[IMG]")
    blocks = [t for t, i in enumerate(seq.ids) if i == img]
    where = {v.index: blocks[k] for k, v in enumerate(seq.visuals)}
    sentence = [_find(seq.ids, tok(" " + t, add_special_tokens=False).input_ids) for t in ORDER_TEXTS]
    assert sentence == sorted(sentence) and where[3] == blocks[-1]  # texts in order; image 3 stays last
    firsts = [where[0] < sentence[0], where[1] < sentence[1], where[2] < sentence[1]]
    # every image stays next to its sentence; images on one side of it keep their order
    assert where[0] < sentence[1] and all(sentence[0] < where[i] < sentence[2] for i in (1, 2))
    assert firsts[1] != firsts[2] or where[1] < where[2]
    return firsts


def video_firsts(tok, seq: TokenSequence, subtitles: list[str]) -> list[bool]:
    """For each frame: whether it stands before its subtitle (layout parsed block by block)."""
    img = tok.convert_tokens_to_ids("[IMG]")
    pos, firsts = 2, []  # after <s> [VIDEO]
    for subtitle in subtitles:
        n = len(tok(" " + subtitle, add_special_tokens=False).input_ids) if subtitle else 0  # blank: left out
        firsts.append(seq.ids[pos] == img)
        assert seq.ids[pos + (0 if firsts[-1] else n)] == img
        pos += n + M + 2
    assert seq.ids[pos] == tok.eos_token_id
    return firsts


def within_binomial(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4 * (p * (1 - p) / n) ** 0.5  # ~4 sigma: a real bias of a few % fails


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_interleaved_image_before_its_text_with_probability_p(tok, p):
    b, rng = builder(tok, "pretrain", image_text_order_p=p), random.Random(7)
    firsts = [interleaved_firsts(tok, b.build(order_doc(), rng)[0]) for _ in range(2000)]
    flat = [f for row in firsts for f in row]
    assert within_binomial(sum(flat), len(flat), p)
    for image in range(3):  # one draw per image, not per sentence: each image alone and a pair jointly
        assert within_binomial(sum(row[image] for row in firsts), len(firsts), p)
    assert within_binomial(sum(row[1] and row[2] for row in firsts), len(firsts), p * p)
    again = random.Random(7)  # the passed rng alone decides: the same seed gives the same orders
    assert firsts[:50] == [interleaved_firsts(tok, b.build(order_doc(), again)[0]) for _ in range(50)]


@pytest.mark.parametrize("p", [0.5, 0.8])
def test_video_frame_before_its_subtitle_with_probability_p(tok, p):
    subtitles = ["the red circle is at the top", "it moves", "", "a blue square"]
    video = VideoText(key="yt", images=[png(i) for i in range(4)], subtitles=subtitles)
    b, rng = builder(tok, "pretrain", image_text_order_p=p), random.Random(8)
    firsts = [video_firsts(tok, b.build(video, rng)[0], subtitles) for _ in range(2000)]
    spoken = [f for row in firsts for i, f in enumerate(row) if subtitles[i]]  # a blank subtitle has no side
    assert within_binomial(sum(spoken), len(spoken), p)


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_order_is_deterministic_at_p_0_and_1(tok, p):
    b = builder(tok, "pretrain", image_text_order_p=p)
    docs = {tok.decode(b.build(order_doc(), random.Random(seed))[0].ids) for seed in range(20)}
    t0, t1, t2 = (" " + t for t in ORDER_TEXTS)
    if p:
        assert docs == {f"<s>{IMG_BLOCK}{t0}{IMG_BLOCK}{IMG_BLOCK}{t1}{t2}{IMG_BLOCK}</s>"}  # document order
    else:
        assert docs == {f"<s>{t0}{IMG_BLOCK}{t1}{IMG_BLOCK}{IMG_BLOCK}{t2}{IMG_BLOCK}</s>"}
    video = VideoText(key="yt", images=[png(1), png(2)], subtitles=["it moves", "a blue square"])
    assert len({tuple(b.build(video, random.Random(seed))[0].ids) for seed in range(20)}) == 1


GROUNDED_TEXT = "a red circle at the top left and a blue square at the center."


def grounded_sample() -> Grounded:
    return Grounded(key="g", images=[png()], text=GROUNDED_TEXT, phrases=[
        Phrase(33, 46, (Box(0.0, 0.25, 0.5, 1.0), Box(0.1, 0.2, 0.3, 0.4))),  # "a blue square", two boxes
        Phrase(0, 12, (Box(0.0, 0.0, 1 / 3, 1 / 3),)),                         # "a red circle"
    ])


def patches(*qs: int) -> str:
    return "".join(f"<patch_index_{q:04d}>" for q in qs)


def test_grounded_phrase_first_layout_and_quantisation(tok):
    s = build1(builder(tok, "pretrain", phrase_first_p=1.0), grounded_sample())
    red = f"<object>{patches(0, 0, 85, 85)}</object>"  # 256/3 = 85.33 -> 85
    blue = (f"<object>{patches(0, 64, 128, 256)}</delimiter_of_multi_objects/>"
            f"{patches(26, 51, 77, 102)}</object>")    # 25.6 -> 26, 51.2 -> 51, 76.8 -> 77, 102.4 -> 102
    assert tok.decode(s.ids) == (f"<s>{IMG_BLOCK}<grounding><phrase> a red circle</phrase>{red} at the top left and"
                                 f"<phrase> a blue square</phrase>{blue} at the center.</s>")
    assert [v.regress for v in s.visuals] == [True]
    image_id = tok.convert_tokens_to_ids("<image>")
    assert {t + 1 for t, y in enumerate(s.targets) if y != IGNORE} == {
        i for i in range(1, len(s.ids)) if s.ids[i] != image_id}
    assert s.data_type == "grounded"


def test_grounded_object_first_when_the_rng_says_so(tok):
    s = build1(builder(tok, "pretrain", phrase_first_p=0.0), grounded_sample())
    text = tok.decode(s.ids)
    assert (f"<grounding><object>{patches(0, 0, 85, 85)}</object><phrase> a red circle</phrase>"
            " at the top left and<object>") in text
    assert text.endswith("</object><phrase> a blue square</phrase> at the center.</s>")


def test_grounded_phrase_order_probability(tok):
    b = builder(tok, "pretrain")  # phrase_first_p defaults to 0.7 (App. B.1)
    phrase, obj = tok.convert_tokens_to_ids("<phrase>"), tok.convert_tokens_to_ids("<object>")
    rng, firsts = random.Random(5), []
    for _ in range(1500):
        ids = b.build(grounded_sample(), rng)[0].ids
        starts = [t for t in ids if t in (phrase, obj)]
        firsts += [starts[0] == phrase, starts[2] == phrase]
    assert abs(sum(firsts) / len(firsts) - 0.7) < 0.03


def test_grounding_rejects_bad_boxes_and_phrases(tok):
    b = builder(tok, "pretrain")
    bad_box = Grounded(key="gb", images=[png()], text=GROUNDED_TEXT, phrases=[Phrase(0, 12, (Box(0, 0, 1.2, 1),))])
    with pytest.raises(ValueError, match=r"'gb'.*1.2 is outside \[0, 1\]"):
        b.build(bad_box, random.Random(0))
    overlap = Grounded(key="go", images=[png()], text=GROUNDED_TEXT,
                       phrases=[Phrase(0, 12, (Box(0, 0, 1, 1),)), Phrase(6, 20, (Box(0, 0, 1, 1),))])
    with pytest.raises(ValueError, match="'go'.*overlaps"):
        b.build(overlap, random.Random(0))
    # half up at the bin edge, and the tiny float excess of a 1.0 computed in pixels is fine
    edge = Grounded(key="ge", images=[png()], text="a red circle.",
                    phrases=[Phrase(0, 12, (Box(0.5 / 256, 1.5 / 256, 1.0000001, 0.9999),))])
    assert patches(1, 2, 256, 256) in tok.decode(b.build(edge, random.Random(0))[0].ids)


def test_text_only(tok):
    text = "A circle has no corners.\nA triangle has three corners.\n"
    s = build1(builder(tok, "pretrain"), TextOnly(key="t", text=text))
    assert_layout(tok, s, "<s> A circle has no corners.\nA triangle has three corners.</s>",
                  BOS, (" A circle has no corners.\nA triangle has three corners.", True), EOS)
    assert s.visuals == [] and s.data_type == "text"


def long_text(tok, tokens: int) -> str:
    rng, text = random.Random(11), ""
    while len(tok(" " + text, add_special_tokens=False).input_ids) < tokens:
        text += world.paragraph(rng, sentences=8) + "\n"
    return text


def test_long_text_is_cut_into_max_len_chunks(tok):
    text = long_text(tok, 5000)
    ids = tok(" " + text.strip(), add_special_tokens=False).input_ids
    assert len(ids) >= 5000
    max_len = 512
    chunks = builder(tok, "pretrain", max_len=max_len).build(TextOnly(key="pile-1", text=text), random.Random(0))
    assert len(chunks) == -(-(len(ids) + 1) // (max_len - 1))  # <s> in each chunk, </s> once
    bos, eos = tok.bos_token_id, tok.eos_token_id
    for i, c in enumerate(chunks):
        assert len(c) <= max_len and c.ids[0] == bos and c.key == "pile-1" and c.data_type == "text"
        assert (c.ids[-1] == eos) == (i == len(chunks) - 1) and eos not in c.ids[:-1]
        assert c.visuals == [] and c.targets[-1] == IGNORE
        assert {t + 1 for t, y in enumerate(c.targets) if y != IGNORE} == set(range(1, len(c)))  # all but <s>
    assert all(len(c) == max_len for c in chunks[:-1])
    # the chunks are the text, in order, and their targets cover all of it and its </s>
    assert [t for c in chunks for t in c.ids[1:]] == ids + [eos]
    assert [y for c in chunks for y in c.targets if y != IGNORE] == ids + [eos]


def test_text_chunks_never_end_in_eos_alone(tok):
    text = "A circle has no corners. A triangle has three corners."
    n = len(tok(" " + text, add_special_tokens=False).input_ids)
    # n text tokens + </s> in chunks of max_len - 1 = n tokens would leave </s> alone
    chunks = builder(tok, "pretrain", max_len=n + 1).build(TextOnly(key="t", text=text), random.Random(0))
    assert [len(c) for c in chunks] == [n, 3]
    assert tok.decode(chunks[1].ids).startswith("<s>") and chunks[1].ids[-1] == tok.eos_token_id
    assert build1(builder(tok, "pretrain", max_len=n + 2), TextOnly(key="t", text=text)).ids[-1] == tok.eos_token_id


def test_interleaved_text_longer_than_a_sequence_is_cut_into_pieces(tok):
    text = long_text(tok, 300)
    doc = Interleaved(key="web", images=[png(1), png(2)], segments=[
        Segment(text="A circle has no corners."), Segment(image=0), Segment(text=text), Segment(image=1)])
    b = builder(tok, "pretrain", image_text_order_p=1.0, max_len=64)  # too_long="error" (the default)
    chunks = b.build(doc, random.Random(0))
    whole = build1(builder(tok, "pretrain", image_text_order_p=1.0, max_len=4096), doc)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert len(chunks) > 4
    for c in chunks:
        assert len(c) <= 64 and c.ids[0] == bos and c.ids[-1] == eos and c.key == "web"
        assert _blocks_intact(tok, c.ids) and len(c.visuals) == c.ids.count(tok.convert_tokens_to_ids("[IMG]"))
    assert [t for c in chunks for t in c.ids[1:-1]] == whole.ids[1:-1]
    assert [v.index for c in chunks for v in c.visuals] == [0, 1]
    # the long text's first piece fills the sequence holding image 0; whole pieces fill the next
    assert [len(c) for c in chunks[:-1]] == [64] * (len(chunks) - 1)


def test_pretrain_rejects_instruction_kinds(tok):
    with pytest.raises(ValueError, match=r"'c'.*'chat'.*'pretrain'"):
        builder(tok, "pretrain").build(Chat(key="c", turns=[Turn("user", "hi"), Turn("assistant", "yo")]),
                                       random.Random(0))


# ---- chat (instruction tuning) ---------------------------------------------------------------

CHAT_SYS = DEFAULT_SYSTEM_MESSAGES["chat"]
ACADEMIC_SYS = DEFAULT_SYSTEM_MESSAGES["academic"]


def chat_sample(**kw) -> Chat:
    return Chat(key="c1", images=[png(1), png(2)], turns=[
        Turn("user", "<image>\nWhat color is the circle?"), Turn("assistant", "The circle is red."),
        Turn("user", "And this one? <image>"), Turn("assistant", " It is a blue square. ")], **kw)


def test_chat_supervises_only_answers_and_their_eos(tok):
    s = build1(builder(tok, "chat"), chat_sample())
    assert_layout(
        tok, s,
        f"<s> {CHAT_SYS}[USER]:{IMG_BLOCK} What color is the circle?[ASSISTANT]: The circle is red.</s>"
        f"[USER]: And this one?{IMG_BLOCK}[ASSISTANT]: It is a blue square.</s>",
        BOS, (" " + CHAT_SYS, False),
        (["[USER]"], False), (":", False), *block(False), (" What color is the circle?", False),
        (["[ASSISTANT]"], False), (":", False), (" The circle is red.", True), EOS,
        (["[USER]"], False), (":", False), (" And this one?", False), *block(False),
        (["[ASSISTANT]"], False), (":", False), (" It is a blue square.", True), EOS)
    assert tok.decode([t for t in s.targets if t != IGNORE]) == " The circle is red.</s> It is a blue square.</s>"
    assert [(v.index, v.regress) for v in s.visuals] == [(0, False), (1, False)]
    # the pieces tokenize exactly as the whole rendered prompt would: what inference feeds the model
    assert tok(tok.decode(s.ids), add_special_tokens=False).input_ids == s.ids
    assert s.data_type == "chat"


def test_chat_system_message_sources(tok):
    own = chat_sample()
    own.turns.insert(0, Turn("system", "Answer briefly."))
    assert tok.decode(build1(builder(tok, "chat"), own).ids).startswith("<s> Answer briefly.[USER]:")
    rules = {"chat": "Be chatty.", "clock": "Read the clock."}
    assert tok.decode(build1(builder(tok, "chat", system_messages=rules), chat_sample(category="clock")).ids
                      ).startswith("<s> Read the clock.[USER]:")
    assert tok.decode(build1(builder(tok, "chat", system_messages=rules), chat_sample()).ids
                      ).startswith("<s> Be chatty.[USER]:")
    with pytest.raises(ValueError, match=r"'c1'.*category 'ocr'"):
        builder(tok, "chat").build(chat_sample(category="ocr"), random.Random(0))
    none = chat_sample()
    none.turns.insert(0, Turn("system", ""))
    assert tok.decode(build1(builder(tok, "chat"), none).ids).startswith("<s>[USER]:[IMG]")


def test_chat_rejects_malformed_conversations(tok):
    b = builder(tok, "chat")
    with pytest.raises(ValueError, match="'c1'.*alternating"):
        b.build(Chat(key="c1", turns=[Turn("user", "hi"), Turn("user", "hi")]), random.Random(0))
    with pytest.raises(ValueError, match="'c1'.*alternating"):
        b.build(Chat(key="c1", turns=[Turn("user", "hi")]), random.Random(0))
    with pytest.raises(ValueError, match="'c1' has 2 <image> placeholders .* but 1 images"):
        s = chat_sample()
        s.images = s.images[:1]
        b.build(s, random.Random(0))


def long_chat(turns: int = 40) -> Chat:
    """`turns` exchanges; every third question shows an image."""
    rng, conversation, images = random.Random(4), [], []
    for i in range(turns):
        scene = world.sample_scene(rng)
        question = "What is in the picture?" if i % 3 else "<image> What is in the picture?"
        images += [] if i % 3 else [png(i)]
        conversation += [Turn("user", question), Turn("assistant", world.caption(scene))]
    return Chat(key="chat-40", images=images, turns=conversation)


@pytest.mark.parametrize("n", [N, 256])  # 256: Emu2-Chat's 16x16 images, truncated at 2,048 (§2.3.1)
def test_long_chat_is_truncated_without_cutting_an_image(tok, n):
    chat = long_chat()
    full = build1(builder(tok, "chat", max_len=1 << 16, image_tokens=n), chat)
    img, end, ph = (tok.convert_tokens_to_ids(t) for t in ("[IMG]", "[/IMG]", "<image>"))
    starts = [t for t, i in enumerate(full.ids) if i == img]
    inside = [s + k for s in starts[1:4] for k in (1, 2, n + 1)]  # cuts inside the 2nd to 4th blocks
    for max_len in [m for m in (*inside, 500, 1000, 2048) if m < len(full)]:
        b = builder(tok, "chat", max_len=max_len, image_tokens=n)  # too_long="error" (the default)
        s = build1(b, chat)
        assert len(s) <= max_len < len(full)
        assert s.ids == full.ids[:len(s)] and s.targets[:-1] == full.targets[:len(s) - 1]
        assert s.ids.count(img) == s.ids.count(end) == len(s.visuals) and s.ids.count(ph) == n * len(s.visuals)
        assert _blocks_intact(tok, s.ids, n)
        assert [v.index for v in s.visuals] == list(range(len(s.visuals)))
        assert full.targets[len(s) - 2] != IGNORE  # it ends on a supervised (answer) token
        assert b.truncated == {"chat": 1} and not b.skipped
        cut = [st for st in starts if st < max_len < st + n + 2]
        assert all(len(s) <= st for st in cut)  # a block the cut would split is left out whole
    assert build1(builder(tok, "chat", max_len=len(full), image_tokens=n), chat).ids == full.ids  # fits whole


def test_chat_cut_inside_an_image_block_falls_before_it(tok):
    chat = Chat(key="c2", images=[png(1)], turns=[
        Turn("user", "What is a circle?"), Turn("assistant", "A shape with no corners."),
        Turn("user", "<image> And this?"), Turn("assistant", "A red circle.")])
    full = build1(builder(tok, "chat", max_len=4096), chat)
    start = full.ids.index(tok.convert_tokens_to_ids("[IMG]"))
    first_eos = full.ids.index(tok.eos_token_id)
    for max_len in range(start + 1, start + N + 2):  # every cut inside the block
        s = build1(builder(tok, "chat", max_len=max_len), chat)
        assert s.ids == full.ids[:first_eos + 1] and s.visuals == []
        assert tok.decode(s.ids).endswith("[ASSISTANT]: A shape with no corners.</s>")
    # the block kept whole once an answer token after it fits
    answer = full.ids.index(tok.convert_tokens_to_ids("[ASSISTANT]"), start) + 2
    s = build1(builder(tok, "chat", max_len=answer + 1), chat)
    assert s.ids == full.ids[:answer + 1] and [v.index for v in s.visuals] == [0] and _blocks_intact(tok, s.ids)


def test_chat_without_an_answer_within_max_len_is_too_long(tok):
    vqa = VQA(key="q-long", images=[png()], question_id=1, image_id=1, question="what color is the circle?",
              answers=["red"], multiple_choice_answer="red")
    full = build1(builder(tok, "chat"), vqa)
    first = next(t for t, y in enumerate(full.targets) if y != IGNORE) + 1  # position of the first answer token
    with pytest.raises(ValueError, match=rf"'q-long' \(academic\) keeps no answer token when truncated: its first "
                                         rf"answer token is token {first + 1}, more than max_len={first}"):
        builder(tok, "chat", max_len=first).build(vqa, random.Random(0))
    skip = builder(tok, "chat", max_len=first, too_long="skip")
    assert skip.build(vqa, random.Random(0)) == [] and skip.skipped == {"too_long": 1} and not skip.truncated
    assert len(build1(builder(tok, "chat", max_len=first + 1), vqa)) == first + 1


def test_vqa_and_captions_are_academic_questions(tok):
    b = builder(tok, "chat")
    vqa = VQA(key="q", images=[png()], question_id=1, image_id=1, question="what color is the circle?",
              answers=["red", "blue", "blue", "red", "blue"], multiple_choice_answer="red")
    s = build1(b, vqa)
    assert_layout(tok, s, f"<s> {ACADEMIC_SYS}[USER]:{IMG_BLOCK} what color is the circle?[ASSISTANT]: red</s>",
                  BOS, (" " + ACADEMIC_SYS, False), (["[USER]"], False), (":", False), *block(False),
                  (" what color is the circle?", False), (["[ASSISTANT]"], False), (":", False), (" red", True), EOS)
    vqa.multiple_choice_answer = ""
    assert tok.decode(build1(b, vqa).ids).endswith("[ASSISTANT]: blue</s>")  # the most common answer
    caps = Captions(key="cc", images=[png()], image_id=1, captions=["A red circle.", "A circle."])
    s = build1(b, caps)
    assert tok.decode(s.ids).endswith(
        f"[USER]:{IMG_BLOCK} Describe the image in one sentence.[ASSISTANT]: A red circle.</s>")
    assert tok.decode([t for t in s.targets if t != IGNORE]) == " A red circle.</s>"
    assert s.data_type == "academic" and [v.regress for v in s.visuals] == [False]


# ---- gen (Emu2-Gen) ----------------------------------------------------------------------------

def test_gen_regresses_only_the_last_image_and_has_no_text_targets(tok):
    sample = Gen(key="e", images=[png(1), png(2), png(3)],
                 condition=[Segment(text="make the red circle blue"), Segment(image=0), Segment(image=2)], target=1)
    s = build1(builder(tok, "gen"), sample)
    assert_layout(tok, s, f"<s> make the red circle blue{IMG_BLOCK}{IMG_BLOCK}{IMG_BLOCK}</s>",
                  BOS, (" make the red circle blue", False), *block(False) * 3, (["</s>"], False))
    assert all(t == IGNORE for t in s.targets)
    assert [(v.index, v.regress) for v in s.visuals] == [(0, False), (2, False), (1, True)]
    assert s.data_type == "edit"
    t2i = build1(builder(tok, "gen"), Pair(key="p", images=[png()], text="a red circle."))
    assert tok.decode(t2i.ids) == f"<s> a red circle.{IMG_BLOCK}</s>"
    assert [v.regress for v in t2i.visuals] == [True] and all(t == IGNORE for t in t2i.targets)


def test_entity_dropping_never_drops_every_condition(tok):
    condition = [Segment(text="a red circle"), Segment(image=0), Segment(text="at the top")]
    sample = Gen(key="e", images=[png(1), png(2)], condition=condition, target=1)
    full = f"<s> a red circle{IMG_BLOCK} at the top{IMG_BLOCK}</s>"
    assert {tok.decode(builder(tok, "gen").build(sample, random.Random(i))[0].ids) for i in range(20)} == {full}
    b, rng, kept_counts = builder(tok, "gen", entity_drop_p=0.95), random.Random(0), []
    for _ in range(400):
        s = b.build(sample, rng)[0]
        assert (s.visuals[-1].index, s.visuals[-1].regress) == (1, True)  # the target is never dropped
        text = tok.decode(s.ids)
        kept = ("a red circle" in text) + ("at the top" in text) + (len(s.visuals) - 1)
        assert kept >= 1
        kept_counts.append(kept)
    assert min(kept_counts) == 1 and max(kept_counts) >= 2
    everything = builder(tok, "gen", entity_drop_p=1.0)  # drops all but one, chosen by the rng
    assert {tok.decode(everything.build(sample, random.Random(i))[0].ids) for i in range(30)} == {
        f"<s> a red circle{IMG_BLOCK}</s>", f"<s>{IMG_BLOCK}{IMG_BLOCK}</s>", f"<s> at the top{IMG_BLOCK}</s>"}


def test_entity_drop_rate(tok):
    condition = [Segment(text=f"a red circle {i}") for i in range(4)]
    sample = Gen(key="e", images=[png()], condition=condition, target=0)
    b, rng = builder(tok, "gen", entity_drop_p=0.3), random.Random(2)
    texts = [tok.decode(b.build(sample, rng)[0].ids) for _ in range(1000)]
    kept = sum(f"circle {i}" in t for t in texts for i in range(4)) / 4000
    assert abs(kept - 0.7) < 0.03


def test_gen_rejects_video_pairs_and_bad_targets(tok):
    with pytest.raises(ValueError, match="'v'.*video"):
        builder(tok, "gen").build(Pair(key="v", images=[png()], text="x", media="video"), random.Random(0))
    with pytest.raises(ValueError, match="'e'.*target image 0 is also a condition"):
        builder(tok, "gen").build(Gen(key="e", images=[png()], condition=[Segment(image=0)], target=0),
                                  random.Random(0))


# ---- too long, tokenization, settings ---------------------------------------------------------

def test_too_long_error_names_key_length_and_max_len(tok):
    pair = Pair(key="big-one", images=[png()], text="a red circle at the top left.")
    n = len(build1(builder(tok, "caption"), pair))
    with pytest.raises(ValueError, match=rf"'big-one' \(image_text\) is {n} tokens long, more than max_len={n - 1}"):
        builder(tok, "caption", max_len=n - 1).build(pair, random.Random(0))
    assert len(build1(builder(tok, "caption", max_len=n), pair)) == n  # exactly max_len fits
    skip = builder(tok, "caption", max_len=n - 1, too_long="skip")
    assert skip.build(pair, random.Random(0)) == [] and skip.build(pair, random.Random(0)) == []
    assert skip.skipped["too_long"] == 2


def test_interleaved_segment_that_cannot_fit_is_too_long(tok):
    doc = Interleaved(key="doc", images=[png()], segments=[Segment(text="a red circle."), Segment(image=0)])
    with pytest.raises(ValueError,
                       match=rf"'doc' \(interleaved\) has an image block .* {N + 4} tokens, more than max_len={N + 3}"):
        builder(tok, "pretrain", max_len=N + 3).build(doc, random.Random(0))
    skip = builder(tok, "pretrain", max_len=N + 3, too_long="skip")
    assert skip.build(doc, random.Random(0)) == [] and skip.skipped == {"too_long": 1}
    assert len(builder(tok, "pretrain", max_len=N + 4).build(doc, random.Random(0))) == 2


def test_special_token_strings_in_text_stay_text(tok):
    """A web caption holding "<image>" or "</s>" must not forge a placeholder (the embedding count
    would no longer match) or end the sequence."""
    s = build1(builder(tok, "pretrain", image_text_order_p=1.0),
               Pair(key="p", images=[png()], text="see <image> and [IMG] here</s>"))
    specials = {tok.convert_tokens_to_ids(t) for t in ("<image>", "[IMG]", "[/IMG]", "</s>")}
    assert sum(t in specials for t in s.ids) == N + 3  # the image block and the final </s> only
    assert tok.decode(s.ids).endswith("[/IMG] see <image> and [IMG] here</s></s>")


def test_pieces_never_merge_across_a_boundary(tok):
    """A caption is tokenized the same whether the image comes before or after it."""
    pair = Pair(key="p", images=[png()], text="a red circle.")
    first = build1(builder(tok, "pretrain", image_text_order_p=1.0), pair).ids
    last = build1(builder(tok, "pretrain", image_text_order_p=0.0), pair).ids
    assert first[N + 3:-1] == last[1:-N - 3] == tok(" a red circle.", add_special_tokens=False).input_ids


def test_data_type_of(tok):
    b = builder(tok, "pretrain")
    assert b.data_type_of(Pair(key="a", images=[png()], text="x")) == "image_text"
    assert b.data_type_of(Pair(key="a", images=[png()], text="x", media="video")) == "video_text"
    assert b.data_type_of(Grounded(key="a", images=[png()], text="x", phrases=[])) == "grounded"


@pytest.mark.parametrize("kw, setting", [
    ({"mode": "sft"}, "sequence.mode"), ({"image_tokens": 0}, "sequence.image_tokens"),
    ({"max_len": 2}, "sequence.max_len"), ({"phrase_first_p": 1.5}, "sequence.phrase_first_p"),
    ({"entity_drop_p": -0.1}, "sequence.entity_drop_p"), ({"too_long": "truncate"}, "sequence.too_long")])
def test_rules_validate_their_settings(kw, setting):
    args = {"mode": "pretrain", "image_tokens": 4, "frame_tokens": 4, "max_len": 64, **kw}
    with pytest.raises(ConfigError, match=setting):
        SequenceRules(**args)


def test_ignore_matches_the_model():
    from emu.model.emu import IGNORE as MODEL_IGNORE

    assert IGNORE == MODEL_IGNORE
