"""img2dataset, GRIT, WebVid and YT-Storyboard: synthetic writers and importers, end to end.

Each format is written by its synth writer in the public layout (docs/formats.md), imported with
the real runner, and read back from the shards: the round trip must be lossless against the files
on disk. Bad input is made by editing those files, and each case must end up in rejects.jsonl under
its rule and key while the rest of the source is still imported.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.formats.webvid import sample_indices
from emu.data.importing import TooFewKept, run_import
from emu.data.schema import Box, Grounded, Pair, Phrase, VideoText
from emu.data.synth import web_writers, world
from emu.data.synth.config import SynthConfig
from emu.errors import ConfigError, SourceError
from tests.unit._fixtures_web import (
    edit_json, files_of, import_source, rewrite_tar, samples_by_key, symlink, tar_members, write_tar)

# 12 pairs at 5 per file: three img2dataset shards, the last one short. 12 storyboard frames, so
# member order ("10.png" before "2.png") differs from frame order.
CONFIG = SynthConfig(pairs=12, grounded=8, videos=3, video_frames=12, storyboards=3, storyboard_frames=12,
                     records_per_file=5)
WRITERS = {"img2dataset": web_writers.write_img2dataset, "grit": web_writers.write_grit,
           "webvid": web_writers.write_webvid, "ytsb": web_writers.write_ytsb}
NOUN_CHUNK = re.compile(rf"^an? ({'|'.join(world.COLORS)}) ({'|'.join(world.SHAPES)})$")


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Each source written once; tests that edit a source work on a copy (`source`)."""
    root = tmp_path_factory.mktemp("written")
    return {fmt: (root / fmt, write(root / fmt, CONFIG)) for fmt, write in WRITERS.items()}


@pytest.fixture
def source(written, tmp_path):
    def copy(fmt: str) -> Path:
        target = tmp_path / "src" / fmt
        shutil.copytree(written[fmt][0], target)
        return target
    return copy


def reject_of(rejects: list[dict], key: str) -> dict:
    matches = [r for r in rejects if r["key"] == key]
    assert len(matches) == 1, f"expected one reject for {key!r}, got {rejects}"
    return matches[0]


# --------------------------------------------------------------------------------------------
# img2dataset

def test_img2dataset_round_trip(written, tmp_path):
    src, count = written["img2dataset"]
    summary, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert count == 12 and summary.samples == 12 and rejects == []
    expected = {}
    for tar in sorted(src.glob("*.tar")):
        for key, members in samples_by_key(tar_members(tar)).items():
            expected[key] = (tar.name, members)
    assert [s.key for s in samples] == list(expected)  # shard order, then tar order
    for sample in samples:
        tar_name, members = expected[sample.key]
        record = json.loads(members["json"])
        assert isinstance(sample, Pair) and sample.media == "image"
        assert sample.images == [members["jpg"]]
        assert sample.text == members["txt"].decode() == record["caption"]
        assert sample.source == f"{tar_name}:{sample.key}"
        assert sample.meta == {name: record[name] for name in
                               ("scene", "url", "original_width", "original_height", "sha256")}


def test_img2dataset_layout_matches_the_tool(written):
    """Keys are shard id + index (img2dataset's compute_key), json fields are the parquet columns in
    img2dataset's order, and _stats.json counts the shard."""
    src, _ = written["img2dataset"]
    assert sorted(p.name for p in src.iterdir()) == [
        f"0000{s}{ext}" for s in range(3) for ext in (".parquet", ".tar", "_stats.json")]
    for shard in range(3):
        members = samples_by_key(tar_members(src / f"0000{shard}.tar"))
        assert list(members) == [f"0000{shard}{i}" for i in range(len(members))]  # 5 + 1 digits
        table = pq.read_table(src / f"0000{shard}.parquet")
        assert table.column_names == ["scene", "caption", "url", "key", "status", "error_message", "width",
                                      "height", "original_width", "original_height", "exif", "sha256"]
        assert table.schema.field("width").type == pa.int32()
        records = [json.loads(m["json"]) for m in members.values()]
        assert table.to_pylist() == records
        assert all(list(r) == table.column_names for r in records)
        stats = json.loads((src / f"0000{shard}_stats.json").read_text())
        assert stats["successes"] == stats["count"] == len(members) == stats["status_dict"]["success"]


