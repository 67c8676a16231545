"""Lineage of the tasks a cluster's KFP served from its cache.

A cached task runs nothing, so nothing of ours records it. On this machine `emu run` reads
kfp.local's cache entries (emu.pipeline.runner.record_cached_tasks). On a cluster the run's exit
handler (emu.pipeline.tasks.finish_task) rebuilds the same record from two facts:

  * every input of a task is a parameter (DVC md5s, configs, its code version: emu.pipeline.handoff;
    register's metrics artifact aside), so KFP's cache entry for a task is determined by its
    stage, image and parameter values: its `fingerprint`, which each task records when it starts,
    with the value it returns (models.TaskCall);
  * the compiled pipeline says where each parameter of each task comes from (a pipeline
    parameter, a constant, or what an upstream task returned) and which condition gates it.

So, walking the graph from the pipeline's arguments, each task's parameters are known once its
upstream tasks' results are; a task with no execution in the run was served from the cache of the
latest execution with its fingerprint on the same backend (a KFP cluster's cache holds none of a
local run's), and the walk goes on with that execution's result.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

#: A KFP condition as the compiler writes it for `dsl.If(task.output == "value")`.
_CONDITION = re.compile(r"^inputs\.parameter_values\['([^']+)'\] == '([^']*)'$")
#: A parameter's source: ("pipeline", name), ("constant", value) or ("task", producer task).
Source = tuple[str, str]


def fingerprint(stage: str, parameters: Mapping[str, str]) -> str:
    """The KFP cache identity of a call of `stage`'s task with `parameters` (its parameter values)
    in this image (its digest, $EMU_IMAGE_DIGEST: KFP's key holds the image too). Left out, as it
    changes nothing the fingerprint must tell apart: register's `evaluation` metrics artifact,
    which evaluate's call determines."""
    import os

    from emu.cluster.image import DIGEST_ENV

    canonical = json.dumps({"stage": stage, "image": os.environ.get(DIGEST_ENV, ""),
                            "parameters": {k: str(v) for k, v in parameters.items()}},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class TaskWiring:
    """One container task of the compiled pipeline: where each of its parameters comes from, and
    the conditions ((source, required value), from enclosing dsl.If groups) it runs under."""

    name: str
    parameters: dict[str, Source]
    conditions: tuple[tuple[Source, str], ...] = ()
    upstream: frozenset[str] = field(default_factory=frozenset)


def wiring(spec: Mapping) -> list[TaskWiring]:
    """The container tasks of a compiled pipeline spec (its first YAML document), nested DAGs
    (the exit handler's, dsl.If groups) flattened, in an order where producers come first. Exit
    tasks (which take a task's final status) are left out."""
    tasks: list[TaskWiring] = []

    def walk(dag_tasks: Mapping, outer: Mapping[str, Source], conditions: tuple) -> None:
        for name, task in dag_tasks.items():
            raw = task.get("inputs", {}).get("parameters", {})
            if any("taskFinalStatus" in ref for ref in raw.values()):
                continue
            sources = {parameter: _source(ref, outer) for parameter, ref in raw.items()}
            gate = conditions + _conditions(task, sources)
            component = spec["components"][task["componentRef"]["name"]]
            if "dag" in component:
                walk(component["dag"]["tasks"], sources, gate)
            else:
                upstream = {v for kind, v in sources.values() if kind == "task"} | \
                           {v for (kind, v), _ in gate if kind == "task"} | set(task.get("dependentTasks", []))
                tasks.append(TaskWiring(name, sources, gate, frozenset(upstream)))

    walk(spec["root"]["dag"]["tasks"], _PipelineInputs(), ())
    return _producers_first(tasks)


def reused(store, run_id: str, arguments: Mapping[str, str], tasks: list[TaskWiring],
           run_succeeded: bool) -> dict[str, int]:
    """{task: id of the execution whose work the run reused} for each task of the run with no
    execution of its own that KFP must have served from its cache. For a run that did not succeed
    (a task failed, it was cancelled), only the tasks whose results a task of the run took as
    input: any other may never have been reached."""
    backend = store.get_run(run_id).backend
    executions = {e.stage: e for e in store.list_executions(run_id)}
    results: dict[str, str] = {}
    found: dict[str, int] = {}
    for task in tasks:
        if any(upstream not in results for upstream in task.upstream):
            continue  # an upstream task did not finish: this one never ran
        if any(results.get(value) != required for (kind, value), required in task.conditions if kind == "task"):
            continue  # its dsl.If was false
        parameters = {name: results[value] if kind == "task" else
                      (arguments.get(value, "") if kind == "pipeline" else value)
                      for name, (kind, value) in task.parameters.items()}
        own = executions.get(task.name)
        if own is not None:
            call = store.call_of(own.cached_from or own.id)
            if own.status == "succeeded" and call is not None and call.result is not None:
                results[task.name] = call.result
            continue
        original = store.original_call(task.name, fingerprint(task.name, parameters), backend)
        if original is not None:
            found[task.name], results[task.name] = original[0].id, original[1]
    if not run_succeeded:
        consumed = {u for t in tasks if t.name in executions for u in _ancestors(t.name, tasks)}
        found = {name: original for name, original in found.items() if name in consumed}
    return found


def record_reused(store, run_id: str, arguments: Mapping[str, str], tasks: list[TaskWiring],
                  run_succeeded: bool) -> list[str]:
    """Record each task `reused` finds as a cached execution of the run; returns their names."""
    found = reused(store, run_id, arguments, tasks, run_succeeded)
    for name, original in found.items():
        store.record_cached_execution(run_id, name, original)
    return sorted(found)


def compiled_wiring() -> list[TaskWiring]:
    """The wiring of the pipeline this code compiles (resources do not change it). Compiled in a
    fresh interpreter without `_KFP_RUNTIME`: in a KFP task (and what it starts) that variable
    makes kfp.dsl import only what an executor needs, and compiling fails on a circular import."""
    import os
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parents[2]
    with tempfile.TemporaryDirectory(prefix="emu-wiring-") as tmp:
        package = Path(tmp) / "pipeline.yaml"
        env = {k: v for k, v in os.environ.items() if k != "_KFP_RUNTIME"}
        done = subprocess.run([sys.executable, "-c", _COMPILE, str(package)], cwd=root, env=env,
                              capture_output=True, text=True, timeout=300)
        if done.returncode:
            raise RuntimeError(f"compiling the pipeline failed: {done.stderr.strip()[-2000:]}")
        return wiring(next(yaml.safe_load_all(package.read_text(encoding="utf-8"))))


_COMPILE = """
import sys
from kfp import compiler
from emu.pipeline.config import PipelineConfig
from pipelines.emu_pipeline import build_pipeline
compiler.Compiler().compile(build_pipeline(PipelineConfig(), close_run_on_exit=True), sys.argv[1])
"""


class _PipelineInputs(dict):
    """The root DAG's scope: an input parameter `x` is the pipeline parameter `x`."""

    def __missing__(self, name: str) -> Source:
        return ("pipeline", name)


def _source(ref: Mapping, outer: Mapping[str, Source]) -> Source:
    if "componentInputParameter" in ref:
        return outer[ref["componentInputParameter"]]
    if "taskOutputParameter" in ref:
        return ("task", ref["taskOutputParameter"]["producerTask"])
    if "runtimeValue" in ref:
        return ("constant", str(ref["runtimeValue"].get("constant", "")))
    raise ValueError(f"a task parameter of an unknown kind: {sorted(ref)}")


def _conditions(task: Mapping, sources: Mapping[str, Source]) -> tuple[tuple[Source, str], ...]:
    condition = task.get("triggerPolicy", {}).get("condition")
    if not condition:
        return ()
    match = _CONDITION.match(condition)
    if match is None or match.group(1) not in sources:  # not a form we read: never assume it held
        return ((("task", f"<unreadable condition {condition!r}>"), ""),)
    return ((sources[match.group(1)], match.group(2)),)


def _producers_first(tasks: list[TaskWiring]) -> list[TaskWiring]:
    by_name, ordered, seen = {t.name: t for t in tasks}, [], set()

    def visit(task: TaskWiring) -> None:
        if task.name in seen:
            return
        seen.add(task.name)
        for name in sorted(task.upstream):
            if name in by_name:
                visit(by_name[name])
        ordered.append(task)

    for task in tasks:
        visit(task)
    return ordered


def _ancestors(name: str, tasks: list[TaskWiring]) -> set[str]:
    by_name, found, todo = {t.name: t for t in tasks}, set(), [name]
    while todo:
        for upstream in by_name[todo.pop()].upstream:
            if upstream in by_name and upstream not in found:
                found.add(upstream)
                todo.append(upstream)
    return found
