"""The pipeline tasks: what each KFP component runs (components/<stage>.py), and nothing else does.

Each task resolves its stage config (the JSON the pipeline passes, else the preset's section),
calls the stage function of emu.train / emu.precompute / emu.validate / emu.evaluate, and
around it:
  * records a stage execution in the lineage store (run from $EMU_RUN_ID), with its resolved
    config, host, status and error;
  * takes its inputs as DVC md5s and pulls them from the remote (emu.pipeline.handoff), links
    them, and content-addresses its outputs into the remote (emu.artifacts.dvc), linking them too;
  * writes each output artifact as a pointer (md5, size, remote URI) and stamps its metadata with
    the md5, size and execution id, so a later run served from KFP's cache can link the very same
    artifacts (emu.pipeline.runner).
The returned string (the main output's md5) is the next task's input.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from emu.config import from_dict, resolve, to_dict
from emu.pipeline.handoff import REMOTE_ENV, input_folder, work_folder
from emu.pipeline.resume import attach_checkpoints, resume_key

log = logging.getLogger(__name__)

RUN_ENV = "EMU_RUN_ID"
#: Set on cluster pods from their `pipeline/runid` label (pipelines/emu_pipeline.py).
KFP_RUN_ENV = "KFP_RUN_ID"
LINEAGE_ENV = "EMU_LINEAGE_URL"


# ---- shared plumbing ------------------------------------------------------------------------------

def lineage():
    from emu.lineage.store import LineageStore

    return LineageStore(os.environ.get(LINEAGE_ENV) or None)


def artifact_store():
    from emu.artifacts.dvc import ArtifactStore

    return ArtifactStore(os.environ.get(REMOTE_ENV) or None)


def stage_config(section: str, preset: str, config_json: str):
    """The stage's config: the resolved JSON the pipeline passed, else the preset's section."""
    from emu.sections import SECTIONS

    cls = SECTIONS[section]()
    if config_json:
        return from_dict(cls, json.loads(config_json), where=section, origin=f"the {section} task's config")
    return resolve(cls, section, preset or None)


def current_run_id() -> str:
    """The lineage run this task belongs to: $EMU_RUN_ID (set by `emu run` here); on a cluster,
    the run recorded for the KFP run id in $KFP_RUN_ID (by `emu run --host` or the dashboard, or
    by the first task of a run started from the KFP UI); else an ad-hoc run."""
    run_id = os.environ.get(RUN_ENV)
    store = lineage()
    if run_id and store.get_run(run_id) is not None:
        return run_id
    kfp_run_id = os.environ.get(KFP_RUN_ENV) or None
    recorded = store.get_run_by_kfp_id(kfp_run_id) if kfp_run_id and not run_id else None
    if recorded is None:
        recorded = store.create_run(trigger="api", backend="kfp" if kfp_run_id or os.environ.get("KFP_POD_NAME")
                                    else "local", image_digest=os.environ.get("EMU_IMAGE_DIGEST") or None,
                                    status="running", run_id=run_id or None, kfp_run_id=kfp_run_id)
    os.environ[RUN_ENV] = recorded.id
    return recorded.id


@dataclass
class Execution:
    """One task's lineage: inputs linked on entry, outputs pushed and linked by `output()`."""

    stage: str
    run_id: str
    id: int
    outputs: dict[str, str] = field(default_factory=dict)

    def output(self, role: str, path: Path, type_: str, artifact=None) -> str:
        """Content-address `path` into the DVC remote, link it as this execution's output `role`;
        write the KFP artifact (if any) as a pointer to it and stamp its metadata; return its md5."""
        from emu.pipeline.handoff import write_pointer

        ref = artifact_store().push(path)
        store = lineage()
        artifact_id = store.record_artifact(ref.md5, ref.size, str(path), type_, name=role)
        store.link(self.id, artifact_id, "out", role)
        if artifact is not None:
            write_pointer(artifact, ref.to_json(), role)
            # Strings only: KFP's local cache keys on input artifacts' metadata, and numbers come
            # back from its JSON store as floats, which would make an identical input look new.
            artifact.metadata.update({"md5": ref.md5, "size": str(ref.size), "execution_id": str(self.id),
                                      "artifact_id": str(artifact_id), "role": role})
        self.outputs[role] = ref.md5
        return ref.md5

    def output_stored(self, role: str, md5: str, type_: str, artifact) -> str:
        """Output `role` is `md5`, already in the DVC remote (a dataset named by its md5): linked
        and pointed at without copying a byte."""
        from emu.errors import SourceError
        from emu.pipeline.handoff import write_pointer

        store = artifact_store()
        if not store.exists(md5):
            raise SourceError(f"--data {md5}: no artifact with this DVC md5 in the remote {store.remote}")
        uri = store.uri_of(md5)
        artifact_id = lineage().record_artifact(md5, None, uri, type_, name=role)
        lineage().link(self.id, artifact_id, "out", role)
        write_pointer(artifact, {"md5": md5, "uri": uri}, role)
        artifact.metadata.update({"md5": md5, "execution_id": str(self.id), "artifact_id": str(artifact_id),
                                  "role": role})
        self.outputs[role] = md5
        return md5

    def result(self, value: str) -> str:
        """What the task returns (the next tasks' input), recorded with its call."""
        lineage().record_result(self.id, value)
        return value

    def stamp(self, *artifacts) -> None:
        """Mark KFP artifacts as this execution's (cached reruns link back through it)."""
        for artifact in artifacts:
            artifact.metadata["execution_id"] = str(self.id)

    def metrics(self, values: dict[str, float], artifact=None) -> None:
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        lineage().record_metrics(self.run_id, self.id, clean)
        if artifact is not None:
            self.stamp(artifact)
            for name, value in clean.items():
                artifact.log_metric(name, value)
            # A file at the artifact's path too: kfp.local treats an output whose file is missing
            # as a cache miss, so a metrics-only artifact would make its task never cacheable.
            Path(artifact.path).parent.mkdir(parents=True, exist_ok=True)
            Path(artifact.path).write_text(json.dumps(clean, indent=1, sort_keys=True), encoding="utf-8")


