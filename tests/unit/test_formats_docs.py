"""MMC4, LLaVA, text, VQAv2 and COCO: the synthetic writers and the importers, end to end.

Each format is written by its synth writer, imported with the real runner, read back from the
shards and compared with the written source file by file: a lossless round trip. Then broken
sources, each expecting a named rule and key in rejects.jsonl while the import still completes.
"""

from __future__ import annotations

import json
import random
import struct
import subprocess
import sys
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from emu.config import resolve
from emu.data.formats import ImportConfig, coco, llava, mmc4, text, vqav2
from emu.data.importing import ImportSummary, run_import
from emu.data.schema import VQA, Captions, Chat, Gen, Interleaved, Sample, Segment, TextOnly
from emu.data.shards import iter_samples
from emu.data.synth import doc_writers, world
from emu.data.synth.config import SynthConfig
from emu.errors import ConfigError, SourceError

#: About a tenth of the default world: 13 documents in 3 shards, 26 chats, 6 VQA images ...
SMALL = SynthConfig(scale=0.1, records_per_file=5)
THRESHOLD = mmc4.Options().sim_threshold
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


@dataclass
class Imported:
    summary: ImportSummary
    samples: dict[str, Sample]
    rejects: list[dict[str, str]]

    def rules(self) -> dict[str, str]:
        """Rejected key -> rule."""
        return {r["key"]: r["rule"] for r in self.rejects}


def import_source(fmt: str, src: Path, out: Path, **options: Any) -> Imported:
    summary = run_import(fmt, src, out, ImportConfig(**options))
    samples = {s.key: s for s in iter_samples(out)}
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text(encoding="utf-8").splitlines()]
    assert summary.samples == len(samples) and summary.rejected == len(rejects)
    return Imported(summary, samples, rejects)


def write(writer, tmp_path: Path, name: str, config: SynthConfig = SMALL) -> tuple[Path, int]:
    src = tmp_path / name
    src.mkdir()
    return src, writer(src, config)


def jpeg() -> bytes:
    """A real image to place in hand-written sources."""
    return world.encode(world.render(world.sample_scene(random.Random(0))), "jpg")


