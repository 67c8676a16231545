"""Samples longer than sequence.max_len train without error on the tiny preset (CPU, in-process):
a 5,000-token text is chunked in stage 2 (Emu2 App. A.1) and a 40-turn chat with 16 images is
truncated in chat tuning (§2.3.1), with the default too_long=error, and the pre-training check
(emu.train.preflight) lets both through. The data goes through the platform's own importers
(`--format text`, `--format llava`; docs/formats.md)."""

import json
import math
import random
from pathlib import Path

import pytest

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.importing import run_import
from emu.data.synth import world as shapes
from emu.model.io import load_model
from emu.train.config import InstructConfig, Stage2Config
from emu.train.stages import instruct, stage2

MAX_LEN = 256
LONG_TEXT_TOKENS = 5000
CHAT_ROUNDS, CHAT_IMAGES = 40, 16  # 16 images x 18 positions (4x4 pooling + markers) > MAX_LEN


def sentence(rng: random.Random) -> str:
    """A caption of the shapes world: words the stage-1 tokenizer was trained on."""
    text = shapes.caption(shapes.sample_scene(rng))
    return text[0].upper() + text[1:].rstrip(".") + "."


def imported(fmt: str, src: Path, out: Path) -> Path:
    summary = run_import(fmt, src, out, resolve(ImportConfig, "import", "tiny"))
    assert summary.rejected == 0, summary.rejects_by_rule
    return out


@pytest.fixture(scope="module")
def long_text(init_model, tmp_path_factory) -> Path:
    """A `--format text` dataset: one text of more than 5,000 tokens and three short ones."""
    root = tmp_path_factory.mktemp("text")
    _, tokenizer = load_model(init_model)
    rng = random.Random(0)
    sentences = []
    while len(tokenizer(" ".join(sentences), add_special_tokens=False).input_ids) < LONG_TEXT_TOKENS:
        sentences += [sentence(rng) for _ in range(50)]
    records = [{"id": "long", "text": " ".join(sentences)}]
    records += [{"id": f"short-{i}", "text": " ".join(sentence(rng) for _ in range(3))} for i in range(3)]
    (root / "src.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return imported("text", root / "src.jsonl", root / "shards")


@pytest.fixture(scope="module")
def long_chat(tmp_path_factory) -> Path:
    """A `--format llava` dataset: a 40-round chat about 16 images, and two one-round chats."""
    root = tmp_path_factory.mktemp("chat")
    (root / "images").mkdir()
    rng = random.Random(0)

    def image(name: str) -> str:
        (root / "images" / f"{name}.jpg").write_bytes(shapes.encode(shapes.render(shapes.sample_scene(rng)), "jpg"))
        return f"images/{name}.jpg"

    with_image = set(range(0, CHAT_ROUNDS, CHAT_ROUNDS // CHAT_IMAGES)[:CHAT_IMAGES])
    conversation, images = [], []
    for i in range(CHAT_ROUNDS):
        question = "What shapes are there?" if i % 2 else "Describe the image."
        if i in with_image:
            images.append(image(f"long-{i}"))
            question = f"<image>\n{question}"
        conversation += [{"from": "human", "value": question}, {"from": "gpt", "value": sentence(rng)}]
    records = [{"id": "long", "image": images, "conversations": conversation}]
    records += [{"id": f"short-{i}", "image": image(f"short-{i}"),
                 "conversations": [{"from": "human", "value": "<image>\nDescribe the image."},
                                   {"from": "gpt", "value": sentence(rng)}]} for i in range(2)]
    (root / "llava.json").write_text(json.dumps(records), encoding="utf-8")
    return imported("llava", root / "llava.json", root / "shards")


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_5000_token_text_trains_in_max_len_chunks(world, init_model, long_text, tmp_path):
    config = resolve(Stage2Config, "stage2", "tiny", [
        "steps=3", "batch_sizes={image_text: 2, text: 2}", f"sequence.max_len={MAX_LEN}",
        f"init={init_model}", "runtime.progress=false"])
    assert config.sequence.too_long == "error"
    result = stage2(config, [long_text, world / "img2dataset"], tmp_path)
    assert result.summary["steps"] == 3
    steps = records(tmp_path)
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert all(r["skipped_too_long"] == 0 for r in steps)
    # Two text samples per step over 4 texts: the long one is read in step 1 or 2, and every one
    # of its tokens is a target (chunks, not a truncation), so that step scores > 5,000 of them.
    assert max(r["text_targets"] for r in steps[:2]) > LONG_TEXT_TOKENS


def test_a_40_turn_multi_image_chat_is_truncated_and_trains(init_model, long_chat, tmp_path):
    config = resolve(InstructConfig, "instruct", "tiny", [
        "steps=3", "batch_sizes={chat: 2}", f"sequence.max_len={MAX_LEN}", f"init={init_model}",
        "runtime.progress=false"])
    assert config.sequence.too_long == "error"
    assert 2 + CHAT_IMAGES * ((config.image_tokens_side ** 2) + 2) > MAX_LEN  # all its images alone would not fit
    result = instruct(config, [long_chat], tmp_path)
    assert result.summary["steps"] == 3
    steps = records(tmp_path)
    assert len(steps) == 3 and all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in steps)
    assert all(r["skipped_too_long"] == 0 for r in steps)
    # Three chats, two a step: the long one is read in step 1 or 2 (`truncated` counts up).
    assert steps[1]["truncated"] >= 1 and steps[-1]["truncated"] >= 1
