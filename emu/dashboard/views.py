"""What the dashboard's pages show, assembled from the lineage store: plain dicts and server-side
SVG, no web framework here (emu.dashboard.app renders them).

A cached execution did no work: its curves, metrics and outputs are those of the execution it
was served from (`cached_from`), and every view follows that pointer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from emu.dashboard import svg
from emu.evaluate.gate import direction_of
from emu.lineage.models import TERMINAL_STATUSES, Run, StageExecution
from emu.lineage.store import LineageStore
from emu.pipeline.runner import TASK_EDGES, TASKS

__all__ = ["run_row", "stage_graph", "curves", "evaluation_of", "evaluation_table", "gate", "promotion",
           "config_diff", "artifacts", "report", "run_file", "lineage_svg", "previous_run", "flatten", "duration_text",
           "HEADLINE_METRICS", "CURVE_GROUPS"]

#: Evaluation metrics shown in the runs list (the gate's defaults).
HEADLINE_METRICS = ("vqav2_accuracy", "coco_captions_cider")
#: Charts per training stage: title -> metric names (a prefix ending in "/" takes every such metric).
CURVE_GROUPS = {"loss": ("loss", "text_loss", "image_loss"), "learning rate": ("lr/",)}
#: Artifact types whose files the dashboard may show (reports, evaluation outputs); models and
#: datasets are restored with `emu artifacts pull`, never served over HTTP.
VIEWABLE_TYPES = ("metrics", "report")
#: What a viewable artifact's link opens, the first file present: the evaluation's self-contained
#: HTML report, else the raw report (the validation's; its Great Expectations Data Docs load
#: styles from a CDN, which the served files' CSP blocks).
VIEW_ENTRIES = ("report.html", "report.json")


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


def duration_text(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _ordered(executions: list[StageExecution]) -> list[StageExecution]:
    order = {stage: i for i, stage in enumerate(TASKS)}
    return sorted(executions, key=lambda e: (order.get(e.stage, len(order)), e.id))


def _source(execution: StageExecution) -> int:
    """The execution whose work this one is (itself unless served from the cache)."""
    return execution.cached_from or execution.id


def evaluation_of(store: LineageStore, executions: list[StageExecution]) -> dict[str, float]:
    for execution in executions:
        if execution.stage == "evaluate" and execution.status == "succeeded":
            return {m.name: m.value for m in store.list_metrics_of_execution(_source(execution)) if m.step is None}
    return {}


def run_row(store: LineageStore, run: Run) -> dict[str, Any]:
    """One line of the runs list: status of every stage, trigger, duration, headline metrics."""
    executions = store.list_executions(run.id)
    by_stage = {e.stage: e for e in executions}
    stages = []
    for stage in TASKS:
        e = by_stage.get(stage)
        status = "cached" if e is not None and e.cached else (e.status if e is not None else "none")
        stages.append({"stage": stage, "status": status})
    evaluation = evaluation_of(store, executions)
    return {"id": run.id, "status": run.status, "trigger": run.trigger, "by": run.triggered_by or "-",
            "preset": run.preset or "-", "created": run.created_at, "backend": run.backend,
            "duration": duration_text(_seconds(run.started_at or run.created_at, run.ended_at)),
            "stages": stages, "metrics": {name: evaluation.get(name) for name in HEADLINE_METRICS}}


def stage_graph(executions: list[StageExecution], run_status: str) -> str:
    """The pipeline graph as SVG, each stage coloured by its status in this run (a stage that never
    started in a finished run was skipped: the gate failed, or an earlier stage did)."""
    by_stage = {e.stage: e for e in executions}
    missing = "skipped" if run_status in TERMINAL_STATUSES else "waiting"
    nodes = []
    for stage in TASKS:
        e = by_stage.get(stage)
        status = "cached" if e is not None and e.cached else (e.status if e is not None else missing)
        when = duration_text(_seconds(e.started_at, e.ended_at)) if e is not None and not e.cached else ""
        nodes.append(svg.GraphNode(id=stage, lines=[stage, status + (f" · {when}" if when and when != "-" else "")],
                                   kind=f"stage st-{status}", href=f"#stage-{stage}",
                                   tooltip=(e.error or "") if e is not None else ""))
    return svg.layered_graph(nodes, TASK_EDGES, id_prefix="stage")


def curves(store: LineageStore, executions: list[StageExecution]) -> list[dict[str, Any]]:
    """Per training stage, its charts (loss: total, text and image; learning rate per group)."""
    out = []
    for execution in _ordered(executions):
        points: dict[str, list[tuple[float, float]]] = {}
        for m in store.list_metrics_of_execution(_source(execution)):
            if m.step is not None:
                points.setdefault(m.name, []).append((m.step, m.value))
        if not points:
            continue
        charts = []
        for title, names in CURVE_GROUPS.items():
            chosen = {n: p for n, p in points.items()
                      if any(n.startswith(w) if w.endswith("/") else n == w for w in names)}
            # An image loss that is zero throughout (stage 1 trains text only) is not a curve.
            chosen = {n: p for n, p in chosen.items() if any(v != 0 for _, v in p)}
            if chosen:
                charts.append(svg.line_chart(chosen, title=f"{execution.stage}: {title}", y_label=title))
        out.append({"stage": execution.stage, "cached": execution.cached, "charts": charts,
                    "steps": max(s for p in points.values() for s, _ in p)})
    return out


def previous_run(store: LineageStore, run: Run) -> Run | None:
    """The latest succeeded run of the same pipeline created before `run`."""
    for candidate in store.list_runs(pipeline=run.pipeline, status="succeeded", limit=200):
        if candidate.id != run.id and candidate.created_at < run.created_at:
            return candidate
    return None


def evaluation_table(store: LineageStore, executions: list[StageExecution], previous: Run | None) -> dict[str, Any]:
    """This run's evaluation beside the previous run's (`previous_run`) and the production model's."""
    current = evaluation_of(store, executions)
    before = evaluation_of(store, store.list_executions(previous.id)) if previous else {}
    production = store.production()
    prod = dict(production.metrics) if production else {}
    names = sorted(n for n in set(current) | set(before)
                   if not (n.endswith("_n") or n.endswith("_seconds") or n == "gate_passed"))
    rows = []
    for name in names:
        value, old = current.get(name), before.get(name)
        delta = value - old if value is not None and old is not None else None
        # Whether the change is an improvement: lower is better for some metrics (FID).
        better = None if not delta else (delta > 0) == (direction_of(name) == "higher")
        rows.append({"name": name, "value": value, "previous": old, "production": prod.get(name),
                     "delta": delta, "better": better, "direction": direction_of(name)})
    return {"rows": rows, "previous": previous.id if previous else None,
            "production": f"{production.version} (run {production.run_id})" if production else None,
            "gate": current.get("gate_passed")}


