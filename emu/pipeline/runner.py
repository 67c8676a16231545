"""`emu run`: the whole pipeline on this machine through kfp.local, or submitted to a KFP cluster.

A run is one call of the pipeline with: the preset, every stage's resolved config (preset
section + `section.key=value` overrides), the training data (a shard folder, s3:// URI or DVC
md5; none = the synthetic shapes world) with its DVC md5, and each stage's code version (a hash
of the code that stage runs and the locked dependencies: emu.pipeline.code_version). Those values,
and the md5 each task passes to the next, are what KFP's cache keys on: an unchanged re-run is
served from the cache in seconds; a changed stage-2 setting re-runs stage 2 and what depends on it;
new data re-runs everything; new code re-runs the stages that run it (a dashboard edit: none).

Locally, each task runs as a subprocess of this environment (kfp.local.SubprocessRunner), under
$EMU_HOME (emu.home: the checkout's outputs/emu-home, else ~/.emu): kfp/ (artifacts, one folder
per run), kfp-cache/ (KFP's cache), logs/RUN_ID.log (everything the run printed),
lineage.db (SQLite) and dvc-remote/ (content-addressed artifacts), unless EMU_LINEAGE_URL and
EMU_DVC_REMOTE point elsewhere (PostgreSQL, S3). The terminal shows a short console
(emu.pipeline.console); the log file holds every line.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu.config import resolve, to_dict
from emu.errors import ConfigError, EmuError

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
#: Pipeline parameter -> preset section of the config it carries.
CONFIG_PARAMETERS = {
    "synth_config": "synth", "import_config": "import", "validate_config": "validate", "stage1_config": "stage1",
    "model_config": "model", "precompute_config": "precompute", "stage2_config": "stage2",
    "decoder_config": "decoder", "visual_decoder_config": "visual_decoder", "instruct_config": "instruct",
    "evaluate_config": "evaluate",
}
#: Pipeline tasks in graph order (KFP task names).
TASKS = ("prepare", "validate", "stage1", "precompute", "stage2", "decoder", "instruct", "evaluate", "register")
#: The graph's dependencies (producer, consumer), as pipelines/emu_pipeline.py wires them (a test
#: checks them against the compiled YAML): stage 2 and the decoder run in parallel after stage 1.
TASK_EDGES = (("prepare", "validate"), ("validate", "stage1"), ("stage1", "precompute"), ("precompute", "stage2"),
              ("stage1", "decoder"), ("stage2", "instruct"), ("precompute", "instruct"), ("instruct", "evaluate"),
              ("decoder", "evaluate"), ("evaluate", "register"))
#: Variables of a torch.distributed process group (set by launchers and emu.train.engine).
DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def emu_home() -> Path:
    """$EMU_HOME, else the platform's one default (emu.home)."""
    from emu.home import emu_home as home

    return home()


@dataclass
class RunRequest:
    preset: str = "tiny"
    source: str = ""                       # shard folder, s3:// URI or DVC md5; "" = synthetic world
    overrides: list[str] = field(default_factory=list)   # "section.key=value"
    trigger: str = "cli"
    triggered_by: str = ""
    schedule_id: str | None = None
    host: str = ""                         # KFP endpoint; "" = kfp.local
    run_id: str | None = None              # a run already recorded (by the scheduler); else a new one


@dataclass
class RunOutcome:
    run_id: str
    status: str
    tasks: list[dict[str, Any]]
    evaluation: dict[str, float]
    artifacts_dir: Path | None
    error: str | None = None
    log_path: Path | None = None          # every line the run printed
    gate: dict[str, Any] | None = None    # the promotion gate's verdict per metric (gate.json)
    seconds: float | None = None
    stopped_by: int | None = None         # the signal that stopped `emu run`, if one did


