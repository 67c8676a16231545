"""Which lineage run a pipeline task records into (emu.pipeline.tasks.current_run_id): the one
`emu run` set, else on a cluster the one recorded for the pod's KFP run id, else an ad-hoc run."""

from __future__ import annotations

import pytest

from emu.lineage.store import LineageStore
from emu.pipeline import tasks


@pytest.fixture()
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    monkeypatch.setenv("EMU_LINEAGE_URL", url)
    for name in ("EMU_RUN_ID", "KFP_RUN_ID", "KFP_POD_NAME"):
        monkeypatch.delenv(name, raising=False)
    return LineageStore(url)


def test_emu_run_id_wins(store, monkeypatch):
    run = store.create_run(status="running")
    monkeypatch.setenv("EMU_RUN_ID", run.id)
    monkeypatch.setenv("KFP_RUN_ID", "kfp-elsewhere")
    assert tasks.current_run_id() == run.id


def test_a_cluster_task_joins_the_run_recorded_at_submission(store, monkeypatch):
    submitted = store.create_run(trigger="dashboard", triggered_by="alice", backend="kfp", kfp_run_id="kfp-42",
                                 status="running")
    monkeypatch.setenv("KFP_RUN_ID", "kfp-42")
    assert tasks.current_run_id() == submitted.id
    assert len(store.list_runs()) == 1


def test_tasks_of_a_run_started_in_the_kfp_ui_share_one_run(store, monkeypatch):
    monkeypatch.setenv("KFP_RUN_ID", "kfp-ui-7")
    first = tasks.current_run_id()
    monkeypatch.delenv("EMU_RUN_ID")  # the next task is another pod: only the KFP run id is shared
    assert tasks.current_run_id() == first
    run = store.get_run(first)
    assert (run.backend, run.kfp_run_id, run.trigger) == ("kfp", "kfp-ui-7", "api")
    assert len(store.list_runs()) == 1


def test_without_either_a_task_gets_an_ad_hoc_local_run(store):
    run = store.get_run(tasks.current_run_id())
    assert (run.backend, run.kfp_run_id) == ("local", None)