@contextmanager
def execution(stage: str, config: Any, inputs: dict[str, tuple[str, str]], call: dict[str, str]) -> Iterator[Execution]:
    """Record the task around its body; a failure is recorded with its error and re-raised.
    `inputs`: role -> (md5, artifact type) of each input (the md5s the pipeline passes); `call`:
    every parameter of the task's component, as KFP passes them (its cache identity:
    emu.pipeline.cached_lineage)."""
    from emu.pipeline.cached_lineage import fingerprint

    store = lineage()
    run_id = current_run_id()
    execution_id = store.start_execution(run_id, stage, config=to_dict(config) if config is not None else None)
    store.record_call(execution_id, fingerprint(stage, call))
    for role, (md5, type_) in inputs.items():
        if md5:
            store.link(execution_id, store.record_artifact(md5, None, None, type_, name=role), "in", role)
    record = Execution(stage=stage, run_id=run_id, id=execution_id)
    try:
        yield record
    except BaseException as exc:
        store.finish_execution(execution_id, "failed", error=f"{type(exc).__name__}: {exc}"[:4000])
        raise
    store.finish_execution(execution_id, "succeeded")


def link_shards(run: Execution, sources: list[Path], batch_sizes: dict[str, int]) -> None:
    """Link every shard holding a data type the stage trains on as its input, by DVC md5, so
    lineage walks from a model back to the exact shards (dataset.json records each shard's md5
    when it is written)."""
    from emu.data.shards import file_md5, read_index
    from emu.train.data import discover

    used = {t for t, n in batch_sizes.items() if n > 0}
    datasets = sorted({ref.path for t, refs in discover(sources).items() if t in used for ref in refs})
    store = lineage()
    for source in datasets:
        for entry in read_index(source)["shards"]:
            path = source / entry["name"]
            md5 = entry.get("md5") or file_md5(path)
            artifact_id = store.record_artifact(md5, entry.get("bytes"), str(path), "dataset",
                                                name=f"{source.name}/{entry['name']}")
            store.link(run.id, artifact_id, "in", "shard")


def training_sources(dataset: Path, preset: str) -> list[Path]:
    """The dataset folders a training stage reads: all but the held-out evaluation sources."""
    held_out = set(stage_config("pipeline", preset, "").eval_sources)
    folders = sorted(p for p in Path(dataset).iterdir() if (p / "dataset.json").is_file())
    return [p for p in folders if p.name not in held_out]


