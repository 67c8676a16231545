"""The lineage store (emu.lineage): records, walks, renderings, schedules, audit log, concurrency, CLI.

A realistic lineage is built by hand: one CLI run prepare -> validate -> stage1 -> precompute ->
stage2 -> instruct -> evaluate with DVC-style md5s, a scheduled re-evaluation with a cached task,
and an unrelated run that must never show up in the walks.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from emu.errors import ConfigError
from emu.lineage import LineageError
from emu.lineage.query import downstream, resolve_target, run_graph, show, summary, upstream
from emu.lineage.store import LineageStore, config_md5, default_url, resolve_url

UTC = timezone.utc
T0 = datetime(2025, 1, 10, 2, 0, tzinfo=UTC)
COMMIT = "3f2a9c1d0b7e6f5a4c3b2a1908f7e6d5c4b3a291"
IMAGE = "sha256:" + "ab" * 32
EMU = Path(sys.executable).parent / "emu"


def md5(text: str, folder: bool = False) -> str:
    return hashlib.md5(text.encode()).hexdigest() + (".dir" if folder else "")


@dataclass
class World:
    store: LineageStore
    url: str
    root: Path
    run: str
    rerun: str
    other: str
    art: dict[str, int]
    md5: dict[str, str]
    exe: dict[str, int]
    configs: dict[str, dict]


STAGE1_CONFIG = {"lr": 0.0001, "steps": 10, "batch_size": 4, "trainable": ["projection", "lm"]}
STAGE2_CONFIG = {"lr": 5e-05, "steps": 20, "image_loss_weight": 1.0, "precomputed": "/lake/emb"}
INSTRUCT_CONFIG = {"lr": 2e-05, "steps": 5, "mode": "chat"}


@pytest.fixture()
def world(tmp_path) -> World:
    return build_world(f"sqlite:///{tmp_path / 'lineage.db'}", tmp_path / "lake")


def build_world(url: str, root: Path) -> World:
    """Record the lineage described in the module docstring into the database at `url`
    (artifacts "live" under `root`). Also used by the PostgreSQL test."""
    store = LineageStore(url)
    art: dict[str, int] = {}
    md5s: dict[str, str] = {}

    def artifact(key: str, type: str, size: int, uri: str | None = None, folder: bool = True) -> int:
        md5s[key] = md5(key, folder)
        art[key] = store.record_artifact(md5s[key], size, uri or str(root / key), type, key)
        return art[key]

    # An unrelated older run with its own data and model: never part of the walks below.
    other = store.create_run(trigger="api", triggered_by="bot", preset="small", run_id="run-20250101-000000-0000aa",
                             created_at=T0 - timedelta(days=9), status="succeeded").id
    x = store.start_execution(other, "stage1", {"lr": 1}, "h0", started_at=T0 - timedelta(days=9))
    store.link(x, artifact("other-data", "dataset", 10), "in", "data")
    store.link(x, artifact("other-model", "model", 20), "out", "model")
    store.finish_execution(x, "succeeded", ended_at=T0 - timedelta(days=9) + timedelta(minutes=5))

    run = store.create_run(trigger="cli", triggered_by="alice", preset="tiny", git_commit=COMMIT, git_dirty=False,
                           image_digest=IMAGE, parameters={"steps_scale": 1, "bench": ["vqav2"]},
                           run_id="run-20250110-020000-c0ffee", created_at=T0, status="running").id
    configs = {"prepare": {"seed": 0, "scale": 0.1}, "validate": {"max_failure_fraction": 0.0},
               "stage1": STAGE1_CONFIG, "precompute": {"batch_size": 8}, "stage2": STAGE2_CONFIG,
               "instruct": INSTRUCT_CONFIG, "evaluate": {"bench": ["vqav2", "coco-captions"]}}
    exe: dict[str, int] = {}

    def execute(stage: str, inputs: list[tuple[str, str]], outputs: list[tuple[str, str, str, int]], hour: int,
                run_id: str = run, cached: bool = False, config: dict | None = None) -> int:
        x = store.start_execution(run_id, stage, config if config is not None else configs[stage], "node-1",
                                  started_at=T0 + timedelta(hours=hour))
        for role, key in inputs:
            store.link(x, art[key], "in", role)
        for role, key, type, size in outputs:
            store.link(x, artifact(key, type, size), "out", role)
        store.finish_execution(x, "succeeded", cached=cached, ended_at=T0 + timedelta(hours=hour, minutes=30))
        return x

    artifact("raw-sources", "dataset", 5_000, folder=True)
    exe["prepare"] = execute("prepare", [("src", "raw-sources")],
                             [("data", "shards-cc", "dataset", 3_000), ("data", "shards-llava", "dataset", 1_500)], 0)
    exe["validate"] = execute("validate", [("data", "shards-cc"), ("data", "shards-llava")],
                              [("report", "gate-report", "report", 900)], 1)
    exe["stage1"] = execute("stage1", [("data", "shards-cc")], [("model", "model-stage1", "model", 40_000)], 2)
    exe["precompute"] = execute("precompute", [("model", "model-stage1"), ("data", "shards-cc")],
                                [("embeddings", "emb-cc", "embeddings", 8_000)], 3)
    exe["stage2"] = execute("stage2", [("init", "model-stage1"), ("data", "shards-cc"), ("embeddings", "emb-cc")],
                            [("model", "model-stage2", "model", 40_000)], 4)
    exe["instruct"] = execute("instruct", [("init", "model-stage2"), ("data", "shards-llava")],
                              [("model", "model-chat", "model", 41_000)], 5)
    artifact("bench-vqav2", "dataset", 700)
    exe["evaluate"] = execute("evaluate", [("model", "model-chat"), ("bench", "bench-vqav2")],
                              [("metrics", "metrics-1", "metrics", 300, )], 6)
    store.record_metrics(run, exe["stage1"], {"loss": 2.5}, step=10)
    store.record_metrics(run, exe["evaluate"], {"vqav2_accuracy": 41.25, "coco_cider": 0.875})
    store.record_metrics(run, None, {"wall_clock_s": 1234.0})
    store.update_run(run, status="succeeded", ended_at=T0 + timedelta(hours=7))

    # A scheduled re-evaluation of the same model: cached evaluate task, new metrics.
    sched = store.create_schedule("nightly-eval", "0 2 * * *", {"bench": ["vqav2"]}, "alice", now=T0)
    rerun = store.create_run(trigger="schedule", triggered_by="alice", schedule_id=sched.id, preset="tiny",
                             git_commit=COMMIT, run_id="run-20250111-020000-beef01",
                             created_at=T0 + timedelta(days=1)).id
    exe["evaluate-2"] = execute("evaluate", [("model", "model-chat"), ("bench", "bench-vqav2")],
                                [("metrics", "metrics-1", "metrics", 300)], 24, run_id=rerun, cached=True,
                                config=configs["evaluate"])
    store.record_metrics(rerun, exe["evaluate-2"], {"vqav2_accuracy": 41.25})
    store.update_run(rerun, status="succeeded", ended_at=T0 + timedelta(days=1, minutes=40))
    return World(store, url, root, run, rerun, other, art, md5s, exe, configs)


# ---------------------------------------------------------------------- readable summary


def stage_lines(text: str) -> list[str]:
    block = text.split("\nstages")[1].split("\n\n")[0]
    return [line.split()[0] for line in block.splitlines()[1:] if line.startswith("  ") and not line.startswith("      ")]


def test_summary_reads_as_the_chain_from_the_model_to_its_data(world):
    """`emu lineage show MODEL` by default: model <- stages <- data with md5s, the run's trigger
    and commit, the evaluation; not every config (that is --full)."""
    graph = show(world.store, world.md5["model-chat"])
    text = summary(world.store, graph)

    assert text.splitlines()[0] == (f"model {world.md5['model-chat']} (40.0 KiB), artifact:{world.art['model-chat']}, "
                                    f"made by instruct")
    assert (f"run {world.run}: succeeded, trigger cli by alice, preset tiny, commit {COMMIT[:12]}, "
            f"data synthetic shapes world, created 2025-01-10 02:00:00 UTC") in text
    assert stage_lines(text) == ["instruct", "stage2", "precompute", "stage1", "prepare"]
    assert f"wrote model {world.md5['model-stage2']} (39.1 KiB)" in text
    assert f"read  init {world.md5['model-stage2']}" in text
    for data in ("shards-cc", "shards-llava", "raw-sources"):
        assert re.search(rf"^  {data} +{world.md5[data]} ", text, re.M), data
    assert f"evaluation (execution:{world.exe['evaluate']}):" in text and re.search(r"vqav2_accuracy +41\.25", text)
    assert '"lr"' not in text and len(text) < len(graph.to_text()) / 2
    assert text.splitlines()[-1].endswith(f"lineage show {world.md5['model-chat']} --full (or --format json / dot)")


def test_summary_and_graph_show_reused_work_once(world):
    """A stage served from KFP's cache is the original's work: listed and drawn once, with the
    runs that reused it (the dashboard's lineage graph drew it twice)."""
    from emu.dashboard.views import lineage_svg

    copy = world.store.record_cached_execution(world.rerun, "evaluate", world.exe["evaluate"])
    graph = show(world.store, world.md5["model-chat"], "down")
    assert {x["id"] for x in graph.executions} >= {world.exe["evaluate"], copy}

    text = summary(world.store, graph)
    evaluate = [line for line in text.splitlines() if line.startswith("  evaluate")]
    assert len(evaluate) == 2  # the original (reused by the copy) and the separately recorded evaluate-2
    assert any(f"reused from the cache by run {world.rerun}" in line and f"execution:{world.exe['evaluate']}" in line
               for line in evaluate)
    drawing = lineage_svg(graph)
    assert f'data-id="execution:{copy}"' not in drawing
    assert drawing.count(f'data-id="execution:{world.exe["evaluate"]}"') == 1 and "reused by 1 run(s)" in drawing


# ---------------------------------------------------------------------- walks


def test_upstream_of_the_final_model_reaches_the_data_configs_and_commit(world):
    graph = show(world.store, str(world.root / "model-chat"))
    assert graph.target == {"query": str(world.root / "model-chat"), "kind": "artifact",
                            "id": world.art["model-chat"], "direction": "up"}
    # Exactly the stages that fed the model, in order; validate and evaluate are not upstream.
    assert [x["stage"] for x in graph.executions] == ["prepare", "stage1", "precompute", "stage2", "instruct"]
    datasets = {a["md5"] for a in graph.artifacts if a["type"] == "dataset"}
    assert datasets == {world.md5["raw-sources"], world.md5["shards-cc"], world.md5["shards-llava"]}
    assert all(m.endswith(".dir") for m in datasets)
    # The leaves (nothing recorded produced them) are the raw sources.
    produced = {e["artifact_id"] for e in graph.edges if e["direction"] == "out"}
    assert {a["md5"] for a in graph.artifacts if a["id"] not in produced} == {world.md5["raw-sources"]}
    by_stage = {x["stage"]: x for x in graph.executions}
    assert by_stage["stage1"]["config"] == STAGE1_CONFIG
    assert by_stage["stage2"]["config"] == STAGE2_CONFIG
    assert by_stage["instruct"]["config_md5"] == config_md5(INSTRUCT_CONFIG)
    assert [(r["id"], r["git_commit"], r["image_digest"], r["trigger"], r["triggered_by"]) for r in graph.runs] == [
        (world.run, COMMIT, IMAGE, "cli", "alice")]
    # stage1's training loss comes along; evaluation metrics are downstream, not here.
    assert [(m["name"], m["value"], m["step"]) for m in graph.metrics] == [("loss", 2.5, 10)]
    ids = {a["id"] for a in graph.artifacts}
    assert world.art["other-data"] not in ids and world.art["gate-report"] not in ids
    assert world.art["bench-vqav2"] not in ids

    text = graph.to_text()
    for needle in [COMMIT, IMAGE, world.md5["shards-cc"], world.md5["shards-llava"], world.md5["raw-sources"],
                   '"lr": 0.0001', '"mode": "chat"', "trigger cli by alice", "preset tiny"]:
        assert needle in text, needle
    for stage in ("prepare", "stage1", "precompute", "stage2", "instruct"):
        assert re.search(rf"execution:\d+  {stage}  succeeded", text), stage


def test_upstream_edges_follow_the_data_flow(world):
    graph = upstream(world.store, world.art["model-chat"])
    edges = {(e["execution_id"], e["artifact_id"], e["direction"], e["role"]) for e in graph.edges}
    a, x = world.art, world.exe
    assert edges == {
        (x["prepare"], a["raw-sources"], "in", "src"), (x["prepare"], a["shards-cc"], "out", "data"),
        (x["prepare"], a["shards-llava"], "out", "data"),
        (x["stage1"], a["shards-cc"], "in", "data"), (x["stage1"], a["model-stage1"], "out", "model"),
        (x["precompute"], a["model-stage1"], "in", "model"), (x["precompute"], a["shards-cc"], "in", "data"),
        (x["precompute"], a["emb-cc"], "out", "embeddings"),
        (x["stage2"], a["model-stage1"], "in", "init"), (x["stage2"], a["shards-cc"], "in", "data"),
        (x["stage2"], a["emb-cc"], "in", "embeddings"), (x["stage2"], a["model-stage2"], "out", "model"),
        (x["instruct"], a["model-stage2"], "in", "init"), (x["instruct"], a["shards-llava"], "in", "data"),
        (x["instruct"], a["model-chat"], "out", "model"),
    }


def test_downstream_of_a_dataset_reaches_the_evaluations_and_their_metrics(world):
    graph = downstream(world.store, world.art["shards-llava"])
    stages = [(x["stage"], x["run_id"], x["cached"]) for x in graph.executions]
    assert stages == [("validate", world.run, False), ("instruct", world.run, False), ("evaluate", world.run, False),
                      ("evaluate", world.rerun, True)]
    assert [(m["run_id"], m["name"], m["value"]) for m in graph.metrics] == [
        (world.run, "coco_cider", 0.875), (world.run, "vqav2_accuracy", 41.25), (world.rerun, "vqav2_accuracy", 41.25)]
    assert {r["id"] for r in graph.runs} == {world.run, world.rerun}
    assert {a["md5"] for a in graph.artifacts} == {world.md5[k] for k in
                                                    ("shards-llava", "gate-report", "model-chat", "metrics-1")}
    # stage1 did not read the llava shards, so nothing of the stage-1 branch is downstream.
    assert world.exe["stage1"] not in {x["id"] for x in graph.executions}
    both = show(world.store, world.md5["model-chat"], direction="both")
    assert [x["stage"] for x in both.executions] == ["prepare", "stage1", "precompute", "stage2", "instruct",
                                                     "evaluate", "evaluate"]


def test_run_graph_holds_every_execution_artifact_and_run_level_metric(world):
    graph = show(world.store, world.run)
    assert graph.target["kind"] == "run" and graph.target["direction"] is None
    assert [x["stage"] for x in graph.executions] == ["prepare", "validate", "stage1", "precompute", "stage2",
                                                      "instruct", "evaluate"]
    assert [r["id"] for r in graph.runs] == [world.run]
    assert ("wall_clock_s", None) in {(m["name"], m["execution_id"]) for m in graph.metrics}
    assert graph.runs[0]["status"] == "succeeded" and graph.runs[0]["ended_at"] == (T0 + timedelta(hours=7)).isoformat()
    assert run_graph(world.store, world.rerun).executions[0]["cached"] is True


def test_json_form_has_the_documented_schema_and_values(world):
    data = json.loads(show(world.store, world.md5["model-chat"]).to_json())
    assert list(data) == ["version", "target", "runs", "executions", "artifacts", "edges", "metrics"]
    assert data["version"] == 1
    assert set(data["target"]) == {"query", "kind", "id", "direction"}
    run_keys = {"id", "pipeline", "status", "trigger", "triggered_by", "schedule_id", "preset", "parameters",
                "git_commit", "git_dirty", "image_digest", "backend", "kfp_run_id", "created_at", "started_at",
                "ended_at", "error"}
    assert all(set(r) == run_keys for r in data["runs"])
    assert all(set(x) == {"id", "run_id", "stage", "status", "cached", "cached_from", "host", "started_at",
                          "ended_at", "error", "config", "config_md5"} for x in data["executions"])
    assert all(set(a) == {"id", "md5", "type", "name", "size", "uri", "uris", "created_at"} for a in data["artifacts"])
    assert all(set(e) == {"execution_id", "artifact_id", "direction", "role"} for e in data["edges"])
    assert all(set(m) == {"run_id", "execution_id", "name", "value", "step", "recorded_at"} for m in data["metrics"])

    run = data["runs"][0]
    assert run["id"] == world.run and run["git_commit"] == COMMIT and run["git_dirty"] is False
    assert run["parameters"] == {"steps_scale": 1, "bench": ["vqav2"]} and run["backend"] == "local"
    assert run["created_at"] == "2025-01-10T02:00:00+00:00"
    stage1 = next(x for x in data["executions"] if x["stage"] == "stage1")
    assert stage1 == {"id": world.exe["stage1"], "run_id": world.run, "stage": "stage1", "status": "succeeded",
                      "cached": False, "cached_from": None, "host": "node-1", "started_at": "2025-01-10T04:00:00+00:00",
                      "ended_at": "2025-01-10T04:30:00+00:00", "error": None, "config": STAGE1_CONFIG,
                      "config_md5": config_md5(STAGE1_CONFIG)}
    cc = next(a for a in data["artifacts"] if a["id"] == world.art["shards-cc"])
    assert cc["md5"] == world.md5["shards-cc"] and cc["size"] == 3_000 and cc["type"] == "dataset"
    assert cc["uri"] == str(world.root / "shards-cc") and cc["uris"] == [cc["uri"]]
    # Sorted and deterministic: the same query twice gives the same bytes.
    assert [a["id"] for a in data["artifacts"]] == sorted(a["id"] for a in data["artifacts"])
    assert show(world.store, world.md5["model-chat"]).to_json() == show(world.store, world.md5["model-chat"]).to_json()


def test_dot_form_names_every_node_and_edge(world):
    graph = show(world.store, world.md5["model-chat"])
    dot = graph.to_dot()
    assert dot.startswith("digraph lineage {") and dot.rstrip().endswith("}")
    declared = set(re.findall(r'^\s*"([^"]+)" \[', dot, flags=re.M))
    expected = ({f"run:{world.run}"} | {f"execution:{x['id']}" for x in graph.executions}
                | {f"artifact:{a['id']}" for a in graph.artifacts})
    assert expected <= declared
    arrows = set(re.findall(r'^\s*"([^"]+)" -> "([^"]+)"', dot, flags=re.M))
    assert (f"artifact:{world.art['shards-cc']}", f"execution:{world.exe['stage1']}") in arrows
    assert (f"execution:{world.exe['instruct']}", f"artifact:{world.art['model-chat']}") in arrows
    assert len([a for a in arrows if not a[1].startswith("metric:")]) == len(graph.edges)
    assert world.md5["shards-cc"] in dot and world.md5["shards-llava"] in dot
    pydot = pytest.importorskip("pydot")  # a DOT parser, when installed (it is a DVC dependency)
    (parsed,) = pydot.graph_from_dot_data(dot)
    assert parsed.get_name() == "lineage"


def test_dot_escapes_quotes_in_labels(world):
    x = world.store.start_execution(world.run, 'stage "quoted" \\ name', {})
    world.store.finish_execution(x, "failed", error='bad "thing"')
    dot = run_graph(world.store, world.run).to_dot()
    assert r'stage \"quoted\" \\ name' in dot
    pydot = pytest.importorskip("pydot")
    assert pydot.graph_from_dot_data(dot)


# ---------------------------------------------------------------------- target resolution


def test_targets_resolve_by_id_md5_prefix_and_uri(world, monkeypatch):
    s, a = world.store, world.art
    chat = ("artifact", a["model-chat"])
    assert resolve_target(s, world.run) == ("run", world.run)
    assert resolve_target(s, f"run:{world.run}") == ("run", world.run)
    assert resolve_target(s, "run-20250111") == ("run", world.rerun)  # unique run-id prefix
    assert resolve_target(s, world.md5["model-chat"]) == chat
    assert resolve_target(s, world.md5["model-chat"].removesuffix(".dir")) == chat  # .dir optional
    assert resolve_target(s, world.md5["model-chat"][:10].upper()) == chat  # prefix, case-insensitive
    assert resolve_target(s, f"artifact:{a['model-chat']}") == chat
    assert resolve_target(s, str(a["model-chat"])) == chat
    assert resolve_target(s, str(world.root / "model-chat") + "/") == chat  # trailing slash
    world.root.mkdir()
    monkeypatch.chdir(world.root)
    assert resolve_target(s, "model-chat") == chat  # relative path made absolute
    # A second location (pushed to a DVC remote) resolves too, and is listed.
    s.record_artifact(world.md5["model-chat"], 41_000, "s3://bucket/dvc/files/md5/ab/cd", "model")
    assert resolve_target(s, "s3://bucket/dvc/files/md5/ab/cd") == chat
    assert upstream(s, a["model-chat"]).artifacts[-1]["uris"][-1] == "s3://bucket/dvc/files/md5/ab/cd"


def test_unknown_and_ambiguous_targets_fail_with_a_message(world):
    with pytest.raises(LineageError, match="no run, artifact md5 or recorded artifact URI matches '/nowhere'"):
        show(world.store, "/nowhere")
    with pytest.raises(LineageError, match="no run 'run-x'"):
        show(world.store, "run:run-x")
    with pytest.raises(LineageError, match="'run-2025' matches several records; name one: "
                                           "run:run-20250101-000000-0000aa; run:run-20250110-020000-c0ffee; "
                                           "run:run-20250111-020000-beef01"):
        resolve_target(world.store, "run-2025")
    # The same md5 recorded as two types: name the one you mean.
    world.store.record_artifact(world.md5["emb-cc"], 8_000, "/x", "dataset")
    with pytest.raises(LineageError, match=r"artifact:\d+ \(embeddings .*artifact:\d+ \(dataset"):
        resolve_target(world.store, world.md5["emb-cc"])
    with pytest.raises(LineageError, match="direction must be one of up, down, both"):
        show(world.store, world.md5["model-chat"], direction="sideways")


# ---------------------------------------------------------------------- records


def test_artifacts_are_idempotent_on_md5_and_type(tmp_path):
    store = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    h = md5("model", folder=True)
    first = store.record_artifact(h, 100, "/models/a", "model", "a")
    assert store.record_artifact(h, 100, "/models/a", "model", "a") == first
    assert store.record_artifact(h, None, "s3://b/a", "model") == first
    assert store.artifact_uris(first) == ["/models/a", "s3://b/a"]
    assert store.get_artifact(first).uri == "/models/a"  # the first location stays the primary one
    assert store.record_artifact(h, 100, "/models/a", "decoder") != first  # another type is another artifact
    with pytest.raises(LineageError, match="recorded with size 100, now 101"):
        store.record_artifact(h, 101, "/models/a", "model")
    with pytest.raises(LineageError, match="not a DVC md5"):
        store.record_artifact("xyz", 1, "/a", "model")
    with pytest.raises(LineageError, match="artifact type must be one of dataset, model"):
        store.record_artifact(md5("x"), 1, "/a", "weights")
    with sqlite3.connect(tmp_path / "l.db") as db:
        assert db.execute("select count(*) from artifacts").fetchone() == (2,)
        assert db.execute("select count(*) from artifact_locations").fetchone() == (3,)


def test_links_are_idempotent_and_checked(world):
    s = world.store
    s.link(world.exe["stage1"], world.art["shards-cc"], "in", "data")
    assert len([e for e in run_graph(s, world.run).edges
                if (e["execution_id"], e["artifact_id"]) == (world.exe["stage1"], world.art["shards-cc"])]) == 1
    with pytest.raises(LineageError, match="direction must be one of in, out"):
        s.link(world.exe["stage1"], world.art["shards-cc"], "sideways", "data")
    with pytest.raises(LineageError, match="no artifact 999"):
        s.link(world.exe["stage1"], 999, "in")


def test_run_status_times_and_validation(tmp_path):
    store = LineageStore(tmp_path / "l.db")  # a plain path is a SQLite file
    run = store.create_run(trigger="dashboard", triggered_by="bob", backend="kfp", kfp_run_id="kfp-123")
    assert re.fullmatch(r"run-\d{8}-\d{6}-[0-9a-f]{6}", run.id)
    assert run.status == "pending" and run.started_at is None and run.created_at.tzinfo == UTC
    running = store.update_run(run.id, status="running")
    assert running.started_at is not None and running.ended_at is None
    failed = store.update_run(run.id, status="failed", error="stage2: CUDA OOM")
    assert failed.ended_at >= failed.started_at and store.get_run(run.id).error == "stage2: CUDA OOM"
    assert store.get_run("run-nope") is None
    with pytest.raises(LineageError, match="status must be one of pending, running"):
        store.update_run(run.id, status="exploded")
    with pytest.raises(LineageError, match="trigger must be one of cli, schedule, dashboard, api"):
        store.create_run(trigger="cron")
    with pytest.raises(LineageError, match="already exists"):
        store.create_run(run_id=run.id)
    with pytest.raises(LineageError, match="no schedule 'sched-x'"):
        store.create_run(trigger="schedule", schedule_id="sched-x")
    with pytest.raises(LineageError, match="must be timezone-aware"):
        store.create_run(started_at=datetime(2025, 1, 1))
    with pytest.raises(LineageError, match="parameters cannot be stored as JSON"):
        store.create_run(parameters={"x": object()})


def test_executions_and_metrics_are_checked(world):
    s = world.store
    with pytest.raises(LineageError, match="no run 'run-missing'"):
        s.start_execution("run-missing", "stage1")
    x = s.start_execution(world.run, "register", {"name": "emu-chat"})
    assert s.get_execution(x).status == "running" and s.get_execution(x).host  # defaults to this machine
    with pytest.raises(LineageError, match="status must be one of succeeded, failed, cancelled, skipped"):
        s.finish_execution(x, "running")
    s.finish_execution(x, "skipped")
    assert s.get_execution(x).ended_at is not None
    with pytest.raises(LineageError, match="metric 'loss' is nan"):
        s.record_metrics(world.run, x, {"loss": float("nan")})
    with pytest.raises(LineageError, match="metric 'ok' must be a number"):
        s.record_metrics(world.run, x, {"ok": True})
    with pytest.raises(LineageError, match=f"no execution {world.exe['evaluate-2']} in run"):
        s.record_metrics(world.run, world.exe["evaluate-2"], {"x": 1.0})
    assert [(m.name, m.value) for m in s.list_metrics(world.rerun)] == [("vqav2_accuracy", 41.25)]
    assert [x.stage for x in s.list_executions(world.rerun)] == ["evaluate"]


def test_list_runs_filters_newest_first(world):
    s = world.store
    failed = s.create_run(trigger="dashboard", triggered_by="carol", created_at=T0 + timedelta(days=2),
                          status="failed").id
    assert [r.id for r in s.list_runs()] == [failed, world.rerun, world.run, world.other]
    assert [r.id for r in s.list_runs(status="failed")] == [failed]
    assert [r.id for r in s.list_runs(trigger="schedule")] == [world.rerun]
    assert [r.id for r in s.list_runs(since=T0)] == [failed, world.rerun, world.run]
    assert [r.id for r in s.list_runs(since=T0, status="succeeded", limit=1)] == [world.rerun]
    assert [r.id for r in s.list_runs(schedule_id=s.get_schedule("nightly-eval").id)] == [world.rerun]
    with pytest.raises(LineageError, match="status must be one of"):
        s.list_runs(status="done")


# ---------------------------------------------------------------------- schedules


def test_schedules_crud_and_due_computation(tmp_path):
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    now = datetime(2025, 3, 1, 10, 7, tzinfo=UTC)
    every15 = s.create_schedule("quarter-hourly", "*/15 * * * *", {"steps": 5}, "alice", preset="tiny", now=now)
    nightly = s.create_schedule("nightly", "0 0 2 * * *", None, "bob", now=now)  # 6 fields: 02:00:00
    assert every15.id.startswith("sched-") and every15.next_run_at == datetime(2025, 3, 1, 10, 15, tzinfo=UTC)
    assert nightly.next_run_at == datetime(2025, 3, 2, 2, 0, tzinfo=UTC)
    assert [x.name for x in s.list_schedules()] == ["nightly", "quarter-hourly"]
    assert s.get_schedule("quarter-hourly").parameters == {"steps": 5}

    assert s.due_schedules(datetime(2025, 3, 1, 10, 14, 59, tzinfo=UTC)) == []
    due = s.due_schedules(datetime(2025, 3, 1, 10, 15, tzinfo=UTC))
    assert [x.id for x in due] == [every15.id]

    # Fire it: a run of the schedule, then the next time. A second scheduler that saw the same due
    # time loses the compare-and-set.
    run = s.create_run(trigger="schedule", schedule_id=every15.id, triggered_by="alice")
    fired_at = datetime(2025, 3, 1, 10, 15, 2, tzinfo=UTC)
    assert s.mark_schedule_fired(every15.id, run.id, expected_next_run_at=due[0].next_run_at, now=fired_at)
    assert not s.mark_schedule_fired(every15.id, "run-other", expected_next_run_at=due[0].next_run_at, now=fired_at)
    after = s.get_schedule(every15.id)
    assert after.last_run_id == run.id and after.next_run_at == datetime(2025, 3, 1, 10, 30, tzinfo=UTC)
    assert after.last_fired_at == fired_at

    # Missed times are not caught up: fired late, the next time is after "now".
    s.mark_schedule_fired("quarter-hourly", None, now=datetime(2025, 3, 1, 13, 1, tzinfo=UTC))
    assert s.get_schedule(every15.id).next_run_at == datetime(2025, 3, 1, 13, 15, tzinfo=UTC)
    s.mark_schedule_fired("quarter-hourly", None, datetime(2025, 3, 5, tzinfo=UTC))  # explicit next time
    assert s.get_schedule(every15.id).next_run_at == datetime(2025, 3, 5, tzinfo=UTC)

    # Pause: never due. Resume: next time after the resume, not the missed ones.
    s.set_paused("nightly", True)
    assert s.get_schedule("nightly").next_run_at is None
    assert "nightly" not in [x.name for x in s.due_schedules(datetime(2025, 3, 9, tzinfo=UTC))]
    assert [x.name for x in s.list_schedules(include_paused=False)] == ["quarter-hourly"]
    resumed = s.set_paused("nightly", False, now=datetime(2025, 3, 9, 3, 0, tzinfo=UTC))
    assert resumed.next_run_at == datetime(2025, 3, 10, 2, 0, tzinfo=UTC)

    with pytest.raises(LineageError, match="a schedule named 'nightly' already exists"):
        s.create_schedule("nightly", "@daily")
    with pytest.raises(ConfigError, match="hour field '25'"):
        s.create_schedule("broken", "0 25 * * *")
    with pytest.raises(LineageError, match="no schedule with id or name 'nope'"):
        s.set_paused("nope", True)

    # Deleting keeps the runs it fired, detached from it.
    s.delete_schedule(every15.id)
    assert s.get_schedule(every15.id) is None and s.get_run(run.id).schedule_id is None
    assert [x.name for x in s.list_schedules()] == ["nightly"]


# ---------------------------------------------------------------------- audit log


def test_audit_entries_record_who_did_what(tmp_path):
    s = LineageStore(f"sqlite:///{tmp_path / 'l.db'}")
    s.audit("alice", "run.start", "run-1", {"preset": "tiny", "params": {"steps": 3}}, at=T0)
    s.audit("bob", "schedule.pause", "sched-1", None, "denied: not an operator", at=T0 + timedelta(minutes=1))
    s.audit("alice", "run.cancel", "run-1", {}, "ok", at=T0 + timedelta(minutes=2))
    entries = s.audit_entries()
    assert [(e.user, e.action, e.outcome) for e in entries] == [
        ("alice", "run.cancel", "ok"), ("bob", "schedule.pause", "denied: not an operator"),
        ("alice", "run.start", "ok")]
    assert entries[-1].request == {"preset": "tiny", "params": {"steps": 3}} and entries[-1].at == T0
    assert [e.action for e in s.audit_entries(user="alice")] == ["run.cancel", "run.start"]
    assert [e.action for e in s.audit_entries(target="sched-1")] == ["schedule.pause"]
    assert [e.action for e in s.audit_entries(since=T0 + timedelta(minutes=1), limit=1)] == ["run.cancel"]
    with pytest.raises(LineageError, match="needs a user and an action"):
        s.audit("", "run.start")


# ---------------------------------------------------------------------- database handling


def test_url_resolution_reads_the_environment_at_call_time(tmp_path, monkeypatch):
    monkeypatch.delenv("EMU_LINEAGE_URL", raising=False)
    monkeypatch.setenv("EMU_HOME", str(tmp_path / "home"))
    assert default_url() == f"sqlite:///{tmp_path / 'home' / 'lineage.db'}"
    store = LineageStore()
    store.create_tables()
    assert (tmp_path / "home" / "lineage.db").is_file()
    monkeypatch.setenv("EMU_LINEAGE_URL", "sqlite:///" + str(tmp_path / "env.db"))
    assert resolve_url() == "sqlite:///" + str(tmp_path / "env.db")
    assert resolve_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    with sqlite3.connect(tmp_path / "home" / "lineage.db") as db:
        assert db.execute("pragma journal_mode").fetchone() == ("wal",)
        assert db.execute("select value from lineage_meta where key='schema_version'").fetchone() == ("1",)


def test_a_newer_schema_is_refused(tmp_path):
    LineageStore(tmp_path / "l.db").create_tables()
    with sqlite3.connect(tmp_path / "l.db") as db:
        db.execute("update lineage_meta set value='99' where key='schema_version'")
    with pytest.raises(LineageError, match="schema version 99, newer than this emu's 1"):
        LineageStore(tmp_path / "l.db").list_runs()


def test_missing_driver_is_a_clear_error():
    with pytest.raises(LineageError, match="no database driver for lineage URL .*install a driver"):
        LineageStore("postgresql+nosuchdriver://u:secret@localhost/db")


def _write_concurrently(url: str, worker: int, n: int, barrier) -> None:
    """One task process: records a run, n executions, a shared and a private artifact each, metrics."""
    store = LineageStore(url)
    barrier.wait(timeout=60)
    run = store.create_run(run_id=f"run-worker-{worker}", trigger="api", status="running")
    for i in range(n):
        x = store.start_execution(run.id, f"stage{i}", {"worker": worker, "i": i}, f"host-{worker}")
        shared = store.record_artifact(md5(f"shared-{i}", True), 100 + i, f"/lake/shared-{i}", "dataset")
        own = store.record_artifact(md5(f"model-{worker}-{i}", True), 7, f"/out/{worker}/{i}", "model")
        store.link(x, shared, "in", "data")
        store.link(x, own, "out", "model")
        store.record_metrics(run.id, x, {"loss": float(i)})
        store.finish_execution(x, "succeeded")
    store.update_run(run.id, status="succeeded")


def test_concurrent_processes_write_one_sqlite_file(tmp_path):
    url = f"sqlite:///{tmp_path / 'shared.db'}"  # tables do not exist yet: creation races too
    workers, n = 3, 25
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(workers + 1)
    procs = [ctx.Process(target=_write_concurrently, args=(url, w, n, barrier)) for w in range(workers)]
    for p in procs:
        p.start()
    barrier.wait(timeout=60)
    reader = LineageStore(url)  # the dashboard reading meanwhile
    reads = 0
    while any(p.is_alive() for p in procs):
        reader.list_runs()
        reads += 1
        time.sleep(0.01)
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0] * workers
    runs = reader.list_runs(status="succeeded")
    assert sorted(r.id for r in runs) == [f"run-worker-{w}" for w in range(workers)]
    assert all(len(reader.list_executions(r.id)) == n for r in runs)
    with sqlite3.connect(tmp_path / "shared.db") as db:
        assert db.execute("select count(*) from artifacts where type='dataset'").fetchone() == (n,)  # shared once
        assert db.execute("select count(*) from artifacts where type='model'").fetchone() == (workers * n,)
        assert db.execute("select count(*) from edges").fetchone() == (2 * workers * n,)
        assert db.execute("select count(*) from metrics").fetchone() == (workers * n,)
    graph = downstream(reader, resolve_target(reader, "/lake/shared-0")[1])
    assert sorted(x["run_id"] for x in graph.executions) == [f"run-worker-{w}" for w in range(workers)]


