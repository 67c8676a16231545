"""`emu run`, `emu compile`, `emu schedule ...`, `emu scheduler`: the pipeline commands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

OverridesArgument = Annotated[Optional[list[str]], typer.Argument(
    help="Stage settings as section.key=value, e.g. stage2.steps=50 (sections: the preset's).", show_default=False)]

schedule_app = typer.Typer(help="Scheduled pipeline runs: KFP recurring runs on a cluster, `emu scheduler` here.",
                           no_args_is_help=True)


HostOption = Annotated[str, typer.Option(
    help="KFP endpoint (e.g. http://ml-pipeline-ui.kubeflow:80): act on that cluster instead of this machine.")]


def run(
    ctx: typer.Context,
    preset: Annotated[str, typer.Option("--preset", "--config", help="Preset name or YAML path.")] = "tiny",
    data: Annotated[str, typer.Option(help="Shard datasets to train on: a folder, s3:// URI or DVC md5. "
                                           "Default: generate the synthetic shapes world.")] = "",
    host: HostOption = "",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print every line of every stage here too "
                                                                  "(they are always in the run's log file).")] = False,
    overrides: OverridesArgument = None,
) -> None:
    """Run the whole pipeline: on this machine through kfp.local (default: tiny preset, synthetic
    data), or on a KFP cluster with --host. Prints a line when each stage starts and ends, the
    training stages' progress and, at the end, the run id, where its log and artifacts are, the
    evaluation and the gate's verdict. Everything the stages print goes to the run's log file
    ($EMU_HOME/logs/RUN_ID.log). Exit 1 when the run failed, 128 + the signal when a signal
    stopped it (the run is recorded as cancelled; its tasks got SIGTERM).

    `emu run cancel RUN` stops a local run and its tasks (a training stage checkpoints first)
    and records it as cancelled."""
    import os

    from emu.pipeline.runner import RunRequest, run_local, submit

    if overrides and overrides[0] == "cancel":
        _cancel(overrides[1:])
        return
    request = RunRequest(preset=preset, source=data, overrides=list(overrides or []), host=host,
                         run_id=os.environ.get("EMU_RUN_ID") or None)
    if host:
        run_id = submit(request)
        typer.echo(f"submitted to {host}: KFP run {run_id}")
        return
    verbose = verbose or bool(ctx.find_root().params.get("verbose"))
    outcome = run_local(request, verbose=verbose)
    if outcome.stopped_by:
        raise typer.Exit(128 + outcome.stopped_by)
    raise typer.Exit(0 if outcome.status == "succeeded" else 1)


def _cancel(targets: list[str]) -> None:
    """`emu run cancel RUN`: stop the run and its tasks; print how it ended."""
    import getpass

    from emu.errors import EmuError
    from emu.pipeline import runstate
    from emu.pipeline.tasks import lineage

    if len(targets) != 1:
        raise EmuError("usage: emu run cancel RUN_ID (one run id, as `emu lineage runs` lists them)")
    store = lineage()
    status = runstate.cancel(store, targets[0], getpass.getuser(), echo=typer.echo)
    typer.echo(f"run {targets[0]}: {status}")


def compile_(
    out: Annotated[Path, typer.Option(help="Where to write the pipeline YAML.")] = Path("pipelines/emu_pipeline.yaml"),
    preset: Annotated[str, typer.Option("--preset", "--config", help="Preset whose pipeline.resources apply.")] = "emu2-37b",
) -> None:
    """Compile the pipeline to KFP YAML (the committed pipelines/emu_pipeline.yaml is this with emu2-37b)."""
    from emu.pipeline.runner import compile_pipeline

    typer.echo(f"wrote {compile_pipeline(preset, out)}")


@schedule_app.command("create")
def schedule_create(
    cron: Annotated[str, typer.Option(help="Cron expression: 5 fields, or 6 with seconds first (KFP's form).")],
    name: Annotated[str, typer.Option(help="Schedule name (unique).")] = "",
    preset: Annotated[str, typer.Option("--preset", "--config", help="Preset name or YAML path each run uses "
                                                                     "(as `emu run --preset`).")] = "tiny",
    data: Annotated[str, typer.Option(help="Training data (as `emu run --data`).")] = "",
    host: Annotated[str, typer.Option(help="KFP endpoint: create a KFP recurring run there instead of a local "
                                           "schedule.")] = "",
    overrides: OverridesArgument = None,
) -> None:
    """Create a schedule: a KFP recurring run (6-field cron, max concurrency 1, no catch-up) with
    --host; else a local schedule that `emu scheduler` runs."""
    from emu.pipeline.schedules import create_schedule

    schedule = create_schedule(cron=cron, name=name, preset=preset, data=data, overrides=list(overrides or []),
                               host=host)
    typer.echo(f"created schedule {schedule['id']} ({schedule['name']}): {schedule['cron']}, next {schedule['next']}")


@schedule_app.command("list")
def schedule_list(host: Annotated[str, typer.Option(help="List the KFP recurring runs of this endpoint.")] = "") -> None:
    """List schedules with their cron, state, last run and next fire time."""
    from emu.pipeline.schedules import list_schedules

    for line in list_schedules(host):
        typer.echo(line)


def _set(target: str, paused: bool, host: str) -> None:
    from emu.pipeline.schedules import set_paused

    typer.echo(set_paused(target, paused, host))


ScheduleArgument = Annotated[str, typer.Argument(
    help="The schedule: its id or name as `emu schedule list` shows them (a KFP recurring run id with --host).",
    show_default=False)]
ScheduleHostOption = Annotated[str, typer.Option(
    help="KFP endpoint whose recurring run this is; without it, a local schedule (`emu scheduler`).")]


@schedule_app.command("pause")
def schedule_pause(schedule: ScheduleArgument, host: ScheduleHostOption = "") -> None:
    """Pause a schedule (no runs start until it is resumed; missed times are not caught up)."""
    _set(schedule, True, host)


@schedule_app.command("resume")
def schedule_resume(schedule: ScheduleArgument, host: ScheduleHostOption = "") -> None:
    """Resume a paused schedule from the next fire time after now."""
    _set(schedule, False, host)


@schedule_app.command("delete")
def schedule_delete(schedule: ScheduleArgument, host: ScheduleHostOption = "") -> None:
    """Delete a schedule (the runs it started stay in the lineage store)."""
    from emu.pipeline.schedules import delete_schedule

    typer.echo(delete_schedule(schedule, host))


def scheduler(
    once: Annotated[bool, typer.Option(help="Fire what is due now and exit (for cron or tests).")] = False,
    poll: Annotated[float, typer.Option(help="Seconds between checks.")] = 5.0,
) -> None:
    """Run the local schedules: start each due schedule's pipeline run, never while the previous run
    of the same schedule is still going."""
    from emu.pipeline.schedules import run_scheduler

    try:
        run_scheduler(once=once, poll_seconds=poll, echo=lambda line: typer.echo(line))
    except KeyboardInterrupt:
        typer.echo("scheduler stopped", err=True)
        sys.exit(130)


def register(app: typer.Typer) -> None:
    """Add the pipeline commands to the `emu` app."""
    app.command("run")(run)
    app.command("compile")(compile_)
    app.command("scheduler")(scheduler)
    app.add_typer(schedule_app, name="schedule")