#: Per-step series kept in the lineage store (the dashboard's curves); the rest stays in metrics.jsonl.
CURVES = ("loss", "text_loss", "image_loss", "grad_norm", "tokens_per_s", "samples_per_s", "padding_fraction", "mfu")


def _training_metrics(run: Execution, out: Path, artifact) -> None:
    """The stage's per-step curves (loss, text and image loss, learning rates...) and its final
    losses, from the trainer's metrics.jsonl and summary.json."""
    series = []
    for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        series.append((int(record["step"]), {k: v for k, v in record.items() if k in CURVES or k.startswith("lr/")}))
    lineage().record_metric_series(run.run_id, run.id, series)
    final = json.loads((out / "summary.json").read_text(encoding="utf-8")).get("final", {})
    run.metrics({k: final[k] for k in ("loss", "text_loss", "image_loss") if isinstance(final.get(k), (int, float))},
                artifact)


# ---- the tasks ------------------------------------------------------------------------------------

def prepare_task(*, source: str, source_md5: str, preset: str, synth_config: str, import_config: str,
                 code_version: str, dataset) -> str:
    """The shard datasets: the synthetic world when `source` is empty, or a copy of a folder / s3://
    prefix of datasets, written into the dataset's work folder and pushed; or a DVC md5 of the
    remote, checked there and handed on as it is (the next tasks pull it)."""
    from emu.data.prepare import import_sources
    from emu.data.synth import generate

    synth = stage_config("synth", preset, synth_config)
    importing = stage_config("import", preset, import_config)
    out = work_folder(dataset)
    call = {"source": source, "source_md5": source_md5, "preset": preset, "synth_config": synth_config,
            "import_config": import_config, "code_version": code_version}
    with execution("prepare", {"source": source, "synth": to_dict(synth), "import": to_dict(importing)}, {},
                   call) as run:
        if _is_md5(source):
            return run.result(run.output_stored("dataset", source, "dataset", dataset))
        if not source:
            with tempfile.TemporaryDirectory(prefix="emu-synth-") as tmp:
                generate(Path(tmp) / "raw", synth)
                import_sources(Path(tmp) / "raw", out, importing)
        else:
            from emu.artifacts.s3 import resolve_local

            shutil.copytree(resolve_local(source), out, dirs_exist_ok=False)
        return run.result(run.output("dataset", out, "dataset", dataset))


def validate_task(*, dataset_md5: str, preset: str, config: str, code_version: str, report, metrics) -> str:
    from emu.validate.gate import run_gate

    cfg = stage_config("validate", preset, config)
    call = {"dataset_md5": dataset_md5, "preset": preset, "config": config, "code_version": code_version}
    with execution("validate", cfg, {"dataset": (dataset_md5, "dataset")}, call) as run:
        folder = work_folder(report)
        result = run_gate(input_folder(dataset_md5, "dataset"), folder, cfg)
        Path(report.path).write_text(_gate_html(result.summary_lines()), encoding="utf-8")
        run.stamp(report)
        run.output("validation", folder, "report")
        run.metrics({"passed": float(result.passed)}, metrics)
        if not result.passed:
            raise RuntimeError("the data failed validation:\n" + "\n".join(result.summary_lines()))
        return run.result("passed")


def stage1_task(*, dataset_md5: str, preset: str, config: str, model_config: str, code_version: str, model,
                metrics) -> str:
    from emu.cluster import launch
    from emu.train.stages import stage1

    cfg = stage_config("stage1", preset, config)
    architecture = stage_config("model", preset, model_config)
    call = {"dataset_md5": dataset_md5, "preset": preset, "config": config, "model_config": model_config,
            "code_version": code_version}
    with execution("stage1", {"stage1": to_dict(cfg), "model": to_dict(architecture)},
                   {"dataset": (dataset_md5, "dataset")}, call) as run:
        dataset, out = input_folder(dataset_md5, "dataset"), work_folder(model)
        location = attach_checkpoints(out, "stage1", resume_key("stage1", config=to_dict(cfg), model=to_dict(architecture),
                                                     dataset=dataset_md5))
        sources = training_sources(dataset, preset)
        link_shards(run, sources, cfg.batch_sizes)
        launch.train("stage1", {"stage1": cfg, "model": architecture}, {"dataset": (dataset, dataset_md5)},
                     sources, out, lambda: stage1(cfg, architecture, sources, out), checkpoints=location)
        _training_metrics(run, out, metrics)
        return run.result(run.output("model", out / "model", "model", model))


