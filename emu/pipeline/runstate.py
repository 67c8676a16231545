"""Run state that cannot lie: who drives a local run, whether it still lives, and ending the runs
whose driver is gone.

`emu run` claims its run (host, pid, the process's start time) and beats a heartbeat while it
works. A run that says pending or running is *orphaned* when

  * its owner ran on this host and no process has that pid any more, or one with another start
    time has it (the pid was reused);
  * its owner ran on another host and has not beaten for STALE_S;
  * nothing ever claimed it (a scheduler or dashboard died between recording and starting it) and
    it is older than UNCLAIMED_S.

`reconcile` (called by every `emu` command that reads runs, by the scheduler before it fires and
by the dashboard before it shows runs) records such runs, and their open executions, as failed
with the reason, after killing what is left of their tasks on this host: every process whose
environment carries the run's EMU_RUN_ID (a task killed with its `emu run` keeps training as an
orphan otherwise). `cancel` stops a live run: SIGTERM to its owner (which forwards it to its
tasks: training checkpoints and stops) or, on another host, a request its heartbeat reads.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import psutil

from emu.errors import EmuError

log = logging.getLogger(__name__)

#: Seconds between two heartbeats of a run's owner.
HEARTBEAT_S = 10.0
#: An owner on another host that has not beaten for this long is taken as gone.
STALE_S = 120.0
#: A run recorded (pending) but never claimed by an `emu run` for this long is taken as never started.
UNCLAIMED_S = 120.0
#: Seconds `cancel` waits for the owner to record the run as cancelled before it kills it.
CANCEL_GRACE_S = 60.0
#: Variable that marks every process of a run (tasks inherit it from `emu run`).
RUN_ENV = "EMU_RUN_ID"


def this_process() -> tuple[str, int, float]:
    """(host, pid, start time) of the calling process: what a run's owner records."""
    return socket.gethostname(), os.getpid(), psutil.Process().create_time()


def process_identity(pid: int) -> float | None:
    """The start time of process `pid` on this host, or None when there is none."""
    try:
        process = psutil.Process(pid)
        # A zombie has ended; only its launcher (the scheduler) has not collected its exit yet.
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.AccessDenied:  # alive, another user's: it exists, identity unknown
        return -1.0


def owner_gone(owner, now=None) -> str | None:
    """Why `owner` (a RunOwner row) no longer drives its run, or None while it does."""
    from emu.lineage.models import utcnow

    if owner.host == socket.gethostname():
        started = process_identity(owner.pid)
        if started is None:
            return f"its `emu run` process (pid {owner.pid} on {owner.host}) is gone"
        if started >= 0 and abs(started - owner.pid_started) > 1.0:
            return f"its `emu run` process (pid {owner.pid} on {owner.host}) is gone (the pid now belongs to another process)"
        return None
    silent = ((now or utcnow()) - owner.heartbeat_at).total_seconds()
    if silent > STALE_S:
        return f"its `emu run` process (pid {owner.pid} on {owner.host}) sent no heartbeat for {silent:.0f} s"
    return None


def run_processes(run_id: str) -> list[psutil.Process]:
    """Processes on this host that belong to `run_id` (EMU_RUN_ID in their environment), except
    this process and its ancestors (a test or launcher that set the variable for itself)."""
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for process in psutil.process_iter():
        if process.pid in mine:
            continue
        try:
            if process.environ().get(RUN_ENV) == run_id:
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


def kill_run_processes(run_id: str, sig: int = signal.SIGKILL, wait_s: float = 5.0) -> int:
    """Send `sig` to every process of `run_id` on this host; wait for them to end. Returns how many."""
    processes = run_processes(run_id)
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.Error:
            pass
    psutil.wait_procs(processes, timeout=wait_s)
    return len(processes)


