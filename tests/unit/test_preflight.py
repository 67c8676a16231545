"""The pre-training check (emu.train.preflight) agrees with what SequenceBuilder does with long
samples: it flags exactly the samples the builder rejects for their images and markers alone (CPU,
seconds)."""

import random

import pytest

from emu.data.schema import VQA, Captions, Chat, Grounded, Interleaved, Pair, Segment, TextOnly, Turn, VideoText
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.shards import ShardWriter
from emu.data.synth import world
from emu.errors import ConfigError
from emu.train.preflight import CHAT_FIXED, check_visual_budget
from tests.unit.test_sequence import png, tok  # noqa: F401  (the same tokenizer fixture and images)

N, M = 5, 2  # <image> tokens per image, [gIMG] tokens per frame
BLOCK = N + 2
CHAT_TYPES = {"chat": 1, "academic": 1}
PRETRAIN_TYPES = {"image_text": 1, "video_text": 1, "interleaved": 1, "video_interleaved": 1, "grounded": 1, "text": 1}
#: No system message, so the chat template before the first answer is only markers and images.
NO_SYSTEM = {"chat": "", "academic": ""}


def dataset(root, name, *samples):
    with ShardWriter(root / name, "test") as writer:
        for sample in samples:
            writer.write(sample)
        writer.close()
    return root / name