def precompute_task(*, dataset_md5: str, model_md5: str, preset: str, config: str, code_version: str,
                    embeddings) -> str:
    from emu.cluster import ray_launch
    from emu.precompute.job import run_precompute

    cfg = stage_config("precompute", preset, config)
    call = {"dataset_md5": dataset_md5, "model_md5": model_md5, "preset": preset, "config": config,
            "code_version": code_version}
    with execution("precompute", cfg, {"dataset": (dataset_md5, "dataset"), "model": (model_md5, "model")},
                   call) as run:
        dataset, out = input_folder(dataset_md5, "dataset"), work_folder(embeddings)
        # The encoder never reads the LM: at 37B that is most of the export (Emu2 section 2.1).
        model = input_folder(model_md5, "model", skip=("lm/",))
        sources = training_sources(dataset, preset)
        ray_launch.precompute(cfg, (dataset, dataset_md5), (model, model_md5), sources, out,
                              lambda: run_precompute(sources, str(model), out, cfg))
        return run.result(run.output("embeddings", out, "embeddings", embeddings))


def stage2_task(*, dataset_md5: str, init_md5: str, embeddings_md5: str, preset: str, config: str,
                code_version: str, model, metrics) -> str:
    from emu.train.stages import stage2

    return _train_on_embeddings("stage2", stage2, dataset_md5=dataset_md5, init_md5=init_md5,
                                embeddings_md5=embeddings_md5, preset=preset, config=config,
                                code_version=code_version, model=model, metrics=metrics)


def decoder_task(*, dataset_md5: str, encoder_md5: str, preset: str, config: str, decoder_config: str,
                 code_version: str, decoder, metrics) -> str:
    import dataclasses

    from emu.cluster import launch
    from emu.train.stages import train_decoder

    base = stage_config("decoder", preset, config)
    architecture = stage_config("visual_decoder", preset, decoder_config)
    call = {"dataset_md5": dataset_md5, "encoder_md5": encoder_md5, "preset": preset, "config": config,
            "decoder_config": decoder_config, "code_version": code_version}
    with execution("decoder", {"decoder": to_dict(base), "visual_decoder": to_dict(architecture)},
                   {"dataset": (dataset_md5, "dataset"), "encoder": (encoder_md5, "model")}, call) as run:
        dataset, encoder = input_folder(dataset_md5, "dataset"), input_folder(encoder_md5, "encoder")
        cfg, out = dataclasses.replace(base, encoder=str(encoder)), work_folder(decoder)
        location = attach_checkpoints(out, "decoder", resume_key("decoder", config=to_dict(base), model=to_dict(architecture),
                                                      dataset=dataset_md5, encoder=encoder_md5),
                           folders=("checkpoints", "vae/checkpoints"))
        sources = training_sources(dataset, preset)
        link_shards(run, sources, cfg.batch_sizes)
        launch.train("decoder", {"decoder": cfg, "visual_decoder": architecture},
                     {"dataset": (dataset, dataset_md5), "encoder": (encoder, encoder_md5)},
                     sources, out, lambda: train_decoder(cfg, architecture, sources, out), checkpoints=location)
        _training_metrics(run, out, metrics)
        return run.result(run.output("decoder", out / "decoder", "decoder", decoder))


def instruct_task(*, dataset_md5: str, init_md5: str, embeddings_md5: str, preset: str, config: str,
                  code_version: str, model, metrics) -> str:
    from emu.train.stages import instruct

    return _train_on_embeddings("instruct", instruct, dataset_md5=dataset_md5, init_md5=init_md5,
                                embeddings_md5=embeddings_md5, preset=preset, config=config,
                                code_version=code_version, model=model, metrics=metrics)


