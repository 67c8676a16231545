"""The validation gate end to end: valid data passes; each class of bad input fails naming the
right rule, shard and key; exit codes through the real `emu` console script.

Great Expectations runs cost seconds each, so one gate run covers every bad-input class at once
(each defect sits in its own dataset, shard and key), and the tests below read its report.
"""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from emu.cli import app
from emu.data.schema import (VQA, Box, Captions, Chat, Gen, Grounded, Interleaved, Pair, Phrase, Segment,
                             TextOnly, Turn, VideoText)
from emu.data.shards import ShardWriter, encode_sample, file_sha256
from emu.validate import ValidateConfig
from emu.validate.gate import run_gate

EMU = Path(sys.executable).parent / "emu"


# ---------------------------------------------------------------------------------------------
# Data builders


def png(width: int = 48, height: int = 48, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return buffer.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid 1x1 PNG whose header declares `width` x `height` (CRC fixed): a decompression bomb."""
    data = bytearray(png(1, 1))
    chunk = b"IHDR" + struct.pack(">II", width, height) + bytes(data[24:29])
    data[12:29] = chunk
    data[29:33] = struct.pack(">I", zlib.crc32(chunk))
    return bytes(data)


def good_samples(prefix: str) -> list:
    """One valid sample of every kind (and a video pair)."""
    box = Box(0.1, 0.2, 0.6, 0.7)
    return [
        Pair(key=f"{prefix}pair", text="a red circle", images=[png()]),
        Pair(key=f"{prefix}video", text="a circle moves", media="video", images=[png()] * 4),
        Interleaved(key=f"{prefix}doc", images=[png()],
                    segments=[Segment(text="A page."), Segment(image=0), Segment(text="More text.")]),
        VideoText(key=f"{prefix}vt", images=[png()] * 3, subtitles=["hello", "", "there"], trailing_text="bye"),
        Grounded(key=f"{prefix}grit", text="a red circle", images=[png()],
                 phrases=[Phrase(start=2, end=12, boxes=(box,))]),
        TextOnly(key=f"{prefix}text", text="Plain language-only text."),
        Chat(key=f"{prefix}chat", images=[png()],
             turns=[Turn("system", "Be brief."), Turn("user", "<image> What is it?"), Turn("assistant", "A circle.")]),
        Gen(key=f"{prefix}gen", images=[png(), png(color=(0, 200, 0))],
            condition=[Segment(image=0), Segment(text="make the circle green")], target=1),
        VQA(key=f"{prefix}vqa", images=[png()], question_id=1, image_id=1, question="What colour?",
            answers=["red"] * 10),
        Captions(key=f"{prefix}coco", images=[png()], image_id=1, captions=["a red circle", "a round shape"]),
    ]


def write_dataset(folder: Path, samples: list, samples_per_shard: int = 1000) -> Path:
    with ShardWriter(folder, "test", samples_per_shard=samples_per_shard) as writer:
        for sample in samples:
            writer.write(sample)
        writer.close()
    return folder


def members(sample) -> list[tuple[str, bytes]]:
    return [(f"{sample.key}.{suffix}", data) for suffix, data in sorted(encode_sample(sample).items())]


def write_tar(path: Path, entries: list) -> None:
    """Write a tar exactly as given: (name, bytes) files, or ("symlink", name, target) links."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for entry in entries:
            if entry[0] == "symlink":
                info = tarfile.TarInfo(entry[1])
                info.type, info.linkname = tarfile.SYMTYPE, entry[2]
                tar.addfile(info)
            else:
                info = tarfile.TarInfo(entry[0])
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))


def write_raw_dataset(folder: Path, shards: dict[str, list]) -> Path:
    """A dataset whose shards are hand-made tars; dataset.json records their true checksums."""
    folder.mkdir(parents=True)
    entries = []
    for name, tar_entries in shards.items():
        write_tar(folder / name, tar_entries)
        entries.append({"name": name, "manifest": "", "samples": 0,
                        "bytes": (folder / name).stat().st_size, "sha256": file_sha256(folder / name)})
    index = {"format_version": 1, "source_format": "test", "samples": 0, "kinds": {}, "shards": entries}
    (folder / "dataset.json").write_text(json.dumps(index))
    return folder