def png_declaring(width: int, height: int) -> bytes:
    """A ~60-byte PNG whose header declares width x height pixels: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def jsonl_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [(number, json.loads(line)) for number, line in enumerate(lines, start=1)]


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- MMC4 -----------------------------------------------------------------------------------------

def expected_segments(doc: dict[str, Any]) -> list[tuple[str, str]]:
    """docs/formats.md: images at or above the threshold, each before its matched sentence, several
    on one sentence in image_info order; as ("image", image_name) / ("text", sentence)."""
    kept = [info for info in doc["image_info"] if info["matched_sim"] >= THRESHOLD]
    expected = []
    for index, sentence in enumerate(doc["text_list"]):
        expected += [("image", info["image_name"]) for info in kept if info["matched_text_index"] == index]
        expected.append(("text", sentence))
    return expected


def segments_of(sample: Interleaved) -> list[tuple[str, str]]:
    names = [info["image_name"] for info in sample.meta["image_info"]]
    return [("image", names[s.image]) if s.image is not None else ("text", s.text) for s in sample.segments]


def test_mmc4_round_trip_places_images_before_their_sentence_and_drops_low_similarity(tmp_path):
    src, written = write(doc_writers.write_mmc4, tmp_path, "mmc4")
    result = import_source("mmc4", src, tmp_path / "out")
    assert result.rejects == [] and len(result.samples) == written == SMALL.count("documents")
    shards = sorted(src.glob("docs_shard_*_v2.jsonl"))
    assert len(shards) == 3
    dropped = shared = reordered = 0
    for shard in shards:
        for number, doc in jsonl_records(shard):
            sample = result.samples[f"{shard.name.removesuffix('.jsonl')}-{number}"]
            assert isinstance(sample, Interleaved)
            assert sample.source == f"{shard.name}:{number}"
            assert segments_of(sample) == expected_segments(doc)
            assert [s.image for s in sample.segments if s.image is not None] == list(range(len(sample.images)))
            assert sample.images == [(src / "images" / info["image_name"]).read_bytes()
                                     for info in sample.meta["image_info"]]
            below = [info for info in doc["image_info"] if info["matched_sim"] < THRESHOLD]
            assert sample.meta["dropped_images"] == len(below)
            assert sample.meta["url"] == doc["url"]
            dropped += len(below)
            indices = [info["matched_text_index"] for info in doc["image_info"] if info["matched_sim"] >= THRESHOLD]
            shared += len(indices) != len(set(indices))
            reordered += indices != sorted(indices)
    # The synth world exercises the threshold, several images on one sentence, and image_info
    # order that differs from sentence order.
    assert dropped and shared and reordered


def test_mmc4_worked_example(tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    picture = jpeg()
    for name in "abcd":
        (src / "images" / f"{name * 12}.jpg").write_bytes(picture)
    doc = {"text_list": ["s0", "s1", "s2"], "url": "u", "could_have_url_duplicate": 0,
           "image_info": [{"image_name": "aaaaaaaaaaaa.jpg", "matched_text_index": 2, "matched_sim": 0.3},
                          {"image_name": "bbbbbbbbbbbb.jpg", "matched_text_index": 0, "matched_sim": 0.3},
                          {"image_name": "cccccccccccc.jpg", "matched_text_index": 2, "matched_sim": 0.24},
                          {"image_name": "dddddddddddd.jpg", "matched_text_index": 1, "matched_sim": 0.2399}]}
    (src / "docs_shard_0_v2.jsonl").write_text(json.dumps(doc) + "\n")
    sample = import_source("mmc4", src, tmp_path / "out").samples["docs_shard_0_v2-1"]
    assert sample.segments == [Segment(image=0), Segment(text="s0"), Segment(text="s1"),
                               Segment(image=1), Segment(image=2), Segment(text="s2")]
    assert [i["image_name"][0] for i in sample.meta["image_info"]] == ["b", "a", "c"]
    assert sample.meta["dropped_images"] == 1


def test_mmc4_reads_jsonl_zip(tmp_path):
    src, _ = write(doc_writers.write_mmc4, tmp_path, "mmc4")
    plain = import_source("mmc4", src, tmp_path / "plain").samples
    for shard in src.glob("*.jsonl"):
        with zipfile.ZipFile(shard.with_name(shard.name + ".zip"), "w", zipfile.ZIP_DEFLATED) as archive:
            archive.write(shard, shard.name)
        shard.unlink()
    zipped = import_source("mmc4", src, tmp_path / "zipped").samples
    assert zipped.keys() == plain.keys()
    for key, sample in zipped.items():
        assert sample.segments == plain[key].segments and sample.images == plain[key].images
        assert sample.source == plain[key].source.replace(".jsonl:", ".jsonl.zip:")


def bad_mmc4_source(tmp_path: Path) -> Path:
    """A small synth source plus `docs_shard_99_v2.jsonl`, one broken document per line."""
    src, _ = write(doc_writers.write_mmc4, tmp_path, "mmc4", SynthConfig(scale=0.02))
    images = src / "images"
    (images / "000000000000.jpg").write_bytes(jpeg())
    (images / "0000000empty.jpg").write_bytes(b"")
    (images / "00000000html.jpg").write_bytes(b"<html><body>Not Found</body></html>")
    (images / "00000000bomb.jpg").write_bytes(png_declaring(30000, 30000))

    def doc(*images: tuple[str, int, float], text_list=("first sentence.", "second sentence.")) -> str:
        return json.dumps({"text_list": list(text_list), "url": "https://example.com/page",
                           "image_info": [{"image_name": n, "matched_text_index": i, "matched_sim": s,
                                           "raw_url": "https://example.com/" + n, "face_detections": None}
                                          for n, i, s in images]})
    good = ("000000000000.jpg", 0, 0.3)
    lines = [
        doc(good),                                                  # 1 imported
        doc(good, ("000000000000.jpg", 2, 0.3)),                     # 2 index 2 of 2 sentences
        doc(good, ("00000missing.jpg", 1, 0.3)),                     # 3 missing file
        '{"text_list": ["unterminated"',                             # 4 not JSON
        doc(("0000000empty.jpg", 0, 0.3)),                           # 5 zero bytes
        doc(("00000000html.jpg", 0, 0.3)),                           # 6 HTML saved as .jpg
        doc(("00000000bomb.jpg", 0, 0.3)),                           # 7 30000x30000 declared
        doc(good, text_list=("caf@ first", "second")),               # 8 Latin-1 byte, not UTF-8
        doc(good, text_list=("first sentence.", "")),                # 9 empty sentence
        doc(("../../etc/hostname", 0, 0.3)),                         # 10 climbs out of images/
        doc(("000000000000.jpg", 0, 0.1)),                           # 11 nothing above threshold
        doc(("nul\x00.jpg", 0, 0.3)),                                 # 12 NUL in the name (the OS raises ValueError)
    ]
    data = "".join(line + "\n" for line in lines).encode().replace(b"caf@", b"caf\xe9")
    (src / "docs_shard_99_v2.jsonl").write_bytes(data)
    return src


BAD_MMC4_RULES = {
    "docs_shard_99_v2-2": "matched_text_index_in_range",
    "docs_shard_99_v2-3": "image_file_missing",
    "docs_shard_99_v2-4": "record_not_json",
    "docs_shard_99_v2-5": "image_empty",
    "docs_shard_99_v2-6": "image_not_image",
    "docs_shard_99_v2-7": "image_decompression_bomb",
    "docs_shard_99_v2-8": "text_not_utf8",
    "docs_shard_99_v2-9": "text_empty",
    "docs_shard_99_v2-10": "image_path_unsafe",
    "docs_shard_99_v2-11": "no_images",
    "docs_shard_99_v2-12": "image_path_unsafe",
}


def test_mmc4_bad_documents_are_rejected_with_their_rule(tmp_path):
    src = bad_mmc4_source(tmp_path)
    result = import_source("mmc4", src, tmp_path / "out")
    assert result.rules() == BAD_MMC4_RULES
    by_key = {r["key"]: r for r in result.rejects}
    assert by_key["docs_shard_99_v2-4"]["source"] == "docs_shard_99_v2.jsonl:4"
    assert "00000missing.jpg" in by_key["docs_shard_99_v2-3"]["message"]
    # Every good document of the source is still imported.
    assert len(result.samples) == SynthConfig(scale=0.02).count("documents") + 1
    assert "docs_shard_99_v2-1" in result.samples


def test_mmc4_missing_images_drop_keeps_the_document(tmp_path):
    src = bad_mmc4_source(tmp_path)
    result = import_source("mmc4", src, tmp_path / "out", mmc4=mmc4.Options(missing_images="drop"))
    assert result.rules() == {k: r for k, r in BAD_MMC4_RULES.items() if k != "docs_shard_99_v2-3"}
    kept = result.samples["docs_shard_99_v2-3"]
    assert len(kept.images) == 1 and kept.meta["missing_images"] == 1
    assert kept.segments == [Segment(image=0), Segment(text="first sentence."), Segment(text="second sentence.")]


# --- LLaVA ----------------------------------------------------------------------------------------

def test_llava_chat_round_trip(tmp_path):
    src, written = write(doc_writers.write_llava_chat, tmp_path, "llava-chat")
    result = import_source("llava", src, tmp_path / "out")
    records = json.loads((src / "llava_chat.json").read_text(encoding="utf-8"))
    assert result.rejects == [] and len(result.samples) == written == len(records)
    assert any("image" not in r for r in records) and any("image" in r for r in records)
    for index, record in enumerate(records):
        sample = result.samples[record["id"]]
        assert isinstance(sample, Chat) and sample.category == "chat"
        assert sample.source == f"llava_chat.json:{index}"
        assert [(t.role, t.content) for t in sample.turns] == [
            (ROLES[turn["from"]], turn["value"]) for turn in record["conversations"]]
        paths = [record["image"]] if "image" in record else []
        assert sample.images == [(src / p).read_bytes() for p in paths]
        assert sample.turns[0].content.startswith("<image>\n") == bool(paths)


def test_llava_edit_round_trip_is_gen(tmp_path):
    src, written = write(doc_writers.write_llava_edit, tmp_path, "llava-edit")
    result = import_source("llava", src / "llava_edit.json", tmp_path / "out")
    records = json.loads((src / "llava_edit.json").read_text(encoding="utf-8"))
    assert result.rejects == [] and len(result.samples) == written == len(records)
    for record in records:
        sample = result.samples[record["id"]]
        instruction = record["conversations"][0]["value"].removeprefix("<image>\n")
        assert isinstance(sample, Gen)
        assert sample.condition == [Segment(image=0), Segment(text=instruction)]
        assert sample.target == 1
        assert sample.images == [(src / p).read_bytes() for p in record["image"]]


def test_llava_multi_turn_gen_and_system_turn(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    picture = jpeg()
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (src / name).write_bytes(picture)
    records = [
        {"id": "g", "image": ["a.jpg", "b.jpg", "c.jpg"], "conversations": [
            {"from": "system", "value": "You edit pictures."},
            {"from": "human", "value": "<image>\n<image>\nmerge these"},
            {"from": "gpt", "value": "Which way?"},
            {"from": "human", "value": "side by side"},
            {"from": "gpt", "value": "<image>"}]},
        {"id": "s", "image": "a.jpg", "conversations": [
            {"from": "system", "value": "Be brief."},
            {"from": "human", "value": "<image>\nWhat is it?"},
            {"from": "gpt", "value": "Shapes."}]},
    ]
    (src / "data.json").write_text(json.dumps(records))
    result = import_source("llava", src, tmp_path / "out", llava=llava.Options(category="vqa"))
    gen = result.samples["g"]
    assert isinstance(gen, Gen) and gen.target == 2 and gen.meta["system"] == "You edit pictures."
    assert gen.condition == [Segment(image=0), Segment(image=1), Segment(text="merge these"),
                             Segment(text="Which way?"), Segment(text="side by side")]
    chat = result.samples["s"]
    assert isinstance(chat, Chat) and chat.category == "vqa"
    assert [t.role for t in chat.turns] == ["system", "user", "assistant"]


def test_llava_bad_records(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok.jpg").write_bytes(jpeg())
    chat = [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Hello."}]
    records = [
        {"id": "ok", "image": "ok.jpg", "conversations": chat},
        {"id": "missing", "image": "gone.jpg", "conversations": chat},
        {"id": "bad-role", "image": "ok.jpg", "conversations": [{"from": "bot", "value": "x"}]},
        {"id": "bad-list", "image": "ok.jpg", "conversations": "Hi"},
        {"id": "no-value", "conversations": [{"from": "human"}]},
        {"id": "gen-no-target", "conversations": [{"from": "human", "value": "draw"},
                                                  {"from": "gpt", "value": "<image>"}]},
        {"id": "bad-image", "image": 7, "conversations": chat},
        ["not", "a", "record"],
    ]
    (src / "data.json").write_text(json.dumps(records))
    result = import_source("llava", src, tmp_path / "out")
    assert list(result.samples) == ["ok"]
    assert result.rules() == {"missing": "image_file_missing", "bad-role": "conversations_invalid",
                              "bad-list": "conversations_invalid", "no-value": "conversations_invalid",
                              "gen-no-target": "conversations_invalid", "bad-image": "record_invalid",
                              "data-7": "record_invalid"}
    assert {r["key"]: r["source"] for r in result.rejects}["missing"] == "data.json:1"


def test_llava_images_beside_the_json(tmp_path):
    """LLaVA-Pretrain's layout: blip_laion_cc_sbu_558k.json beside images/, record paths relative
    to images/. Found without a setting; a missing image's reject says where it was looked for."""
    src = tmp_path / "LLaVA-Pretrain"
    (src / "images" / "00453").mkdir(parents=True)
    (src / "images" / "00453" / "004539375.jpg").write_bytes(jpeg())
    chat = [{"from": "human", "value": "<image>\nDescribe it."}, {"from": "gpt", "value": "Shapes."}]
    records = [{"id": "004539375", "image": "00453/004539375.jpg", "conversations": chat},
               {"id": "gone", "image": "00453/missing.jpg", "conversations": chat}]
    (src / "blip_laion_cc_sbu_558k.json").write_text(json.dumps(records))

    result = import_source("llava", src / "blip_laion_cc_sbu_558k.json", tmp_path / "out")

    assert list(result.samples) == ["004539375"] and result.rules() == {"gone": "image_file_missing"}
    assert result.rejects[0]["message"] == (
        f"image file 00453/missing.jpg not found: looked for any of {src}/00453/missing.jpg, "
        f"{src}/images/00453/missing.jpg (set import.llava.image_folder or --images)")