def parameters(request: RunRequest, hash_source: bool = True) -> dict[str, str]:
    """The pipeline's arguments: every stage config resolved, the data md5, the code version.
    Without `hash_source`, a folder or s3:// source is checked, not hashed (`source_md5` is
    empty): `prepare` reads it when the run starts (`source_read_at_run`)."""
    from emu.sections import SECTIONS

    by_section: dict[str, list[str]] = {}
    for override in request.overrides:
        section, dot, rest = override.partition(".")
        if not dot or section not in SECTIONS or "=" not in rest:
            raise ConfigError(f"`emu run` override {override!r} must be section.key=value with a section of "
                              f"{', '.join(SECTIONS)}")
        by_section.setdefault(section, []).append(rest)
    unused = set(by_section) - set(CONFIG_PARAMETERS.values()) - {"pipeline"}
    if unused:
        raise ConfigError(f"`emu run` overrides for {sorted(unused)}: the pipeline does not run those sections")
    from emu.lineage.store import LineageStore
    from emu.pipeline.code_version import stage_code_versions
    from emu.pipeline.tasks import production_reference

    values = {"preset": request.preset, "source": request.source,
              "source_md5": source_md5(request.source, hash_location=hash_source),
              "production": production_reference(LineageStore(os.environ.get("EMU_LINEAGE_URL") or None)),
              **{f"{stage}_code_version": version for stage, version in stage_code_versions().items()}}
    for name, section in CONFIG_PARAMETERS.items():
        config = resolve(SECTIONS[section](), section, request.preset, by_section.get(section, []))
        values[name] = json.dumps(to_dict(config), sort_keys=True)
    return values


def run_parameters(request: RunRequest, args: dict[str, str]) -> dict[str, Any]:
    """What the lineage store keeps of a run's arguments: the resolved config of every stage
    (for audits and config diffs), the data and its md5, the code version, the overrides."""
    return {"source": request.source, "source_md5": args["source_md5"], "code_version": run_code_version(args),
            "code_versions": stage_versions(args), "overrides": list(request.overrides),
            "configs": {CONFIG_PARAMETERS[k]: json.loads(v) for k, v in args.items() if k in CONFIG_PARAMETERS}}


def pipeline_config(request: RunRequest):
    from emu.pipeline.config import PipelineConfig

    extra = [o.partition(".")[2] for o in request.overrides if o.startswith("pipeline.")]
    return resolve(PipelineConfig, "pipeline", request.preset, extra)


def stage_versions(args: dict[str, str]) -> dict[str, str]:
    """{stage: code version} of a run's pipeline arguments."""
    return {k.removesuffix("_code_version"): v for k, v in args.items() if k.endswith("_code_version")}


def run_code_version(args: dict[str, str]) -> str:
    """The run's one code version (what the console, lineage and dashboard show), from its stages'."""
    from emu.pipeline.code_version import combined

    return combined(stage_versions(args))


def source_md5(source: str, hash_location: bool = True) -> str:
    """The DVC md5 of the training data ("" for the synthetic world, whose content the synth
    config fixes). A DVC md5 must be in the remote, a path must exist: refused before anything
    starts, not by the first task. Without `hash_location`, a folder or s3:// prefix is only
    checked to hold something ("" returned): hashing an s3:// prefix downloads all of it here."""
    if not source:
        return ""
    from emu.artifacts.dvc import ArtifactStore

    store = ArtifactStore(os.environ.get("EMU_DVC_REMOTE") or None)
    if not source_read_at_run(source):
        if not store.exists(source):
            raise ConfigError(f"--data {source}: no artifact with this DVC md5 in the remote {store!r}")
        return source
    from emu.artifacts.s3 import has_objects, resolve_local

    if hash_location:
        return store.md5(resolve_local(source))
    if source.lower().startswith("s3:") and not has_objects(source):
        raise ConfigError(f"--data {source}: nothing is stored under this prefix")
    if not source.lower().startswith("s3:"):
        resolve_local(source)  # ConfigError naming a missing folder
    return ""


def source_read_at_run(source: str) -> bool:
    """Whether `source` is a location (a folder or s3:// prefix) whose content may change between
    runs, rather than content fixed by the run's parameters (a DVC md5, or the synthetic world)."""
    return bool(source) and not re.fullmatch(r"[0-9a-f]{32}(\.dir)?", source)


def check_remote() -> None:
    """Refuse an unusable DVC remote (EMU_DVC_REMOTE: a bad URL, an unreachable endpoint, a
    folder that is a file) before a run starts; every task pushes its outputs there."""
    remote = os.environ.get("EMU_DVC_REMOTE")
    if not remote:
        return
    from emu.artifacts.dvc import ArtifactStore

    try:
        ArtifactStore(remote).exists("0" * 32)
    except (EmuError, OSError, ValueError) as exc:
        raise ConfigError(f"the DVC remote EMU_DVC_REMOTE={remote} is not usable: {exc}") from None


