"""Resume across pipeline runs (emu.pipeline.resume): the checkpoint folder of a stage is found by
its cache key, linked into the task's output folder, and held by one task at a time."""

from __future__ import annotations

import subprocess
import sys
import time

from emu.pipeline import resume

HOLDER = """
import sys, time
from pathlib import Path
from emu.pipeline.resume import attach_checkpoints
attach_checkpoints(Path(sys.argv[1]), "stage1", "k" * 24)
print("held", flush=True)
time.sleep(2)
"""


def test_checkpoints_live_under_emu_home_by_stage_and_key(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    assert resume.checkpoint_location("stage2", "abc") == tmp_path / "home" / "checkpoints" / "stage2" / "abc"
    out = tmp_path / "task-out"
    location = resume.attach_checkpoints(out, "decoder", "abc", folders=("checkpoints", "vae/checkpoints"))
    assert (out / "checkpoints").resolve() == (location / "checkpoints").resolve()
    assert (out / "vae" / "checkpoints").resolve() == (location / "vae" / "checkpoints").resolve()
    (location / "checkpoints" / "latest").write_text("step-00000004\n")
    again = tmp_path / "next-run-out"
    resume.attach_checkpoints(again, "decoder", "abc", folders=("checkpoints", "vae/checkpoints"))
    assert (again / "checkpoints" / "latest").read_text() == "step-00000004\n", "the next run sees the checkpoint"


def test_keys_differ_by_config_and_inputs():
    base = resume.resume_key("stage1", config={"lr": 1}, dataset="a" * 32)
    assert base == resume.resume_key("stage1", config={"lr": 1}, dataset="a" * 32)
    assert base != resume.resume_key("stage1", config={"lr": 2}, dataset="a" * 32)
    assert base != resume.resume_key("stage1", config={"lr": 1}, dataset="b" * 32)
    assert base != resume.resume_key("stage2", config={"lr": 1}, dataset="a" * 32)


def test_a_second_task_with_the_same_key_waits_for_the_first(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path / "first")], stdout=subprocess.PIPE,
                              text=True, env={**__import__("os").environ})
    assert holder.stdout.readline().strip() == "held"
    started = time.monotonic()
    resume.attach_checkpoints(tmp_path / "second", "stage1", "k" * 24)
    waited = time.monotonic() - started
    assert holder.wait(timeout=10) == 0
    assert waited > 1.0, f"the second task did not wait ({waited:.2f} s)"
