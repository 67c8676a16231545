"""Schedules: KFP recurring runs on a cluster; on one machine, rows of the lineage store that
`emu scheduler` fires.

Local semantics match the cluster's settings (max concurrency 1, no catch-up): a due schedule
starts one `emu run` (a separate process, recorded with the schedule as its trigger); while that
run is still pending or running, the schedule's next fire times are skipped; a paused schedule
fires again from the first time after it is resumed.
"""

from __future__ import annotations

import getpass
import os
import subprocess
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from emu.errors import EmuError

#: Runs in these states block the next firing of the same schedule.
ACTIVE = ("pending", "running")


def _store():
    from emu.lineage.store import LineageStore

    return LineageStore(os.environ.get("EMU_LINEAGE_URL") or None)


def create_schedule(*, cron: str, name: str, preset: str, data: str, overrides: list[str], host: str) -> dict[str, Any]:
    from emu.lineage.cron import next_fire_time

    parameters = {"preset": preset, "data": data, "overrides": overrides}
    if host:
        return _create_recurring_run(cron=cron, name=name, host=host, **parameters)
    validate_run(preset, data, overrides)
    store = _store()
    schedule = store.create_schedule(name or f"{preset}-{int(time.time())}", cron, parameters=parameters,
                                     created_by=getpass.getuser(), preset=preset)
    return {"id": schedule.id, "name": schedule.name, "cron": schedule.cron,
            "next": schedule.next_run_at or next_fire_time(cron, datetime.now(timezone.utc))}


def validate_run(preset: str, data: str, overrides: list[str]) -> None:
    """Refuse what `emu run` would refuse (ConfigError naming the setting, preset, data path or
    md5), now rather than at every firing. The data's md5 and the code version are resolved
    again when the schedule fires: a nightly run on new data retrains, on the same data it is
    served from the cache."""
    from emu.pipeline.runner import RunRequest, check_remote, parameters

    check_remote()
    parameters(RunRequest(preset=preset, source=data, overrides=list(overrides)))


def list_schedules(host: str = "") -> list[str]:
    if host:
        client = _client(host)
        runs = client.list_recurring_runs(page_size=100).recurring_runs or []
        return [f"{r.recurring_run_id}  {r.display_name}  {r.status}  {r.trigger.cron_schedule.cron}" for r in runs]
    store = _store()
    lines = []
    for s in store.list_schedules():
        last = store.get_run(s.last_run_id) if s.last_run_id else None
        lines.append(f"{s.id}  {s.name:<20} {s.cron:<16} {'paused' if s.paused else 'active':<7} "
                     f"last {s.last_run_id or '-'} ({last.status if last else '-'})  next {s.next_run_at or '-'}")
    return lines or ["no schedules"]


def set_paused(target: str, paused: bool, host: str = "") -> str:
    if host:
        client = _client(host)
        (client.disable_recurring_run if paused else client.enable_recurring_run)(target)
        return f"{'paused' if paused else 'resumed'} recurring run {target}"
    schedule = _store().set_paused(target, paused)
    return f"{'paused' if paused else 'resumed'} schedule {schedule.id} ({schedule.name})"


def delete_schedule(target: str, host: str = "") -> str:
    if host:
        _client(host).delete_recurring_run(target)
        return f"deleted recurring run {target}"
    _store().delete_schedule(target)
    return f"deleted schedule {target}"