def git_state() -> tuple[str | None, bool | None]:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None, None
    if commit.returncode:
        return None, None
    return commit.stdout.strip(), bool(dirty.stdout.strip())


# ---- local runs ---------------------------------------------------------------------------------

def run_local(request: RunRequest, *, verbose: bool = False, terminal=None) -> RunOutcome:
    """Run the pipeline through kfp.local; record the run, its cached tasks and its outcome.

    The terminal (`terminal`, default stdout) gets the run's header, one line per stage start and
    end, progress lines of the training stages and the summary; the run's log file
    (`run_log_path`) every line of every task; with `verbose` the terminal gets every line too.

    The run is claimed by this process (emu.pipeline.runstate: host, pid, start time, heartbeat)
    so that, should it die, the next `emu` command records the run as failed. SIGTERM, SIGINT and
    SIGHUP are forwarded to the running task (a training stage checkpoints and stops) and end the
    run as cancelled; a second signal kills the tasks. Whatever happens, the outcome is recorded.
    """
    from kfp import local

    from emu.lineage.store import LineageStore
    from emu.pipeline import runstate
    from emu.pipeline.console import RunConsole
    from pipelines.emu_pipeline import build_pipeline

    home = emu_home()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("EMU_LINEAGE_URL", f"sqlite:///{home / 'lineage.db'}")
    os.environ.setdefault("EMU_DVC_REMOTE", str(home / "dvc-remote"))
    store = LineageStore(os.environ["EMU_LINEAGE_URL"])
    runstate.reconcile_quietly(store)
    recorded = store.get_run(request.run_id) if request.run_id else None
    try:
        check_remote()
        args = parameters(request)
        config = pipeline_config(request)
    except BaseException as exc:  # a run recorded by the scheduler or dashboard must not stay pending
        if recorded is not None:
            store.end_run(recorded.id, "failed", f"the run could not start: {_reason(exc)}")
        raise
    commit, dirty = git_state()
    if recorded is not None:
        run = recorded
        store.set_run_details(run.id, parameters=run_parameters(request, args), git_commit=commit, git_dirty=dirty)
    else:
        run = store.create_run(trigger=request.trigger, triggered_by=request.triggered_by or getpass.getuser(),
                               schedule_id=request.schedule_id, preset=request.preset,
                               parameters=run_parameters(request, args), git_commit=commit, git_dirty=dirty,
                               image_digest=os.environ.get("EMU_IMAGE_DIGEST") or None, backend="local",
                               status="pending", run_id=request.run_id)
    host, pid, pid_started = runstate.this_process()
    store.claim_run(run.id, host=host, pid=pid, pid_started=pid_started)
    store.update_run(run.id, status="running", image_digest=os.environ.get("EMU_IMAGE_DIGEST") or None)
    os.environ["EMU_RUN_ID"] = run.id
    log_path = run_log_path(run.id)

    def cached(task: str, key: str) -> None:
        # Recorded as it happens, so a live run page shows the stage as cached, not waiting.
        record_cached_tasks(store, run.id, {task: key}, home / "kfp-cache")

    # Tasks inherit this environment; a process group this process may have joined is not theirs.
    inherited = {name: os.environ.pop(name) for name in DISTRIBUTED_ENV if name in os.environ}
    started = time.perf_counter()
    error = None
    stop = _StopSignals(run.id)
    try:
        with stop, runstate.Heartbeat(store, run.id, on_cancel=lambda user: os.kill(os.getpid(), signal.SIGTERM)) \
                as heartbeat, RunConsole(log_path, verbose=verbose, on_cache_hit=cached, terminal=terminal) as console:
            try:
                console.echo(f"run {run.id}: preset {request.preset}, data {request.source or 'synthetic shapes world'}, "
                             f"code {run_code_version(args)}")
                console.echo(f"log: {log_path}" + ("" if verbose else " (every line of every stage; -v prints them here)"))
                local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"),
                           raise_on_error=False, enable_caching=True, cache_root=str(home / "kfp-cache"))
                build_pipeline(config)(**args)
            except _Stopped as exc:
                error = (f"cancelled by {heartbeat.cancelled_by}" if heartbeat.cancelled_by
                         else f"`emu run` was stopped by {signal.Signals(exc.signum).name}")
                console.echo(f"stopping: {error}; waiting for the running task to stop (a training stage "
                             f"checkpoints first; a second signal kills it)")
                _wait_for_tasks(run.id)
            except Exception as exc:  # kfp.local raises for pipeline-level problems
                error = f"{type(exc).__name__}: {exc}"
                console.echo(f"error: {error}")
            finally:
                stop.recording = True  # from here a signal waits for the outcome to be recorded
                os.environ.update(inherited)
            console.sync()  # the last cache hit may still be in the pipe: record it first
            status, error = _status_of(store, run.id, console.status, error, stopped=stop.signum is not None)
            store.end_open_executions(run.id, status if status != "succeeded" else "failed",
                                      error or "the task never recorded its end")
            store.update_run(run.id, status=status, error=error)
            outcome = outcome_of(store, run.id, artifacts_dir=home / "kfp", seconds=time.perf_counter() - started)
            outcome.stopped_by = stop.signum
            for line in outcome_lines(outcome):
                console.echo(line)
    finally:
        # Anything that escaped above (the console, the heartbeat, a second signal) still ends
        # the run: a recorded outcome is never skipped, only replaced by a poorer one.
        store.end_run(run.id, "cancelled" if stop.signum else "failed",
                      error or "`emu run` stopped before recording an outcome")
    return outcome


