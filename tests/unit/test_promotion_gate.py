"""The pipeline's promotion gate (emu.pipeline.tasks.promotion_gate): per metric its value, what
it is compared with (chance, or the production model), the tolerance and the verdict, in the
direction the metric improves (FID: lower); and the registry never registers one model twice."""

from __future__ import annotations

import pytest

from emu.evaluate.gate import direction_of, gate_lines, gate_table
from emu.lineage import LineageError
from emu.lineage.store import LineageStore
from emu.pipeline.tasks import production_named, production_reference, promotion_gate, register_task

NAMES = ["vqav2_accuracy", "autoencode_fid"]


@pytest.fixture
def store(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'lineage.db'}"
    monkeypatch.setenv("EMU_LINEAGE_URL", url)
    return LineageStore(url)


def checks(gate: dict) -> dict[str, tuple]:
    return {c["metric"]: (c["passed"], c["value"], c["reference"], c["threshold"], c["tolerance"], c["bound"])
            for c in gate["checks"]}


def test_directions():
    assert direction_of("autoencode_fid") == direction_of("t2i_fid") == direction_of("fid") == "lower"
    assert direction_of("vqav2_accuracy") == direction_of("coco_captions_cider") == "higher"


def test_before_the_first_promotion_each_metric_must_beat_chance(store):
    """FID's chance is the FID of unrelated images: the candidate must be below it."""
    gate = promotion_gate({"vqav2_accuracy": 40.0, "vqav2_chance": 33.3, "autoencode_fid": 200.0,
                           "autoencode_chance_fid": 200.0}, NAMES, tolerance=5.0)
    assert gate["passed"] is False and gate["against"] == "chance (no production model yet)"
    assert checks(gate) == {"vqav2_accuracy": (True, 40.0, "chance", 33.3, 0.0, 33.3),
                            "autoencode_fid": (False, 200.0, "chance", 200.0, 0.0, 200.0)}
    assert gate["reasons"] == ["autoencode_fid = 200; needs < 200 (lower is better; chance 200)"]


def test_against_production_no_metric_may_be_worse_beyond_the_tolerance(store):
    run = store.create_run(status="succeeded").id
    store.promote(run, model_md5="a" * 32 + ".dir", decoder_md5=None,
                  metrics={"vqav2_accuracy": 50.0, "autoencode_fid": 100.0})
    production = production_named(production_reference(store))
    close = promotion_gate({"vqav2_accuracy": 49.8, "autoencode_fid": 100.3}, NAMES, tolerance=0.5,
                           production=production)
    assert close["passed"] and close["against"] == f"production v1 (run {run})"
    worse = promotion_gate({"vqav2_accuracy": 49.0, "autoencode_fid": 101.0, "vqav2_chance": 33.3}, NAMES,
                           tolerance=0.5, production=production)
    assert checks(worse) == {"vqav2_accuracy": (False, 49.0, "production v1", 50.0, 0.5, 49.5),
                             "autoencode_fid": (False, 101.0, "production v1", 100.0, 0.5, 100.5)}
    better_fid = promotion_gate({"vqav2_accuracy": 50.0, "autoencode_fid": 60.0}, NAMES, tolerance=0.0,
                                production=production)
    assert better_fid["passed"], "a lower FID is an improvement, not a regression"

    lines = gate_lines(worse)
    assert lines[0] == f"gate FAILED against production v1 (run {run})"
    assert lines[1].split() == ["FAIL", "vqav2_accuracy", "49", "production", "v1", "50,", "tolerance", "0.5",
                                "(higher", "is", "better;", "needs", ">=", "49.5)"]
    assert lines[2].split()[:3] == ["FAIL", "autoencode_fid", "101"] and lines[2].endswith("needs <= 100.5)")
    table = gate_table(worse)
    assert table.rows[0] == ["vqav2_accuracy", 49.0, "production v1", 50.0, 0.5, "higher", ">= 49.5", "FAIL"]


