"""The exit handler of a cluster run (emu.pipeline.tasks.finish_task): KFP's final state ends the
run's lineage record, with the executions still open; a run no task recorded is recorded."""

from __future__ import annotations

import pytest

from emu.lineage.store import LineageStore
from emu.pipeline.tasks import finish_task


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    monkeypatch.setenv("EMU_LINEAGE_URL", url)
    monkeypatch.delenv("EMU_RUN_ID", raising=False)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-run-1")
    return LineageStore(url)


def test_a_failed_run_ends_failed_with_its_error_and_open_executions(store):
    run = store.create_run(trigger="schedule", backend="kfp", kfp_run_id="kfp-run-1", status="running")
    done = store.start_execution(run.id, "stage1")
    store.finish_execution(done, "succeeded")
    open_one = store.start_execution(run.id, "stage2")  # its pod was killed: it never recorded its end
    assert finish_task(state="FAILED", error="task stage2 failed: OOMKilled", arguments={}) == "failed"
    ended = store.get_run(run.id)
    assert ended.status == "failed" and ended.error == "task stage2 failed: OOMKilled" and ended.ended_at
    assert store.get_execution(open_one).status == "failed"
    assert store.get_execution(done).status == "succeeded"


@pytest.mark.parametrize("state", ["SUCCEEDED", "COMPLETE"])
def test_a_succeeded_run_ends_succeeded_in_either_backend_s_words(store, state):
    """KFP backends with MLMD give the exit handler MLMD's state (COMPLETE), others the run's."""
    run = store.create_run(backend="kfp", kfp_run_id="kfp-run-1", status="running")
    assert finish_task(state=state, error="", arguments={}) == "succeeded"
    assert store.get_run(run.id).status == "succeeded" and store.get_run(run.id).error is None


def test_an_unknown_state_ends_failed_and_names_it(store):
    run = store.create_run(backend="kfp", kfp_run_id="kfp-run-1", status="running")
    assert finish_task(state="EXPLODED", error="", arguments={}) == "failed"
    assert "EXPLODED" in store.get_run(run.id).error


def test_a_cancelled_run_ends_cancelled(store):
    run = store.create_run(backend="kfp", kfp_run_id="kfp-run-1", status="running")
    assert finish_task(state="CANCELED", error="", arguments={}) == "cancelled"
    assert store.get_run(run.id).status == "cancelled"
    assert "CANCELED" in store.get_run(run.id).error


def test_a_run_every_task_of_which_was_cached_is_still_recorded(store):
    """Started from the KFP UI, served from the cache: no task ran to record it."""
    assert store.get_run_by_kfp_id("kfp-run-1") is None
    assert finish_task(state="SUCCEEDED", error="", arguments={}) == "succeeded"
    run = store.get_run_by_kfp_id("kfp-run-1")
    assert run.status == "succeeded" and run.backend == "kfp" and run.ended_at
