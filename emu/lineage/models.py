"""Tables of the lineage store (SQLAlchemy 2.x declarative).

Portable by construction: only generic types (String, Text, Integer, BigInteger, Float, Boolean,
JSON, DateTime), CHECK constraints instead of native enums, JSONB on PostgreSQL via a variant,
and datetimes stored as UTC (`UTCDateTime`: aware in and out, whatever the backend keeps).

    runs ─┬─< stage_executions ─┬─< edges >── artifacts ─< artifact_locations
          │                     ├─< metrics
          │                     └── task_calls (its KFP cache identity and what it returned)
          └─< metrics (run-level, execution_id NULL)
    schedules ─< runs.schedule_id          audit_log      lineage_meta (schema version)
    run_owners (the process that drives a local run: host, pid, its start time, heartbeat)
    idempotency_keys (a write request's key -> what it created: a double submit starts one run)

Tables are created with `create_all` on first use (emu.lineage.store). There are no migrations
yet: `lineage_meta.schema_version` records the layout so that a future migration tool (Alembic)
can start from it, and a store refuses a database written by a newer layout.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        String, Text, UniqueConstraint)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

__all__ = [
    "SCHEMA_VERSION", "RUN_STATUSES", "EXECUTION_STATUSES", "TERMINAL_STATUSES", "TRIGGERS", "BACKENDS",
    "ARTIFACT_TYPES", "DIRECTIONS", "Base", "Run", "StageExecution", "Artifact", "ArtifactLocation", "Edge",
    "Metric", "Registration", "Schedule", "AuditEntry", "IdempotencyKey", "Meta", "RunOwner", "TaskCall", "utcnow",
]

#: Layout version written to lineage_meta; bump with every change a migration must handle.
#: (A new table is not such a change: `create_all` adds it to an existing database, and older
#: code ignores it. idempotency_keys and run_owners were added that way, within version 1.)
SCHEMA_VERSION = 1

RUN_STATUSES = ("pending", "running", "succeeded", "failed", "cancelled")
#: A task can also be skipped (a KFP condition was false, or the gate stopped the pipeline).
EXECUTION_STATUSES = RUN_STATUSES + ("skipped",)
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled", "skipped")
TRIGGERS = ("cli", "schedule", "dashboard", "api")
BACKENDS = ("local", "kfp")
ARTIFACT_TYPES = ("dataset", "model", "metrics", "report", "decoder", "embeddings")
DIRECTIONS = ("in", "out")

#: JSON everywhere, JSONB on PostgreSQL (indexable, compact); no driver import needed for either.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    """Now, timezone-aware UTC (the only kind of datetime the store keeps)."""
    return datetime.now(timezone.utc)


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes on every backend.

    PostgreSQL keeps `timestamptz`; SQLite keeps text without an offset, so values are converted to
    UTC and stored naive there, and every value read back is made aware UTC. Naive datetimes are
    refused: a time without a zone is a bug the caller must fix, not a guess for the store.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError(f"lineage datetimes must be timezone-aware, got naive {value.isoformat()}")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSONType}


class Meta(Base):
    """Key/value facts about the database itself (schema_version)."""

    __tablename__ = "lineage_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(255))


class Schedule(Base):
    """A cron schedule of pipeline runs, fired by `emu scheduler` (or mirrored to a KFP recurring run)."""

    __tablename__ = "schedules"
    __table_args__ = (Index("ix_schedules_due", "paused", "next_run_at"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Unique, human-chosen; the CLI and dashboard address schedules by id or name.
    name: Mapped[str] = mapped_column(String(128), unique=True)
    #: 5-field cron, or 6 fields with leading seconds (KFP); evaluated in UTC (emu.lineage.cron).
    cron: Mapped[str] = mapped_column(String(128))
    pipeline: Mapped[str] = mapped_column(String(128), default="emu")
    preset: Mapped[str | None] = mapped_column(String(255))
    #: Pipeline parameters each fired run gets.
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    paused: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: The run the schedule fired last. Not a foreign key: runs.schedule_id already points the other
    #: way, and a cycle of foreign keys would complicate creation and deletion on every backend.
    last_run_id: Mapped[str | None] = mapped_column(String(64))
    last_fired_at: Mapped[datetime | None] = mapped_column()
    #: Next fire time (UTC); NULL while paused. due = not paused and next_run_at <= now.
    next_run_at: Mapped[datetime | None] = mapped_column()


class Run(Base):
    """One pipeline run: who or what started it, with which code, image, preset and parameters."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(_one_of("status", RUN_STATUSES), name="ck_runs_status"),
        CheckConstraint(_one_of("trigger", TRIGGERS), name="ck_runs_trigger"),
        CheckConstraint(_one_of("backend", BACKENDS), name="ck_runs_backend"),
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_status_created_at", "status", "created_at"),
        Index("ix_runs_trigger_created_at", "trigger", "created_at"),
    )

    #: `run-YYYYMMDD-HHMMSS-xxxxxx` (UTC, random hex) unless the caller gives one.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    pipeline: Mapped[str] = mapped_column(String(128), default="emu")
    status: Mapped[str] = mapped_column(String(16), default="pending")
    trigger: Mapped[str] = mapped_column(String(16), default="cli")
    #: User name (CLI user, dashboard user); for schedules, the schedule's creator.
    triggered_by: Mapped[str | None] = mapped_column(String(128))
    schedule_id: Mapped[str | None] = mapped_column(
        String(64), ForeignKey("schedules.id", ondelete="SET NULL"), index=True)
    preset: Mapped[str | None] = mapped_column(String(255))
    parameters: Mapped[dict[str, Any]] = mapped_column(default=dict)
    git_commit: Mapped[str | None] = mapped_column(String(64))
    git_dirty: Mapped[bool | None] = mapped_column(Boolean)
    #: Container image digest (`sha256:...`) the tasks ran in; NULL for local runs outside one.
    image_digest: Mapped[str | None] = mapped_column(String(255))
    backend: Mapped[str] = mapped_column(String(16), default="local")
    kfp_run_id: Mapped[str | None] = mapped_column(String(128), index=True)
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class StageExecution(Base):
    """One task of a run (validate, stage1, precompute, ...), with its resolved config."""

    __tablename__ = "stage_executions"
    __table_args__ = (
        CheckConstraint(_one_of("status", EXECUTION_STATUSES), name="ck_stage_executions_status"),
        Index("ix_stage_executions_run_stage", "run_id", "stage"),
        Index("ix_stage_executions_config_md5", "config_md5"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"))
    #: Stage name (prepare, validate, stage1, precompute, stage2, decoder, instruct, evaluate, register).
    stage: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="running")
    #: Served from KFP's cache: no work was done, the outputs are those of an earlier execution.
    cached: Mapped[bool] = mapped_column(Boolean, default=False)
    host: Mapped[str | None] = mapped_column(String(255))
    started_at: Mapped[datetime | None] = mapped_column()
    ended_at: Mapped[datetime | None] = mapped_column()
    error: Mapped[str | None] = mapped_column(Text)
    #: The stage's resolved config (what `emu config show` prints), as JSON.
    config: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: md5 of the config's canonical JSON (sorted keys, compact): equal configs, equal md5.
    config_md5: Mapped[str | None] = mapped_column(String(32))
    #: For a cached execution: the execution that did the work (its outputs are these outputs).
    cached_from: Mapped[int | None] = mapped_column(Integer, ForeignKey("stage_executions.id", ondelete="SET NULL"))


class Artifact(Base):
    """Content identified by its DVC hash: a dataset, model, decoder, embeddings, metrics or report."""

    __tablename__ = "artifacts"
    __table_args__ = (
        UniqueConstraint("md5", "type", name="uq_artifacts_md5_type"),
        CheckConstraint(_one_of("type", ARTIFACT_TYPES), name="ck_artifacts_type"),
        Index("ix_artifacts_uri", "uri"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: DVC md5: 32 hex digits, with `.dir` for folders (the md5 of DVC's listing of the folder).
    md5: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int | None] = mapped_column(BigInteger)
    #: Where the bytes were first recorded (a local path or a DVC remote / s3:// URI); every known
    #: location is in artifact_locations.
    uri: Mapped[str | None] = mapped_column(String(2048))
    type: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ArtifactLocation(Base):
    """Every URI an artifact was recorded at (the same md5 pushed to a remote, copied elsewhere)."""

    __tablename__ = "artifact_locations"
    __table_args__ = (UniqueConstraint("artifact_id", "uri", name="uq_artifact_locations"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id", ondelete="CASCADE"), index=True)
    uri: Mapped[str] = mapped_column(String(2048), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Edge(Base):
    """An execution read (`in`) or wrote (`out`) an artifact, in a role (`data`, `model`, `init`...)."""

    __tablename__ = "edges"
    __table_args__ = (
        UniqueConstraint("execution_id", "artifact_id", "direction", "role", name="uq_edges"),
        CheckConstraint(_one_of("direction", DIRECTIONS), name="ck_edges_direction"),
        Index("ix_edges_artifact_direction", "artifact_id", "direction"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    execution_id: Mapped[int] = mapped_column(
        Integer, ForeignKey("stage_executions.id", ondelete="CASCADE"), index=True)
    artifact_id: Mapped[int] = mapped_column(Integer, ForeignKey("artifacts.id", ondelete="CASCADE"))
    direction: Mapped[str] = mapped_column(String(8))
    role: Mapped[str] = mapped_column(String(64), default="")


class Metric(Base):
    """A number a run or one of its executions reported (loss, vqav2 accuracy, CIDEr...)."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metrics_run_name", "run_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"))
    execution_id: Mapped[int | None] = mapped_column(
        Integer, ForeignKey("stage_executions.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(255))
    value: Mapped[float] = mapped_column(Float)
    step: Mapped[int | None] = mapped_column(Integer)
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)


class Registration(Base):
    """A model promoted to production by the pipeline's register step (the evaluation gate passed).
    The newest registration is the production model that the next gate compares against."""

    __tablename__ = "registrations"
    __table_args__ = (Index("ix_registrations_at", "registered_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: "v1", "v2", ... in promotion order.
    version: Mapped[str] = mapped_column(String(32), unique=True)
    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"))
    model_md5: Mapped[str] = mapped_column(String(40))
    decoder_md5: Mapped[str | None] = mapped_column(String(40))
    #: The evaluation metrics it was promoted with (what later candidates must not fall below).
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONType, default=dict)
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """One write action (dashboard, API, CLI): who did what to which target, and how it ended."""

    __tablename__ = "audit_log"
    __table_args__ = (Index("ix_audit_log_at", "at"), Index("ix_audit_log_user_at", "user", "at"),
                      Index("ix_audit_log_action_at", "action", "at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    user: Mapped[str] = mapped_column(String(128))
    #: e.g. run.start, run.cancel, schedule.create, schedule.pause, schedule.delete.
    action: Mapped[str] = mapped_column(String(64))
    #: What it acted on: a run id, schedule id, artifact id... NULL for actions without one.
    target: Mapped[str | None] = mapped_column(String(255))
    request: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    #: `ok`, `denied`, `error: <message>`...
    outcome: Mapped[str] = mapped_column(Text)


class IdempotencyKey(Base):
    """A write request's idempotency key (the dashboard's retrain form carries one, API clients send
    an `Idempotency-Key` header): the first request claims it, later ones with the same key get
    the first one's result (e.g. its run id) instead of doing the work again. Keys expire (24 h)."""

    __tablename__ = "idempotency_keys"
    __table_args__ = (UniqueConstraint("user", "action", "key", name="uq_idempotency_keys"),
                      Index("ix_idempotency_keys_created_at", "created_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    #: Keys are scoped by user and action: one user's key never answers another's request.
    user: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    key: Mapped[str] = mapped_column(String(255))
    #: What the first request produced (a run id); NULL while it is still being done.
    result: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class TaskCall(Base):
    """What a pipeline task was called with, as KFP's cache sees it, and what it returned.

    `fingerprint` hashes the task's stage and parameter values (emu.pipeline.cached_lineage): every
    input of a task is a parameter (DVC md5s, configs, its code version), so two executions with
    one fingerprint are one KFP cache entry. On a cluster a task served from the cache runs
    nothing; the run's exit handler finds the execution that did the work by its fingerprint and
    records the cached one in the run. A table of its own, not columns of `stage_executions`:
    `create_all` adds it to an existing database."""

    __tablename__ = "task_calls"
    __table_args__ = (Index("ix_task_calls_fingerprint", "fingerprint"),)

    execution_id: Mapped[int] = mapped_column(Integer, ForeignKey("stage_executions.id", ondelete="CASCADE"),
                                              primary_key=True)
    fingerprint: Mapped[str] = mapped_column(String(64))
    #: The task's return value (its main output's md5, the gate's "true"/"false"); NULL until it returns.
    result: Mapped[str | None] = mapped_column(String(255))


class RunOwner(Base):
    """The process that drives a local run (`emu run`): while it lives the run may say `running`;
    when it is gone (pid missing or reused, or, on another host, no heartbeat) the next `emu`
    command, the scheduler or the dashboard records the run as failed (emu.pipeline.runstate).
    A table of its own, not columns of `runs`: `create_all` adds it to an existing database."""

    __tablename__ = "run_owners"

    run_id: Mapped[str] = mapped_column(String(64), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    #: The process's start time (seconds since the epoch, as psutil reports it): a pid reused by
    #: another process after the owner died has another start time.
    pid_started: Mapped[float] = mapped_column(Float)
    heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    #: Who asked for the run to be cancelled (`emu run cancel`, the dashboard); the owner's
    #: heartbeat reads it and stops the run (how a cancel reaches an owner on another host).
    cancel_requested_by: Mapped[str | None] = mapped_column(String(128))