def test_a_metric_not_measured_fails(store):
    gate = promotion_gate({"vqav2_accuracy": 40.0, "vqav2_chance": 33.3}, NAMES, tolerance=0.0)
    assert gate["reasons"] == ["autoencode_fid was not measured (evaluate.benches)"]


def test_the_production_model_is_not_registered_again(store):
    run = store.create_run(status="succeeded").id
    assert store.promote(run, model_md5="b" * 32, decoder_md5="c" * 32, metrics={}) == "v1"
    with pytest.raises(LineageError, match=r"model b{32} is production already as v1"):
        store.promote(run, model_md5="b" * 32, decoder_md5="c" * 32, metrics={})
    assert store.promote(run, model_md5="d" * 32, decoder_md5="c" * 32, metrics={}) == "v2"
    assert [r.version for r in store.registrations()] == ["v2", "v1"]


def test_the_production_reference_names_the_model_the_gate_compares_with(store):
    """Evaluate and register take the registry's production model at submission as an input (a
    KFP cache key), so a verdict against a previous production model is never replayed."""
    assert production_reference(store) == "" and production_named("") is None
    run = store.create_run(status="succeeded").id
    store.promote(run, model_md5="a" * 32, decoder_md5=None, metrics={"vqav2_accuracy": 50.0})
    reference = production_reference(store)
    assert reference == "v1:" + "a" * 32 and production_named(reference).version == "v1"
    with pytest.raises(RuntimeError,
                       match=r"production model v7:a{32} was named at submission but the registry has no v7"):
        production_named("v7:" + "a" * 32)


class _Evaluation:
    metadata = {"vqav2_accuracy": 60.0}


class _EvaluatedAtRun:
    """Evaluate's metrics artifact of a run whose production model was looked up at run time."""

    def __init__(self, compared: str) -> None:
        self.metadata = {"vqav2_accuracy": 60.0, "production": compared}


def test_a_production_looked_up_at_run_time_is_the_one_register_checks(store, monkeypatch):
    """A recurring run's arguments are fixed at creation: its gate compares with the registry's
    production model when evaluate runs (PRODUCTION_AT_RUN), and register checks that one."""
    from emu.pipeline.tasks import PRODUCTION_AT_RUN, production_at_run

    run = store.create_run(status="running")
    monkeypatch.setenv("EMU_RUN_ID", run.id)
    assert production_at_run(PRODUCTION_AT_RUN) == "" and production_at_run("v9:" + "e" * 32) == "v9:" + "e" * 32
    store.promote(store.create_run(status="succeeded").id, model_md5="a" * 32, decoder_md5=None, metrics={})
    assert production_at_run(PRODUCTION_AT_RUN) == "v1:" + "a" * 32, "the registry now, not at creation"
    with pytest.raises(RuntimeError, match=r"compared with production \(none\), but the registry's is now v1"):
        register_task(model_md5="b" * 32, decoder_md5="c" * 32, code_version="", production=PRODUCTION_AT_RUN,
                      evaluation=_EvaluatedAtRun(""))
    assert register_task(model_md5="b" * 32, decoder_md5="c" * 32, code_version="", production=PRODUCTION_AT_RUN,
                         evaluation=_EvaluatedAtRun("v1:" + "a" * 32)) == "v2"


def test_register_refuses_when_production_changed_since_the_gate(store, monkeypatch):
    run = store.create_run(status="running")
    monkeypatch.setenv("EMU_RUN_ID", run.id)
    store.promote(store.create_run(status="succeeded").id, model_md5="a" * 32, decoder_md5=None, metrics={})
    with pytest.raises(RuntimeError,
                       match=r"the gate compared with production \(none\), but the registry's is now v1:a{32}"):
        register_task(model_md5="b" * 32, decoder_md5="c" * 32, code_version="", evaluation=_Evaluation(),
                      production="")
    assert register_task(model_md5="b" * 32, decoder_md5="c" * 32, code_version="", evaluation=_Evaluation(),
                         production="v1:" + "a" * 32) == "v2"
