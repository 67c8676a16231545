"""Lineage walks over the store: what produced a model, and what a dataset went on to produce.

- `upstream(store, artifact_id)`: from an artifact back through the executions that wrote it,
  their input artifacts, and so on down to the data (artifacts no recorded execution wrote).
- `downstream(store, artifact_id)`: forward through the executions that read it, their outputs,
  and so on, to the evaluations and their metrics.
- `run_graph(store, run_id)`: one run's executions, the artifacts they read and wrote, its metrics.
- `show(store, target, direction)`: resolve `target` (see `resolve_target`) and build one of those.

Every walk returns a `LineageGraph`. Its JSON form (`to_json`, schema version 1) is stable:

    {
      "version": 1,
      "target": {"query": str, "kind": "run" | "artifact", "id": str | int,
                 "direction": "up" | "down" | "both" | null},
      "runs": [{"id", "pipeline", "status", "trigger", "triggered_by", "schedule_id", "preset",
                "parameters", "git_commit", "git_dirty", "image_digest", "backend", "kfp_run_id",
                "created_at", "started_at", "ended_at", "error"}],
      "executions": [{"id", "run_id", "stage", "status", "cached", "cached_from", "host",
                      "started_at", "ended_at", "error", "config", "config_md5"}],
      "artifacts": [{"id", "md5", "type", "name", "size", "uri", "uris", "created_at"}],
      "edges": [{"execution_id", "artifact_id", "direction": "in" | "out", "role"}],
      "metrics": [{"run_id", "execution_id", "name", "value", "step", "recorded_at"}]
    }

Datetimes are ISO 8601 with a UTC offset (`2025-01-31T02:00:00+00:00`); absent values are null.
Lists are sorted: runs by creation, executions by start, artifacts and edges by id, metrics by
execution, name and step. Edges hold only pairs whose two ends are in the graph. `to_dot` names
nodes `run:<id>`, `execution:<id>` and `artifact:<id>` (the forms `show` also accepts as targets).

An artifact written by several executions (the same data prepared by many runs, a KFP cache hit
recorded as its own execution, `cached_from` naming the original) has all of them as producers:
the graph is what was recorded. `summary(store, graph)` is the readable form `emu lineage show`
prints by default: the chain of stages (a cached execution shown once, with its original), the
data shards with their md5s, the final metrics, the trigger; `to_text` is the full record.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from emu.lineage import LineageError
from emu.lineage.models import Artifact, ArtifactLocation, Edge, Metric, Run, StageExecution
from emu.lineage.store import LineageStore

__all__ = ["LineageGraph", "upstream", "downstream", "artifact_graph", "run_graph", "show", "resolve_target",
           "run_dict", "summary", "DIRECTIONS", "GRAPH_SCHEMA_VERSION"]

GRAPH_SCHEMA_VERSION = 1
#: up: what produced the target; down: what it went on to produce; both: the union.
DIRECTIONS = ("up", "down", "both")
_DIRECTION_WORDS = {"up": "upstream", "down": "downstream", "both": "upstream and downstream"}
#: Shortest md5 / run-id prefix `show` accepts (shorter ones match too much to be useful).
MIN_PREFIX = 4
#: Ids per SQL `IN (...)` (SQLite limits bound parameters per statement).
_CHUNK = 500


@dataclass
class LineageGraph:
    """Runs, executions, artifacts, edges and metrics around a target, as plain JSON-ready dicts."""

    target: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)
    executions: list[dict[str, Any]] = field(default_factory=list)
    artifacts: list[dict[str, Any]] = field(default_factory=list)
    edges: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"version": GRAPH_SCHEMA_VERSION, "target": self.target, "runs": self.runs,
                "executions": self.executions, "artifacts": self.artifacts, "edges": self.edges,
                "metrics": self.metrics}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent, sort_keys=False)

    # -------------------------------------------------------------- text

    def to_text(self) -> str:
        artifacts = {a["id"]: a for a in self.artifacts}
        t = self.target
        if t["kind"] == "run":
            lines = [f"lineage of run {t['id']}"]
        else:
            a = artifacts[t["id"]]
            lines = [f"lineage of {a['type']} artifact:{a['id']} {_artifact_label(a)} "
                     f"({_DIRECTION_WORDS[t['direction']]})"]
        lines.append("")
        lines.append(f"runs ({len(self.runs)}):")
        for r in self.runs:
            who = f" by {r['triggered_by']}" if r["triggered_by"] else ""
            sched = f" (schedule {r['schedule_id']})" if r["schedule_id"] else ""
            dirty = " (dirty)" if r["git_dirty"] else ""
            lines.append(f"  {r['id']}  {r['status']}  pipeline {r['pipeline']}  backend {r['backend']}"
                         f"  trigger {r['trigger']}{who}{sched}")
            lines.append(f"      commit {r['git_commit'] or '-'}{dirty}  image {r['image_digest'] or '-'}"
                         f"  preset {r['preset'] or '-'}  created {r['created_at']}")
            if r["parameters"]:
                lines.append(f"      parameters {_compact(r['parameters'])}")
            if r["error"]:
                lines.append(f"      error: {r['error']}")
        lines.append(f"executions ({len(self.executions)}):")
        edges_of: dict[int, list[dict[str, Any]]] = {}
        for e in self.edges:
            edges_of.setdefault(e["execution_id"], []).append(e)
        for x in self.executions:
            cached = "  (cached)" if x["cached"] else ""
            lines.append(f"  execution:{x['id']}  {x['stage']}  {x['status']}{cached}  run {x['run_id']}"
                         f"  host {x['host'] or '-'}  {x['started_at'] or '-'} .. {x['ended_at'] or '-'}")
            if x["error"]:
                lines.append(f"      error: {x['error']}")
            if x["config"] is not None:
                lines.append(f"      config {x['config_md5']} {_compact(x['config'])}")
            for e in edges_of.get(x["id"], []):
                a = artifacts[e["artifact_id"]]
                lines.append(f"      {e['direction']:<3} {e['role'] or '-':<10} artifact:{a['id']} {a['type']} "
                             f"{_artifact_label(a)}")
        lines.append(f"artifacts ({len(self.artifacts)}):")
        width = max((len(f"artifact:{a['id']}") for a in self.artifacts), default=0)
        for a in self.artifacts:
            node = f"artifact:{a['id']}"
            lines.append(f"  {node:<{width}}  {a['type']:<10}  {a['md5']:<36}  {_size(a['size']):>10}  "
                         f"{a['name'] or '-'}  {a['uri'] or '-'}")
            for uri in a["uris"]:
                if uri != a["uri"]:
                    lines.append(f"      also at {uri}")
        lines.append(f"metrics ({len(self.metrics)}):")
        stage_of = {x["id"]: x["stage"] for x in self.executions}
        for m in self.metrics:
            where = (f"execution:{m['execution_id']} {stage_of.get(m['execution_id'], '')}".rstrip()
                     if m["execution_id"] is not None else f"run {m['run_id']}")
            step = f" (step {m['step']})" if m["step"] is not None else ""
            lines.append(f"  {where}  {m['name']} = {m['value']:.6g}{step}")
        return "\n".join(lines)

    # -------------------------------------------------------------- Graphviz

    def to_dot(self) -> str:
        """Graphviz DOT text (render with `dot -Tsvg`; nothing here needs Graphviz installed)."""
        lines = ["digraph lineage {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];',
                 '  edge [fontname="Helvetica", fontsize=9];']
        by_run: dict[str, list[dict[str, Any]]] = {}
        for x in self.executions:
            by_run.setdefault(x["run_id"], []).append(x)
        for i, r in enumerate(self.runs):
            lines.append(f"  subgraph cluster_{i} {{")
            commit = (r["git_commit"] or "-")[:12] + ("+dirty" if r["git_dirty"] else "")
            title = f"run {r['id']} ({r['status']}, {r['trigger']}, commit {commit})"
            lines.append(f"    label={_dot_str(title)};")
            lines.append(f"    {_dot_str('run:' + r['id'])} [shape=note, label={_dot_str(r['id'])}];")
            for x in by_run.get(r["id"], []):
                label = f"{x['stage']}\nexecution:{x['id']} {x['status']}" + (" (cached)" if x["cached"] else "")
                node = f"execution:{x['id']}"
                lines.append(f"    {_dot_str(node)} [shape=ellipse, label={_dot_str(label)}];")
            lines.append("  }")
        for a in self.artifacts:
            label = f"{a['type']}: {a['name'] or '-'}\n{a['md5']}\n{_size(a['size'])}"
            shape = "cylinder" if a["type"] == "dataset" else "box"
            node = f"artifact:{a['id']}"
            lines.append(f"  {_dot_str(node)} [shape={shape}, label={_dot_str(label)}];")
        for e in self.edges:
            x, a = _dot_str(f"execution:{e['execution_id']}"), _dot_str(f"artifact:{e['artifact_id']}")
            src, dst = (a, x) if e["direction"] == "in" else (x, a)
            lines.append(f"  {src} -> {dst} [label={_dot_str(e['role'] or '')}];")
        for m in self.metrics:
            owner = f"execution:{m['execution_id']}" if m["execution_id"] is not None else f"run:{m['run_id']}"
            node = f"metric:{owner}:{m['name']}" + (f"@{m['step']}" if m["step"] is not None else "")
            label = f"{m['name']} = {m['value']:.6g}"
            lines.append(f"  {_dot_str(node)} [shape=plaintext, label={_dot_str(label)}];")
            lines.append(f"  {_dot_str(owner)} -> {_dot_str(node)} [style=dashed];")
        lines.append("}")
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- walks


def upstream(store: LineageStore, artifact_id: int, *, query: str | None = None) -> LineageGraph:
    """What produced `artifact_id`: its producers, their inputs, recursively, down to the data."""
    return artifact_graph(store, artifact_id, "up", query=query)


def downstream(store: LineageStore, artifact_id: int, *, query: str | None = None) -> LineageGraph:
    """What `artifact_id` went on to produce: its consumers, their outputs, recursively, and their metrics."""
    return artifact_graph(store, artifact_id, "down", query=query)


def artifact_graph(store: LineageStore, artifact_id: int, direction: str = "up", *,
                   query: str | None = None) -> LineageGraph:
    """`upstream`, `downstream`, or both (`direction` up, down, both)."""
    if direction not in DIRECTIONS:
        raise LineageError(f"direction must be one of {', '.join(DIRECTIONS)}; got {direction!r}")
    with store.session() as s:
        if s.get(Artifact, artifact_id) is None:
            raise LineageError(f"no artifact {artifact_id}")
        executions, artifacts = set(), {artifact_id}
        if direction in ("up", "both"):
            e, a = _walk(s, {artifact_id}, up=True)
            executions |= e
            artifacts |= a
        if direction in ("down", "both"):
            e, a = _walk(s, {artifact_id}, up=False)
            executions |= e
            artifacts |= a
        return _graph(s, _target(query, "artifact", artifact_id, direction), executions, artifacts)


def run_graph(store: LineageStore, run_id: str, *, query: str | None = None) -> LineageGraph:
    """One run: its executions, every artifact they read or wrote, and all its metrics (run-level too)."""
    with store.session() as s:
        if s.get(Run, run_id) is None:
            raise LineageError(f"no run {run_id!r}")
        executions = set(s.scalars(select(StageExecution.id).where(StageExecution.run_id == run_id)))
        artifacts = set(_in(s, select(Edge.artifact_id), Edge.execution_id, executions))
        return _graph(s, _target(query, "run", run_id, None), executions, artifacts, run_ids={run_id})


def show(store: LineageStore, target: str, direction: str = "up") -> LineageGraph:
    """The graph of `target` (see `resolve_target`): a run's own graph, or an artifact's lineage in
    `direction`."""
    kind, ident = resolve_target(store, target)
    if kind == "run":
        return run_graph(store, str(ident), query=target)
    return artifact_graph(store, int(ident), direction, query=target)


def resolve_target(store: LineageStore, target: str) -> tuple[str, str | int]:
    """`("run", run_id)` or `("artifact", artifact_id)` for a target string, tried in order:

    1. `run:<id>` or `artifact:<id>` (the node names of `to_dot` and the text form);
    2. a run id; 3. an artifact md5 (DVC hash, `.dir` included or not);
    4. a stored URI of an artifact: a local path (made absolute) or a remote URI, as recorded
       (nothing is hashed: a path never recorded is not found);
    5. a unique prefix (at least 4 characters) of a run id or an artifact md5;
    6. an artifact id (a number).

    An md5 shared by artifacts of several types, or a prefix matching several, is a LineageError
    listing the candidates.
    """
    target = target.strip()
    if not target:
        raise LineageError("empty lineage target; give a run id, an artifact md5 or id, or a model path/URI")
    with store.session() as s:
        kind, _, rest = target.partition(":")
        if kind == "run" and rest:
            if s.get(Run, rest) is None:
                raise LineageError(f"no run {rest!r}")
            return "run", rest
        if kind == "artifact" and rest.isdigit():
            if s.get(Artifact, int(rest)) is None:
                raise LineageError(f"no artifact {rest}")
            return "artifact", int(rest)
        if s.get(Run, target) is not None:
            return "run", target
        md5 = target.lower()
        exact = list(s.scalars(select(Artifact).where(Artifact.md5.in_({md5, md5 + ".dir"})).order_by(Artifact.id)))
        if exact:
            return "artifact", _one(target, [], exact)
        by_uri = _by_uri(s, target)
        if by_uri:
            return "artifact", _one(target, [], by_uri)
        if len(target) >= MIN_PREFIX:
            runs = list(s.scalars(select(Run.id).where(Run.id.startswith(target, autoescape=True))
                                      .order_by(Run.id).limit(20)))
            arts = []
            if all(c in "0123456789abcdef" for c in md5):
                arts = list(s.scalars(select(Artifact).where(Artifact.md5.startswith(md5))
                                          .order_by(Artifact.id).limit(20)))
            if runs or arts:
                if len(runs) == 1 and not arts:
                    return "run", runs[0]
                return "artifact", _one(target, runs, arts)
        if target.isdigit() and s.get(Artifact, int(target)) is not None:
            return "artifact", int(target)
    raise LineageError(f"no run, artifact md5 or recorded artifact URI matches {target!r} "
                       f"(`emu lineage runs` lists runs)")


# ---------------------------------------------------------------------- internals


def _walk(s: Session, start: set[int], *, up: bool) -> tuple[set[int], set[int]]:
    """Executions and artifacts reachable from `start` artifacts: up = against the data flow
    (artifact <- producer <- its inputs), down = with it (artifact -> consumer -> its outputs)."""
    toward_exec, away_from_exec = ("out", "in") if up else ("in", "out")
    executions: set[int] = set()
    artifacts: set[int] = set(start)
    frontier = set(start)
    while frontier:
        found = set(_in(s, select(Edge.execution_id).where(Edge.direction == toward_exec), Edge.artifact_id, frontier))
        new_executions = found - executions
        executions |= new_executions
        reached = set(_in(s, select(Edge.artifact_id).where(Edge.direction == away_from_exec), Edge.execution_id,
                          new_executions))
        frontier = reached - artifacts
        artifacts |= frontier
    return executions, artifacts


def _graph(s: Session, target: dict[str, Any], execution_ids: set[int], artifact_ids: set[int],
           run_ids: set[str] | None = None) -> LineageGraph:
    executions = sorted(_in(s, select(StageExecution), StageExecution.id, execution_ids),
                        key=lambda x: (_sort_time(x.started_at), x.id))
    run_ids = set(run_ids or ()) | {x.run_id for x in executions}
    runs = sorted(_in(s, select(Run), Run.id, run_ids), key=lambda r: (_sort_time(r.created_at), r.id))
    artifacts = sorted(_in(s, select(Artifact), Artifact.id, artifact_ids), key=lambda a: a.id)
    locations: dict[int, list[str]] = {}
    for loc in sorted(_in(s, select(ArtifactLocation), ArtifactLocation.artifact_id, artifact_ids),
                      key=lambda loc: loc.id):
        locations.setdefault(loc.artifact_id, []).append(loc.uri)
    edges = sorted((e for e in _in(s, select(Edge), Edge.execution_id, execution_ids)
                    if e.artifact_id in artifact_ids), key=lambda e: e.id)
    metric_rows = list(_in(s, select(Metric), Metric.execution_id, execution_ids))
    if target["kind"] == "run":  # run-level metrics (no execution) belong to the run's own graph
        metric_rows += list(s.scalars(select(Metric).where(Metric.run_id == target["id"],
                                                           Metric.execution_id.is_(None))))
    metric_rows.sort(key=lambda m: (m.execution_id is not None, m.execution_id or 0, m.name,
                                    m.step if m.step is not None else -1, m.id))
    return LineageGraph(
        target=target,
        runs=[run_dict(r) for r in runs],
        executions=[_execution_dict(x) for x in executions],
        artifacts=[_artifact_dict(a, locations.get(a.id, [])) for a in artifacts],
        edges=[{"execution_id": e.execution_id, "artifact_id": e.artifact_id, "direction": e.direction,
                "role": e.role} for e in edges],
        metrics=[{"run_id": m.run_id, "execution_id": m.execution_id, "name": m.name, "value": m.value,
                  "step": m.step, "recorded_at": _iso(m.recorded_at)} for m in metric_rows],
    )


def _in(s: Session, query, column, ids: Iterable) -> Iterator:
    """Rows of `query` with `column IN ids`, in chunks (bound-parameter limits)."""
    ids = list(ids)
    for i in range(0, len(ids), _CHUNK):
        yield from s.scalars(query.where(column.in_(ids[i:i + _CHUNK])))


def _target(query: str | None, kind: str, ident: str | int, direction: str | None) -> dict[str, Any]:
    return {"query": query if query is not None else (f"{kind}:{ident}"), "kind": kind, "id": ident,
            "direction": direction}


def _by_uri(s: Session, target: str) -> list[Artifact]:
    candidates = {target}
    if "://" not in target:
        path = Path(target).expanduser()
        candidates |= {str(path.absolute()), str(path.resolve())}
        candidates |= {f"file://{c}" for c in list(candidates) if c.startswith("/")}
    else:
        candidates |= {target.removeprefix("file://")}
    candidates |= {c.rstrip("/") for c in candidates} | {c.rstrip("/") + "/" for c in candidates}
    candidates.discard("")
    located = select(ArtifactLocation.artifact_id).where(ArtifactLocation.uri.in_(candidates))
    return list(s.scalars(select(Artifact).where(or_(Artifact.uri.in_(candidates), Artifact.id.in_(located)))
                          .order_by(Artifact.id)))


def _one(target: str, runs: list[str], artifacts: list[Artifact]) -> int:
    if len(artifacts) == 1 and not runs:
        return artifacts[0].id
    options = [f"run:{r}" for r in runs] + [f"artifact:{a.id} ({a.type} {a.md5} {a.name or ''})".rstrip()
                                             for a in artifacts]
    raise LineageError(f"{target!r} matches several records; name one: {'; '.join(options)}")


def run_dict(r: Run) -> dict[str, Any]:
    return {"id": r.id, "pipeline": r.pipeline, "status": r.status, "trigger": r.trigger,
            "triggered_by": r.triggered_by, "schedule_id": r.schedule_id, "preset": r.preset,
            "parameters": r.parameters or {}, "git_commit": r.git_commit, "git_dirty": r.git_dirty,
            "image_digest": r.image_digest, "backend": r.backend, "kfp_run_id": r.kfp_run_id,
            "created_at": _iso(r.created_at), "started_at": _iso(r.started_at), "ended_at": _iso(r.ended_at),
            "error": r.error}


def _execution_dict(x: StageExecution) -> dict[str, Any]:
    return {"id": x.id, "run_id": x.run_id, "stage": x.stage, "status": x.status, "cached": x.cached,
            "cached_from": x.cached_from, "host": x.host, "started_at": _iso(x.started_at),
            "ended_at": _iso(x.ended_at), "error": x.error, "config": x.config, "config_md5": x.config_md5}


def _artifact_dict(a: Artifact, uris: list[str]) -> dict[str, Any]:
    return {"id": a.id, "md5": a.md5, "type": a.type, "name": a.name, "size": a.size, "uri": a.uri,
            "uris": uris or ([a.uri] if a.uri else []), "created_at": _iso(a.created_at)}


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.isoformat()


def _sort_time(when: datetime | None) -> str:
    return "" if when is None else when.isoformat()


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(", ", ": "))


def _size(size: int | None) -> str:
    if size is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _artifact_label(a: dict[str, Any]) -> str:
    return f"{a['name'] or '-'} md5 {a['md5']} size {_size(a['size'])} uri {a['uri'] or '-'}"


def _dot_str(text: str) -> str:
    """A DOT double-quoted string: backslashes and quotes escaped, newlines as \\n."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


