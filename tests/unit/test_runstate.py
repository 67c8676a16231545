"""Run state that cannot lie (emu.pipeline.runstate): runs whose `emu run` is gone are recorded as
failed by the next command, their leftover tasks killed; `cancel` stops a run and its tasks;
schedules are not blocked by dead runs and refuse bad settings at creation. Real processes
stand in for `emu run` and its tasks (the pipeline itself: tests/integration/test_run_faults.py)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psutil
import pytest

from emu.lineage.store import LineageStore
from emu.pipeline import runstate
from emu.pipeline.schedules import fire_due

EMU = Path(sys.executable).parent / "emu"
#: An "emu run" that starts a "task" child (both carry EMU_RUN_ID, as kfp.local's tasks do) and
#: prints the child's pid; with IGNORE it ignores SIGTERM.
OWNER = """
import os, signal, subprocess, sys, time
if os.environ.get("IGNORE"):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
print(child.pid, flush=True)
time.sleep(120)
"""


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("EMU_LINEAGE_URL", f"sqlite:///{tmp_path / 'lineage.db'}")
    monkeypatch.delenv("EMU_RUN_ID", raising=False)
    return tmp_path


def _owner(run_id: str, ignore_term: bool = False) -> tuple[subprocess.Popen, int]:
    env = {**os.environ, runstate.RUN_ENV: run_id, **({"IGNORE": "1"} if ignore_term else {})}
    owner = subprocess.Popen([sys.executable, "-c", OWNER], env=env, stdout=subprocess.PIPE, text=True)
    return owner, int(owner.stdout.readline())


def _running(store: LineageStore, owner: subprocess.Popen | None, *, host: str | None = None) -> str:
    run = store.create_run(status="running")
    execution = store.start_execution(run.id, "stage1")
    assert execution
    if owner is not None:
        store.claim_run(run.id, host=host or socket.gethostname(), pid=owner.pid,
                        pid_started=psutil.Process(owner.pid).create_time())
    return run.id


def _gone(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if runstate.process_identity(pid) is None:
            return True
        time.sleep(0.1)
    return False


def test_the_next_command_fails_a_run_whose_emu_run_was_killed_and_kills_its_task(home):
    store = LineageStore()
    run_id = "run-killed"
    owner, task = _owner(run_id)
    store.create_run(status="running", run_id=run_id)
    store.start_execution(run_id, "stage1")
    store.claim_run(run_id, host=socket.gethostname(), pid=owner.pid, pid_started=psutil.Process(owner.pid).create_time())
    assert runstate.reconcile(store) == [], "a live owner's run is left alone"
    owner.kill()
    owner.wait()
    listed = subprocess.run([str(EMU), "lineage", "runs"], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    run = store.get_run(run_id)
    assert run.status == "failed" and f"pid {owner.pid}" in run.error and "is gone" in run.error
    assert [(e.stage, e.status) for e in store.list_executions(run_id)] == [("stage1", "failed")]
    assert "the run ended while this stage was running" in store.list_executions(run_id)[0].error
    assert _gone(task), "the orphaned task was killed"
    assert "failed" in listed.stdout


def test_reused_pid_stale_heartbeat_and_never_claimed_runs_are_failed(home):
    store = LineageStore()
    reused = _running(store, None)
    me = psutil.Process()
    store.claim_run(reused, host=socket.gethostname(), pid=me.pid, pid_started=me.create_time() - 100)
    remote = _running(store, None)
    store.claim_run(remote, host="another-host", pid=1234, pid_started=1.0)
    fresh_remote = _running(store, None)
    store.claim_run(fresh_remote, host="another-host", pid=1234, pid_started=1.0)
    with store.session(write=True) as s:
        from emu.lineage.models import RunOwner

        s.get(RunOwner, remote).heartbeat_at = datetime.now(timezone.utc) - timedelta(seconds=runstate.STALE_S + 5)
    old = store.create_run(status="pending", created_at=datetime.now(timezone.utc) - timedelta(seconds=600)).id
    young = store.create_run(status="pending").id
    ended = runstate.reconcile(store)
    assert sorted(ended) == sorted([reused, remote, old])
    assert "belongs to another process" in store.get_run(reused).error
    assert "no heartbeat" in store.get_run(remote).error
    assert "no `emu run` ever started it" in store.get_run(old).error
    assert store.get_run(fresh_remote).status == "running" and store.get_run(young).status == "pending"


def test_cancel_stops_the_owner_and_its_tasks(home):
    store = LineageStore()
    owner, task = _owner("run-cancel")
    store.create_run(status="running", run_id="run-cancel")
    store.claim_run("run-cancel", host=socket.gethostname(), pid=owner.pid,
                    pid_started=psutil.Process(owner.pid).create_time())
    done = subprocess.run([str(EMU), "run", "cancel", "run-cancel"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "run run-cancel: cancelled" in done.stdout
    owner.wait(timeout=10)
    assert _gone(task)
    run = store.get_run("run-cancel")
    assert run.status == "cancelled" and run.error.startswith("cancelled by ")


def test_cancel_kills_an_owner_that_ignores_sigterm(home):
    store = LineageStore()
    owner, task = _owner("run-stubborn", ignore_term=True)
    time.sleep(0.5)  # the owner has installed its SIG_IGN
    store.create_run(status="running", run_id="run-stubborn")
    store.claim_run("run-stubborn", host=socket.gethostname(), pid=owner.pid,
                    pid_started=psutil.Process(owner.pid).create_time())
    assert runstate.cancel(store, "run-stubborn", "alice", grace_s=1.0) == "cancelled"
    assert owner.wait(timeout=10) == -signal.SIGKILL
    assert _gone(task)


def test_cancel_of_an_ended_or_unknown_run(home):
    store = LineageStore()
    run = store.create_run(status="succeeded")
    assert runstate.cancel(store, run.id, "alice") == "succeeded"
    done = subprocess.run([str(EMU), "run", "cancel", "run-nope"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stderr.strip().startswith("error: no run 'run-nope'")


def _due_schedule(store: LineageStore) -> str:
    schedule = store.create_schedule("nightly", "0 3 * * *", parameters={"preset": "tiny", "data": "", "overrides": []},
                                     now=datetime.now(timezone.utc) - timedelta(days=2))
    return schedule.id


def test_a_schedule_whose_run_died_fires_again(home):
    store = LineageStore()
    schedule_id = _due_schedule(store)
    launched: list[str] = []

    def launch_and_die(run_id: str, params: dict):
        owner = subprocess.Popen([sys.executable, "-c", "pass"])
        owner.wait()  # the `emu run` died at once (SIGKILL, OOM...)
        store.claim_run(run_id, host=socket.gethostname(), pid=owner.pid, pid_started=0.0)
        launched.append(run_id)

    first = fire_due(launch=launch_and_die, echo=lambda line: None)
    assert first == launched[:1] and store.get_run(first[0]).status == "pending"
    with store.session(write=True) as s:  # the next fire time comes
        from emu.lineage.models import Schedule

        s.get(Schedule, schedule_id).next_run_at = datetime.now(timezone.utc) - timedelta(minutes=1)
    second = fire_due(launch=launch_and_die, echo=lambda line: None)
    assert len(second) == 1 and second != first, "not skipped as 'previous run still pending'"
    assert store.get_run(first[0]).status == "failed"


def test_a_fired_run_that_cannot_start_is_failed_not_pending(home):
    store = LineageStore()
    _due_schedule(store)

    def broken(run_id: str, params: dict):
        raise OSError(24, "Too many open files")

    lines: list[str] = []
    assert fire_due(launch=broken, echo=lines.append) == []
    (run,) = store.list_runs()
    assert run.status == "failed" and "could not start `emu run`" in run.error and "Too many open files" in run.error


@pytest.mark.parametrize("args, message", [
    (["stage1.steps=abc"], "expected an integer"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--data", "/nonexistent/shards"], "/nonexistent/shards does not exist"),
    (["--data", "0" * 32], "no artifact with this DVC md5"),
    (["nosection.key=1"], "must be section.key=value"),
])
def test_schedule_create_refuses_what_emu_run_refuses(home, args, message):
    done = subprocess.run([str(EMU), "schedule", "create", "--cron", "0 3 * * *", *args],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], done.stderr
    assert LineageStore().list_schedules() == []