def test_img2dataset_failed_parquet_rows_are_rejected(source, tmp_path):
    src = source("img2dataset")
    table = pq.read_table(src / "00001.parquet")
    failed = {**table.slice(0, 1).to_pylist()[0], "key": "000019", "status": "failed_to_download",
              "error_message": "HTTP Error 404: Not Found", "width": None, "height": None, "sha256": None}
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist([failed], schema=table.schema)]),
                   src / "00001.parquet")

    summary, _, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert summary.samples == 12
    assert rejects == [{"source": "00001.parquet:000019", "key": "000019", "rule": "source_failed",
                        "message": f"img2dataset status 'failed_to_download' for {failed['url']!r}: "
                                   "HTTP Error 404: Not Found"}]


@pytest.mark.parametrize("change, rule", [
    (lambda r: r.update(width=float("nan")), "size_invalid"),
    (lambda r: r.update(height=-64), "size_invalid"),
    (lambda r: r.update(width=0), "size_invalid"),
    (lambda r: r.pop("height"), "size_invalid"),
    (lambda r: r.update(width=65), "size_mismatch"),
    (lambda r: r.update(key="000003"), "key_mismatch"),
], ids=["width_nan", "height_negative", "width_zero", "height_missing", "width_differs", "key_differs"])
def test_img2dataset_json_checks(source, tmp_path, change, rule):
    src = source("img2dataset")
    rewrite_tar(src / "00000.tar", edit_json("000002.json", change))

    summary, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    reject = reject_of(rejects, "000002")
    assert (reject["rule"], reject["source"]) == (rule, "00000.tar:000002")
    assert len(rejects) == 1 and summary.samples == 11 and "000002" not in {s.key for s in samples}


def test_img2dataset_resized_images_keep_the_download_hash(written, tmp_path):
    """As img2dataset writes with its defaults: the stored image is the download resized (and
    re-encoded), the json's sha256 is the download's. That hash cannot match and is no reject."""
    src, count = written["img2dataset"]
    summary, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert rejects == [] and summary.samples == count
    records = {key: json.loads(m["json"]) for tar in sorted(src.glob("*.tar"))
               for key, m in samples_by_key(tar_members(tar)).items()}
    for sample in samples:
        record = records[sample.key]
        assert Image.open(io.BytesIO(sample.images[0])).size == (record["width"], record["height"]) == (64, 64)
        assert record["original_width"] == record["original_height"] in (128, 192, 256)
        assert hashlib.sha256(sample.images[0]).hexdigest() != record["sha256"] == sample.meta["sha256"]


def test_img2dataset_verify_hash_checks_output_stored_as_downloaded(source, tmp_path):
    """`--resize_mode no --skip_reencode True` stores the download's bytes: there the hash must
    match (img2dataset.verify_hash), and a differing one is rejected by key."""
    src = source("img2dataset")
    for tar in sorted(src.glob("*.tar")):
        members = tar_members(tar)
        write_tar(tar, [(name, json.dumps({**json.loads(data), "sha256": hashlib.sha256(
            members[name.replace(".json", ".jpg")]).hexdigest()}).encode() if name.endswith(".json") else data)
            for name, data in members.items()])
    rewrite_tar(src / "00000.tar", edit_json("000002.json", lambda r: r.update(sha256="0" * 64)))

    assert import_source("img2dataset", src, tmp_path / "default")[2] == []
    summary, _, rejects = import_source("img2dataset", src, tmp_path / "verified", "img2dataset.verify_hash=true")

    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [
        ("000002", "image_hash_mismatch", "00000.tar:000002")]
    assert summary.samples == 11