def _train_on_embeddings(stage: str, train, *, dataset_md5: str, init_md5: str, embeddings_md5: str, preset: str,
                         config: str, code_version: str, model, metrics) -> str:
    """A stage that starts from the previous stage's model and reads precomputed embeddings
    (stage 2, instruction tuning): train, record curves and shard lineage, version the model."""
    import dataclasses

    from emu.cluster import launch

    base = stage_config(stage, preset, config)
    call = {"dataset_md5": dataset_md5, "init_md5": init_md5, "embeddings_md5": embeddings_md5, "preset": preset,
            "config": config, "code_version": code_version}
    with execution(stage, base, {"dataset": (dataset_md5, "dataset"), "init": (init_md5, "model"),
                                 "embeddings": (embeddings_md5, "embeddings")}, call) as run:
        dataset, init = input_folder(dataset_md5, "dataset"), input_folder(init_md5, "init")
        embeddings, out = input_folder(embeddings_md5, "embeddings"), work_folder(model)
        cfg = dataclasses.replace(base, init=str(init), precomputed=str(embeddings))
        location = attach_checkpoints(out, stage, resume_key(stage, config=to_dict(base), dataset=dataset_md5, init=init_md5,
                                                  embeddings=embeddings_md5))
        sources = training_sources(dataset, preset)
        link_shards(run, sources, cfg.batch_sizes)
        launch.train(stage, {stage: cfg}, {"dataset": (dataset, dataset_md5), "init": (init, init_md5),
                                           "embeddings": (embeddings, embeddings_md5)},
                     sources, out, lambda: train(cfg, sources, out), checkpoints=location)
        _training_metrics(run, out, metrics)
        return run.result(run.output("model", out / "model", "model", model))


def evaluate_task(*, dataset_md5: str, model_md5: str, decoder_md5: str, preset: str, config: str,
                  code_version: str, metrics, report, summary, production: str = "") -> str:
    """Benchmarks, then the promotion gate: against the configured baseline file, else the
    production model named by `production` (the registry's at submission, a cache-key input:
    `production_reference`; no regression beyond the tolerance), else, with no production model
    yet, each headline score must beat its chance level. The verdict per metric goes to gate.json
    in the evaluation folder and into the reports. Returns "true" when the gate passes."""
    import dataclasses

    from emu.evaluate.gate import gate_table
    from emu.evaluate.harness import evaluate, write_reports
    from emu.evaluate.report import Section

    base = stage_config("evaluate", preset, config)
    call = {"dataset_md5": dataset_md5, "model_md5": model_md5, "decoder_md5": decoder_md5, "preset": preset,
            "config": config, "code_version": code_version, "production": production}
    with execution("evaluate", base, {"dataset": (dataset_md5, "dataset"), "model": (model_md5, "model"),
                                      "decoder": (decoder_md5, "decoder")}, call) as run:
        cfg = dataclasses.replace(base, data_root=str(input_folder(dataset_md5, "dataset")))
        out = work_folder(metrics)
        result = evaluate(cfg, str(input_folder(model_md5, "model")), out,
                          decoder=str(input_folder(decoder_md5, "decoder")))
        flat = json.loads((out / "kfp_metrics.json").read_text(encoding="utf-8"))
        pipeline = stage_config("pipeline", preset, "")
        compared = production_at_run(production)
        gate = result.gate if result.gate is not None else promotion_gate(
            flat, pipeline.gate_metrics, pipeline.gate_tolerance, production_named(compared))
        (out / GATE_FILE).write_text(json.dumps(gate, indent=1), encoding="utf-8")
        if result.gate is None:  # a baseline gate is in the harness's reports already
            write_reports(out, [*result.sections[:1], Section("Promotion gate", tables=[gate_table(gate)]),
                                *result.sections[1:]])
        run.metrics({**flat, "gate_passed": float(gate["passed"])}, metrics)
        shutil.copyfile(out / "report.html", report.path)
        Path(summary.path).write_text((out / "report.md").read_text(encoding="utf-8"), encoding="utf-8")
        run.output("evaluation", out, "metrics")
        run.stamp(report, summary)
        metrics.metadata.update({"gate_reasons": gate["reasons"], "production": compared})
        return run.result("true" if gate["passed"] else "false")


#: The promotion gate's verdict per metric, in the evaluation folder (the CLI summary and the
#: dashboard read it from there).
GATE_FILE = "gate.json"