def build_bad_root(root: Path) -> None:
    write_dataset(root / "good", good_samples("g"), samples_per_shard=4)

    box = Box(0.1, 0.2, 0.6, 0.7)
    write_dataset(root / "content", [
        *good_samples("c"),
        Pair(key="notimage", text="html saved as jpg", images=[b"<html>not an image</html>"]),
        Pair(key="zerobyte", text="empty file", images=[b""]),
        Pair(key="bomb", text="declares 30000x30000", images=[bomb_png()]),
        Pair(key="emptytext", text="  \n ", images=[png()]),
        Pair(key="tiny", text="an icon", images=[png(16, 16)]),
        Pair(key="wide", text="a banner", images=[png(250, 50)]),
        Pair(key="fewframes", text="one frame is no video", media="video", images=[png()]),
        VideoText(key="vtfewframes", images=[png()], subtitles=["only one"]),
        Grounded(key="boxout", text="a red circle", images=[png()],
                 phrases=[Phrase(start=2, end=12, boxes=(Box(0.1, 0.2, 1.5, 0.7),))]),
        Grounded(key="boxneg", text="a red circle", images=[png()],
                 phrases=[Phrase(start=2, end=12, boxes=(Box(-0.1, 0.2, 0.6, 0.7),))]),
        Grounded(key="boxinverted", text="a red circle", images=[png()],
                 phrases=[Phrase(start=2, end=12, boxes=(Box(0.6, 0.2, 0.4, 0.7),))]),
        Grounded(key="boxnan", text="a red circle", images=[png()],
                 phrases=[Phrase(start=2, end=12, boxes=(Box(float("nan"), 0.2, 0.6, 0.7), box))]),
        Chat(key="notalternating", images=[],
             turns=[Turn("user", "hi"), Turn("user", "hello?")]),
        Chat(key="placeholders", images=[png(), png()],
             turns=[Turn("user", "<image> what is it?"), Turn("assistant", "two circles")]),
        Interleaved(key="badref", images=[png()],
                    segments=[Segment(text="index out of range"), Segment(image=3)]),
    ])

    ok = Pair(key="ok0", text="fine", images=[png()])
    record = encode_sample(Pair(key="badutf8", text="x", images=[]))["json"]
    listed = encode_sample(Pair(key="missingimg", text="x", images=[png()]))["json"]
    linked = Pair(key="symlink", text="x", images=[png()])
    write_raw_dataset(root / "structure", {
        "shard-000000.tar": [
            *members(ok),
            ("badutf8.json", record.replace(b'"x"', b'"\xff\xfe"')),
            ("orphan.0.png", png()),
            ("missingimg.json", listed),
            ("symlink.json", encode_sample(linked)["json"]),
            ("symlink", "symlink.0.png", "/etc/passwd"),
            ("../evil.json", b"{}"),
            ("/abs.json", b"{}"),
        ],
        "shard-000001.tar": members(Pair(key="dup", text="first", images=[png()])),
        "shard-000002.tar": members(Pair(key="dup", text="second", images=[png()])),
    })

    # A shard cut short after import: dataset.json still records the full shard's checksum.
    truncated = write_raw_dataset(root / "truncated", {"shard-000000.tar": [
        entry for i in range(3) for entry in members(Pair(key=f"t{i}", text="x", images=[png()]))]})
    tar = truncated / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:3000])

    # 1 failing sample in 20: fails at max_failure_fraction 0, passes at 0.1.
    write_dataset(root / "mostly", [Pair(key=f"m{i:02d}", text="fine", images=[png(16 if i == 7 else 48, 48)])
                                    for i in range(20)])


