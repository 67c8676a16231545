"""`emu lineage ...`: read the lineage store from the command line.

A Typer sub-app registered by emu/cli.py. Importing it imports only typer: SQLAlchemy and the
store load when a command runs. The database is `--db URL` (or a SQLite file path), else env
EMU_LINEAGE_URL, else `sqlite:///$EMU_HOME/lineage.db`.
"""

from __future__ import annotations

import json
import re
from datetime import datetime, timedelta, timezone
from typing import Annotated, Optional

import typer

from emu.lineage import LineageError

__all__ = ["lineage_app", "parse_since"]

lineage_app = typer.Typer(help="Lineage: which data, code and settings produced a model, and what it produced.",
                          no_args_is_help=True)

DbOption = Annotated[Optional[str], typer.Option(
    "--db", help="Lineage database: SQLAlchemy URL (sqlite:///..., postgresql+psycopg://...) or SQLite file path. "
                 "Default: env EMU_LINEAGE_URL, else $EMU_HOME/lineage.db (EMU_HOME default: the checkout's "
                 "outputs/emu-home, else ~/.emu).")]

_FORMATS = ("text", "json", "dot")


@lineage_app.command("show")
def show(
    target: Annotated[str, typer.Argument(
        help="A run id, an artifact md5 (or unique prefix), artifact:<id> / run:<id>, or a model path/URI "
             "as recorded.")],
    format: Annotated[str, typer.Option("--format", help="text, json (stable schema, see emu.lineage.query) "
                                                         "or dot (Graphviz).")] = "text",
    direction: Annotated[str, typer.Option(
        help="For artifacts: up (what produced it, down to the data), down (what it produced, to the "
             "metrics) or both.")] = "up",
    full: Annotated[bool, typer.Option("--full", help="Text: the full record (every resolved config, run "
                                                      "parameter and per-step metric) instead of the summary.")] = False,
    db: DbOption = None,
) -> None:
    """Show the lineage of a run or an artifact.

    By default a summary: the run (trigger, user, commit, data), the chain of stages from the
    target back to the data with what each read and wrote (DVC md5s), the data shards trained
    on, the final metrics, the evaluation and the registry. --full lists everything recorded:
    runs with their parameters, executions with their resolved configs, artifacts (md5, size,
    URI), edges and every metric; --format json / dot give the same graph for programs and
    Graphviz. An artifact's lineage goes up to the data by default (--direction).
    """
    from emu.lineage.query import DIRECTIONS, show as build, summary
    from emu.lineage.store import LineageStore

    if format not in _FORMATS:
        raise LineageError(f"--format must be one of {', '.join(_FORMATS)}; got {format!r}")
    if direction not in DIRECTIONS:
        raise LineageError(f"--direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    if full and format != "text":
        raise LineageError(f"--full is for --format text (--format {format} always holds everything)")
    with LineageStore(db) as store:
        graph = build(store, target, direction)
        if format == "text":
            text = graph.to_text() if full else summary(store, graph)
        else:
            text = graph.to_json() if format == "json" else graph.to_dot()
    typer.echo(text.rstrip("\n"))


@lineage_app.command("runs")
def runs(
    status: Annotated[Optional[str], typer.Option(
        help="Only runs with this status: pending, running, succeeded, failed, cancelled.")] = None,
    trigger: Annotated[Optional[str], typer.Option(help="Only runs started by: cli, schedule, dashboard, api.")] = None,
    since: Annotated[Optional[str], typer.Option(
        help="Only runs created at or after: an ISO date/time (UTC unless an offset is given) or an age "
             "like 30m, 12h, 7d.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many runs, newest first.")] = 20,
    format: Annotated[str, typer.Option("--format", help="text or json.")] = "text",
    db: DbOption = None,
) -> None:
    """List pipeline runs, newest first."""
    from emu.lineage.query import run_dict
    from emu.lineage.store import LineageStore

    if format not in ("text", "json"):
        raise LineageError(f"--format must be text or json; got {format!r}")
    with LineageStore(db) as store:
        rows = store.list_runs(status=status, trigger=trigger, since=parse_since(since) if since else None,
                               limit=limit)
    if format == "json":
        typer.echo(json.dumps([run_dict(r) for r in rows], indent=2))
        return
    if not rows:
        typer.echo("no runs")
        return
    typer.echo(f"{'run':<28}{'status':<11}{'trigger':<10}{'by':<14}{'preset':<10}{'commit':<14}created")
    for r in rows:
        commit = (r.git_commit or "-")[:12] + ("+" if r.git_dirty else "")
        typer.echo(f"{r.id:<28}{r.status:<11}{r.trigger:<10}{(r.triggered_by or '-')[:13]:<14}"
                   f"{(r.preset or '-')[:9]:<10}{commit:<14}{r.created_at:%Y-%m-%d %H:%M:%S}")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """`30m`, `12h`, `7d`, `2w` ago, or an ISO 8601 date/time (naive means UTC)."""
    match = re.fullmatch(r"\s*(\d+)\s*([smhdw])\s*", value)
    if match:
        seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[match.group(2)]
        return (now or datetime.now(timezone.utc)) - timedelta(seconds=int(match.group(1)) * seconds)
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise LineageError(f"--since {value!r} is neither an ISO date/time nor an age like 30m, 12h, 7d") from None
    return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when