class _Stopped(KeyboardInterrupt):
    """A signal stopped `emu run` (not an Exception: kfp.local's `except Exception` must not eat
    it; the `emu` entry point exits 128 + `signum` on it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class _StopSignals:
    """SIGTERM, SIGINT and SIGHUP while the pipeline runs: forward SIGTERM to this process's
    children (the task: a trainer checkpoints and stops, emu.train.trainer) and raise `_Stopped`
    in the main thread; a second signal kills every process of the run. Once `recording` is set,
    a signal is only noted, so that the outcome is recorded before the process ends. Installed
    only in the main thread (Python delivers signals there)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.signum: int | None = None
        self.recording = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        import psutil

        from emu.pipeline.runstate import kill_run_processes

        if self.signum is not None:
            if not self.recording:
                kill_run_processes(self.run_id, wait_s=0.0)
            return
        self.signum = signum
        for child in psutil.Process().children(recursive=True):
            try:
                child.terminate()
            except psutil.Error:
                pass
        if not self.recording:
            raise _Stopped(signum)


#: Seconds a stopped `emu run` waits for its tasks to stop after SIGTERM (a training stage writes
#: a checkpoint first) before it kills them.
STOP_GRACE_S = 300.0


def _wait_for_tasks(run_id: str) -> None:
    """Wait for the run's processes on this host to end after SIGTERM; kill what outlives the grace."""
    import psutil

    from emu.pipeline.runstate import kill_run_processes, run_processes

    _, alive = psutil.wait_procs(run_processes(run_id), timeout=STOP_GRACE_S)
    if alive:
        log.warning("run %s: %d task process(es) did not stop within %.0f s; killing them", run_id, len(alive),
                    STOP_GRACE_S)
        kill_run_processes(run_id)


def _status_of(store, run_id: str, states: dict[str, str], error: str | None, *, stopped: bool) -> tuple[str, str | None]:
    """How the run ended: cancelled (a signal or a cancel), failed (an error, a failed or missing
    task), else succeeded; with the error to record."""
    failed = [e for e in store.list_executions(run_id) if e.status == "failed"]
    if stopped:
        return "cancelled", error
    if failed and error is None:
        error = f"{failed[0].stage}: {failed[0].error}"
    status = "failed" if error or any(s != "SUCCESS" for s in states.values()) else "succeeded"
    if status == "failed" and error is None:
        error = "; ".join(f"{task} {state}" for task, state in states.items() if state != "SUCCESS")
    return status, error


def _reason(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, EmuError) else f"{type(exc).__name__}: {exc}"


def outcome_of(store, run_id: str, artifacts_dir: Path | None = None, seconds: float | None = None) -> RunOutcome:
    """A recorded run as `emu run` reports it: its stages in graph order, evaluation and gate."""
    run = store.get_run(run_id)
    if run is None:
        raise EmuError(f"no run {run_id!r} in {store!r}")
    order = {stage: i for i, stage in enumerate(TASKS)}
    tasks = [{"stage": e.stage, "status": e.status, "cached": e.cached,
              "seconds": (e.ended_at - e.started_at).total_seconds() if e.ended_at and e.started_at else None,
              "error": e.error} for e in sorted(store.list_executions(run_id), key=lambda e: order.get(e.stage, len(order)))]
    return RunOutcome(run_id=run_id, status=run.status, tasks=tasks, evaluation=evaluation_of(store, run_id),
                      artifacts_dir=artifacts_dir, error=run.error, log_path=run_log_path(run_id),
                      gate=gate_of(store, run_id), seconds=seconds)