def gate(store: LineageStore, run: Run, executions: list[StageExecution]) -> dict[str, Any] | None:
    """The promotion gate's verdict per metric (gate.json of the run's evaluation), or None."""
    from emu.pipeline.tasks import GATE_FILE

    for row in artifacts(store, run, executions):
        if row["type"] == "metrics" and row["stage"] == "evaluate":
            path = run_file(store, run.id, row["id"], GATE_FILE)
            if path is not None:
                return json.loads(path.read_text(encoding="utf-8"))
    return None


def promotion(store: LineageStore, run: Run, executions: list[StageExecution]) -> dict[str, Any]:
    """Whether the run page offers to promote the run's model, and if not, why: only a succeeded,
    evaluated run whose model is not production already (the same md5 again would be a new
    version of nothing). A run whose gate failed is offered with that said beside the button."""
    if run.status != "succeeded":
        return {"offered": False, "reason": ""}
    evaluation = evaluation_of(store, executions)
    model = next((r for r in artifacts(store, run, executions) if r["stage"] == "instruct" and r["type"] == "model"),
                 None)
    if model is None or not evaluation:
        return {"offered": False, "reason": "This run has no evaluated instruction-tuned model to promote."}
    production = store.production()
    if production is not None and production.model_md5 == model["md5"]:
        return {"offered": False, "model": model,
                "reason": f"This run's model is the production model ({production.version})."}
    return {"offered": True, "model": model, "reason": "", "gate_failed": evaluation.get("gate_passed") == 0.0,
            "production": production.version if production else None}


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (`stage2.schedule.decay`); lists stay values."""
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(flatten(inner, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: value}


def config_diff(run: Run, previous: Run | None) -> dict[str, Any]:
    """The run's resolved configs (every stage) and what changed since the previous run. A run
    recorded before it started (pending, or failed at launch) has none yet: `resolved` False, no diff."""
    configs = (run.parameters or {}).get("configs", {})
    mine = flatten(configs)
    changes = []
    if previous is not None and configs:
        theirs = flatten((previous.parameters or {}).get("configs", {}))
        for key in sorted(set(mine) | set(theirs)):
            if mine.get(key, "∅") != theirs.get(key, "∅"):
                changes.append({"key": key, "before": _show(theirs.get(key, "(absent)")),
                                "after": _show(mine.get(key, "(absent)"))})
    return {"text": json.dumps(configs, indent=2, sort_keys=True), "changes": changes, "resolved": bool(configs),
            "overrides": (run.parameters or {}).get("overrides", []),
            "source": (run.parameters or {}).get("source") or "synthetic shapes world",
            "source_md5": (run.parameters or {}).get("source_md5") or "-",
            "code_version": (run.parameters or {}).get("code_version") or "-"}


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def artifacts(store: LineageStore, run: Run, executions: list[StageExecution]) -> list[dict[str, Any]]:
    """What the run's stages wrote: md5, size, where, and how to restore it."""
    from emu.lineage.query import run_graph

    graph = run_graph(store, run.id)
    by_execution = {x["id"]: x for x in graph.executions}
    produced = {}
    for edge in graph.edges:
        x = by_execution.get(edge["execution_id"])
        if edge["direction"] == "out" and x is not None and x["run_id"] == run.id:
            produced.setdefault(edge["artifact_id"], x["stage"])
    rows = []
    for a in graph.artifacts:
        if a["id"] not in produced:
            continue
        view = next((name for name in VIEW_ENTRIES if _file_in(store, a["id"], name)), None)
        rows.append({"id": a["id"], "stage": produced[a["id"]], "type": a["type"], "name": a["name"] or "-",
                     "md5": a["md5"], "size": a["size"], "uri": a["uri"] or "-", "view": view})
    order = {stage: i for i, stage in enumerate(TASKS)}
    rows.sort(key=lambda r: (order.get(r["stage"], len(order)), r["id"]))
    return rows


