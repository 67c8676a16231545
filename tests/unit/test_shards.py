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


@pytest.mark.parametrize("fields, message", [
    ({"kind": "text", "text": 5}, "field 'text' must be str, got 5"),
    ({"kind": "vqa", "question_id": 1, "image_id": 1, "question": "q", "answers": 5},
     "field 'answers' must be list[str]"),
    ({"kind": "vqa", "question_id": True, "image_id": 1, "question": "q", "answers": []},
     "field 'question_id' must be int"),
    ({"kind": "chat", "turns": [{"role": "user", "content": 3}]}, "field 'turns' must be list[Turn]"),
    ({"kind": "chat", "turns": [{"role": "robot", "content": "hi"}]}, "field 'turns' must be list[Turn]"),
    ({"kind": "gen", "condition": [{"text": "x"}], "target": "0"}, "field 'target' must be int"),
    ({"kind": "grounded", "text": "abc", "phrases": [{"start": 0, "end": 1, "boxes": [["a", 0, 1, 1]]}]},
     "field 'phrases' must be list[Phrase]"),
    ({"kind": "interleaved", "segments": [{"image": "0"}]}, "field 'segments' must be list[Segment]"),
    ({"kind": "text", "text": "x", "meta": []}, "field 'meta' must be dict"),
    ({"kind": "text", "text": "x", "image_members": [["0.png"]]}, "image_members must be a list of member names"),
])
def test_records_of_the_wrong_type_are_per_sample_problems(tmp_path, fields, message):
    """A shard written by anyone else (or corrupted) may hold well-formed JSON of the wrong types:
    reading it reports `record_invalid` for that sample instead of crashing a later stage."""
    from emu.data.shards import decode_sample
    from emu.validate.scan import shard_rows

    path = tmp_path / "shard-000000.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "bad.json", json.dumps({"key": "bad", "image_members": [], **fields}).encode())
        add(tar, "good.json", record("good"))
    raws = list(iter_raw_samples(path))
    with pytest.raises(SampleProblem, match="record_invalid") as err:
        decode_sample(raws[0])
    assert message in str(err.value)
    assert decode_sample(raws[1]).text == "hi"
    rows = list(shard_rows(path, max_pixels=10**6))  # the gate's scan: a row, not a crash
    assert rows[0]["structure_error"].startswith("record_invalid: ") and rows[1]["structure_error"] is None


def test_keys_with_a_trailing_newline_are_invalid(tmp_path):
    with ShardWriter(tmp_path / "ds", "test") as writer:
        with pytest.raises(SampleProblem, match="key_invalid"):
            writer.write(TextOnly(key="abc\n", text="x"))
        writer.close()
    path = tmp_path / "nl.tar"
    with tarfile.open(path, "w") as tar:
        add(tar, "abc\n.json", record("abc\n"))
    assert [p.rule for p in next(iter_raw_samples(path)).problems] == ["key_invalid"]


def test_a_field_that_is_not_unicode_is_a_sample_problem_not_a_crash(tmp_path):
    """JSON "\\ud800" parses to a lone surrogate, which cannot be written as UTF-8."""
    with ShardWriter(tmp_path / "ds", "test") as writer:
        with pytest.raises(SampleProblem, match="record_not_utf8"):
            writer.write(TextOnly(key="a", text="fine", meta={"note": "\ud800"}))
        writer.write(TextOnly(key="b", text="fine"))
        writer.close()
    assert [s.key for s in iter_samples(tmp_path / "ds")] == ["b"]


def test_manifest_rows_use_the_writers_pixel_limit(tmp_path):
    """The per-shard manifest must agree with the import's `max_image_pixels`, not the default."""
    import pyarrow.parquet as pq

    big = Image.new("RGB", (300, 200))
    out = io.BytesIO()
    big.save(out, format="PNG")
    sample = Pair(key="p", images=[out.getvalue()], text="x")
    for limit, error in ((50_000, "image_decompression_bomb"), (60_000, None)):
        ds = tmp_path / f"ds{limit}"
        with ShardWriter(ds, "test", max_image_pixels=limit) as writer:
            writer.write(sample)
            writer.close()
        row = pq.read_table(ds / "shard-000000.parquet").to_pylist()[0]
        assert (row["image_error"] or "").split(": ")[1:2] == ([error] if error else [])