def launch_background(run_id: str, preset: str, data: str = "", overrides: list[str] = (),
                      log_path: Path | None = None, store=None) -> subprocess.Popen:
    """`emu run` in its own process (own session: it outlives its launcher) for a run already
    recorded in the lineage store (EMU_RUN_ID): how the scheduler and the dashboard start runs.
    Its output goes to `log_path` (default $EMU_HOME/logs/RUN_ID.log). With `store`, the new
    process is recorded as the run's owner at once, so a run whose `emu run` dies while starting
    is found orphaned (emu.pipeline.runstate) rather than left pending."""
    import socket
    import sys

    import psutil

    command = [sys.executable, "-m", "emu.cli", "run", "--preset", preset]
    if data:
        command += ["--data", data]
    command += list(overrides)
    env = {**os.environ, "EMU_RUN_ID": run_id, "PYTHONUNBUFFERED": "1"}
    for name in DISTRIBUTED_ENV:
        env.pop(name, None)
    log_path = Path(log_path) if log_path else run_log_path(run_id)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True)
    if store is not None:
        try:
            started = psutil.Process(process.pid).create_time()
        except psutil.NoSuchProcess:  # already gone: the zombie is ours to reap; reconcile records it
            started = 0.0
        store.claim_run(run_id, host=socket.gethostname(), pid=process.pid, pid_started=started)
    return process