# --- text -----------------------------------------------------------------------------------------

def test_text_round_trip(tmp_path):
    src, written = write(doc_writers.write_text, tmp_path, "text")
    result = import_source("text", src, tmp_path / "out")
    files = sorted(src.glob("*.jsonl"))
    assert result.rejects == [] and len(result.samples) == written and len(files) == 6
    for path in files:
        for number, record in jsonl_records(path):
            sample = result.samples[record["id"]]
            assert isinstance(sample, TextOnly) and sample.text == record["text"]
            assert sample.source == f"{path.name}:{number}" and sample.meta == {"id": record["id"]}


def test_text_bad_lines(tmp_path):
    src = tmp_path / "dump.jsonl"
    src.write_bytes(b"\n".join([
        b'{"id": "a/1", "text": "kept, key sanitised", "lang": "en"}',
        b'{"text": "no id: key from file and line"}',
        b'{"id": "utf", "text": "caf\xe9"}',
        b'{"id": "empty", "text": "  "}',
        b"not json",
        b'{"id": "field", "body": "wrong field"}',
        b"[1, 2]",
        b"",
    ]))
    result = import_source("text", src, tmp_path / "out")
    assert result.samples["a_1"].text == "kept, key sanitised"
    assert result.samples["a_1"].meta == {"id": "a/1", "lang": "en"}
    assert result.samples["dump-2"].source == "dump.jsonl:2"
    assert result.rules() == {"dump-3": "text_not_utf8", "empty": "text_empty", "dump-5": "record_not_json",
                              "dump-6": "record_invalid", "dump-7": "record_invalid"}
    renamed = import_source("text", src, tmp_path / "out-body", text=text.Options(field="body"))
    assert renamed.samples["field"].text == "wrong field"


