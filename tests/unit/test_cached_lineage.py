"""Finding what a cluster run reused from KFP's cache (emu.pipeline.cached_lineage): the wiring read
from the compiled pipeline, and the walk from the pipeline's arguments through recorded calls."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from emu.lineage.store import LineageStore
from emu.pipeline.cached_lineage import fingerprint, record_reused, reused, wiring

ROOT = Path(__file__).resolve().parents[2]
ARGUMENTS = {"preset": "tiny", "source": "", "source_md5": "", "production": "", "stage2_config": "{}"}


@pytest.fixture(scope="module")
def tasks():
    return wiring(next(yaml.safe_load_all((ROOT / "pipelines" / "emu_pipeline.yaml").read_text())))


@pytest.fixture
def store(tmp_path):
    return LineageStore(f"sqlite:///{tmp_path / 'lineage.db'}")


def test_the_wiring_of_the_compiled_pipeline(tasks):
    by_name = {t.name: t for t in tasks}
    assert [t.name for t in tasks][:3] == ["prepare", "validate", "stage1"]
    assert set(by_name) == {"prepare", "validate", "stage1", "precompute", "stage2", "decoder", "instruct",
                            "evaluate", "register"}, "the exit task is not a task of the graph"
    assert by_name["stage2"].parameters == {
        "dataset_md5": ("task", "prepare"), "init_md5": ("task", "stage1"), "embeddings_md5": ("task", "precompute"),
        "preset": ("pipeline", "preset"), "config": ("pipeline", "stage2_config"),
        "code_version": ("pipeline", "stage2_code_version")}
    assert by_name["decoder"].parameters["decoder_config"] == ("pipeline", "visual_decoder_config")
    # register sits in the gate's dsl.If: its inputs come through the group's, and it runs on "true"
    assert by_name["register"].parameters["model_md5"] == ("task", "instruct")
    assert by_name["register"].conditions == ((("task", "evaluate"), "true"),)
    assert "validate" in by_name["stage1"].upstream, "stage1 runs after validate (.after), not on its output"


def parameters_of(task, arguments, results):
    return {name: results[value] if kind == "task" else arguments.get(value, "") if kind == "pipeline" else value
            for name, (kind, value) in task.parameters.items()}


def run_all(store, tasks, arguments, *, gate="true", fail=None) -> tuple[str, dict[str, int]]:
    """A run whose tasks execute as the real ones record themselves: a call, then a result."""
    run = store.create_run(status="running")
    results, ids = {}, {}
    for task in tasks:
        if any(u not in results for u in task.upstream):
            continue
        if task.name == "register" and results["evaluate"] != "true":
            continue
        execution = store.start_execution(run.id, task.name)
        store.record_call(execution, fingerprint(task.name, parameters_of(task, arguments, results)))
        if task.name == fail:
            store.finish_execution(execution, "failed", "boom")
            continue
        results[task.name] = gate if task.name == "evaluate" else f"{task.name}-{run.id}"
        store.record_result(execution, results[task.name])
        store.finish_execution(execution, "succeeded")
        ids[task.name] = execution
    return run.id, ids


def test_a_run_with_no_execution_reused_every_task(store, tasks):
    _, originals = run_all(store, tasks, ARGUMENTS)
    cluster = store.create_run(status="running").id
    assert record_reused(store, cluster, ARGUMENTS, tasks, run_succeeded=True) == sorted(originals)
    assert {e.stage: (e.cached, e.cached_from) for e in store.list_executions(cluster)} == \
        {stage: (True, original) for stage, original in originals.items()}


def test_a_changed_setting_reuses_only_what_does_not_depend_on_it(store, tasks):
    _, originals = run_all(store, tasks, ARGUMENTS)
    changed = {**ARGUMENTS, "stage2_config": '{"lr": 0.002}'}
    # KFP served the tasks before stage 2 (and the decoder); stage 2 onward ran in the run.
    run = store.create_run(status="running").id
    results = {name: store.call_of(originals[name]).result
               for name in ("prepare", "validate", "stage1", "precompute", "decoder")}
    for name in ("stage2", "instruct", "evaluate", "register"):
        task = next(t for t in tasks if t.name == name)
        execution = store.start_execution(run, name)
        store.record_call(execution, fingerprint(name, parameters_of(task, changed, results)))
        results[name] = "true" if name == "evaluate" else f"{name}-new"
        store.record_result(execution, results[name])
        store.finish_execution(execution, "succeeded")
    assert reused(store, run, changed, tasks, run_succeeded=True) == {
        name: originals[name] for name in ("prepare", "validate", "stage1", "precompute", "decoder")}


def test_a_gate_that_failed_reuses_no_registration(store, tasks):
    _, originals = run_all(store, tasks, ARGUMENTS, gate="false")
    assert "register" not in originals
    cluster = store.create_run(status="running").id
    assert "register" not in reused(store, cluster, ARGUMENTS, tasks, run_succeeded=True)
    assert "evaluate" in reused(store, cluster, ARGUMENTS, tasks, run_succeeded=True)


def test_other_arguments_or_a_failed_original_are_not_reused(store, tasks):
    run_all(store, tasks, ARGUMENTS, fail="stage1")
    cluster = store.create_run(status="running").id
    found = reused(store, cluster, ARGUMENTS, tasks, run_succeeded=True)
    assert set(found) == {"prepare", "validate"}, "a failed stage1 did no work to reuse, nor did what follows"
    assert reused(store, cluster, {**ARGUMENTS, "preset": "small"}, tasks, run_succeeded=True) == {}


def test_only_executions_on_the_same_backend_are_reused(store, tasks):
    """A cluster's KFP cache holds none of a local run's executions."""
    run_all(store, tasks, ARGUMENTS)
    assert reused(store, store.create_run(backend="kfp", status="running").id, ARGUMENTS, tasks, True) == {}


def test_a_failed_run_claims_only_what_its_executed_tasks_consumed(store, tasks):
    _, originals = run_all(store, tasks, ARGUMENTS)
    failed = store.create_run(status="running").id
    # prepare, validate, stage1 and the decoder cached; precompute ran and failed; nothing after it.
    results = {name: store.call_of(originals[name]).result for name in ("prepare", "stage1")}
    task = next(t for t in tasks if t.name == "precompute")
    execution = store.start_execution(failed, "precompute")
    store.record_call(execution, fingerprint("precompute", parameters_of(task, ARGUMENTS, results)))
    store.finish_execution(execution, "failed", "boom")
    assert set(reused(store, failed, ARGUMENTS, tasks, run_succeeded=False)) == {"prepare", "validate", "stage1"}, \
        "the decoder may never have been reached: the run failed"