@dataclass
class BadRun:
    proc: subprocess.CompletedProcess
    report: dict
    root: Path
    data_before: dict[str, tuple[int, int]]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def bad_run(tmp_path_factory) -> BadRun:
    """One gate run over every bad-input class, through the real `emu` console script, from an
    empty working folder (to check that nothing is written outside the report folder)."""
    root = tmp_path_factory.mktemp("bad")
    build_bad_root(root / "data")
    before = snapshot(root / "data")
    (root / "cwd").mkdir()
    out = root / "report"
    proc = subprocess.run([str(EMU), "validate", "--data", str(root / "data"), "--report", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=root / "cwd")
    report = json.loads((out / "report.json").read_text()) if (out / "report.json").exists() else {}
    return BadRun(proc, report, root, before)


def test_nothing_is_written_outside_the_report_folder(bad_run):
    assert sorted(p.name for p in bad_run.root.iterdir()) == ["cwd", "data", "report"]
    assert list((bad_run.root / "cwd").iterdir()) == []
    assert snapshot(bad_run.root / "data") == bad_run.data_before


def failures_of(report: dict, rule: str, scope: str) -> dict[tuple[str, str, str | None], str]:
    """{(dataset, shard, key): message} of one rule in one suite/kind."""
    found = [r for r in report["rules"] if r["rule"] == rule and (r["kind"] or r["suite"]) == scope]
    assert len(found) == 1, f"rule {rule} [{scope}] not in report"
    return {(f["dataset"], f["shard"], f["key"]): f["message"] for f in found[0]["failures"]}


# ---------------------------------------------------------------------------------------------
# Tests


def test_valid_data_of_every_kind_passes(tmp_path):
    write_dataset(tmp_path / "data" / "a", good_samples("a"), samples_per_shard=3)
    write_dataset(tmp_path / "data" / "nested" / "b", good_samples("b"))
    result = run_gate(tmp_path / "data", tmp_path / "report", ValidateConfig())

    assert result.passed, result.summary_lines()
    assert [d.name for d in result.datasets] == ["a", "nested/b"]
    assert result.samples == 20
    assert result.datasets[0].kinds["pair"] == 2 and len(result.datasets[0].shards) == 4
    assert {r.kind for r in result.rules} >= {"pair", "interleaved", "video_text", "grounded", "text",
                                              "chat", "gen", "vqa", "captions"}
    assert all(r.checked > 0 for r in result.rules if r.rule in ("text_nonempty", "structure_ok"))
    lines = result.summary_lines()
    assert lines[0].startswith("validation PASSED: 2 datasets, 20 samples")
    assert not any(line.startswith("FAIL") for line in lines)
    assert str(tmp_path / "report" / "report.json") in lines[-1]

    report = tmp_path / "report"
    assert json.loads((report / "report.json").read_text())["passed"] is True
    assert pq.read_table(report / "manifest.parquet").num_rows == 20
    assert "max_failure_fraction: 0.0" in (report / "validate.config.yaml").read_text()
    assert "<html" in (report / "data_docs" / "index.html").read_text().lower()
    assert sorted(p.name for p in report.iterdir()) == ["data_docs", "manifest.parquet", "report.json",
                                                        "validate.config.yaml"]


def test_bad_run_prints_one_line_per_failing_rule(bad_run):
    proc, report = bad_run.proc, bad_run.report
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("validation FAILED"), proc.stdout + proc.stderr
    failing = [r for r in report["rules"] if not r["success"]]
    fail_lines = [line for line in lines if line.startswith("FAIL ")]
    assert len(fail_lines) == len(failing)
    for rule in failing:
        scope = rule["kind"] or rule["suite"]
        line, = [line for line in fail_lines if line.startswith(f"FAIL {rule['rule']} [{scope}] ")]
        first = rule["failures"][0]
        assert first["dataset"] + "/" + first["shard"] + (f":{first['key']}" if first["key"] else "") in line
    assert "FAIL image_decodable [pair] 3/" in proc.stdout
    assert "content/shard-000000.tar:bomb (image 0: image_decompression_bomb" in proc.stdout
    assert lines[-1].startswith("report: ")


def test_failed_gate_exits_1_through_console_script(bad_run):
    proc = bad_run.proc
    assert proc.returncode == 1


@pytest.mark.parametrize("rule, scope, where, message", [
    ("structure_ok", "structure", ("truncated", "shard-000000.tar", "t1"), "shard_truncated"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "badutf8"), "record_not_utf8"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "orphan"), "record_missing"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "missingimg"), "image_member_missing"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "symlink"), "member_not_regular"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "evil"), "member_path_unsafe"),
    ("structure_ok", "structure", ("structure", "shard-000000.tar", "abs"), "member_path_unsafe"),
    ("key_unique", "structure", ("structure", "shard-000001.tar", "dup"), "shard-000002.tar"),
    ("key_unique", "structure", ("structure", "shard-000002.tar", "dup"), "shard-000001.tar"),
    ("shard_checksum", "shards", ("truncated", "shard-000000.tar", None), "sha256_actual="),
    ("image_decodable", "pair", ("content", "shard-000000.tar", "notimage"), "image_not_image"),
    ("image_decodable", "pair", ("content", "shard-000000.tar", "zerobyte"), "image_empty"),
    ("image_decodable", "pair", ("content", "shard-000000.tar", "bomb"), "image_decompression_bomb"),
    ("text_nonempty", "pair", ("content", "shard-000000.tar", "emptytext"), "text_chars_min=0"),
    ("image_side_min", "pair", ("content", "shard-000000.tar", "tiny"), "image_side_min=16"),
    ("image_side_min", "pair", ("mostly", "shard-000000.tar", "m07"), "image_side_min=16"),
    ("image_aspect_max", "pair", ("content", "shard-000000.tar", "wide"), "image_aspect_max=5"),
    ("video_frames", "pair", ("content", "shard-000000.tar", "fewframes"), "n_frames=1"),
    ("video_frames", "video_text", ("content", "shard-000000.tar", "vtfewframes"), "n_frames=1"),
    ("box_coord_max", "grounded", ("content", "shard-000000.tar", "boxout"), "box_coord_max=1.5"),
    ("box_coord_min", "grounded", ("content", "shard-000000.tar", "boxneg"), "box_coord_min=-0.1"),
    ("box_extent_positive", "grounded", ("content", "shard-000000.tar", "boxinverted"), "box_extent_min=-0.2"),
    ("boxes_finite", "grounded", ("content", "shard-000000.tar", "boxnan"), "boxes_finite=False"),
    ("turns_alternate", "chat", ("content", "shard-000000.tar", "notalternating"), "turns_alternate=False"),
    ("placeholders_match_images", "chat", ("content", "shard-000000.tar", "placeholders"),
     "n_image_placeholders=1, n_images=2"),
    ("image_refs_ok", "interleaved", ("content", "shard-000000.tar", "badref"), "image_refs_ok=False"),
])
def test_each_bad_input_fails_naming_rule_shard_and_key(bad_run, rule, scope, where, message):
    report = bad_run.report
    failures = failures_of(report, rule, scope)
    assert where in failures, f"{where} not among {rule} [{scope}] failures: {sorted(failures, key=str)}"
    assert message in failures[where]
    rule_result, = [r for r in report["rules"] if r["rule"] == rule and (r["kind"] or r["suite"]) == scope]
    assert rule_result["success"] is False