def test_text_lone_surrogates_are_rejected_per_sample(tmp_path):
    """JSON may escape a lone surrogate ("\\ud800"), which no UTF-8 file can hold: in a field kept in
    meta, or in a file name that is not UTF-8, it must cost one sample, not the import."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.jsonl").write_text('{"id": "m", "text": "ok", "note": "\\ud800"}\n{"id": "k", "text": "kept"}\n')
    (src / "b\udcff.jsonl").write_text('{"id": "e", "text": " "}\n')  # the name's byte 0xff is not UTF-8
    result = import_source("text", src, tmp_path / "out")
    assert list(result.samples) == ["k"]
    assert result.rules() == {"m": "record_not_utf8", "e": "text_empty"}
    assert [r["source"] for r in result.rejects] == ["a.jsonl:1", "b\udcff.jsonl:1"]


# --- VQAv2 ----------------------------------------------------------------------------------------

def test_vqav2_round_trip(tmp_path):
    src, written = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    result = import_source("vqav2", src, tmp_path / "out")
    split = doc_writers.EVAL_SPLIT
    questions = json.loads((src / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())
    annotations = json.loads((src / f"v2_mscoco_{split}_annotations.json").read_text())
    assert set(questions) == {"info", "task_type", "data_type", "data_subtype", "questions", "license"}
    assert set(annotations) == {"info", "license", "data_type", "data_subtype", "annotations"}
    assert result.rejects == [] and len(result.samples) == written == len(questions["questions"])
    by_id = {a["question_id"]: a for a in annotations["annotations"]}
    for question in questions["questions"]:
        sample = result.samples[f"q{question['question_id']}"]
        annotation = by_id[question["question_id"]]
        assert isinstance(sample, VQA)
        assert (sample.question, sample.image_id) == (question["question"], question["image_id"])
        assert sample.answers == [a["answer"] for a in annotation["answers"]] and len(sample.answers) == 10
        assert [a["answer_id"] for a in annotation["answers"]] == list(range(1, 11))
        assert (sample.multiple_choice_answer, sample.question_type, sample.answer_type) == (
            annotation["multiple_choice_answer"], annotation["question_type"], annotation["answer_type"])
        assert sample.meta["answer_confidence"] == [a["answer_confidence"] for a in annotation["answers"]]
        image = src / split / f"COCO_{split}_{question['image_id']:012d}.jpg"
        assert sample.images == [image.read_bytes()]
    assert {s.answer_type for s in result.samples.values()} == {"yes/no", "number", "other"}


def test_vqav2_question_without_annotation_or_image(tmp_path):
    src, written = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    split = doc_writers.EVAL_SPLIT
    path = src / f"v2_mscoco_{split}_annotations.json"
    annotations = json.loads(path.read_text())
    unanswered = annotations["annotations"].pop(0)["question_id"]
    path.write_text(json.dumps(annotations))
    questions = json.loads((src / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())["questions"]
    lost_image = questions[-1]["image_id"]
    (src / split / f"COCO_{split}_{lost_image:012d}.jpg").unlink()
    result = import_source("vqav2", src, tmp_path / "out")
    lost = {f"q{q['question_id']}" for q in questions if q["image_id"] == lost_image}
    assert result.rules() == {f"q{unanswered}": "annotation_missing", **dict.fromkeys(lost, "image_file_missing")}
    assert len(result.samples) == written - 1 - len(lost)


def test_vqav2_explicit_files_anywhere(tmp_path):
    """The three parts under names and folders of the user's choosing: SRC is the questions file,
    the annotations file and image folder are settings; images named as COCO 2017 names them."""
    src, written = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    split = doc_writers.EVAL_SPLIT
    (tmp_path / "mine").mkdir()
    questions = (src / f"v2_OpenEnded_mscoco_{split}_questions.json").rename(tmp_path / "mine" / "questions.json")
    annotations = (src / f"v2_mscoco_{split}_annotations.json").rename(tmp_path / "answers.json")
    pictures = tmp_path / "coco2017"
    pictures.mkdir()
    for image in (src / split).iterdir():
        image.rename(pictures / image.name.removeprefix(f"COCO_{split}_"))

    result = import_source("vqav2", questions, tmp_path / "out", vqav2=vqav2.Options(
        annotations=str(annotations), images_dir=str(pictures)))

    assert result.rejects == [] and len(result.samples) == written
    sample = next(iter(result.samples.values()))
    assert sample.source.startswith("questions.json:") and sample.meta["data_subtype"] == split
    assert sample.images == [(pictures / f"{sample.image_id:012d}.jpg").read_bytes()]


def test_vqav2_vqa_api_layout(tmp_path):
    """The VQA API repository's layout: Questions/, Annotations/, Images/mscoco/{subtype}/."""
    src, written = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    split = doc_writers.EVAL_SPLIT
    for folder, name in (("Questions", f"v2_OpenEnded_mscoco_{split}_questions.json"),
                         ("Annotations", f"v2_mscoco_{split}_annotations.json")):
        (src / folder).mkdir()
        (src / name).rename(src / folder / name)
    (src / "Images" / "mscoco").mkdir(parents=True)
    (src / split).rename(src / "Images" / "mscoco" / split)

    result = import_source("vqav2", src, tmp_path / "out")

    assert result.rejects == [] and len(result.samples) == written
    assert next(iter(result.samples.values())).source.startswith(f"Questions/v2_OpenEnded_mscoco_{split}_questions")


