"""Shard writing and reading: every sample kind round-trips; writes are atomic and deterministic;
the reader reports unsafe or malformed members per sample instead of raising."""

import io
import json
import tarfile

import pytest
from PIL import Image

from emu.data.schema import (VQA, Box, Captions, Chat, Gen, Grounded, Interleaved, Pair, Phrase, Segment,
                             TextOnly, Turn, VideoText)
from emu.data.shards import (DATASET_FILE, ShardWriter, SampleProblem, iter_raw_samples, iter_samples,
                             list_shards, read_index)
from emu.errors import DatasetError


def png(color=(255, 0, 0), size=(40, 40)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def jpg(color=(0, 0, 255)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(out, format="JPEG")
    return out.getvalue()


def every_kind() -> list:
    return [
        Pair(key="pair1", images=[png()], text="a red square.", source="x.tar:1", meta={"url": "u"}),
        Pair(key="vid1", images=[png((0, i * 30, 0)) for i in range(4)], text="moves", media="video"),
        Interleaved(key="doc1", images=[jpg(), png()], segments=[
            Segment(image=0), Segment(text="first"), Segment(text="second"), Segment(image=1)]),
        VideoText(key="yt1", images=[png(), png((1, 2, 3))], subtitles=["", "hello"], trailing_text="bye"),
        Grounded(key="g1", images=[jpg()], text="a red circle", phrases=[
            Phrase(0, 12, (Box(0.1, 0.2, 0.5, 0.6),), score=0.9)],
            referring_expressions=[Phrase(0, 12, (Box(0.1, 0.2, 0.5, 0.6), Box(0.0, 0.0, 1.0, 1.0)))]),
        TextOnly(key="t1", text="ünïcode text ✓"),
        Chat(key="c1", images=[png()], category="chat", turns=[
            Turn("system", "be brief"), Turn("user", "<image>\nwhat?"), Turn("assistant", "red")]),
        Gen(key="e1", images=[png(), png((0, 255, 0))], condition=[Segment(image=0), Segment(text="make it green")],
            target=1),
        VQA(key="q1", images=[jpg()], question_id=1, image_id=2, question="what color?",
            answers=["red"] * 10, multiple_choice_answer="red", question_type="what color", answer_type="other"),
        Captions(key="coco1", images=[jpg()], image_id=5, captions=["a", "b"]),
    ]


def write(tmp_path, samples, **kwargs):
    with ShardWriter(tmp_path / "ds", "test", **kwargs) as writer:
        for s in samples:
            writer.write(s)
        writer.close()
    return tmp_path / "ds"


def test_every_kind_round_trips_losslessly(tmp_path):
    samples = every_kind()
    ds = write(tmp_path, samples, samples_per_shard=3)
    back = list(iter_samples(ds))
    assert back == samples
    index = read_index(ds)
    assert index["samples"] == len(samples) and len(index["shards"]) == 4
    assert [p.name for p in list_shards(ds)] == [f"shard-00000{i}.tar" for i in range(4)]
    assert index["kinds"]["pair"] == 2


def test_shard_bytes_are_deterministic(tmp_path):
    a = write(tmp_path / "a", every_kind())
    b = write(tmp_path / "b", every_kind())
    assert (a / "shard-000000.tar").read_bytes() == (b / "shard-000000.tar").read_bytes()
    assert read_index(a)["shards"][0]["sha256"] == read_index(b)["shards"][0]["sha256"]


def test_max_shard_bytes_splits_shards(tmp_path):
    samples = [TextOnly(key=f"t{i}", text="x" * 1000) for i in range(10)]
    ds = write(tmp_path, samples, max_shard_bytes=3000)
    assert len(list_shards(ds)) >= 4
    assert [s.key for s in iter_samples(ds)] == [s.key for s in samples]


def test_failed_write_leaves_nothing_that_looks_valid(tmp_path):
    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "ds", "test", samples_per_shard=2) as writer:
            for s in every_kind()[:5]:
                writer.write(s)
            raise RuntimeError("crash mid-import")
    assert list((tmp_path / "ds").iterdir()) == []
    with pytest.raises(DatasetError, match="no dataset.json"):
        read_index(tmp_path / "ds")


def test_refuses_to_overwrite_a_dataset(tmp_path):
    ds = write(tmp_path, every_kind()[:1])
    before = (ds / DATASET_FILE).read_bytes()
    with pytest.raises(DatasetError, match="already holds a dataset"):
        write(tmp_path, every_kind()[:2])
    assert (ds / DATASET_FILE).read_bytes() == before


def test_writer_rejects_bad_and_duplicate_keys(tmp_path):
    with ShardWriter(tmp_path / "ds", "test") as writer:
        writer.write(TextOnly(key="a", text="x"))
        with pytest.raises(SampleProblem, match="key_duplicate"):
            writer.write(TextOnly(key="a", text="y"))
        with pytest.raises(SampleProblem, match="key_invalid"):
            writer.write(TextOnly(key="a.b", text="y"))
        writer.close()
    assert [s.key for s in iter_samples(tmp_path / "ds")] == ["a"]


def add(tar, name, data=b"x", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tar.addfile(info, io.BytesIO(data) if info.isfile() else None)


def record(key, **extra):
    return json.dumps({"kind": "text", "key": key, "text": "hi", "image_members": [], **extra}).encode()


def test_reader_reports_unsafe_members_per_sample(tmp_path):
    path = tmp_path / "bad.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "ok.json", record("ok"))
        add(tar, "link.json", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tar, "../escape.json", record("escape"))
        add(tar, "/abs.json", record("abs"))
        add(tar, "dup.json", record("dup"))
        add(tar, "dup.json", record("dup"))
        add(tar, "orphan.0.png", png())
        add(tar, "ok.json", record("ok"))
    raw = {r.key + str(i): r for i, r in enumerate(iter_raw_samples(path))}
    rules = {key: [p.rule for p in r.problems] for key, r in raw.items()}
    assert rules == {"ok0": [], "link1": ["member_not_regular"], "escape2": ["member_path_unsafe"],
                     "abs3": ["member_path_unsafe"], "dup4": ["member_duplicate"], "orphan5": [],
                     "ok6": ["key_duplicate"]}
    with pytest.raises(SampleProblem, match="record_missing"):
        from emu.data.shards import decode_sample
        decode_sample(raw["orphan5"])


def test_reader_reports_truncation_after_the_complete_samples(tmp_path):
    ds = write(tmp_path, [TextOnly(key=f"t{i}", text="y" * 3000) for i in range(5)])
    shard = list_shards(ds)[0]
    data = shard.read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    raws = list(iter_raw_samples(cut))
    assert [r.problems for r in raws[:-1]] == [[]] * (len(raws) - 1)
    assert raws[-1].problems[-1].rule == "shard_truncated"