def production_reference(store) -> str:
    """The registry's production model as a pipeline parameter ("" before the first promotion):
    evaluate and register take it as an input, so KFP's cache keys on it and a run after a new
    promotion evaluates again instead of replaying a verdict against the previous model."""
    current = store.production()
    return f"{current.version}:{current.model_md5}" if current is not None else ""


#: The `production` argument of a run that resolves the registry's production model when its
#: evaluate task runs, not at submission: a KFP recurring run (its arguments are fixed at
#: creation) and a run started from the KFP UI (the pipeline's default).
PRODUCTION_AT_RUN = "@run"


def production_at_run(reference: str) -> str:
    """`reference`, or for PRODUCTION_AT_RUN the registry's production model now. Evaluate's cache
    keys on the argument, so with it a run whose models are unchanged replays the earlier verdict;
    that run's register is replayed too, and promotes nothing."""
    return production_reference(lineage()) if reference == PRODUCTION_AT_RUN else reference


def production_named(reference: str):
    """The registration `reference` (production_reference) names, or None for ""; refused when the
    registry no longer holds it as recorded."""
    if not reference:
        return None
    version, _, model_md5 = reference.partition(":")
    found = next((r for r in lineage().registrations() if r.version == version), None)
    if found is None or found.model_md5 != model_md5:
        raise RuntimeError(f"production model {reference} was named at submission but the registry "
                           f"{'holds ' + found.version + ':' + found.model_md5 if found else 'has no ' + version}")
    return found


def promotion_gate(flat: dict[str, float], names: list[str], tolerance: float, production=None) -> dict[str, Any]:
    """The verdict (emu.evaluate.gate.GateResult.to_dict) on the `names` metrics: none may be
    worse than the production model's by more than `tolerance` (in the direction each metric
    improves), or, before the first promotion, each must beat its chance level."""
    from emu.evaluate.gate import GateResult

    checks = []
    if production is not None:
        against = f"production {production.version} (run {production.run_id})"
        for name in names:
            reference = production.metrics.get(name)
            if reference is None:  # production was never measured on it: nothing to regress from
                reference, label, strict = flat.get(_chance_of(name)), "chance", True
            else:
                label, strict = f"production {production.version}", False
            checks.append(_gate_check(name, flat, reference, label, tolerance if not strict else 0.0, strict))
    else:
        against = "chance (no production model yet)"
        checks = [_gate_check(name, flat, flat.get(_chance_of(name)), "chance", 0.0, True) for name in names]
    result = GateResult(passed=all(c.passed for c in checks), reasons=[c.message for c in checks if not c.passed],
                        checks=checks)
    return result.to_dict(against=against)


def _gate_check(name: str, flat: dict[str, float], reference: float | None, label: str, tolerance: float,
                strict: bool):
    from emu.evaluate.gate import GateCheck, MetricThreshold, compare, direction_of

    """One metric's verdict against `reference` (named `label`); a metric not measured, or with
    nothing to compare with, fails: an evaluation that did not run must not pass."""
    spec = MetricThreshold(threshold=0.0 if reference is None else reference, direction=direction_of(name),
                           tolerance=tolerance)
    if name not in flat:
        return GateCheck(name, False, None, spec, f"{name} was not measured (evaluate.benches)", label, strict)
    if reference is None:
        return GateCheck(name, False, flat[name], spec, f"{name} has no {label} level to compare with", label, strict)
    return compare(name, flat[name], spec, reference=label, strict=strict)


def _chance_of(metric: str) -> str:
    """`vqav2_accuracy` -> `vqav2_chance`; `t2i_clip_i` -> `t2i_chance_clip_i`."""
    for bench in ("coco_captions", "vqav2", "autoencode", "t2i"):
        if metric.startswith(bench + "_"):
            rest = metric[len(bench) + 1:]
            return f"{bench}_chance" if rest in ("accuracy", "cider") else f"{bench}_chance_{rest}"
    return metric + "_chance"