def test_bad_run_reports_no_false_positives(bad_run):
    report = bad_run.report
    flagged = {(f["dataset"], f["key"]) for r in report["rules"] for f in r["failures"]}
    assert not [f for f in flagged if f[0] == "good"]
    assert not [f for f in flagged if f[0] == "content" and f[1].startswith("c")]
    # The boxnan row has no finite coordinates: only boxes_finite names it, range rules skip it.
    for rule in ("box_coord_min", "box_coord_max", "box_extent_positive"):
        assert [w for w in failures_of(report, rule, "grounded") if w[2] == "boxnan"] == []


def test_report_json_contents(bad_run):
    report, root = bad_run.report, bad_run.root
    assert report["passed"] is False
    assert report["config"]["max_failure_fraction"] == 0.0
    datasets = {d["name"]: d for d in report["datasets"]}
    assert sorted(datasets) == ["content", "good", "mostly", "structure", "truncated"]
    assert datasets["good"]["kinds"] == {"captions": 1, "chat": 1, "gen": 1, "grounded": 1, "interleaved": 1,
                                         "pair": 2, "text": 1, "video_text": 1, "vqa": 1}
    assert datasets["structure"]["kinds"] == {"pair": 3, "undecodable": 6}
    rule = next(r for r in report["rules"] if r["rule"] == "image_decodable" and r["kind"] == "pair")
    assert rule["expectation_types"] == ["expect_column_values_to_be_null"]
    assert rule["unexpected_count"] == 3
    assert rule["unexpected_fraction"] == pytest.approx(3 / rule["checked"])
    assert (root / "report" / "data_docs" / "index.html").is_file()
    manifest = pq.read_table(root / "report" / "manifest.parquet").to_pandas()
    assert manifest.columns[0] == "dataset"
    assert set(manifest["dataset"]) == set(datasets)