def reconcile(store) -> list[str]:
    """Record every orphaned run (module docstring) as failed, with the reason, after killing its
    leftover processes on this host. Returns the run ids ended."""
    from emu.lineage.models import utcnow

    now = utcnow()
    ended = []
    for run, owner in store.active_local_runs():
        if owner is None:
            age = (now - run.created_at).total_seconds()
            reason = (f"it was recorded {age:.0f} s ago but no `emu run` ever started it"
                      if age > UNCLAIMED_S else None)
        else:
            reason = owner_gone(owner, now)
        if reason is None:
            continue
        if owner is not None and owner.host == socket.gethostname():
            kill_run_processes(run.id)
        status = "cancelled" if owner is not None and owner.cancel_requested_by else "failed"
        if store.end_run(run.id, status, f"{reason}; the run was {run.status} and is recorded as {status}"):
            log.warning("run %s: %s; recorded as %s", run.id, reason, status)
            ended.append(run.id)
    return ended


def reconcile_quietly(store) -> list[str]:
    """`reconcile`, never failing the command that calls it (an unreadable store is that
    command's own error to report)."""
    try:
        return reconcile(store)
    except Exception as exc:  # the caller's work comes first; say why state could not be checked
        log.warning("could not check for orphaned runs in %r: %s", store, exc)
        return []


def cancel(store, run_id: str, user: str, *, grace_s: float = CANCEL_GRACE_S,
           echo=lambda line: None) -> str:
    """Stop run `run_id` and its tasks; returns the status it ends with.

    On this host: SIGTERM to its owner, which forwards it to its tasks and records `cancelled`;
    after `grace_s` without that, owner and tasks are killed and the run recorded here. On another
    host: the request is stored and the owner's next heartbeat acts on it."""
    run = store.get_run(run_id)
    if run is None:
        raise EmuError(f"no run {run_id!r} in {store!r}")
    if run.status not in ("pending", "running"):
        return run.status
    if run.backend != "local":
        raise EmuError(f"run {run_id} runs on a KFP cluster (KFP run {run.kfp_run_id}); cancel it there")
    owner = store.run_owner(run_id)
    if owner is not None:
        store.request_cancel(run_id, user)
    if owner is not None and owner.host != socket.gethostname() and owner_gone(owner) is None:
        echo(f"run {run_id} runs on {owner.host}: asked its `emu run` (pid {owner.pid}) to stop at its next "
             f"heartbeat (within {HEARTBEAT_S:.0f} s)")
        return "running"
    if owner is not None and owner_gone(owner) is None:
        echo(f"run {run_id}: stopping its `emu run` (pid {owner.pid}) and its tasks")
        os.kill(owner.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and owner_gone(owner) is None:
            time.sleep(0.2)
        if owner_gone(owner) is None:
            echo(f"run {run_id}: `emu run` did not stop within {grace_s:.0f} s; killing it")
            os.kill(owner.pid, signal.SIGKILL)
    kill_run_processes(run_id)
    store.end_run(run_id, "cancelled", f"cancelled by {user}")
    return store.get_run(run_id).status


def cancel_quietly(store, run_id: str, user: str) -> None:
    """`cancel` where nobody waits for its answer (the dashboard's background thread): a failure
    is logged, and the run is then ended by `reconcile` once its owner is gone."""
    try:
        cancel(store, run_id, user)
    except Exception as exc:  # the thread's only reader is the log
        log.warning("cancel of run %s by %s failed: %s", run_id, user, exc)


class Heartbeat:
    """The owner's heartbeat: a daemon thread that beats every HEARTBEAT_S and, when someone asked
    for a cancel, calls `on_cancel(user)` once (the runner sends itself SIGTERM)."""

    def __init__(self, store, run_id: str, on_cancel, interval_s: float = HEARTBEAT_S) -> None:
        self.store, self.run_id, self.on_cancel, self.interval_s = store, run_id, on_cancel, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True, name=f"heartbeat-{run_id}")
        self.cancelled_by: str | None = None

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=self.interval_s + 5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                requested = self.store.heartbeat(self.run_id)
            except Exception as exc:  # a busy database must not stop the run; the next beat retries
                log.warning("run %s: heartbeat failed: %s", self.run_id, exc)
                continue
            if requested and self.cancelled_by is None:
                self.cancelled_by = requested
                self.on_cancel(requested)


__all__ = ["HEARTBEAT_S", "STALE_S", "UNCLAIMED_S", "Heartbeat", "cancel", "cancel_quietly", "kill_run_processes", "owner_gone",
           "process_identity", "reconcile", "reconcile_quietly", "run_processes", "this_process"]
