"""The README's main job on a small world: `emu data synth` -> `emu data prepare` -> `emu validate`;
and (marked slow: minutes) the main job itself, `emu run` on the tiny preset as scripts/main runs it.

Every source the synth writes must import without a reject (the synth writes only valid data, so
a reject is a bug in a writer or an importer) and the gate must pass; the same seed must give the
same bytes; sources.json is checked before anything is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emu.config import resolve
from emu.data.formats import ImportConfig
from emu.data.prepare import import_sources, read_sources
from emu.data.shards import read_index
from emu.data.synth import SOURCES_FILE, SynthConfig, generate
from emu.errors import DatasetError, SourceError
from emu.validate import ValidateConfig
from emu.validate.gate import run_gate

#: A few samples of every source (counts never scale below 1), two files per sharded format.
SMALL = SynthConfig(scale=0.03, records_per_file=8)


def tree_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_synth_prepare_validate(tmp_path):
    synth = generate(tmp_path / "raw", SMALL)
    summaries = import_sources(tmp_path / "raw", tmp_path / "shards", ImportConfig(samples_per_shard=5))

    listed = json.loads((tmp_path / "raw" / SOURCES_FILE).read_text())
    assert [s.out_dir.name for s in summaries] == [entry["name"] for entry in listed] == list(synth.records)
    for summary, entry in zip(summaries, listed):
        assert summary.rejected == 0, (entry["name"], summary.rejects_by_rule)
        assert summary.samples == entry["records"] == synth.records[entry["name"]] > 0
        assert read_index(summary.out_dir)["samples"] == summary.samples

    # The gate with the tiny preset's policy, as scripts/main runs it.
    result = run_gate(tmp_path / "shards", tmp_path / "validation", resolve(ValidateConfig, "validate", "tiny"))
    assert result.passed, result.summary_lines()
    assert result.samples == sum(synth.records.values())

    again = generate(tmp_path / "raw2", SMALL)
    assert again.records == synth.records
    assert tree_digest(tmp_path / "raw") == tree_digest(tmp_path / "raw2"), "same seed, same bytes"


def test_sources_with_no_records_are_not_listed(tmp_path):
    """An empty source folder is no valid source of its format: prepare could not import it."""
    config = SynthConfig(scale=0.03, pairs=0, videos=0, chats=0)
    summary = generate(tmp_path / "raw", config)
    names = [entry["name"] for entry in read_sources(tmp_path / "raw")]
    assert "img2dataset" not in names and "webvid" not in names and "llava-chat" not in names
    assert "grit" in names and summary.records["img2dataset"] == 0
    assert not (tmp_path / "raw" / "img2dataset").exists()


@pytest.mark.parametrize("entry, message", [
    ({"name": "a", "format": "text", "path": 5}, "path must be a string, got 5"),
    ({"name": ["a"], "format": "text", "path": "a"}, "name must be a string"),
    ({"name": "a", "format": ["text"], "path": "a"}, "format must be a string"),
    ({"name": "a", "format": "csv", "path": "a"}, "unknown format 'csv'"),
    ({"name": "../a", "format": "text", "path": "a"}, "invalid or repeated name '../a'"),
    ({"name": "a", "format": "text"}, "needs name, format and path"),
])
def test_bad_sources_json_is_a_source_error(tmp_path, entry, message):
    (tmp_path / SOURCES_FILE).write_text(json.dumps([entry]))
    with pytest.raises(SourceError, match=message):
        read_sources(tmp_path)


def test_synth_refuses_a_folder_with_leftovers(tmp_path):
    """A stale shard of an interrupted, larger run would be imported with the new world."""
    stale = tmp_path / "raw" / "img2dataset" / "00007.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old")
    with pytest.raises(DatasetError, match="not an empty folder"):
        generate(tmp_path / "raw", SMALL)
    assert sorted(p.name for p in (tmp_path / "raw").rglob("*")) == ["00007.tar", "img2dataset"]
    (tmp_path / "empty").mkdir()
    assert generate(tmp_path / "empty", SynthConfig(scale=0.01)).records["text"] > 0


@pytest.mark.slow
def test_the_main_job_prints_a_short_console_and_its_commands_work(tmp_path):
    """The first `emu run` on the tiny preset (scripts/main): at most ~60 lines on the terminal
    (kfp.local alone printed ~1,300), every line in the run's log file, and the commands the
    summary prints work pasted into a fresh shell."""
    emu = Path(sys.executable).with_name("emu")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMU_")}
    env["EMU_HOME"] = str(tmp_path / "home")
    proc = subprocess.run([str(emu), "run"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=3600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    shown = proc.stdout.splitlines() + proc.stderr.splitlines()
    assert len(shown) <= 60, "\n".join(shown)
    log = Path(re.search(r"^log: (\S+)$", proc.stdout, re.M).group(1))
    logged = log.read_text(encoding="utf-8")
    assert "Executing task 'instruct'" in logged and "instruct step 600/600" in logged and "\x1b" not in logged
    lineage = re.search(r"^lineage: (.+)$", proc.stdout, re.M).group(1)
    fresh = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/root")}
    shown = subprocess.run(["bash", "-c", lineage], capture_output=True, text=True, env=fresh, cwd=tmp_path, timeout=300)
    assert shown.returncode == 0 and "data shards (" in shown.stdout, shown.stderr