def test_max_failure_fraction_tolerates_a_small_fraction(bad_run, tmp_path):
    root = bad_run.root
    mostly = root / "data" / "mostly"
    strict = CliRunner().invoke(app, ["validate", "--data", str(mostly), "--report", str(tmp_path / "strict")])
    assert strict.exit_code == 1, strict.output
    assert "FAIL image_side_min [pair] 1/20 samples: mostly/shard-000000.tar:m07 (image_side_min=16)" \
        in strict.output

    tolerant = run_emu("validate", "--data", str(mostly), "--report", str(tmp_path / "tolerant"),
                       "--max-failure-fraction", "0.1")
    assert tolerant.returncode == 0, tolerant.stdout + tolerant.stderr
    assert tolerant.stdout.startswith("validation PASSED")
    assert "TOLERATED (max_failure_fraction=0.1) image_side_min [pair] 1/20 samples: " \
           "mostly/shard-000000.tar:m07" in tolerant.stdout
    report = json.loads((tmp_path / "tolerant" / "report.json").read_text())
    assert report["passed"] is True and report["config"]["max_failure_fraction"] == 0.1
    assert failures_of(report, "image_side_min", "pair") == {
        ("mostly", "shard-000000.tar", "m07"): "image_side_min=16"}


def run_emu(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(EMU), *args], capture_output=True, text=True, timeout=120)


def test_unusable_input_exits_2(tmp_path):
    missing = run_emu("validate", "--data", str(tmp_path / "nope"), "--report", str(tmp_path / "r"))
    assert missing.returncode == 2 and "is not a folder" in missing.stderr

    (tmp_path / "empty").mkdir()
    empty = run_emu("validate", "--data", str(tmp_path / "empty"), "--report", str(tmp_path / "r"))
    assert empty.returncode == 2 and "no dataset.json under" in empty.stderr

    dataset = write_dataset(tmp_path / "ds", [Pair(key=f"k{i}", text="x", images=[png()]) for i in range(4)],
                            samples_per_shard=2)
    inside = run_emu("validate", "--data", str(dataset), "--report", str(dataset / "report"))
    assert inside.returncode == 2 and "inside the dataset folder" in inside.stderr
    assert not (dataset / "report").exists()

    (dataset / "shard-000001.tar").unlink()
    gone = run_emu("validate", "--data", str(dataset), "--report", str(tmp_path / "r"))
    assert gone.returncode == 2 and "lists shard-000001.tar but the file is missing" in gone.stderr
    assert not (tmp_path / "r").exists()
    assert all(len(p.stderr.strip().splitlines()) == 1 for p in (missing, empty, inside, gone))

    hollow = write_raw_dataset(tmp_path / "hollow", {"shard-000000.tar": []})
    nothing = run_emu("validate", "--data", str(hollow), "--report", str(tmp_path / "r2"))
    assert nothing.returncode == 2 and "holds no samples" in nothing.stderr
    assert not (tmp_path / "r2" / "report.json").exists()


def test_relative_paths_work_from_the_working_directory(tmp_path):
    """The README's main job passes relative paths; GX's docs site needs them made absolute."""
    write_dataset(tmp_path / "data" / "ds", [Pair(key=f"k{i}", text="x", images=[png()]) for i in range(2)])
    proc = subprocess.run([str(EMU), "validate", "--data", "data", "--report", "out/validation"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "validation" / "data_docs" / "index.html").is_file()
    assert json.loads((tmp_path / "out" / "validation" / "report.json").read_text())["passed"] is True