def test_vqav2_missing_image_says_where_it_looked(tmp_path):
    src, _ = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    split = doc_writers.EVAL_SPLIT
    image_id = json.loads((src / f"v2_OpenEnded_mscoco_{split}_questions.json").read_text())["questions"][0]["image_id"]
    (src / split / f"COCO_{split}_{image_id:012d}.jpg").unlink()

    result = import_source("vqav2", src, tmp_path / "out")

    message = next(r["message"] for r in result.rejects if r["rule"] == "image_file_missing")
    name = f"COCO_{split}_{image_id:012d}.jpg"
    assert message.startswith(f"image file {name} not found: looked for any of {src}/{split}/{name}, "
                              f"{src}/{split}/{image_id:012d}.jpg, {src}/Images/mscoco/{split}/{name}")
    assert message.endswith("(set import.vqav2.images_dir or --images)")


def test_cli_import_flags_name_explicit_files(tmp_path):
    """`emu data import --questions --annotations --images`, relative to where the command runs."""
    src, written = write(doc_writers.write_vqav2, tmp_path, "vqav2")
    split = doc_writers.EVAL_SPLIT
    (src / f"v2_mscoco_{split}_annotations.json").rename(tmp_path / "a.json")
    (src / split).rename(tmp_path / "pics")
    emu = Path(sys.executable).with_name("emu")
    done = subprocess.run([str(emu), "data", "import", "--format", "vqav2", "--src", "vqav2",
                           "--questions", f"vqav2/v2_OpenEnded_mscoco_{split}_questions.json",
                           "--annotations", "a.json", "--images", "pics", "--out", "out"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"imported {written} samples into 1 shards") and "rejected 0" in done.stdout
    wrong = subprocess.run([str(emu), "data", "import", "--format", "text", "--src", "vqav2", "--questions", "q.json",
                            "--out", "out2"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == "error: --questions is for --format vqav2, not text"


# --- COCO -----------------------------------------------------------------------------------------

def test_coco_round_trip(tmp_path):
    src, written = write(doc_writers.write_coco, tmp_path, "coco")
    result = import_source("coco", src, tmp_path / "out")
    split = doc_writers.EVAL_SPLIT
    data = json.loads((src / "annotations" / f"captions_{split}.json").read_text())
    assert list(data) == ["info", "images", "licenses", "annotations"]
    assert result.rejects == [] and len(result.samples) == written == len(data["images"])
    for image in data["images"]:
        sample = result.samples[f"coco{image['id']}"]
        expected = [a for a in data["annotations"] if a["image_id"] == image["id"]]
        assert isinstance(sample, Captions) and sample.image_id == image["id"]
        assert sample.captions == [a["caption"] for a in expected]
        assert len(sample.captions) == SMALL.captions_per_image
        assert sample.meta["caption_ids"] == [a["id"] for a in expected]
        assert sample.images == [(src / split / image["file_name"]).read_bytes()]
        assert sample.source == f"annotations/captions_{split}.json:{image['id']}"
    # Annotations are not grouped by image, as in COCO: grouping must keep annotation order.
    assert [a["image_id"] for a in data["annotations"]] != sorted(a["image_id"] for a in data["annotations"])


def test_coco_image_without_captions_and_captions_without_image(tmp_path):
    src, written = write(doc_writers.write_coco, tmp_path, "coco")
    path = src / "annotations" / f"captions_{doc_writers.EVAL_SPLIT}.json"
    data = json.loads(path.read_text())
    orphan = dict(data["images"][0], id=999)
    data["images"].append(orphan)
    data["annotations"].append({"image_id": 12345, "id": 10**6, "caption": "a caption of no listed image"})
    gone = data["images"][1]
    (src / doc_writers.EVAL_SPLIT / gone["file_name"]).unlink()
    path.write_text(json.dumps(data))
    result = import_source("coco", src, tmp_path / "out")
    assert result.rules() == {"coco999": "captions_missing", f"coco{gone['id']}": "image_file_missing",
                              "coco12345": "image_missing"}
    assert len(result.samples) == written - 1


def test_coco_explicit_captions_file(tmp_path):
    """SRC is a captions file of any name, the images folder a setting."""
    src, written = write(doc_writers.write_coco, tmp_path, "coco")
    split = doc_writers.EVAL_SPLIT
    captions = (src / "annotations" / f"captions_{split}.json").rename(tmp_path / "my_captions.json")
    (src / split).rename(tmp_path / "photos")

    result = import_source("coco", captions, tmp_path / "out", coco=coco.Options(images_dir="photos"))

    assert result.rejects == [] and len(result.samples) == written
    sample = next(iter(result.samples.values()))
    assert sample.source.startswith("my_captions.json:") and sample.meta["split"] == "my_captions"


def test_coco_official_captions_file_finds_its_images(tmp_path):
    """SRC = annotations/captions_val2014.json of the official layout: the images are found in
    val2014/ beside annotations/, and also in images/val2014/."""
    src, written = write(doc_writers.write_coco, tmp_path, "coco")
    split = doc_writers.EVAL_SPLIT
    result = import_source("coco", src / "annotations" / f"captions_{split}.json", tmp_path / "out")
    assert result.rejects == [] and len(result.samples) == written

    (src / "images").mkdir()
    (src / split).rename(src / "images" / split)
    moved = import_source("coco", src, tmp_path / "out2")
    assert moved.rejects == [] and len(moved.samples) == written


# --- unreadable sources, settings, determinism ----------------------------------------------------

def make(path: Path, content: str | None = None) -> Path:
    """A file with `content`, or a folder when content is None; parents are created."""
    if content is None:
        path.mkdir(parents=True)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content)
    return path


UNREADABLE_SOURCES = {
    "mmc4 folder without shards": ("mmc4", lambda d: make(d / "empty")),
    "mmc4 source missing": ("mmc4", lambda d: d / "does-not-exist"),
    "text file that is not jsonl": ("text", lambda d: make(d / "notes.txt", "hello")),
    "llava object, not a list": ("llava", lambda d: make(d / "dict.json", '{"conversations": []}')),
    "llava truncated JSON": ("llava", lambda d: make(d / "broken.json", '[{"id": "a", "conversations": []}, {"id": ')),
    "llava folder without json": ("llava", lambda d: make(d / "empty")),
    "vqav2 questions without annotations": (
        "vqav2", lambda d: make(d / "q" / "v2_OpenEnded_mscoco_test2015_questions.json", '{"questions": []}').parent),
    "vqav2 folder without questions": ("vqav2", lambda d: make(d / "empty")),
    "coco folder without annotations": ("coco", lambda d: make(d / "empty")),
    "coco annotations not an object": ("coco", lambda d: make(d / "c" / "annotations" / "captions_val2014.json", "[]")
                                       .parent.parent),
}


@pytest.mark.parametrize("case", UNREADABLE_SOURCES)
def test_unreadable_sources_raise_source_error(tmp_path, case):
    fmt, make_source = UNREADABLE_SOURCES[case]
    with pytest.raises(SourceError) as caught:
        run_import(fmt, make_source(tmp_path), tmp_path / "out", ImportConfig())
    assert "\n" not in str(caught.value)


def test_cli_exits_non_zero_with_one_line_reason(tmp_path):
    (tmp_path / "dict.json").write_text('{"conversations": []}')
    emu = Path(sys.executable).with_name("emu")
    done = subprocess.run([str(emu), "data", "import", "--format", "llava", "--src", str(tmp_path / "dict.json"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "JSON array of LLaVA records" in lines[0]


@pytest.mark.parametrize("override, setting", [
    ("mmc4.sim_threshold=30", "import.mmc4.sim_threshold"),
    ("mmc4.missing_images=skip", "import.mmc4.missing_images"),
    ("text.field=", "import.text.field"),
    ("llava.category=", "import.llava.category"),
    ("vqav2.images_dir=", "import.vqav2.images_dir"),
    ("vqav2.annotations=", "import.vqav2.annotations"),
    ("coco.annotations=", "import.coco.annotations"),
])
def test_bad_settings_name_the_setting(override, setting):
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        resolve(ImportConfig, "import", None, [override])


@pytest.mark.parametrize("writer", [doc_writers.write_mmc4, doc_writers.write_llava_chat, doc_writers.write_llava_edit,
                                    doc_writers.write_text, doc_writers.write_vqav2, doc_writers.write_coco])
def test_writers_are_deterministic(tmp_path, writer):
    first, n_first = write(writer, tmp_path, "first")
    second, n_second = write(writer, tmp_path, "second")
    assert n_first == n_second > 0
    assert files_of(first) == files_of(second)
    other, _ = write(writer, tmp_path, "other-seed", SynthConfig(scale=SMALL.scale, records_per_file=5, seed=1))
    assert files_of(other) != files_of(first)


def test_dataset_json_is_written_last_and_a_failed_import_leaves_nothing(tmp_path, monkeypatch):
    """dataset.json is the commit point: rejects.jsonl and import.config.yaml exist before it, and
    an import that fails at the very end leaves none of them (nor a shard) behind."""
    import emu.data.shards as shards

    src = tmp_path / "t.jsonl"
    src.write_text('{"text": "kept"}\n{"text": ""}\n')
    seen = []
    atomic_write = shards._atomic_write_bytes

    def spy(path, data):
        seen.append(sorted(p.name for p in path.parent.iterdir()))
        atomic_write(path, data)
    monkeypatch.setattr(shards, "_atomic_write_bytes", spy)
    import_source("text", src, tmp_path / "ok")
    assert seen == [["import.config.yaml", "rejects.jsonl", "shard-000000.parquet", "shard-000000.tar"]]

    def fail(path, data):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(shards, "_atomic_write_bytes", fail)
    with pytest.raises(OSError, match="No space left"):
        run_import("text", src, tmp_path / "failed", ImportConfig())
    assert list((tmp_path / "failed").iterdir()) == []