# ---------------------------------------------------------------------- CLI


def test_cli_show_and_runs(world, monkeypatch):
    from emu.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["lineage", "show", str(world.root / "model-chat"), "--format", "json",
                                 "--db", world.url])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["target"]["id"] == world.art["model-chat"] and data["runs"][0]["git_commit"] == COMMIT

    monkeypatch.setenv("EMU_LINEAGE_URL", world.url)  # no --db: the environment, read at call time
    result = runner.invoke(app, ["lineage", "show", world.md5["shards-llava"][:8], "--direction", "down", "--full"])
    assert result.exit_code == 0, result.output
    assert "vqav2_accuracy = 41.25" in result.output and "(cached)" in result.output
    summary_text = runner.invoke(app, ["lineage", "show", world.md5["shards-llava"][:8], "--direction", "down"])
    assert summary_text.exit_code == 0 and "vqav2_accuracy" in summary_text.output
    assert len(summary_text.output) < len(result.output) and '"steps"' not in summary_text.output
    wrong = runner.invoke(app, ["lineage", "show", world.run, "--format", "json", "--full"])
    assert wrong.exit_code != 0 and "--full is for --format text" in str(wrong.exception)
    result = runner.invoke(app, ["lineage", "show", world.run, "--format", "dot"])
    assert result.exit_code == 0 and result.output.startswith("digraph lineage {")

    result = runner.invoke(app, ["lineage", "runs", "--trigger", "schedule"])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert lines[0].split()[:4] == ["run", "status", "trigger", "by"] and len(lines) == 2
    assert lines[1].split()[:4] == [world.rerun, "succeeded", "schedule", "alice"]
    result = runner.invoke(app, ["lineage", "runs", "--since", "2025-01-10", "--format", "json"])
    assert [r["id"] for r in json.loads(result.output)] == [world.rerun, world.run]


def test_cli_errors_are_one_line_exit_2(world):
    proc = subprocess.run([str(EMU), "lineage", "show", "/no/such/model", "--db", world.url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: no run, artifact md5 or recorded artifact URI matches '/no/such/model' "
                                   "(`emu lineage runs` lists runs)")
    proc = subprocess.run([str(EMU), "lineage", "runs", "--status", "done", "--db", world.url],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "status must be one of pending" in proc.stderr


def test_importing_the_cli_loads_no_database_code():
    code = "import sys, emu.cli, emu.lineage.cli; print(sorted(m for m in sys.modules if m.startswith('sqlalchemy')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