# ---------------------------------------------------------------------- readable summary

#: Metric names that are counts or timings, not results: left out of the summary.
_NOT_RESULTS = ("_n", "_seconds")


def summary(store: LineageStore, graph: LineageGraph) -> str:
    """The lineage a person reads: what the target is, who started its run and on what code, the
    chain of stages (newest first for an artifact: model <- instruct <- stage2 ... <- prepare),
    what each read and wrote (md5s), the data shards trained on, the final metrics and the
    evaluation, and the registry. Per-step curves and configs are left to `to_text` / JSON."""
    from emu.home import emu_command
    from emu.pipeline.tasks import _chance_of

    t = graph.target
    artifacts = {a["id"]: a for a in graph.artifacts}
    groups = _execution_groups(graph.executions)
    finals = _final_metrics(store, [g["work"] for g in groups])
    lines = []
    if t["kind"] == "artifact":  # a run target is introduced by its own run line below
        a = artifacts[t["id"]]
        makers = [g for g in groups if any(e["artifact_id"] == a["id"] and e["direction"] == "out"
                                           for e in _edges_of(graph, g))]
        made = f", made by {makers[0]['stage']}" if makers else ", not made by a recorded stage (source data)"
        lines.append(f"{a['type']} {a['md5']} ({_size(a['size'])}), artifact:{a['id']}{made}")
        if a["uri"]:
            lines.append(f"  at {a['uri']}")
    for r in graph.runs:
        who = f" by {r['triggered_by']}" if r["triggered_by"] else ""
        schedule = f" (schedule {r['schedule_id']})" if r["schedule_id"] else ""
        commit = (r["git_commit"] or "-")[:12] + (" (uncommitted changes)" if r["git_dirty"] else "")
        source = (r["parameters"] or {}).get("source") or "synthetic shapes world"
        lines.append(f"run {r['id']}: {r['status']}, trigger {r['trigger']}{who}{schedule}, preset {r['preset'] or '-'}, "
                     f"commit {commit}, data {source}, created {_when(r['created_at'])}")
        if r["error"]:
            lines.append(f"  error: {r['error'].splitlines()[0][:300]}")
    newest_first = t["kind"] == "artifact"
    lines += ["", "stages" + (" (newest first: what made the target, back to the data):" if newest_first else ":")]
    for g in sorted(groups, key=lambda g: g["started_at"] or "", reverse=newest_first):
        losses = " ".join(f"{k} {v:.4g}" for k, v in finals.get(g["work"], {}).items()
                          if k in ("loss", "text_loss", "image_loss"))
        state = g["status"] + (f", reused from the cache by run {', '.join(g['reused_by'])}" if g["reused_by"] else "")
        lines.append(f"  {g['stage']:<11} {state}  {_duration(g)}{'  ' + losses if losses else ''}  "
                     f"(execution:{g['work']}, run {g['run_id']})")
        if g["error"]:
            lines.append(f"      error: {g['error'].splitlines()[0][:200]}")
        edges = _edges_of(graph, g)
        ins = [e for e in edges if e["direction"] == "in" and e["role"] != "shard"]
        shards = sum(e["direction"] == "in" and e["role"] == "shard" for e in edges)
        read = [f"{e['role'] or artifacts[e['artifact_id']]['type']} {artifacts[e['artifact_id']]['md5']}" for e in ins]
        if shards:
            read.append(f"{shards} shard{'s' if shards > 1 else ''}")
        if read:
            lines.append(f"      read  {', '.join(read)}")
        for e in edges:
            if e["direction"] == "out":
                a = artifacts[e["artifact_id"]]
                lines.append(f"      wrote {a['type']} {a['md5']} ({_size(a['size'])})")
    # The exact shard files training stages read (role "shard", as the pipeline records them);
    # without such records, every dataset the stages read.
    shards = {e["artifact_id"] for e in graph.edges if e["role"] == "shard" and e["direction"] == "in"} or {
        e["artifact_id"] for e in graph.edges if e["direction"] == "in" and artifacts[e["artifact_id"]]["type"] == "dataset"}
    shards = sorted(shards, key=lambda i: artifacts[i]["name"] or "")
    if shards:
        lines += ["", f"data shards ({len(shards)}), the exact files the stages read:"]
        width = max(len(artifacts[i]["name"] or "-") for i in shards)
        for i in shards:
            a = artifacts[i]
            lines.append(f"  {a['name'] or '-':<{width}}  {a['md5']}  {_size(a['size']):>10}")
    evaluations = [g["work"] for g in groups if g["stage"] == "evaluate"]
    if t["kind"] == "artifact" and not evaluations:  # a model's evaluation is downstream of it
        evaluations = _evaluations_reading(store, t["id"])
        finals.update(_final_metrics(store, evaluations))
    for work in evaluations:
        values = finals.get(work)
        if not values:
            continue
        lines += ["", f"evaluation (execution:{work}):"]
        for name in sorted(values):
            if "chance" in name or name.endswith(_NOT_RESULTS) or name == "gate_passed":
                continue
            chance = values.get(_chance_of(name))
            lines.append(f"  {name:<32} {values[name]:>10.4g}" + ("" if chance is None else f"   (chance {chance:.4g})"))
        if "gate_passed" in values:
            lines.append(f"  promotion gate: {'passed' if values['gate_passed'] else 'FAILED'}")
    models = {a["md5"] for a in graph.artifacts if a["type"] == "model"}
    registered = [r for r in store.registrations() if r.model_md5 in models]
    if registered:
        production = store.production()
        lines += ["", "registry:"]
        for r in registered:
            current = " (production)" if production is not None and production.id == r.id else ""
            lines.append(f"  {r.version}{current}: model {r.model_md5}, registered {_when(_iso(r.registered_at))} "
                         f"by run {r.run_id}")
    lines += ["", f"every config, parameter and per-step metric: {emu_command()} lineage show {t['query']} --full "
                  f"(or --format json / dot)"]
    return "\n".join(lines)