def long_text(words: int) -> str:
    rng = random.Random(1)
    return " ".join(world.paragraph(rng, sentences=8) for _ in range(words // 60 + 1))


def chat(key: str, images_per_turn: list[int], system: str | None = "") -> Chat:
    """A chat with one exchange per entry of `images_per_turn`, the user turn holding that many
    images and no text (none at all when 0); `system=""`: an empty system turn, i.e. no system
    message at all."""
    turns = [Turn("system", system)] if system is not None else []
    for i, n in enumerate(images_per_turn):
        turns += [Turn("user", " ".join(["<image>"] * n)), Turn("assistant", f"A red circle {i}.")]
    return Chat(key=key, turns=turns, images=[png(i) for i in range(sum(images_per_turn))])


def built(tok, mode, sample, max_len):
    """What the builder does: 'ok', 'truncated' or 'too long'."""
    builder = SequenceBuilder(tok, SequenceRules(mode=mode, image_tokens=N, frame_tokens=M, max_len=max_len,
                                                 system_messages=dict(NO_SYSTEM)))
    try:
        sequences = builder.build(sample, random.Random(0))
    except ValueError as exc:
        assert "max_len" in str(exc), exc
        return "too long"
    assert sequences and all(len(s) <= max_len for s in sequences)
    return "truncated" if builder.truncated else "ok"


def flagged(folder, batch_sizes, max_len) -> bool:
    return check_visual_budget("test", [folder], batch_sizes, max_len, N, M, "skip") > 0


# Samples whose only text before their first answer (or in an uncuttable part) is empty: the
# builder rejects them at exactly the max_len the check computes from images and markers.
EXACT = {
    # 1 image before the first answer, then 4 more in later turns: truncated, not rejected.
    "chat_first_one": (lambda: chat("c1", [1, 2, 2]), "chat", CHAT_FIXED + BLOCK),
    "chat_first_three": (lambda: chat("c3", [3, 1]), "chat", CHAT_FIXED + 3 * BLOCK),
    "chat_no_image_first": (lambda: chat("c0", [0, 3]), "chat", None),  # a text question first
    "vqa": (lambda: VQA(key="q", question="", answers=["yes"], question_id=1, image_id=1, images=[png()]),
            "chat", CHAT_FIXED + BLOCK),
    "interleaved": (lambda: Interleaved(key="d", images=[png(0), png(1), png(2)], segments=[
        Segment(image=0), Segment(image=1), Segment(text=long_text(400)), Segment(image=2)]), "pretrain", BLOCK + 2),
    "text": (lambda: TextOnly(key="t", text=long_text(2000)), "pretrain", 3),
    "grounded": (lambda: Grounded(key="g", text="", phrases=[], images=[png()]), "pretrain", BLOCK + 3),
    "pair": (lambda: Pair(key="p", text="", images=[png()]), "pretrain", BLOCK + 2),
    "video_pair": (lambda: Pair(key="v", text="", media="video", images=[png(i) for i in range(3)]),
                   "pretrain", 3 + 3 * (M + 2)),
    "video_text": (lambda: VideoText(key="y", subtitles=["", ""], images=[png(0), png(1)]), "pretrain",
                   3 + 2 * (M + 2)),
}


@pytest.mark.parametrize("name", list(EXACT))
def test_check_flags_exactly_what_the_builder_rejects(tok, tmp_path, name):
    make, mode, shortest = EXACT[name]
    sample = make()
    folder = dataset(tmp_path, name, sample)
    types = CHAT_TYPES if mode == "chat" else PRETRAIN_TYPES
    # A chat whose first answer comes before any image needs only a few text tokens.
    low = shortest if shortest is not None else CHAT_FIXED
    for max_len in range(max(3, low - 3), low + 4 * BLOCK + 4):
        outcome = built(tok, mode, sample, max_len)
        assert flagged(folder, types, max_len) == (outcome == "too long"), (name, max_len, outcome)
        if shortest is not None:  # the check's bound is the builder's, to the token
            assert (outcome == "too long") == (max_len < shortest), (name, max_len, outcome)


def test_a_long_multi_image_chat_truncates_and_passes_the_check(tok, tmp_path):
    """The bug this guards against: every image of a chat was counted, so with too_long=error the
    instruct stage stopped before training on chats the builder truncates fine (Emu2 §2.3.1)."""
    sample = chat("long", [1] + [1, 0, 2] * 13, system=None)  # 40 exchanges, 40 images
    folder = dataset(tmp_path, "chats", sample)
    max_len = 4 * BLOCK + 200
    assert 40 * BLOCK > max_len  # all its images alone would not fit
    builder = SequenceBuilder(tok, SequenceRules(mode="chat", image_tokens=N, frame_tokens=M, max_len=max_len))
    [sequence] = builder.build(sample, random.Random(0))
    assert len(sequence) <= max_len and builder.truncated["chat"] == 1 and 0 < len(sequence.visuals) < 40
    assert check_visual_budget("instruct", [folder], CHAT_TYPES, max_len, N, M, "error") == 0


def test_academic_samples_need_their_one_image_before_the_answer(tmp_path):
    folder = dataset(tmp_path, "academic",
                     VQA(key="q1", question="What color?", answers=["red"], question_id=1, image_id=1, images=[png()]),
                     Captions(key="c1", image_id=2, captions=["A red circle."], images=[png(1)]))
    assert check_visual_budget("instruct", [folder], CHAT_TYPES, CHAT_FIXED + BLOCK, N, M, "error") == 0
    assert check_visual_budget("instruct", [folder], CHAT_TYPES, CHAT_FIXED + BLOCK - 1, N, M, "skip") == 2


def test_error_names_dataset_shard_key_and_rule(tmp_path):
    chats = dataset(tmp_path, "my-chats", chat("ok", [1, 4]), chat("crowded", [4, 1]))
    docs = dataset(tmp_path, "my-docs", Interleaved(key="doc7", images=[png()], segments=[
        Segment(text="a red circle"), Segment(image=0)]))
    max_len = CHAT_FIXED + 2 * BLOCK
    with pytest.raises(ConfigError) as info:
        check_visual_budget("instruct", [chats], CHAT_TYPES, max_len, N, M, "error")
    message = str(info.value)
    assert "instruct: 1 samples" in message and "instruct.sequence.max_len=" in message
    assert f"my-chats/shard-000000.tar:crowded (chat: {CHAT_FIXED + 4 * BLOCK} positions for" in message
    assert "[USER]: + 4 image(s) + [ASSISTANT]: + the first answer token" in message and ":ok " not in message
    assert "instruct.sequence.too_long=skip" in message
    with pytest.raises(ConfigError, match=rf"my-docs/shard-000000.tar:doc7 \(interleaved: {BLOCK + 2} positions "
                                          r"for <s> \+ one image block \+ </s>\)"):
        check_visual_budget("stage2", [docs], PRETRAIN_TYPES, BLOCK + 1, N, M, "error")


def test_text_only_never_fails_and_unused_types_are_not_checked(tmp_path):
    texts = dataset(tmp_path, "texts", TextOnly(key="t", text=long_text(3000)))
    assert check_visual_budget("stage2", [texts], {"text": 1}, 3, N, M, "error") == 0
    pairs = dataset(tmp_path, "pairs", Pair(key="p", text="a circle", images=[png()]))
    assert check_visual_budget("stage2", [pairs], {"image_text": 0, "text": 1}, 3, N, M, "error") == 0


def test_a_dataset_of_two_types_is_counted_once(tmp_path):
    """discover() lists a dataset under each of its types; its samples must not count twice."""
    folder = dataset(tmp_path, "mixed", Pair(key="img", text="x", images=[png()]),
                     Pair(key="vid", text="x", media="video", images=[png(0), png(1)]))
    assert check_visual_budget("stage1", [folder], {"image_text": 1, "video_text": 1}, 5, N, M, "skip") == 2