def run_log_path(run_id: str) -> Path:
    """Where a background run's console output goes."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", run_id):
        raise EmuError(f"run id {run_id!r} is not a valid file name")
    return emu_home() / "logs" / f"{run_id}.log"


def record_cached_tasks(store, run_id: str, cached: dict[str, str], cache_root: Path) -> None:
    """Record the tasks KFP served from its cache as executions of this run that link the very
    artifacts the original execution produced (found through the cache entry's metadata)."""
    for task, key in cached.items():
        entries = sorted(cache_root.glob(f"{key}*.json"))
        if len(entries) != 1:
            log.warning("cache entry of %s (%s) not found; its lineage link is missing", task, key)
            continue
        outputs = json.loads(entries[0].read_text(encoding="utf-8"))
        originals = {int(value["metadata"]["execution_id"]) for value in outputs.values()
                     if isinstance(value, dict) and (value.get("metadata") or {}).get("execution_id")}
        stage = _stage_of(task)
        if len(originals) == 1:
            store.record_cached_execution(run_id, stage, originals.pop())
        else:
            store.finish_execution(store.start_execution(run_id, stage), "succeeded", cached=True)


def _stage_of(task: str) -> str:
    """kfp.local names tasks after their component (`stage1`, `stage2`...)."""
    return task.split("-")[0] if task.split("-")[0] in TASKS else task


def gate_of(store, run_id: str) -> dict[str, Any] | None:
    """The promotion gate's verdict of the run's evaluation (gate.json in its evaluation
    artifact; the original's when evaluate was served from the cache), or None."""
    from emu.pipeline.tasks import GATE_FILE

    for execution in store.list_executions(run_id):
        if execution.stage != "evaluate" or execution.status != "succeeded":
            continue
        for artifact in store.output_artifacts(execution.cached_from or execution.id):
            for uri in [artifact.uri, *store.artifact_uris(artifact.id)]:
                path = Path(uri) / GATE_FILE if uri and "://" not in uri else None
                if path is not None and path.is_file():
                    return json.loads(path.read_text(encoding="utf-8"))
    return None


def outcome_lines(outcome: RunOutcome) -> list[str]:
    """The summary `emu run` ends with: every stage, the error, where everything is (as commands
    that work pasted into a new shell), the evaluation and the gate's verdict per metric."""
    from emu.evaluate.gate import gate_lines
    from emu.home import emu_command
    from emu.pipeline.tasks import _chance_of

    took = "" if outcome.seconds is None else f" in {outcome.seconds:.0f} s"
    lines = [f"run {outcome.run_id}: {outcome.status.upper()}{took}"]
    for task in outcome.tasks:
        seconds = "" if task["seconds"] is None else f"{task['seconds']:.1f} s"
        state = "cached (reused)" if task["cached"] else task["status"]
        lines.append(f"  {task['stage']:<11} {state:<16} {seconds}")
        if task["error"]:
            lines.append(f"      error: {task['error'].splitlines()[0][:200]}")
    if outcome.error and not any(t["error"] for t in outcome.tasks):
        lines.append(f"  error: {outcome.error.splitlines()[0][:300]}")
    emu = emu_command()
    if outcome.log_path is not None:
        lines.append(f"log: {outcome.log_path}")
    lines.append(f"artifacts: {outcome.artifacts_dir} (restore anywhere: {emu} artifacts pull {outcome.run_id} --out DIR)")
    lines.append(f"lineage: {emu} lineage show {outcome.run_id}")
    if outcome.evaluation:
        lines.append("evaluation:")
        names = sorted(n for n in outcome.evaluation if not n.endswith("_seconds"))
        for name in names:
            if "chance" in name or name.endswith("_n") or name == "gate_passed":
                continue
            chance = outcome.evaluation.get(_chance_of(name))
            beside = "" if chance is None else f"   (chance {chance:.3f})"
            lines.append(f"  {name:<32} {outcome.evaluation[name]:>9.3f}{beside}")
    if outcome.gate is not None:
        lines += gate_lines(outcome.gate)
    elif "gate_passed" in outcome.evaluation:
        lines.append(f"gate {'passed' if outcome.evaluation['gate_passed'] else 'FAILED'}")
    return lines


def evaluation_of(store, run_id: str) -> dict[str, float]:
    """The metrics of the run's evaluate execution (its original when it was cached)."""
    for execution in store.list_executions(run_id):
        if execution.stage == "evaluate" and execution.status == "succeeded":
            source = execution.cached_from or execution.id
            return {m.name: m.value for m in store.list_metrics_of_execution(source)}
    return {}


# ---- cluster runs -------------------------------------------------------------------------------

def compile_pipeline(preset: str, out: Path, overrides: list[str] = ()) -> Path:
    """Write the pipeline YAML for a cluster, with `preset`'s resources applied, an exit handler
    that ends the run's lineage record, and a `prepare` that reads its source whenever a run starts
    (never cached: a run from the KFP UI or a recurring run names a folder or s3:// prefix whose
    content may have changed; a DVC md5 costs it one lookup, and every later task caches on the
    md5 it returns)."""
    from kfp import compiler

    from pipelines.emu_pipeline import build_pipeline

    config = pipeline_config(RunRequest(preset=preset, overrides=list(overrides)))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(config, source_read_at_run=True, close_run_on_exit=True),
                                  str(out))
    return out


def submit(request: RunRequest, package: Path | None = None) -> str:
    """Submit the compiled pipeline to the KFP endpoint `request.host`; returns the KFP run id. A
    folder or s3:// source is read by the run's `prepare`, not hashed here (which would download
    all of it to this machine)."""
    import kfp

    from emu.lineage.store import LineageStore

    args = parameters(request, hash_source=not source_read_at_run(request.source))
    package = package or compile_pipeline(request.preset, emu_home() / "emu_pipeline.yaml", request.overrides)
    from emu.cluster.image import digest_of, image_reference

    config = pipeline_config(request)
    client = kfp.Client(host=request.host)
    try:
        # The pods run as the platform's service account (infra/k8s: it may create TrainJobs).
        # enable_caching=None keeps each task's compiled caching option (True would cache `finish`
        # and a `prepare` that must read its source).
        result = client.create_run_from_pipeline_package(str(package), arguments=args, enable_caching=None,
                                                         service_account=config.service_account)
    except Exception as exc:
        raise EmuError(f"cannot submit to {request.host}: {type(exc).__name__}: {exc}") from None
    commit, dirty = git_state()
    LineageStore(os.environ.get("EMU_LINEAGE_URL") or None).create_run(
        trigger=request.trigger, triggered_by=request.triggered_by or getpass.getuser(), schedule_id=request.schedule_id,
        preset=request.preset, parameters=run_parameters(request, args),
        git_commit=commit, git_dirty=dirty, backend="kfp", kfp_run_id=result.run_id, status="running",
        image_digest=digest_of(image_reference(config.image)))
    return result.run_id
