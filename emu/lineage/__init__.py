"""The lineage store (DESIGN.md, "Lineage is ours, not MLMD's"): runs, stage executions,
artifacts, edges, metrics, schedules and the dashboard's audit log, in SQLAlchemy.

- `emu.lineage.models`: the tables (portable: SQLite by default, PostgreSQL by URL).
- `emu.lineage.store`: `LineageStore`, the small typed write/read API the pipeline tasks, the
  scheduler and the dashboard use.
- `emu.lineage.query`: lineage walks (`upstream`, `downstream`, `show`) returning a `LineageGraph`
  that renders as text, JSON or Graphviz DOT.
- `emu.lineage.cron`: 5/6-field cron expressions for schedules.
- `emu.lineage.cli`: the `emu lineage` commands.

Importing this package imports nothing heavy (no SQLAlchemy): only `LineageError` lives here.
"""

from __future__ import annotations

from emu.errors import EmuError

__all__ = ["LineageError"]


class LineageError(EmuError):
    """The lineage store cannot do what was asked: an unknown run/execution/artifact/schedule, an
    ambiguous target, conflicting records (same md5, different size), or an unreachable database."""
