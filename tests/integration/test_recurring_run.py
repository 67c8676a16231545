"""A KFP recurring run fired as KFP fires it: the package and the arguments `emu schedule create
--host` creates it with (fixed at creation), executed by kfp.local at each firing. New data at the
source between two firings retrains; the same data is served from the cache after `prepare`; and
each firing's lineage record is ended by the package's exit handler, as nothing else ends a run
that KFP starts, after it recorded the tasks KFP served from its cache."""

import dataclasses
import shutil
from pathlib import Path

import pytest
from kfp import components, local

from emu.lineage.store import LineageStore
from emu.pipeline.schedules import recurring_run_package
from emu.pipeline.tasks import stage_config
from tests.integration.test_pipeline import fast_preset

TRAINING = {"stage1", "precompute", "stage2", "decoder", "instruct", "evaluate"}


def shapes_world(folder: Path, preset: Path, seed: int) -> None:
    """`folder` holds the shard datasets of the shapes world drawn with `seed` (replacing what it held)."""
    from emu.data.prepare import import_sources
    from emu.data.synth import generate

    synth = dataclasses.replace(stage_config("synth", str(preset), ""), seed=seed)
    raw, fresh = folder.parent / "raw", folder.parent / "fresh"
    generate(raw, synth)
    import_sources(raw, fresh, stage_config("import", str(preset), ""))
    shutil.rmtree(raw)
    shutil.rmtree(folder, ignore_errors=True)
    fresh.rename(folder)


@pytest.mark.slow
def test_a_recurring_run_retrains_on_new_data_and_is_cached_on_the_same(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EMU_HOME", str(home))
    monkeypatch.setenv("EMU_LINEAGE_URL", f"sqlite:///{home / 'lineage.db'}")
    monkeypatch.setenv("EMU_DVC_REMOTE", str(home / "dvc-remote"))
    monkeypatch.delenv("EMU_RUN_ID", raising=False)
    home.mkdir()
    preset, source = fast_preset(tmp_path), tmp_path / "incoming"
    shapes_world(source, preset, seed=0)

    package, args = recurring_run_package(str(preset), str(source), [])
    assert args["source_md5"] == "", "a folder source is read at each firing, not hashed at creation"
    assert args["production"] == "@run", "the gate compares with each firing's production model"
    loaded = components.load_component_from_file(str(package))
    store = LineageStore()

    def fire(number: int) -> dict:
        """One firing: KFP starts the package with the arguments fixed at creation; the pods' run id
        label (KFP_RUN_ID) is what the tasks record their lineage under."""
        monkeypatch.setenv("KFP_RUN_ID", f"firing-{number}")
        local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(home / "kfp"),
                   raise_on_error=True, enable_caching=True, cache_root=str(home / "kfp-cache"))
        loaded(**args)
        run = store.get_run_by_kfp_id(f"firing-{number}")
        assert run.status == "succeeded" and run.ended_at, "the exit handler (finish) ends the run's record"
        return {e.stage: e for e in store.list_executions(run.id)}

    def dataset_md5(executions: dict) -> str:
        [dataset] = [a.md5 for a in store.output_artifacts(executions["prepare"].id) if a.type == "dataset"]
        return dataset

    first = fire(1)
    assert TRAINING <= set(first), sorted(first)

    same = fire(2)
    ran = {stage for stage, e in same.items() if not e.cached}
    assert ran == {"prepare"}, f"the same data re-ran {sorted(ran - {'prepare'})}"
    assert dataset_md5(same) == dataset_md5(first)
    # The exit handler recorded what KFP served from its cache, each pointing at firing 1's work.
    assert {stage: e.cached_from for stage, e in same.items() if e.cached} == \
        {stage: e.id for stage, e in first.items() if stage != "prepare"}

    shapes_world(source, preset, seed=1)
    new = fire(3)
    assert dataset_md5(new) != dataset_md5(first)
    assert TRAINING <= set(new), f"new data did not retrain {sorted(TRAINING - set(new))}"
    assert all(new[stage].status == "succeeded" for stage in TRAINING)
