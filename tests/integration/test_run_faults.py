"""`emu run` killed at several moments (SIGTERM, SIGKILL; during a stage, between stages, while
it records cached stages): no run or execution is left `running` once the next command runs, no
task of it keeps training, its schedule fires again, and the rerun resumes the interrupted
stage from its checkpoint (its log says so) to the very weights of an uninterrupted run.

The pipeline is the fast variant of the tiny preset (tests/integration/test_pipeline.py) with
stage 1 longer and checkpointing every step, so that a kill mid-stage leaves checkpoints.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from emu.lineage.store import LineageStore
from emu.pipeline import runstate
from tests.integration.test_pipeline import fast_preset

EMU = Path(sys.executable).parent / "emu"
DISTRIBUTED = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Long enough that a task orphaned by an early kill has not finished stage 1 by the next command.
STAGE1_STEPS = 30


def faults_preset(folder: Path) -> Path:
    path = fast_preset(folder)
    preset = yaml.safe_load(path.read_text())
    preset["stage1"]["steps"] = STAGE1_STEPS
    preset["stage1"]["runtime"]["checkpoint_every"] = 1
    preset["stage1"]["runtime"]["keep_checkpoints"] = 2
    path.write_text(yaml.safe_dump(preset))
    return path


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in DISTRIBUTED and k not in ("EMU_RUN_ID", "EMU_LINEAGE_URL", "EMU_DVC_REMOTE")}
    env["EMU_HOME"] = str(home)
    return env


def _store(home: Path) -> LineageStore:
    return LineageStore(f"sqlite:///{home / 'lineage.db'}")


def _start(home: Path, preset: Path) -> tuple[subprocess.Popen, str]:
    """`emu run` as a person starts it; returns the process and its run id (from its header)."""
    out = open(home / f"emu-run-{time.monotonic_ns()}.out", "w+")
    proc = subprocess.Popen([str(EMU), "run", "--preset", str(preset)], stdout=out, stderr=subprocess.STDOUT,
                            env=_env(home), cwd=home, text=True)
    proc.out = out  # type: ignore[attr-defined]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        found = re.search(r"^run (run-\S+): preset", Path(out.name).read_text(), re.M)
        if found:
            return proc, found.group(1)
        assert proc.poll() is None, Path(out.name).read_text()
        time.sleep(0.2)
    raise AssertionError("emu run printed no header")


def _wait_in_log(home: Path, run_id: str, pattern: str, proc: subprocess.Popen | None = None,
                 timeout: float = 400) -> None:
    log = home / "logs" / f"{run_id}.log"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.is_file() and re.search(pattern, log.read_text(errors="replace")):
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"emu run ended before {pattern!r}: {log.read_text() if log.is_file() else ''}")
        time.sleep(0.1)
    raise AssertionError(f"{pattern!r} never appeared in {log}")


def _next_command_sees_no_running_run(home: Path, run_id: str) -> None:
    """The next `emu` command (any that reads runs) records the dead run; nothing of it runs."""
    listed = subprocess.run([str(EMU), "lineage", "runs"], capture_output=True, text=True, env=_env(home),
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    store = _store(home)
    run = store.get_run(run_id)
    assert run.status in ("failed", "cancelled"), (run.status, run.error)
    open_ = [(e.stage, e.status) for e in store.list_executions(run_id) if e.status in ("pending", "running")]
    assert not open_, open_
    assert not [r.id for r in store.list_runs(limit=None) if r.status in ("pending", "running")]
    assert runstate.run_processes(run_id) == [], "no task of the dead run keeps running"


def _stage(home: Path, run_id: str, stage: str):
    (execution,) = [e for e in _store(home).list_executions(run_id) if e.stage == stage]
    return execution


def _stage1_weights(home: Path, run_id: str) -> dict[str, torch.Tensor]:
    execution = _stage(home, run_id, "stage1")
    (model,) = _store(home).output_artifacts(execution.cached_from or execution.id)
    folder = Path(model.uri)
    out = load_file(str(folder / "model.safetensors"))
    for shard in sorted((folder / "lm").glob("*.safetensors")):
        out.update({f"lm.{k}": v for k, v in load_file(str(shard)).items()})
    return out


@pytest.fixture()
def home(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    return home


def test_sigterm_during_a_stage_cancels_the_run_and_leaves_its_checkpoint(home):
    """SIGTERM to `emu run` reaches the training task: it checkpoints and stops; the run and the
    stage are recorded cancelled at once, exit 143, and the checkpoint is where the next run
    with the same cache key looks (emu.pipeline.resume)."""
    preset = faults_preset(home)
    proc, run_id = _start(home, preset)
    _wait_in_log(home, run_id, r"stage1: checkpoint step-00000001", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 143, Path(proc.out.name).read_text()
    store = _store(home)
    run = store.get_run(run_id)
    assert run.status == "cancelled" and run.error == "`emu run` was stopped by SIGTERM", run.error
    stages = {e.stage: e.status for e in store.list_executions(run_id)}
    assert stages["stage1"] in ("cancelled", "failed") and "running" not in stages.values(), stages
    assert [p.cmdline() for p in runstate.run_processes(run_id)] == []
    (latest,) = (home / "checkpoints" / "stage1").glob("*/checkpoints/latest")
    assert latest.read_text().strip().startswith("step-")
    _next_command_sees_no_running_run(home, run_id)


@pytest.mark.slow
def test_kills_at_several_moments_then_the_schedule_fires_and_resumes_to_the_same_weights(home, tmp_path):
    preset = faults_preset(home)
    # The reference: the same pipeline, uninterrupted, in a home of its own.
    reference_home = tmp_path / "reference"
    reference_home.mkdir()
    done = subprocess.run([str(EMU), "run", "--preset", str(preset)], capture_output=True, text=True,
                          env=_env(reference_home), cwd=reference_home, timeout=1500)
    reference_run = re.search(r"^run (\S+): (SUCCEEDED|FAILED)", done.stdout, re.M)
    assert reference_run, done.stdout + done.stderr
    assert _stage(reference_home, reference_run.group(1), "stage1").status == "succeeded", done.stdout
    reference = _stage1_weights(reference_home, reference_run.group(1))

    # Between stages: SIGKILL as validate ends, before stage 1 has done anything.
    proc, run_id = _start(home, preset)
    _wait_in_log(home, run_id, r"Task 'validate' finished with status SUCCESS", proc)
    proc.kill()
    proc.wait()
    _next_command_sees_no_running_run(home, run_id)

    # In the cache-recording step: prepare and validate are cached now; SIGKILL at the first hit.
    proc, run_id = _start(home, preset)
    _wait_in_log(home, run_id, r"cache hit", proc, timeout=120)
    proc.kill()
    proc.wait()
    _next_command_sees_no_running_run(home, run_id)

    # During a stage, started by the scheduler: SIGKILL its `emu run` (only it, as the OOM killer
    # would) after stage 1's third checkpoint; its task would train on, orphaned.
    store = _store(home)
    env = _env(home)
    create = subprocess.run([str(EMU), "schedule", "create", "--cron", "* * * * * *", "--name", "nightly",
                             "--preset", str(preset)], capture_output=True, text=True, env=env, timeout=120)
    assert create.returncode == 0, create.stderr

    def fire() -> str:
        with store.session(write=True) as s:
            from emu.lineage.models import Schedule

            s.get(Schedule, store.get_schedule("nightly").id).next_run_at = (
                datetime.now(timezone.utc) - timedelta(seconds=1))
        fired = subprocess.run([str(EMU), "scheduler", "--once"], capture_output=True, text=True, env=env, timeout=120)
        assert fired.returncode == 0 and "started run" in fired.stdout, fired.stdout + fired.stderr
        return fired.stdout.split("started run ")[1].split()[0]

    killed = fire()
    # (The earlier kills may have left stage-1 checkpoints already: this run resumes from them.)
    _wait_in_log(home, killed, r"stage1: checkpoint step-")
    os.kill(store.run_owner(killed).pid, signal.SIGKILL)
    _next_command_sees_no_running_run(home, killed)

    # The schedule is not blocked by the dead run: it fires, and the run resumes stage 1.
    resumed = fire()
    deadline = time.monotonic() + 1500
    while store.get_run(resumed).status in ("pending", "running"):
        assert time.monotonic() < deadline, "the resumed run did not end"
        time.sleep(2)
    log = (home / "logs" / f"{resumed}.log").read_text()
    stage1 = _stage(home, resumed, "stage1")
    assert stage1.status == "succeeded" and not stage1.cached, log[-3000:]
    assert "resuming an interrupted execution with the same cache key" in log
    assert re.search(r"stage1: resumed from step-\d+", log), log[-3000:]
    weights = _stage1_weights(home, resumed)
    assert weights.keys() == reference.keys()
    different = [k for k in weights if not torch.equal(weights[k], reference[k])]
    assert not different, f"resumed stage-1 weights differ from the uninterrupted run's: {different[:5]}"
    # The curves in the lineage store hold each step once (beside the final value, recorded without a step).
    steps = [m.step for m in store.list_metrics_of_execution(stage1.id) if m.name == "loss" and m.step is not None]
    assert steps == list(range(1, STAGE1_STEPS + 1)), steps