def fire_due(now: datetime | None = None, launch: Callable[[str, dict], subprocess.Popen] | None = None,
             echo: Callable[[str], None] = print) -> list[str]:
    """Start a run for every due, unblocked schedule; returns the run ids started."""
    from emu.lineage.cron import next_fire_time

    from emu.pipeline.runstate import reconcile_quietly

    store = _store()
    reconcile_quietly(store)  # a run whose `emu run` died must not block its schedule for good
    now = now or datetime.now(timezone.utc)
    started = []
    for schedule in store.due_schedules(now):
        following = next_fire_time(schedule.cron, now)
        last = store.get_run(schedule.last_run_id) if schedule.last_run_id else None
        if last is not None and last.status in ACTIVE:
            store.mark_schedule_fired(schedule.id, schedule.last_run_id, following,
                                      expected_next_run_at=schedule.next_run_at)
            echo(f"{schedule.name}: previous run {last.id} is still {last.status}; skipped ({schedule.next_run_at})")
            continue
        params = schedule.parameters or {}
        run = store.create_run(trigger="schedule", triggered_by=f"schedule:{schedule.name}", schedule_id=schedule.id,
                               preset=params.get("preset", "tiny"), status="pending")
        if not store.mark_schedule_fired(schedule.id, run.id, following, expected_next_run_at=schedule.next_run_at):
            store.update_run(run.id, status="cancelled", error="another scheduler fired this schedule first")
            continue
        try:
            (launch or _launch)(run.id, params)
        except Exception as exc:  # never leave a run pending that nothing will start
            store.end_run(run.id, "failed", f"could not start `emu run`: {type(exc).__name__}: {exc}")
            echo(f"{schedule.name}: could not start run {run.id}: {exc}")
            continue
        echo(f"{schedule.name}: started run {run.id}")
        started.append(run.id)
    return started


def run_scheduler(once: bool = False, poll_seconds: float = 5.0, echo: Callable[[str], None] = print) -> None:
    echo(f"scheduler: checking every {poll_seconds:g} s (lineage {os.environ.get('EMU_LINEAGE_URL') or 'default'})")
    while True:
        fire_due(echo=echo)
        if once:
            return
        time.sleep(poll_seconds)


def _launch(run_id: str, params: dict) -> subprocess.Popen:
    from emu.pipeline.runner import launch_background

    return launch_background(run_id, params.get("preset", "tiny"), params.get("data", ""),
                             list(params.get("overrides", [])), store=_store())


def _client(host: str):
    import kfp

    return kfp.Client(host=host)


def _create_recurring_run(*, cron: str, name: str, host: str, preset: str, data: str, overrides: list[str]) -> dict:
    """A KFP recurring run of the compiled pipeline: 6-field cron, max concurrency 1, no catch-up."""
    from emu.lineage.cron import parse_cron

    fields = cron.split()
    if len(fields) == 5:  # KFP's cron has a leading seconds field
        cron = "0 " + cron
    parse_cron(cron)
    package, args = recurring_run_package(preset, data, overrides)
    client = _client(host)
    try:
        experiment = client.create_experiment(name="emu")
        job = client.create_recurring_run(experiment_id=experiment.experiment_id, job_name=name or f"emu-{preset}",
                                          cron_expression=cron, max_concurrency=1, no_catchup=True,
                                          pipeline_package_path=str(package), params=args,
                                          enable_caching=None)  # each task's compiled option
    except Exception as exc:
        raise EmuError(f"cannot create a recurring run on {host}: {type(exc).__name__}: {exc}") from None
    return {"id": job.recurring_run_id, "name": job.display_name, "cron": cron, "next": "set by KFP"}


def recurring_run_package(preset: str, data: str, overrides: list[str]) -> tuple[Path, dict[str, str]]:
    """The pipeline package and the arguments a KFP recurring run is created with.

    KFP fixes both now, for every firing. So a folder or s3:// source is read by `prepare` at each
    firing (never cached in a cluster's package: compile_pipeline) instead of being hashed once here: new data there gives a new md5 and
    retrains; the same data gives the same md5, and every task after `prepare` is served from the
    cache (tasks take md5s: emu.pipeline.handoff). The code is the pinned image's for the
    schedule's life (its code versions are computed now): a schedule picks up new code when it is
    created again with the new image. The production model the gate compares with is looked up
    when each firing's evaluate runs (PRODUCTION_AT_RUN)."""
    from emu.pipeline.runner import RunRequest, compile_pipeline, emu_home, parameters, source_read_at_run
    from emu.pipeline.tasks import PRODUCTION_AT_RUN

    request = RunRequest(preset=preset, source=data, overrides=overrides, trigger="schedule")
    # The gate compares with the production model of each firing, not the one of today.
    args = {**parameters(request, hash_source=not source_read_at_run(data)), "production": PRODUCTION_AT_RUN}
    package = compile_pipeline(preset, emu_home() / "emu_recurring_pipeline.yaml", overrides)
    return package, args