def _run_artifact_ids(store: LineageStore, run_id: str) -> set[int]:
    from emu.lineage.query import run_graph

    graph = run_graph(store, run_id)
    own = {x["id"] for x in graph.executions if x["run_id"] == run_id}
    return {e["artifact_id"] for e in graph.edges if e["execution_id"] in own}


def run_file(store: LineageStore, run_id: str, artifact_id: int, relative: str) -> Path | None:
    """The file `relative` inside artifact `artifact_id`, if that artifact belongs to run `run_id`
    (one of its stages read or wrote it), is of a viewable type, is a local folder, and the
    resolved path stays inside it (no `..`, no symlink out). Anything else: None (the app's 404)."""
    if store.get_run(run_id) is None or artifact_id not in _run_artifact_ids(store, run_id):
        return None
    return _file_in(store, artifact_id, relative)


def _file_in(store: LineageStore, artifact_id: int, relative: str) -> Path | None:
    """The file `relative` inside a viewable artifact's local folder, resolved and kept inside it."""
    artifact = store.get_artifact(artifact_id)
    if artifact is None or artifact.type not in VIEWABLE_TYPES:
        return None
    for uri in [artifact.uri, *store.artifact_uris(artifact_id)]:
        if not uri or "://" in uri:
            continue
        root = Path(uri).resolve()
        if not root.is_dir():
            continue
        try:
            target = (root / relative).resolve()
        except (OSError, ValueError, RuntimeError):  # a NUL byte; a symlink loop (RuntimeError)
            return None
        if target != root and target.is_relative_to(root) and target.is_file():
            return target
    return None


