"""`LineageStore`: the small typed API over the lineage tables (emu.lineage.models).

Where the database is: `LineageStore(url)`, else env `EMU_LINEAGE_URL`, else
`sqlite:///$EMU_HOME/lineage.db` (emu.home; all read when the store is made, never at import).
A URL without `://` is taken as a SQLite file path. PostgreSQL is any SQLAlchemy URL such as
`postgresql+psycopg://user:pass@host/db`; its driver is imported only when such a URL is used.

Tables are created on first use (`create_all`, serialised between processes: SQLite's write lock,
a PostgreSQL advisory lock). Schema migrations are future work: a database whose
`lineage_meta.schema_version` is newer than this code's is refused rather than misread.

Concurrency. kfp.local runs each task as its own process, all recording into one SQLite file
while the scheduler and the dashboard read it. SQLite is opened in WAL mode (readers never block
the writer) with a busy timeout, and every write transaction starts with `BEGIN IMMEDIATE`: it
takes the write lock up front, so a transaction that reads then writes waits its turn instead of
failing with "database is locked" when another process committed in between. Transactions are
short (one API call each). WAL needs the file on a local filesystem (not NFS): processes on
several machines share a PostgreSQL database instead.

Returned rows (Run, Schedule, ...) are detached snapshots: read their attributes, don't mutate
them; change records through the API.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import secrets
import socket
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, func, select, text, update
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, IntegrityError, NoSuchModuleError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from emu.lineage import LineageError
from emu.lineage.cron import parse_cron
from emu.lineage.models import (ARTIFACT_TYPES, BACKENDS, DIRECTIONS, EXECUTION_STATUSES, RUN_STATUSES, SCHEMA_VERSION, TERMINAL_STATUSES,
                                TRIGGERS, Artifact, ArtifactLocation, AuditEntry, Base, Edge, IdempotencyKey, Meta,
                                Metric, Registration, Run, RunOwner, Schedule, StageExecution, TaskCall, utcnow)

__all__ = ["LineageStore", "default_url", "resolve_url", "config_md5", "new_run_id", "valid_md5"]

#: Seconds a SQLite connection waits for another process's write lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 60.0
#: Key of the PostgreSQL advisory lock that serialises table creation ("emulinea" in ASCII).
_PG_CREATE_LOCK = 0x656D756C696E6561


def default_url() -> str:
    """`sqlite:///$EMU_HOME/lineage.db` (emu.home: EMU_HOME read now, else the one default)."""
    from emu.home import emu_home

    return f"sqlite:///{emu_home() / 'lineage.db'}"


def resolve_url(url: str | os.PathLike[str] | None = None) -> str:
    """The database URL: `url`, else env EMU_LINEAGE_URL, else `default_url()`. A plain path
    (no `://`, or a Path) is a SQLite file."""
    url = (os.fspath(url) if url else None) or os.environ.get("EMU_LINEAGE_URL") or default_url()
    if "://" not in url:
        return f"sqlite:///{Path(url).expanduser().absolute()}"
    return url


def config_md5(config: Mapping[str, Any] | None) -> str | None:
    """md5 of the canonical JSON of a config (sorted keys, compact separators)."""
    if config is None:
        return None
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.md5(canonical.encode()).hexdigest()


def new_run_id(now: datetime | None = None) -> str:
    """`run-YYYYMMDD-HHMMSS-xxxxxx`: readable, sortable by time, random suffix (24 bits)."""
    now = (now or utcnow()).astimezone(timezone.utc)
    return f"run-{now:%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def valid_md5(md5: str) -> bool:
    """A DVC md5: 32 lowercase hex digits, with `.dir` for folders."""
    digest = md5[:-4] if md5.endswith(".dir") else md5
    return len(digest) == 32 and all(c in "0123456789abcdef" for c in digest)


class LineageStore:
    """Runs, stage executions, artifacts, edges, metrics, schedules and the audit log.

    Every method is one transaction. Datetimes in and out are timezone-aware UTC; naive ones are
    refused (LineageError).
    """

    def __init__(self, url: str | os.PathLike[str] | None = None, *, echo: bool = False) -> None:
        self.url = resolve_url(url)
        self.engine = _make_engine(self.url, echo=echo)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = self.engine.execution_options(emu_write=True)
        self._write_sessions = sessionmaker(self._writer, expire_on_commit=False)
        self._ready = False

    # ------------------------------------------------------------------ plumbing

    def __enter__(self) -> LineageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release pooled connections (the store can still be used; it reconnects)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"LineageStore({make_url(self.url).render_as_string(hide_password=True)!r})"

    def create_tables(self) -> None:
        """Create missing tables and record the schema version; safe to call from many processes
        at once. Called on first use."""
        if self._ready:
            return
        for attempt in range(5):
            try:
                self._create_tables()
                break
            except OperationalError as exc:
                # Processes opening a new SQLite file at once race for switching it to WAL, which
                # SQLite answers with "locked" at once, without its busy timeout: try again.
                if "locked" not in str(exc.orig) or attempt == 4:
                    raise LineageError(f"cannot open lineage database {self!r}: {exc.orig}") from exc
                time.sleep(0.2 * (attempt + 1))
        self._ready = True

    def _create_tables(self) -> None:
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_CREATE_LOCK})
            Base.metadata.create_all(conn)
            version = conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar()
            if version is None:
                conn.execute(Meta.__table__.insert().values(key="schema_version", value=str(SCHEMA_VERSION)))
            elif int(version) > SCHEMA_VERSION:
                raise LineageError(f"lineage database {self!r} has schema version {version}, newer than this "
                                   f"emu's {SCHEMA_VERSION}; upgrade emu (migrations are not implemented yet)")

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session in one transaction: committed when the block ends, rolled back on error.
        `write=True` takes SQLite's write lock at BEGIN (see the module docstring)."""
        self.create_tables()
        factory = self._write_sessions if write else self._sessions
        with factory.begin() as session:
            yield session

    # ------------------------------------------------------------------ runs

    def create_run(self, *, pipeline: str = "emu", trigger: str = "cli", triggered_by: str | None = None,
                   schedule_id: str | None = None, preset: str | None = None,
                   parameters: Mapping[str, Any] | None = None, git_commit: str | None = None,
                   git_dirty: bool | None = None, image_digest: str | None = None, backend: str = "local",
                   kfp_run_id: str | None = None, status: str = "pending", run_id: str | None = None,
                   started_at: datetime | None = None, created_at: datetime | None = None) -> Run:
        """Record a new run; its id is `run_id` or `new_run_id()`. Status `running` sets started_at
        to now unless given."""
        _check_in("status", status, RUN_STATUSES)
        _check_in("trigger", trigger, TRIGGERS)
        _check_in("backend", backend, BACKENDS)
        created = _aware("created_at", created_at) or utcnow()
        if status == "running" and started_at is None:
            started_at = created
        run = Run(id=run_id or new_run_id(created), pipeline=pipeline, status=status, trigger=trigger,
                  triggered_by=triggered_by, schedule_id=schedule_id, preset=preset,
                  parameters=_json_dict("parameters", parameters), git_commit=git_commit, git_dirty=git_dirty,
                  image_digest=image_digest, backend=backend, kfp_run_id=kfp_run_id,
                  started_at=_aware("started_at", started_at), created_at=created)
        try:
            with self.session(write=True) as s:
                if schedule_id is not None and s.get(Schedule, schedule_id) is None:
                    raise LineageError(f"no schedule {schedule_id!r} (create_run schedule_id)")
                if s.get(Run, run.id) is not None:
                    raise LineageError(f"run {run.id!r} already exists")
                s.add(run)
        except IntegrityError as exc:
            raise LineageError(f"cannot record run {run.id!r}: {exc.orig}") from exc
        return run

    def update_run(self, run_id: str, *, status: str | None = None, error: str | None = None,
                   started_at: datetime | None = None, ended_at: datetime | None = None,
                   kfp_run_id: str | None = None, image_digest: str | None = None) -> Run:
        """Change a run's status and times. `running` sets started_at (if unset) to now; a terminal
        status (succeeded, failed, cancelled) sets ended_at to now unless given."""
        if status is not None:
            _check_in("status", status, RUN_STATUSES)
        with self.session(write=True) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise LineageError(f"no run {run_id!r}")
            now = utcnow()
            if status is not None:
                run.status = status
                if status == "running" and run.started_at is None and started_at is None:
                    run.started_at = now
                if status in TERMINAL_STATUSES and ended_at is None and run.ended_at is None:
                    run.ended_at = now
            if error is not None:
                run.error = error
            if started_at is not None:
                run.started_at = _aware("started_at", started_at)
            if ended_at is not None:
                run.ended_at = _aware("ended_at", ended_at)
            if kfp_run_id is not None:
                run.kfp_run_id = kfp_run_id
            if image_digest is not None:
                run.image_digest = image_digest
        return run

    def set_run_details(self, run_id: str, *, parameters: Mapping[str, Any] | None = None,
                        git_commit: str | None = None, git_dirty: bool | None = None) -> None:
        """Fill in what a run recorded ahead of time (by the scheduler) learns when it starts."""
        with self.session(write=True) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise LineageError(f"no run {run_id!r}")
            if parameters is not None:
                run.parameters = _json_dict("parameters", parameters)
            if git_commit is not None:
                run.git_commit = git_commit
            if git_dirty is not None:
                run.git_dirty = git_dirty

    def get_run(self, run_id: str) -> Run | None:
        """The run, or None."""
        with self.session() as s:
            return s.get(Run, run_id)

    def get_run_by_kfp_id(self, kfp_run_id: str) -> Run | None:
        """The run recorded for a KFP run id (a run submitted to a cluster), or None."""
        with self.session() as s:
            return s.scalars(select(Run).where(Run.kfp_run_id == kfp_run_id)
                             .order_by(Run.created_at.desc()).limit(1)).first()

    def list_runs(self, *, status: str | None = None, trigger: str | None = None, since: datetime | None = None,
                  schedule_id: str | None = None, pipeline: str | None = None, limit: int | None = 50) -> list[Run]:
        """Runs, newest first, filtered by status, trigger, creation time (>= since), schedule,
        pipeline; at most `limit` (None: all)."""
        query = select(Run).order_by(Run.created_at.desc(), Run.id.desc())
        if status is not None:
            _check_in("status", status, RUN_STATUSES)
            query = query.where(Run.status == status)
        if trigger is not None:
            _check_in("trigger", trigger, TRIGGERS)
            query = query.where(Run.trigger == trigger)
        if since is not None:
            query = query.where(Run.created_at >= _aware("since", since))
        if schedule_id is not None:
            query = query.where(Run.schedule_id == schedule_id)
        if pipeline is not None:
            query = query.where(Run.pipeline == pipeline)
        if limit is not None:
            if limit < 1:
                raise LineageError(f"limit must be at least 1, got {limit}")
            query = query.limit(limit)
        with self.session() as s:
            return list(s.scalars(query))

    # ------------------------------------------------------------------ run owners

    def claim_run(self, run_id: str, *, host: str, pid: int, pid_started: float) -> None:
        """Record (or replace) the process that drives `run_id`, with a fresh heartbeat."""
        with self.session(write=True) as s:
            if s.get(Run, run_id) is None:
                raise LineageError(f"no run {run_id!r} (claim_run)")
            owner = s.get(RunOwner, run_id)
            if owner is None:
                s.add(RunOwner(run_id=run_id, host=host, pid=pid, pid_started=pid_started, heartbeat_at=utcnow()))
            else:
                owner.host, owner.pid, owner.pid_started, owner.heartbeat_at = host, pid, pid_started, utcnow()

    def heartbeat(self, run_id: str) -> str | None:
        """The owner is alive: move its heartbeat to now. Returns who asked for a cancel, if anyone."""
        with self.session(write=True) as s:
            owner = s.get(RunOwner, run_id)
            if owner is None:
                return None
            owner.heartbeat_at = utcnow()
            return owner.cancel_requested_by

    def run_owner(self, run_id: str) -> RunOwner | None:
        with self.session() as s:
            return s.get(RunOwner, run_id)

    def request_cancel(self, run_id: str, user: str) -> None:
        """Ask the owner of `run_id` to stop it (read by its heartbeat)."""
        with self.session(write=True) as s:
            owner = s.get(RunOwner, run_id)
            if owner is not None:
                owner.cancel_requested_by = user

    def active_local_runs(self) -> list[tuple[Run, RunOwner | None]]:
        """Local runs that say pending or running, each with its owner (None: never claimed)."""
        with self.session() as s:
            rows = s.execute(select(Run, RunOwner).outerjoin(RunOwner, RunOwner.run_id == Run.id)
                             .where(Run.status.in_(("pending", "running")), Run.backend == "local")
                             .order_by(Run.created_at))
            return [(run, owner) for run, owner in rows]

    def end_run(self, run_id: str, status: str, error: str | None) -> bool:
        """End a run that may still say pending or running, in one transaction: the run gets
        `status` (failed or cancelled) and `error`, and so does every execution of it that still
        says pending or running. Returns False (and changes nothing) when the run had already
        ended: its own record of how it ended wins over a later guess."""
        _check_in("status", status, ("failed", "cancelled"))
        with self.session(write=True) as s:
            run = s.get(Run, run_id)
            if run is None:
                raise LineageError(f"no run {run_id!r}")
            if run.status not in ("pending", "running"):
                return False
            now = utcnow()
            run.status, run.error, run.ended_at = status, error, run.ended_at or now
            for execution in s.scalars(select(StageExecution).where(
                    StageExecution.run_id == run_id, StageExecution.status.in_(("pending", "running")))):
                execution.status, execution.ended_at = status, now
                execution.error = f"the run ended while this stage was running: {error}"
            return True

    def end_open_executions(self, run_id: str, status: str, error: str) -> int:
        """Mark the executions of `run_id` that still say pending or running as `status` (a run
        recording its own outcome: a task killed with it never recorded its end)."""
        _check_in("status", status, TERMINAL_STATUSES)
        with self.session(write=True) as s:
            open_ = list(s.scalars(select(StageExecution).where(
                StageExecution.run_id == run_id, StageExecution.status.in_(("pending", "running")))))
            for execution in open_:
                execution.status, execution.error, execution.ended_at = status, error, utcnow()
            return len(open_)

    # ------------------------------------------------------------------ executions

    def start_execution(self, run_id: str, stage: str, config: Mapping[str, Any] | None = None,
                        host: str | None = None, *, started_at: datetime | None = None,
                        status: str = "running") -> int:
        """Record that a task of `run_id` started; returns the execution id. `config` is the stage's
        resolved config (stored with its md5); `host` defaults to this machine's name."""
        _check_in("status", status, EXECUTION_STATUSES)
        if not stage:
            raise LineageError("stage name must not be empty")
        config = None if config is None else _json_dict("config", config)
        execution = StageExecution(run_id=run_id, stage=stage, status=status, cached=False,
                                   host=host if host is not None else socket.gethostname(),
                                   started_at=_aware("started_at", started_at) or utcnow(),
                                   config=config, config_md5=config_md5(config))
        with self.session(write=True) as s:
            if s.get(Run, run_id) is None:
                raise LineageError(f"no run {run_id!r} (start_execution of stage {stage!r})")
            s.add(execution)
            s.flush()
            return execution.id

    def finish_execution(self, execution_id: int, status: str, error: str | None = None, cached: bool = False,
                         *, ended_at: datetime | None = None) -> None:
        """Record how a task ended: succeeded, failed, cancelled or skipped; `cached` when KFP served
        it from its cache."""
        _check_in("status", status, TERMINAL_STATUSES)
        with self.session(write=True) as s:
            execution = s.get(StageExecution, execution_id)
            if execution is None:
                raise LineageError(f"no execution {execution_id}")
            execution.status = status
            execution.error = error
            execution.cached = bool(cached)
            execution.ended_at = _aware("ended_at", ended_at) or utcnow()

    def get_execution(self, execution_id: int) -> StageExecution | None:
        with self.session() as s:
            return s.get(StageExecution, execution_id)

    def list_executions(self, run_id: str) -> list[StageExecution]:
        """A run's executions in start order."""
        with self.session() as s:
            return list(s.scalars(select(StageExecution).where(StageExecution.run_id == run_id)
                                  .order_by(StageExecution.started_at, StageExecution.id)))

    def record_cached_execution(self, run_id: str, stage: str, original_id: int) -> int:
        """A task of `run_id` that KFP served from its cache: a succeeded, cached execution with the
        original's config, host and edges (inputs and outputs), pointing at the original."""
        with self.session(write=True) as s:
            original = s.get(StageExecution, original_id)
            if original is None:
                raise LineageError(f"no execution {original_id} to record a cached copy of")
            if s.get(Run, run_id) is None:
                raise LineageError(f"no run {run_id!r} (cached execution of stage {stage!r})")
            now = utcnow()
            copy = StageExecution(run_id=run_id, stage=stage, status="succeeded", cached=True, host=original.host,
                                  started_at=now, ended_at=now, config=original.config,
                                  config_md5=original.config_md5, cached_from=original.cached_from or original.id)
            s.add(copy)
            s.flush()
            for edge in s.scalars(select(Edge).where(Edge.execution_id == original.id)):
                s.add(Edge(execution_id=copy.id, artifact_id=edge.artifact_id, direction=edge.direction,
                           role=edge.role))
            return copy.id

    def record_call(self, execution_id: int, fingerprint: str) -> None:
        """The KFP cache identity of an execution (models.TaskCall), recorded when it starts."""
        with self.session(write=True) as s:
            s.add(TaskCall(execution_id=execution_id, fingerprint=fingerprint))

    def record_result(self, execution_id: int, result: str) -> None:
        """What the execution's task returned (the next tasks' input)."""
        with self.session(write=True) as s:
            call = s.get(TaskCall, execution_id)
            if call is None:
                raise LineageError(f"execution {execution_id} has no recorded call")
            call.result = result

    def call_of(self, execution_id: int) -> TaskCall | None:
        with self.session() as s:
            return s.get(TaskCall, execution_id)

    def original_call(self, stage: str, fingerprint: str, backend: str) -> tuple[StageExecution, str] | None:
        """The latest execution of `stage` with `fingerprint` in a run on `backend` that did the
        work and succeeded, with what it returned: the execution a KFP cache hit on that
        fingerprint reuses (a local run's is not in a cluster's cache, and its training may have
        come out otherwise)."""
        with self.session() as s:
            row = s.execute(select(StageExecution, TaskCall.result)
                            .join(TaskCall, TaskCall.execution_id == StageExecution.id)
                            .join(Run, Run.id == StageExecution.run_id)
                            .where(TaskCall.fingerprint == fingerprint, TaskCall.result.is_not(None),
                                   StageExecution.stage == stage, StageExecution.status == "succeeded",
                                   StageExecution.cached.is_(False), Run.backend == backend)
                            .order_by(StageExecution.id.desc()).limit(1)).first()
            return (row[0], row[1]) if row is not None else None

    def record_metric_series(self, run_id: str, execution_id: int, series: list[tuple[int, Mapping[str, float]]]) -> int:
        """Per-step values of a training execution (loss curves) in one transaction; non-finite and
        non-numeric values are left out (a curve may have gaps, never a poisoned point)."""
        rows = [Metric(run_id=run_id, execution_id=execution_id, name=name, value=float(value), step=step)
                for step, values in series for name, value in values.items()
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)]
        with self.session(write=True) as s:
            execution = s.get(StageExecution, execution_id)
            if execution is None or execution.run_id != run_id:
                raise LineageError(f"no execution {execution_id} in run {run_id!r} (record_metric_series)")
            s.add_all(rows)
        return len(rows)

    def list_metrics_of_execution(self, execution_id: int) -> list[Metric]:
        with self.session() as s:
            return list(s.scalars(select(Metric).where(Metric.execution_id == execution_id).order_by(Metric.id)))

    # ------------------------------------------------------------------ registry

    def promote(self, run_id: str, *, model_md5: str, decoder_md5: str | None, metrics: Mapping[str, float]) -> str:
        """Make the model (and decoder) of `run_id` the production model; returns its version.
        LineageError when that model and decoder are production already: a second version of the
        same md5s would make the registry's history say something changed."""
        with self.session(write=True) as s:
            current = s.scalars(select(Registration).order_by(Registration.registered_at.desc(),
                                                              Registration.id.desc()).limit(1)).first()
            if current is not None and (current.model_md5, current.decoder_md5) == (model_md5, decoder_md5):
                raise LineageError(f"model {model_md5} is production already as {current.version} "
                                   f"(run {current.run_id})")
            count = s.scalar(select(func.count()).select_from(Registration)) or 0
            version = f"v{count + 1}"
            s.add(Registration(version=version, run_id=run_id, model_md5=model_md5, decoder_md5=decoder_md5,
                               metrics={k: float(v) for k, v in metrics.items()}))
        return version

    def production(self) -> Registration | None:
        """The newest registration, or None before the first promotion."""
        with self.session() as s:
            return s.scalars(select(Registration).order_by(Registration.registered_at.desc(),
                                                           Registration.id.desc()).limit(1)).first()

    def registrations(self) -> list[Registration]:
        with self.session() as s:
            return list(s.scalars(select(Registration).order_by(Registration.id.desc())))

    # ------------------------------------------------------------------ artifacts and edges

    def record_artifact(self, md5: str, size: int | None, uri: str | None, type: str,
                        name: str | None = None) -> int:
        """The id of the artifact with this DVC md5 and type, recording it if new (idempotent).
        A known artifact seen at a new URI gains that location; a different size for the same md5
        is a conflict (LineageError)."""
        if not valid_md5(md5):
            raise LineageError(f"artifact md5 {md5!r} is not a DVC md5 (32 lowercase hex digits, "
                               f"'.dir' suffix for folders)")
        _check_in("artifact type", type, ARTIFACT_TYPES)
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise LineageError(f"artifact size must be a non-negative integer of bytes, got {size!r}")
        for attempt in range(3):
            try:
                with self.session(write=True) as s:
                    artifact = s.scalar(select(Artifact).where(Artifact.md5 == md5, Artifact.type == type))
                    if artifact is None:
                        artifact = Artifact(md5=md5, size=size, uri=uri, type=type, name=name)
                        s.add(artifact)
                        s.flush()
                    else:
                        if size is not None and artifact.size is not None and artifact.size != size:
                            raise LineageError(
                                f"{type} artifact {md5} was recorded with size {artifact.size}, now {size}: "
                                f"the same md5 cannot have two sizes")
                        if artifact.size is None and size is not None:
                            artifact.size = size
                        if artifact.uri is None and uri is not None:
                            artifact.uri = uri
                        if artifact.name is None and name is not None:
                            artifact.name = name
                    if uri is not None and s.scalar(select(ArtifactLocation.id).where(
                            ArtifactLocation.artifact_id == artifact.id, ArtifactLocation.uri == uri)) is None:
                        s.add(ArtifactLocation(artifact_id=artifact.id, uri=uri))
                    return artifact.id
            except IntegrityError:
                # Another process inserted the same (md5, type) or location between our read and
                # write (possible on PostgreSQL; SQLite's BEGIN IMMEDIATE serialises): read again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def get_artifact(self, artifact_id: int) -> Artifact | None:
        with self.session() as s:
            return s.get(Artifact, artifact_id)

    def artifact_uris(self, artifact_id: int) -> list[str]:
        """Every URI the artifact was recorded at, first one first."""
        with self.session() as s:
            return list(s.scalars(select(ArtifactLocation.uri).where(ArtifactLocation.artifact_id == artifact_id)
                                  .order_by(ArtifactLocation.id)))

    def output_artifacts(self, execution_id: int) -> list[Artifact]:
        """The artifacts an execution wrote (its `out` edges), in id order."""
        with self.session() as s:
            return list(s.scalars(select(Artifact).join(Edge, Edge.artifact_id == Artifact.id)
                                  .where(Edge.execution_id == execution_id, Edge.direction == "out")
                                  .order_by(Artifact.id)))

    def link(self, execution_id: int, artifact_id: int, direction: str, role: str = "") -> None:
        """Record that an execution read (`in`) or wrote (`out`) an artifact in `role` (idempotent)."""
        _check_in("direction", direction, DIRECTIONS)
        for attempt in range(3):
            try:
                with self.session(write=True) as s:
                    if s.get(StageExecution, execution_id) is None:
                        raise LineageError(f"no execution {execution_id} (link)")
                    if s.get(Artifact, artifact_id) is None:
                        raise LineageError(f"no artifact {artifact_id} (link)")
                    exists = s.scalar(select(Edge.id).where(
                        Edge.execution_id == execution_id, Edge.artifact_id == artifact_id,
                        Edge.direction == direction, Edge.role == role))
                    if exists is None:
                        s.add(Edge(execution_id=execution_id, artifact_id=artifact_id, direction=direction, role=role))
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    # ------------------------------------------------------------------ metrics

    def record_metrics(self, run_id: str, execution_id: int | None, metrics: Mapping[str, float],
                       step: int | None = None) -> int:
        """Record numbers of a run (execution_id None) or of one of its executions; returns how many.
        Values must be finite real numbers (NaN/inf are refused: they would not survive SQLite or JSON)."""
        rows = []
        for name, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise LineageError(f"metric {name!r} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise LineageError(f"metric {name!r} is {value}; only finite values can be recorded")
            rows.append(Metric(run_id=run_id, execution_id=execution_id, name=name, value=float(value), step=step))
        with self.session(write=True) as s:
            if s.get(Run, run_id) is None:
                raise LineageError(f"no run {run_id!r} (record_metrics)")
            if execution_id is not None:
                execution = s.get(StageExecution, execution_id)
                if execution is None or execution.run_id != run_id:
                    raise LineageError(f"no execution {execution_id} in run {run_id!r} (record_metrics)")
            s.add_all(rows)
        return len(rows)

    def list_metrics(self, run_id: str, execution_id: int | None = None) -> list[Metric]:
        """A run's metrics (or one execution's), by name then step."""
        query = select(Metric).where(Metric.run_id == run_id)
        if execution_id is not None:
            query = query.where(Metric.execution_id == execution_id)
        with self.session() as s:
            return list(s.scalars(query.order_by(Metric.name, Metric.step, Metric.id)))

    # ------------------------------------------------------------------ schedules

    def create_schedule(self, name: str, cron: str, parameters: Mapping[str, Any] | None = None,
                        created_by: str | None = None, *, pipeline: str = "emu", preset: str | None = None,
                        paused: bool = False, now: datetime | None = None) -> Schedule:
        """A new schedule (id `sched-<hex>`); the cron expression is validated (ConfigError naming
        the field) and its next fire time after `now` computed (NULL while paused)."""
        if not name or not name.strip():
            raise LineageError("schedule name must not be empty")
        expr = parse_cron(cron)
        now = _aware("now", now) or utcnow()
        schedule = Schedule(id=f"sched-{secrets.token_hex(6)}", name=name.strip(), cron=expr.expression,
                            pipeline=pipeline, preset=preset, parameters=_json_dict("parameters", parameters),
                            paused=paused, created_by=created_by, created_at=now,
                            next_run_at=None if paused else expr.next_after(now))
        try:
            with self.session(write=True) as s:
                if s.scalar(select(Schedule.id).where(Schedule.name == schedule.name)) is not None:
                    raise LineageError(f"a schedule named {schedule.name!r} already exists")
                s.add(schedule)
        except IntegrityError as exc:
            raise LineageError(f"cannot create schedule {schedule.name!r}: {exc.orig}") from exc
        return schedule

    def get_schedule(self, id_or_name: str) -> Schedule | None:
        """A schedule by id, else by name; None if neither."""
        with self.session() as s:
            return s.get(Schedule, id_or_name) or s.scalar(select(Schedule).where(Schedule.name == id_or_name))

    def list_schedules(self, *, include_paused: bool = True) -> list[Schedule]:
        """Schedules by name."""
        query = select(Schedule).order_by(Schedule.name)
        if not include_paused:
            query = query.where(Schedule.paused.is_(False))
        with self.session() as s:
            return list(s.scalars(query))

    def set_paused(self, id_or_name: str, paused: bool, *, now: datetime | None = None) -> Schedule:
        """Pause (next_run_at cleared) or resume a schedule. Resuming computes the next fire time
        after `now`: times missed while paused are not caught up."""
        now = _aware("now", now) or utcnow()
        with self.session(write=True) as s:
            schedule = self._schedule(s, id_or_name)
            if schedule.paused != paused:
                schedule.paused = paused
                schedule.next_run_at = None if paused else parse_cron(schedule.cron).next_after(now)
        return schedule

    def delete_schedule(self, id_or_name: str) -> None:
        """Delete a schedule; its runs stay, with schedule_id set to NULL."""
        with self.session(write=True) as s:
            schedule = self._schedule(s, id_or_name)
            s.execute(update(Run).where(Run.schedule_id == schedule.id).values(schedule_id=None))
            s.delete(schedule)

    def due_schedules(self, now: datetime | None = None) -> list[Schedule]:
        """Unpaused schedules whose next fire time is at or before `now`, earliest first."""
        now = _aware("now", now) or utcnow()
        with self.session() as s:
            return list(s.scalars(select(Schedule).where(Schedule.paused.is_(False), Schedule.next_run_at <= now)
                                  .order_by(Schedule.next_run_at, Schedule.name)))

    def mark_schedule_fired(self, id_or_name: str, run_id: str | None, next_run_at: datetime | None = None, *,
                            expected_next_run_at: datetime | None = None, now: datetime | None = None) -> bool:
        """Record that a schedule fired `run_id`, and move its next fire time to `next_run_at`
        (default: the cron's next time after `now`, or after the time just fired if that is later;
        missed times are not caught up).

        With `expected_next_run_at` (the next_run_at the caller saw as due) the update happens only
        if no other scheduler fired it meanwhile; returns whether this call did it.
        """
        now = _aware("now", now) or utcnow()
        with self.session(write=True) as s:
            schedule = self._schedule(s, id_or_name)
            if expected_next_run_at is not None and schedule.next_run_at != _aware("expected_next_run_at",
                                                                                   expected_next_run_at):
                return False
            if next_run_at is None:
                fired = schedule.next_run_at
                next_run_at = parse_cron(schedule.cron).next_after(max(now, fired) if fired else now)
            schedule.last_run_id = run_id
            schedule.last_fired_at = now
            schedule.next_run_at = None if schedule.paused else _aware("next_run_at", next_run_at)
            return True

    @staticmethod
    def _schedule(s: Session, id_or_name: str) -> Schedule:
        schedule = s.get(Schedule, id_or_name) or s.scalar(select(Schedule).where(Schedule.name == id_or_name))
        if schedule is None:
            raise LineageError(f"no schedule with id or name {id_or_name!r}")
        return schedule

    # ------------------------------------------------------------------ audit log

    def audit(self, user: str, action: str, target: str | None = None, request: Mapping[str, Any] | None = None,
              outcome: str = "ok", *, at: datetime | None = None) -> int:
        """Append one entry to the audit log; returns its id."""
        if not user or not action:
            raise LineageError("an audit entry needs a user and an action")
        entry = AuditEntry(at=_aware("at", at) or utcnow(), user=user, action=action, target=target,
                           request=None if request is None else _json_dict("request", request), outcome=outcome)
        with self.session(write=True) as s:
            s.add(entry)
            s.flush()
            return entry.id

    def audit_entries(self, *, user: str | None = None, action: str | None = None, target: str | None = None,
                      since: datetime | None = None, limit: int | None = 100) -> list[AuditEntry]:
        """Audit entries, newest first, filtered by user, action, target and time (>= since)."""
        query = select(AuditEntry).order_by(AuditEntry.at.desc(), AuditEntry.id.desc())
        if user is not None:
            query = query.where(AuditEntry.user == user)
        if action is not None:
            query = query.where(AuditEntry.action == action)
        if target is not None:
            query = query.where(AuditEntry.target == target)
        if since is not None:
            query = query.where(AuditEntry.at >= _aware("since", since))
        if limit is not None:
            query = query.limit(limit)
        with self.session() as s:
            return list(s.scalars(query))


    # ------------------------------------------------------------------ idempotency keys

    #: How long a key answers repeats of its request.
    IDEMPOTENCY_TTL = timedelta(hours=24)

    def claim_idempotency_key(self, key: str, user: str, action: str, *, ttl: timedelta | None = None,
                              now: datetime | None = None) -> tuple[bool, str | None]:
        """Claim `key` for `user`'s `action` (one transaction holding the write lock, so two
        concurrent requests cannot both claim it). Returns `(True, None)` when this call claimed
        it: do the work, then `complete_idempotency_key` with what it produced (or
        `release_idempotency_key` if nothing was produced). Returns `(False, result)` when an
        earlier request within `ttl` (default 24 h) holds it: `result` is what that one
        produced, None while it is still being done. Expired keys are removed here."""
        if not key or len(key) > 255:
            raise LineageError("an idempotency key must be 1 to 255 characters")
        if not user or not action:
            raise LineageError("an idempotency key needs a user and an action")
        now = _aware("now", now) or utcnow()
        cutoff = now - (ttl if ttl is not None else self.IDEMPOTENCY_TTL)
        try:
            with self.session(write=True) as s:
                s.execute(delete(IdempotencyKey).where(IdempotencyKey.created_at < cutoff))
                held = s.scalar(select(IdempotencyKey).where(IdempotencyKey.user == user,
                                                             IdempotencyKey.action == action,
                                                             IdempotencyKey.key == key))
                if held is not None:
                    return False, held.result
                s.add(IdempotencyKey(user=user, action=action, key=key, result=None, created_at=now))
                return True, None
        except IntegrityError:  # PostgreSQL: another transaction inserted it between our read and write
            with self.session() as s:
                held = s.scalar(select(IdempotencyKey.result).where(
                    IdempotencyKey.user == user, IdempotencyKey.action == action, IdempotencyKey.key == key))
            return False, held

    def complete_idempotency_key(self, key: str, user: str, action: str, result: str) -> None:
        """Record what the request that claimed `key` produced (what repeats will get)."""
        with self.session(write=True) as s:
            held = s.scalar(select(IdempotencyKey).where(IdempotencyKey.user == user, IdempotencyKey.action == action,
                                                         IdempotencyKey.key == key))
            if held is None:
                raise LineageError(f"idempotency key {key!r} of {user}/{action} was not claimed")
            held.result = result

    def release_idempotency_key(self, key: str, user: str, action: str) -> None:
        """Give up a claimed key whose request produced nothing (so that it can be retried)."""
        with self.session(write=True) as s:
            s.execute(delete(IdempotencyKey).where(IdempotencyKey.user == user, IdempotencyKey.action == action,
                                                   IdempotencyKey.key == key, IdempotencyKey.result.is_(None)))


# ---------------------------------------------------------------------- helpers


def _make_engine(url: str, *, echo: bool) -> Engine:
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise LineageError(f"lineage database URL {url!r} is not a valid SQLAlchemy URL: {exc}") from exc
    kwargs: dict[str, Any] = {"echo": echo}
    sqlite = parsed.get_backend_name() == "sqlite"
    if sqlite:
        database = parsed.database or ""
        memory = database in ("", ":memory:") or database.startswith("file::memory:")
        if memory:
            # One shared connection, or every session would see its own empty database.
            kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
    else:
        kwargs["pool_pre_ping"] = True
    try:
        engine = create_engine(parsed, **kwargs)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as exc:
        hint = (" (install a driver, e.g. pip install 'psycopg[binary]', and use postgresql+psycopg://...)"
                if parsed.get_backend_name() == "postgresql" else "")
        raise LineageError(f"no database driver for lineage URL {parsed.render_as_string(hide_password=True)}: "
                           f"{exc}{hint}") from exc
    if sqlite:
        _configure_sqlite(engine, memory=memory)
    return engine


def _configure_sqlite(engine: Engine, *, memory: bool) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        # Let SQLAlchemy (the "begin" hook below) issue BEGIN, instead of pysqlite's implicit one.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
        if not memory:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.execute("PRAGMA foreign_keys = ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("emu_write") else "BEGIN")


def _check_in(what: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise LineageError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")


def _aware(what: str, when: datetime | None) -> datetime | None:
    if when is None:
        return None
    if not isinstance(when, datetime):
        raise LineageError(f"{what} must be a datetime, got {when!r}")
    if when.tzinfo is None or when.utcoffset() is None:
        raise LineageError(f"{what} must be timezone-aware (UTC), got naive {when.isoformat()}")
    return when.astimezone(timezone.utc)


def _json_dict(what: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """A JSON-ready copy of a mapping; values JSON cannot hold are refused, naming the setting."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise LineageError(f"{what} must be a mapping, got {type(value).__name__}")
    try:
        return json.loads(json.dumps(dict(value), allow_nan=False, default=_json_default))
    except (TypeError, ValueError) as exc:
        raise LineageError(f"{what} cannot be stored as JSON: {exc}") from exc


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} value {value!r} is not JSON")