def register_task(*, model_md5: str, decoder_md5: str, code_version: str, evaluation, production: str = "") -> str:
    """Promote the model and decoder that passed the gate: the registry's production pointer.
    Refused when the registry's production model is no longer the one the gate compared with
    (`production`: another run promoted one since): that verdict says nothing about the new one.
    With PRODUCTION_AT_RUN, the model evaluate compared with is in `evaluation`'s metadata."""
    store = lineage()
    call = {"model_md5": model_md5, "decoder_md5": decoder_md5, "code_version": code_version, "production": production}
    with execution("register", None, {"model": (model_md5, "model"), "decoder": (decoder_md5, "decoder")},
                   call) as run:
        compared = (evaluation.metadata or {}).get("production", "") if production == PRODUCTION_AT_RUN else production
        if production_reference(store) != compared:
            raise RuntimeError(f"the gate compared with production {compared or '(none)'}, but the registry's "
                               f"is now {production_reference(store) or '(none)'}: run the pipeline again")
        values = {k: v for k, v in (evaluation.metadata or {}).items() if isinstance(v, (int, float))
                  and not isinstance(v, bool) and k != "gate_passed"}
        production = store.production()
        if production is not None and production.model_md5 == model_md5 and production.decoder_md5 == decoder_md5:
            # The same model evaluated again (a re-run with new evaluation settings): it is
            # production already; a second version of one md5 would make the registry lie.
            log.info("model %s is production already as %s; nothing to register", model_md5, production.version)
            return run.result(production.version)
        version = store.promote(run.run_id, model_md5=model_md5, decoder_md5=decoder_md5, metrics=values)
        started = store.get_run(run.run_id)
        # The audit log names whoever started the run whose gate promoted this model.
        store.audit((started.triggered_by if started else None) or "pipeline", "model.promote", run.run_id,
                    {"model_md5": model_md5, "decoder_md5": decoder_md5, "by": "evaluation gate"}, f"ok: {version}")
        log.info("registered %s as production (model %s, decoder %s)", version, model_md5, decoder_md5)
        return run.result(version)


#: KFP run and task states -> lineage run statuses (a run still going keeps `running`). An exit
#: handler's PipelineTaskFinalStatus.state is MLMD's execution state on backends that keep one
#: (COMPLETE, FAILED, CANCELED), the run's state elsewhere (SUCCEEDED, ...): both are read.
KFP_STATES = {"SUCCEEDED": "succeeded", "COMPLETE": "succeeded", "CACHED": "succeeded", "FAILED": "failed",
              "CANCELED": "cancelled", "CANCELLED": "cancelled", "SKIPPED": "cancelled", "PENDING": "running",
              "RUNNING": "running", "CANCELING": "running", "PAUSED": "running"}


def finish_task(*, state: str, error: str, arguments: dict[str, str]) -> str:
    """The exit handler of a cluster run. First the tasks KFP served from its cache get their
    cached executions, found from the pipeline's `arguments` (emu.pipeline.cached_lineage); then
    the run's lineage record ends with the state KFP gives the handler (its
    `PipelineTaskFinalStatus`), and so do executions still open. A run no task recorded (started
    from the KFP UI, every task cached) is recorded here, so it is not lost. Returns the status."""
    from emu.pipeline.cached_lineage import compiled_wiring, record_reused

    store = lineage()
    run_id = current_run_id()
    status = KFP_STATES.get(state.upper())
    if status is None:
        log.warning("run %s: KFP gave the exit handler the state %r, which emu does not know; recorded as failed",
                    run_id, state)
        status = "failed"
    try:
        cached = record_reused(store, run_id, arguments, compiled_wiring(), run_succeeded=status == "succeeded")
        log.info("run %s: served from the cache: %s", run_id, ", ".join(cached) or "no task")
    except Exception as exc:  # the run's end matters more than its cached tasks' records
        log.warning("run %s: the cached tasks could not be recorded: %s: %s", run_id, type(exc).__name__, exc)
    if status == "succeeded":
        store.update_run(run_id, status="succeeded", error=None)
    else:  # an exit handler runs once the run is over: nothing is still going
        status = "cancelled" if status == "cancelled" else "failed"
        store.end_run(run_id, status, error or f"the KFP run ended {state}")
    log.info("run %s ended %s (KFP state %s)", run_id, status, state)
    return status


def _is_md5(text: str) -> bool:
    core = text[:-4] if text.endswith(".dir") else text
    return len(core) == 32 and all(c in "0123456789abcdef" for c in core)


def _gate_html(lines: list[str]) -> str:
    import html

    body = "\n".join(html.escape(line) for line in lines)
    return f"<!doctype html><meta charset=utf-8><title>Validation</title><pre>{body}</pre>\n"