def report(store: LineageStore, run: Run, executions: list[StageExecution]) -> dict[str, Any] | None:
    """The evaluation report (report.json of the evaluation artifact): example answers as tables,
    generated images and decoder reconstructions as figures, with the URLs the app serves them at."""
    for row in artifacts(store, run, executions):
        if row["type"] != "metrics" or row["stage"] != "evaluate":
            continue
        path = run_file(store, run.id, row["id"], "report.json")
        if path is None:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        for section in data.get("sections", []):
            for figure in section.get("figures", []):
                figure["url"] = f"/runs/{run.id}/files/{row['id']}/{figure['file']}"
        data["html_url"] = f"/runs/{run.id}/files/{row['id']}/report.html"
        return data
    return None


def lineage_svg(graph) -> str:
    """A lineage graph (emu.lineage.query.LineageGraph) as navigable SVG: datasets and other
    artifacts link to their own lineage, executions to their run. An execution and the cached
    executions that reused its work are one node (the work was done once), naming the runs that
    reused it; their edges are drawn once."""
    nodes, edges = [], []
    runs = {r["id"] for r in graph.runs}
    node_of: dict[int, str] = {}
    by_work: dict[int, list[dict[str, Any]]] = {}
    for x in graph.executions:
        by_work.setdefault(x.get("cached_from") or x["id"], []).append(x)
    for work, members in by_work.items():
        x = next((m for m in members if m["id"] == work), members[0])
        reused = sorted({m["run_id"] for m in members if m["cached"]} - {x["run_id"]})
        status = f"{x['status']} (cached)" if x["cached"] else x["status"]
        lines = [x["stage"], status, x["run_id"]] + ([f"reused by {len(reused)} run(s)"] if reused else [])
        node = f"execution:{x['id']}"
        for m in members:
            node_of[m["id"]] = node
        tooltip = (x.get("error") or "") + ("\nreused by " + ", ".join(reused) if reused else "")
        nodes.append(svg.GraphNode(id=node, lines=lines, href=f"/runs/{x['run_id']}" if x["run_id"] in runs else None,
                                   kind=f"execution st-{x['status']}", tooltip=tooltip.strip()))
    for a in graph.artifacts:
        size = "" if a["size"] is None else f" · {a['size']:,} B"
        nodes.append(svg.GraphNode(id=f"artifact:{a['id']}", lines=[f"{a['type']}: {a['name'] or '-'}",
                                                                    a["md5"][:16] + "…" + size],
                                   href=f"/lineage?target=artifact:{a['id']}", kind=f"artifact type-{a['type']}",
                                   tooltip=f"{a['md5']}\n{a['uri'] or ''}"))
    drawn = set()
    for e in graph.edges:
        execution, artifact = node_of[e["execution_id"]], f"artifact:{e['artifact_id']}"
        pair = (artifact, execution) if e["direction"] == "in" else (execution, artifact)
        if (pair, e["role"]) in drawn:
            continue
        drawn.add((pair, e["role"]))
        edges.append(svg.GraphEdge(*pair, kind=e["direction"], label=e["role"] or ""))
    return svg.layered_graph(nodes, edges, id_prefix="lineage", max_chars=30)