def test_an_import_that_keeps_nothing_fails_with_its_reason(source, tmp_path):
    """Every sample rejected: no dataset (nothing for a pipeline to train on), rejects.jsonl kept,
    and the error names the rules."""
    src = source("img2dataset")
    for tar in sorted(src.glob("*.tar")):
        rewrite_tar(tar, lambda name, data: data.replace(b'"key": "0', b'"key": "x') if name.endswith(".json") else data)

    with pytest.raises(TooFewKept, match=r"img2dataset import of .* kept 0 of 12 records; rejected: "
                                         r"key_mismatch: 12; every reject is in .*rejects.jsonl"):
        run_import("img2dataset", src, tmp_path / "out", ImportConfig())

    assert not (tmp_path / "out" / "dataset.json").exists() and not list((tmp_path / "out").glob("*.tar"))
    rejects = (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()
    assert len(rejects) == 12 and all(json.loads(r)["rule"] == "key_mismatch" for r in rejects)


def test_min_kept_fraction(source, tmp_path):
    """Five of twelve samples broken: 58% kept. Download failures listed by the parquet do not
    count against the fraction (a crawl's loss, not the import's)."""
    src = source("img2dataset")
    rewrite_tar(src / "00000.tar", lambda name, data: data.replace(b'"key": "0', b'"key": "x')
                if name.endswith(".json") else data)
    table = pq.read_table(src / "00001.parquet")
    failed = [{**table.slice(0, 1).to_pylist()[0], "key": f"00001{9 - i}", "status": "failed_to_download"}
              for i in range(4)]
    pq.write_table(pa.concat_tables([table, pa.Table.from_pylist(failed, schema=table.schema)]),
                   src / "00001.parquet")

    summary, _, _ = import_source("img2dataset", src, tmp_path / "half", "min_kept_fraction=0.5")
    assert summary.samples == 7 and summary.rejects_by_rule == {"key_mismatch": 5, "source_failed": 4}
    with pytest.raises(TooFewKept, match=r"kept 7 of 12 records \(58.3%, below import.min_kept_fraction=0.75\)"):
        import_source("img2dataset", src, tmp_path / "most", "min_kept_fraction=0.75")


def test_cli_import_that_keeps_nothing_exits_non_zero(source, tmp_path):
    src = source("img2dataset")
    for tar in sorted(src.glob("*.tar")):
        rewrite_tar(tar, lambda name, data: b"" if name.endswith(".jpg") else data)
    emu = Path(sys.executable).with_name("emu")
    result = subprocess.run([str(emu), "data", "import", "--format", "img2dataset", "--src", str(src),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stdout
    assert "kept 0 of 12 records; rejected: image_empty: 12" in result.stderr
    assert "imported" not in result.stdout


@pytest.mark.parametrize("image, rule", [(b"", "image_empty"), (b"<!DOCTYPE html><html>", "image_not_image")])
def test_img2dataset_bad_image_bytes(source, tmp_path, image, rule):
    src = source("img2dataset")
    rewrite_tar(src / "00000.tar", lambda name, data: image if name == "000003.jpg" else data)

    summary, _, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert [(r["key"], r["rule"]) for r in rejects] == [("000003", rule)] and summary.samples == 11


def test_img2dataset_caption_must_be_utf8(source, tmp_path):
    src = source("img2dataset")
    rewrite_tar(src / "00000.tar", lambda name, data: b"caf\xe9" if name == "000001.txt" else data)

    _, _, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert [(r["key"], r["rule"]) for r in rejects] == [("000001", "text_not_utf8")]


def test_img2dataset_unsafe_members_are_rejected_per_sample(source, tmp_path):
    """A symlink and a `../` name never reach the disk or the shards; the samples they belong to
    are rejected and their neighbours imported."""
    src = source("img2dataset")
    members = tar_members(src / "00002.tar")
    write_tar(src / "00002.tar", [
        symlink("000020.jpg", "/etc/passwd"), ("000020.json", members["000020.json"]),
        ("000020.txt", members["000020.txt"]),
        ("../000021.jpg", members["000020.jpg"]), ("000021.json", members["000020.json"]),
        ("000022.jpg", members["000020.jpg"]),
        ("000022.json", members["000020.json"].replace(b'"key": "000020"', b'"key": "000022"')),
        ("000022.txt", members["000020.txt"]),
    ])

    summary, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert {(r["key"], r["rule"], r["source"]) for r in rejects} == {
        ("000020", "member_not_regular", "00002.tar:000020"),
        ("000021", "member_path_unsafe", "00002.tar:000021")}
    assert "000022" in {s.key for s in samples} and summary.samples == 11
    assert not (tmp_path / "000021.jpg").exists() and not (src.parent / "000021.jpg").exists()


def test_img2dataset_truncated_tar_keeps_complete_samples(source, tmp_path, caplog):
    src = source("img2dataset")
    data = (src / "00000.tar").read_bytes()
    (src / "00000.tar").write_bytes(data[: len(data) // 3])

    with caplog.at_level(logging.WARNING, logger="emu.data.formats.img2dataset"):
        summary, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert [r["rule"] for r in rejects] == ["shard_truncated"]
    assert rejects[0]["source"] == f"00000.tar:{rejects[0]['key']}"
    first_shard = [s.key for s in samples if s.source.startswith("00000.tar")]
    assert first_shard == [f"00000{i}" for i in range(len(first_shard))] and 0 < len(first_shard) < 5
    assert summary.samples == len(first_shard) + 7
    # The cut sample counts as found: it was there, but broken.
    assert (f"00000.tar: 00000_stats.json counts 5 successes but the tar holds {len(first_shard) + 1} samples"
            in caplog.text)


def test_img2dataset_sanitises_keys_and_rejects_collisions(tmp_path):
    image = world.encode(world.render(world.Scene(shapes=(world.Shape("circle", "red", 0, 0),))), "jpg")

    def sample(key: str) -> list[tuple[str, bytes]]:
        record = {"caption": "a red circle", "key": key, "status": "success", "width": 64, "height": 64}
        return [(f"{key}.jpg", image), (f"{key}.json", json.dumps(record).encode()), (f"{key}.txt", b"a red circle")]

    src = tmp_path / "src"
    src.mkdir()
    write_tar(src / "00000.tar", sample("a b") + sample("a_b") + sample("ok"))

    _, samples, rejects = import_source("img2dataset", src, tmp_path / "out")

    assert [s.key for s in samples] == ["a_b", "ok"] and samples[0].source == "00000.tar:a b"
    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [("a_b", "key_duplicate", "00000.tar:a_b")]


def test_img2dataset_unreadable_parquet_stops_the_import(source, tmp_path):
    src = source("img2dataset")
    (src / "00001.parquet").write_bytes(b"not a parquet file")

    with pytest.raises(SourceError, match=r"00001.parquet is not a readable parquet file"):
        run_import("img2dataset", src, tmp_path / "out", ImportConfig())
    assert not list((tmp_path / "out").glob("*.tar"))


def test_img2dataset_parquet_with_a_corrupt_footer_is_a_source_error(source, tmp_path):
    """A column name in the footer that is not UTF-8 makes pyarrow raise UnicodeDecodeError (found
    by fuzzing); it must be the one-line SourceError, not a traceback."""
    src = source("img2dataset")
    data = (src / "00001.parquet").read_bytes()
    assert b"original_width" in data
    (src / "00001.parquet").write_bytes(data.replace(b"original_width", b"original_\x9cidth"))

    with pytest.raises(SourceError, match=r"00001.parquet is not a readable parquet file"):
        run_import("img2dataset", src, tmp_path / "out", ImportConfig())


# --------------------------------------------------------------------------------------------
# GRIT

def _phrase(entry: list[float]) -> Phrase:
    start, end, x0, y0, x1, y1, score = entry
    return Phrase(start=int(start), end=int(end), boxes=(Box(x0, y0, x1, y1),), score=score)


def test_grit_round_trip(written, tmp_path):
    src, count = written["grit"]
    summary, samples, rejects = import_source("grit", src, tmp_path / "out")

    assert count == summary.samples == 8 and rejects == []
    sources = {key: m for tar in sorted(src.glob("*.tar")) for key, m in samples_by_key(tar_members(tar)).items()}
    for sample in samples:
        members = sources[sample.key]
        record = json.loads(members["json"])
        assert isinstance(sample, Grounded)
        assert sample.images == [members["jpg"]] and sample.text == members["txt"].decode()
        assert sample.phrases == [_phrase(e) for e in record["noun_chunks"]]
        assert sample.referring_expressions == [_phrase(e) for e in record["ref_exps"]]
        assert sample.meta == {"id": record["id"], "clip_similarity_vitb32": record["clip_similarity_vitb32"],
                               "clip_similarity_vitl14": record["clip_similarity_vitl14"], "url": record["url"],
                               "original_width": record["original_width"],
                               "original_height": record["original_height"], "sha256": record["sha256"],
                               "dropped_boxes": 0}
        for chunk, expression in zip(sample.phrases, sample.referring_expressions, strict=True):
            phrase = sample.text[chunk.start:chunk.end]
            assert NOUN_CHUNK.match(phrase), phrase
            assert sample.text[expression.start:expression.end].startswith(phrase + " ")
            assert chunk.boxes == expression.boxes and 0 <= chunk.boxes[0].x_min < chunk.boxes[0].x_max <= 1


def test_grit_min_box_score_drops_and_counts(written, tmp_path):
    src, _ = written["grit"]
    _, samples, _ = import_source("grit", src, tmp_path / "out", "grit.min_box_score=0.6")

    sources = {key: json.loads(m["json"]) for tar in sorted(src.glob("*.tar"))
               for key, m in samples_by_key(tar_members(tar)).items()}
    total_dropped = 0
    for sample in samples:
        record = sources[sample.key]
        assert sample.phrases == [_phrase(e) for e in record["noun_chunks"] if e[6] >= 0.6]
        assert sample.referring_expressions == [_phrase(e) for e in record["ref_exps"] if e[6] >= 0.6]
        low = sum(e[6] < 0.6 for e in record["noun_chunks"] + record["ref_exps"])
        assert sample.meta["dropped_boxes"] == low
        total_dropped += low
    assert total_dropped > 0


@pytest.mark.parametrize("entry, rule", [
    ([0, 5, 0.1, 0.1, 0.5], "box_malformed"),
    ([0, 5, 0.1, 0.1, 0.5, 0.5, 0.9, 1.0], "box_malformed"),
    ([0.5, 5, 0.1, 0.1, 0.5, 0.5, 0.9], "box_malformed"),
    ([0, 5, "0.1", 0.1, 0.5, 0.5, 0.9], "box_malformed"),
    ([0, 5, 0.1, float("nan"), 0.5, 0.5, 0.9], "box_not_finite"),
    ([0, 5, 0.1, 0.1, float("inf"), 0.5, 0.9], "box_not_finite"),
], ids=["six_numbers", "eight_numbers", "fractional_offset", "string_coordinate", "nan", "inf"])
def test_grit_bad_entries(source, tmp_path, entry, rule):
    src = source("grit")
    rewrite_tar(src / "00001.tar", edit_json("000012.json", lambda r: r["ref_exps"].append(entry)))

    summary, _, rejects = import_source("grit", src, tmp_path / "out")

    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [("000012", rule, "00001.tar:000012")]
    assert "ref_exps[" in rejects[0]["message"] and summary.samples == 7


def test_grit_out_of_range_boxes_are_kept_for_the_gate(source, tmp_path):
    src = source("grit")
    out_of_range = [[0, 999, -0.5, 0, 1.5, 1, 0.9]]  # span past the caption, box outside the image
    rewrite_tar(src / "00000.tar", edit_json("000000.json", lambda r: r.update(noun_chunks=out_of_range)))

    _, samples, rejects = import_source("grit", src, tmp_path / "out")

    assert rejects == [] and samples[0].phrases == [Phrase(0, 999, (Box(-0.5, 0, 1.5, 1),), 0.9)]


# --------------------------------------------------------------------------------------------
# WebVid

def _decode_all(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def _centroid(pixels: np.ndarray) -> tuple[float, float]:
    """Centre (x, y) of the pixels that differ from the background: where the shape is."""
    mask = np.abs(pixels.astype(int) - np.array(world.BACKGROUND)).sum(axis=2) > 60
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def test_webvid_round_trip(written, tmp_path):
    src, count = written["webvid"]
    summary, samples, rejects = import_source("webvid", src, tmp_path / "out")

    rows = (src / "results_synth.csv").read_text().splitlines()
    assert rows[0] == "videoid,contentUrl,duration,page_dir,name"
    assert count == summary.samples == len(rows) - 1 == 3 and rejects == []
    for line, (row, sample) in enumerate(zip(rows[1:], samples, strict=True), start=2):
        videoid, url, duration, page_dir, name = row.split(",")
        assert isinstance(sample, Pair) and sample.media == "video"
        assert (sample.key, sample.text, sample.source) == (videoid, name, f"results_synth.csv:{line}")
        assert duration == "PT00H00M03S" and sample.meta["duration_s"] == 3.0  # 12 frames at 4 fps
        assert sample.meta["contentUrl"] == url and sample.meta["page_dir"] == page_dir
        # The middle frame of each of 8 equal segments of 12 frames.
        assert sample.meta["frame_indices"] == sample_indices(12, 8) == [0, 2, 3, 5, 6, 8, 9, 11]
        decoded = _decode_all(src / "videos" / page_dir / f"{videoid}.mp4")
        assert len(decoded) == sample.meta["video_frames"] == 12
        frames = [np.asarray(Image.open(io.BytesIO(data))) for data in sample.images]
        assert all(data.startswith(b"\x89PNG") for data in sample.images)
        for frame, index in zip(frames, sample.meta["frame_indices"], strict=True):
            np.testing.assert_array_equal(frame, decoded[index])  # PNG keeps the decoded pixels exactly
        # Time order: the shape travels the way the caption says ("a red circle moves right.").
        direction = name.split()[-1].rstrip(".")
        axis, sign = {"right": (0, 1), "left": (0, -1), "down": (1, 1), "up": (1, -1)}[direction]
        track = [sign * _centroid(f)[axis] for f in frames]
        assert track == sorted(track) and track[-1] - track[0] > 30


def test_webvid_frame_options(written, tmp_path):
    src, _ = written["webvid"]
    _, samples, _ = import_source("webvid", src, tmp_path / "out", "webvid.num_frames=20", "webvid.frame_format=jpg")

    for sample in samples:
        assert len(sample.images) == 20 and all(d.startswith(b"\xff\xd8\xff") for d in sample.images)
        # 20 samples of a 12-frame video repeat frames, still in time order.
        assert sample.meta["frame_indices"] == sorted(sample.meta["frame_indices"]) == sample_indices(12, 20)


def test_webvid_frames_above_the_pixel_limit_are_refused_before_decoding(written, tmp_path):
    """A video's declared frame size is checked like an image's: a video decompression bomb."""
    src, _ = written["webvid"]
    with pytest.raises(TooFewKept, match="kept 0 of 3 records; rejected: image_decompression_bomb: 3"):
        import_source("webvid", src, tmp_path / "out", "max_image_pixels=1000")
    rejects = [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]
    assert {r["rule"] for r in rejects} == {"image_decompression_bomb"}
    assert "declares 64x64 frames" in rejects[0]["message"]


def test_webvid_bad_rows(source, tmp_path):
    src = source("webvid")
    csv_path = src / "results_synth.csv"
    header, first, second, third = csv_path.read_text().splitlines()
    videos = sorted((src / "videos").rglob("*.mp4"))
    videos[0].unlink()                                   # 1000000: video_missing
    videos[1].write_bytes(b"\x00\x00\x00\x18ftypmp42 garbage, not a video")  # 1000001: video_undecodable
    videos[2].rename(src / "videos" / "1000002.mp4")     # the flat layout is found too
    broken_duration = third.replace("PT00H00M03S", "3 seconds").replace("1000002", "1000003")
    shutil.copy(src / "videos" / "1000002.mp4", src / "videos" / "1000003.mp4")
    csv_path.write_text("\n".join([header, first, second, third, broken_duration]) + "\n")

    summary, samples, rejects = import_source("webvid", src, tmp_path / "out")

    assert [s.key for s in samples] == ["1000002"] and summary.samples == 1
    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [
        ("1000000", "video_missing", "results_synth.csv:2"),
        ("1000001", "video_undecodable", "results_synth.csv:3"),
        ("1000003", "duration_invalid", "results_synth.csv:5")]


def test_webvid_duration_must_agree_with_the_video(source, tmp_path):
    """The CSV's whole seconds may be rounded (within webvid.duration_tolerance_s of the 3 s
    videos); a duration that disagrees more is rejected by key, its neighbours imported."""
    src = source("webvid")
    csv_path = src / "results_synth.csv"
    header, first, second, third = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([header, first.replace("PT00H00M03S", "PT00H00M04S"),
                                   second.replace("PT00H00M03S", "PT00H01M00S"), third]) + "\n")

    summary, samples, rejects = import_source("webvid", src, tmp_path / "out")

    assert [s.key for s in samples] == ["1000000", "1000002"] and summary.samples == 2
    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [
        ("1000001", "duration_mismatch", "results_synth.csv:3")]
    assert rejects[0]["message"] == ("the CSV says PT00H01M00S (60 s) but 1000001.mp4 lasts 3.00 s "
                                     "(more than import.webvid.duration_tolerance_s=1 apart)")
    strict = import_source("webvid", src, tmp_path / "strict", "webvid.duration_tolerance_s=0.5")[2]
    assert [(r["key"], r["rule"]) for r in strict] == [("1000000", "duration_mismatch"),
                                                       ("1000001", "duration_mismatch")]


def test_webvid_csv_values_cannot_reach_outside_the_videos_folder(source, tmp_path):
    src = source("webvid")
    (src / "1000009.mp4").write_bytes(b"")  # would be found via page_dir ".."
    csv_path = src / "results_synth.csv"
    rows = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join([rows[0], "1000009,https://example.com/x.mp4,PT00H00M03S,..,a red circle moves up.",
                                   rows[1]]) + "\n")

    _, _, rejects = import_source("webvid", src, tmp_path / "out")

    assert [(r["key"], r["rule"]) for r in rejects] == [("1000009", "video_missing")]
    assert "not a plain name" in rejects[0]["message"]


def test_webvid_csv_without_the_webvid_header_is_a_source_error(tmp_path):
    (tmp_path / "src" / "videos").mkdir(parents=True)
    (tmp_path / "src" / "results.csv").write_text("id,caption\n1,a red circle\n")
    with pytest.raises(SourceError, match=r"results.csv lacks the WebVid column\(s\) videoid, contentUrl"):
        run_import("webvid", tmp_path / "src", tmp_path / "out", ImportConfig())


def test_webvid_counts_frames_when_the_container_does_not_store_them(source, tmp_path):
    """Matroska keeps no frame count in its header (PyAV's stream.frames is 0), so frames are
    counted by demuxing; the file name does not decide the container, FFmpeg probes the bytes."""
    src = source("webvid")
    (mp4,) = [p for p in (src / "videos").rglob("*.mp4") if p.stem == "1000000"]
    frames = [Image.fromarray(f) for f in _decode_all(mp4)]
    with av.open(str(mp4), "w", format="matroska") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height = frames[0].size
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_image(image)))
        container.mux(stream.encode())

    _, samples, rejects = import_source("webvid", src, tmp_path / "out")

    assert rejects == [] and samples[0].key == "1000000"
    assert samples[0].meta["video_frames"] == 12 and samples[0].meta["frame_indices"] == sample_indices(12, 8)


def test_webvid_without_videos_folder_is_a_source_error(source, tmp_path):
    src = source("webvid")
    shutil.rmtree(src / "videos")
    with pytest.raises(SourceError, match=r"no videos folder .*set import.webvid.videos_dir"):
        run_import("webvid", src, tmp_path / "out", ImportConfig())


def test_webvid_videos_dir_setting(source, tmp_path):
    src = source("webvid")
    (src / "videos").rename(tmp_path / "elsewhere")
    override = f"webvid.videos_dir={tmp_path / 'elsewhere'}"
    summary, _, rejects = import_source("webvid", src, tmp_path / "out", override)
    assert summary.samples == 3 and rejects == []


# --------------------------------------------------------------------------------------------
# YT-Storyboard

def test_ytsb_round_trip(written, tmp_path):
    src, count = written["ytsb"]
    summary, samples, rejects = import_source("ytsb", src, tmp_path / "out")

    assert count == summary.samples == 3 and rejects == []
    sources = samples_by_key(tar_members(src / "0000000.tar"))
    assert [s.key for s in samples] == list(sources)
    for sample in samples:
        members = sources[sample.key]
        meta = json.loads(members["final_meta.json"])
        assert isinstance(sample, VideoText) and sample.source == f"0000000.tar:{sample.key}"
        assert sample.meta == meta and meta["id"] == sample.key and meta["frame_num"] == 12
        assert sample.images == [members[f"{i}.png"] for i in range(12)]  # index order, not member order
        assert sample.subtitles == [members[f"{i}.txt"].decode() for i in range(12)]
        assert sample.trailing_text == members.get("12.txt", b"").decode()
        # The maker's merge: nothing precedes frame 0, and every subtitle lands once, in order.
        assert sample.subtitles[0] == ""
        spoken = [t for t in [*sample.subtitles, sample.trailing_text] if t]
        assert " ".join(spoken) == " ".join(s["text"] for s in meta["subtitle"])


def test_ytsb_frames_move_in_time_order(written, tmp_path):
    """Imported frames, in index order, show the shape gliding one grid cell at a time across the
    grid: a frame out of order would make it jump."""
    src, _ = written["ytsb"]
    _, samples, _ = import_source("ytsb", src, tmp_path / "out")
    for sample in samples:
        cells = []
        for data in sample.images:
            x, y = _centroid(np.asarray(Image.open(io.BytesIO(data))))
            cells.append((int(y * 3 // 64), int(x * 3 // 64)))
        assert len(set(cells)) == 3  # the shape crosses the grid
        steps = [abs(a[0] - b[0]) + abs(a[1] - b[1]) for a, b in zip(cells, cells[1:])]
        assert set(steps) <= {0, 1}  # one cell at a time, never jumping: frames are in order


@pytest.mark.parametrize("edit, rule", [
    (lambda vid: (lambda name, data: None if name == f"{vid}.3.png" else data), "frame_missing"),
    (lambda vid: edit_json(f"{vid}.final_meta.json", lambda m: m.update(frame_num=13)), "frame_count_mismatch"),
    (lambda vid: (lambda name, data: None if name == f"{vid}.final_meta.json" else data), "record_missing"),
    (lambda vid: (lambda name, data: None if name == f"{vid}.4.txt" else data), "subtitle_missing"),
    (lambda vid: (lambda name, data: b"\xff\xfe" if name == f"{vid}.2.txt" else data), "text_not_utf8"),
], ids=["gap", "frame_num", "no_final_meta", "no_txt", "txt_not_utf8"])
def test_ytsb_bad_storyboards(source, tmp_path, edit, rule):
    src = source("ytsb")
    vid = next(iter(samples_by_key(tar_members(src / "0000000.tar"))))
    rewrite_tar(src / "0000000.tar", edit(vid))

    summary, _, rejects = import_source("ytsb", src, tmp_path / "out")

    assert [(r["key"], r["rule"], r["source"]) for r in rejects] == [(vid, rule, f"0000000.tar:{vid}")]
    assert summary.samples == 2


# --------------------------------------------------------------------------------------------
# Unreadable sources, settings, CLI, determinism

@pytest.mark.parametrize("fmt", WRITERS)
def test_unreadable_source_raises(fmt, tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        run_import(fmt, tmp_path / "missing", tmp_path / "out1", ImportConfig())
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match=r"holds no .*\((\*\.tar|\*\.csv)\)"):
        run_import(fmt, tmp_path / "empty", tmp_path / "out2", ImportConfig())
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SourceError, match="must be a folder"):
        run_import(fmt, tmp_path / "file.txt", tmp_path / "out3", ImportConfig())


@pytest.mark.parametrize("override, message", [
    ("webvid.num_frames=0", "import.webvid.num_frames must be >= 1, got 0"),
    ("webvid.frame_format=gif", "import.webvid.frame_format must be one of png, jpg, got 'gif'"),
    ("webvid.videos_dir=", "import.webvid.videos_dir must not be empty"),
    ("webvid.duration_tolerance_s=-1", "import.webvid.duration_tolerance_s must be >= 0 seconds, got -1"),
    ("min_kept_fraction=1.5", r"import.min_kept_fraction must be in \[0, 1\], got 1.5"),
    ("grit.min_box_score=1.5", r"import.grit.min_box_score must be in \[0, 1\], got 1.5"),
    ("grit.min_box_score=.nan", r"'import.grit.min_box_score' in override 'grit.min_box_score=.nan': "
                                r"expected a finite number"),
])
def test_options_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        resolve(ImportConfig, "import", None, [override])


def test_cli_reports_an_unreadable_source_in_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    emu = Path(sys.executable).with_name("emu")
    result = subprocess.run([str(emu), "data", "import", "--format", "ytsb", "--src", str(tmp_path / "empty"),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: source {tmp_path / 'empty'} holds no YT-Storyboard shards (*.tar)"]


@pytest.mark.parametrize("fmt", WRITERS)
def test_writers_are_deterministic(fmt, written, tmp_path):
    src, count = written[fmt]
    assert WRITERS[fmt](tmp_path / fmt, CONFIG) == count
    assert files_of(tmp_path / fmt) == files_of(src)
    other_seed = tmp_path / "seed1"
    WRITERS[fmt](other_seed, SynthConfig(**{**CONFIG.__dict__, "seed": 1}))
    assert files_of(other_seed) != files_of(src)


def test_video_side_is_even_for_h264(tmp_path):
    config = SynthConfig(videos=1, video_frames=3, image_size=33)
    web_writers.write_webvid(tmp_path, config)
    (video,) = (tmp_path / "videos").rglob("*.mp4")
    frames = _decode_all(video)
    assert len(frames) == 3 and frames[0].shape == (32, 32, 3)


def test_ytsb_huge_frame_index_is_a_gap_not_an_allocation(source, tmp_path):
    """Frame indices come from member names: `{vid}.99999999999.png` is a gap to report, and must
    not size a set of every index below it (that exhausted memory)."""
    src = source("ytsb")
    vid = next(iter(samples_by_key(tar_members(src / "0000000.tar"))))
    # Frame 3 renamed to index 99999999999, kept inside its sample (members stay consecutive).
    huge = f"{vid}.99999999999.png"
    write_tar(src / "0000000.tar", [(huge if name == f"{vid}.3.png" else name, data)
                                    for name, data in tar_members(src / "0000000.tar").items()])

    summary, _, rejects = import_source("ytsb", src, tmp_path / "out")

    reject = reject_of(rejects, vid)
    assert reject["rule"] == "frame_missing"
    assert reject["message"] == "frame(s) 3 missing before frame 99999999999"
    assert summary.samples == 2