def _evaluations_reading(store: LineageStore, artifact_id: int) -> list[int]:
    """The evaluate executions that read an artifact and did the work (not cached copies)."""
    with store.session() as s:
        return list(s.scalars(select(StageExecution.id).join(Edge, Edge.execution_id == StageExecution.id)
                              .where(Edge.artifact_id == artifact_id, Edge.direction == "in",
                                     StageExecution.stage == "evaluate", StageExecution.cached.is_(False))
                              .order_by(StageExecution.id)))


def _execution_groups(executions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per piece of work: an execution and the cached executions that reused it are
    one stage run once (drawn and listed once), with the runs that reused it."""
    by_work: dict[int, list[dict[str, Any]]] = {}
    for x in executions:
        by_work.setdefault(x["cached_from"] or x["id"], []).append(x)
    groups = []
    for work, members in by_work.items():
        original = next((x for x in members if x["id"] == work), None)
        if original is not None:
            groups.append({**original, "work": work, "members": [x["id"] for x in members],
                           "reused_by": sorted({x["run_id"] for x in members if x["cached"]} - {original["run_id"]})})
        else:  # only cached copies in the graph: the work was done by an execution outside it
            shown = members[0]
            groups.append({**shown, "work": work, "members": [x["id"] for x in members], "reused_by": [],
                           "status": f"cached (the work of execution:{work})", "ended_at": None})
    return groups


def _edges_of(graph: LineageGraph, group: dict[str, Any]) -> list[dict[str, Any]]:
    """The group's edges, each (artifact, direction, role) once."""
    seen, out = set(), []
    for e in graph.edges:
        key = (e["artifact_id"], e["direction"], e["role"])
        if e["execution_id"] in group["members"] and key not in seen:
            seen.add(key)
            out.append(e)
    return out


def _final_metrics(store: LineageStore, execution_ids: list[int]) -> dict[int, dict[str, float]]:
    """Each execution's metrics without a step (final losses, evaluation results)."""
    with store.session() as s:
        rows = list(_in(s, select(Metric).where(Metric.step.is_(None)), Metric.execution_id, execution_ids))
    out: dict[int, dict[str, float]] = {}
    for m in rows:
        out.setdefault(m.execution_id, {})[m.name] = m.value
    return out


def _duration(x: dict[str, Any]) -> str:
    if not x["started_at"] or not x["ended_at"]:
        return "-"
    seconds = round((datetime.fromisoformat(x["ended_at"]) - datetime.fromisoformat(x["started_at"])).total_seconds())
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


def _when(iso: str | None) -> str:
    return "-" if iso is None else datetime.fromisoformat(iso).strftime("%Y-%m-%d %H:%M:%S UTC")
