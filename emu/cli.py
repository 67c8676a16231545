"""The `emu` command: the one entry point. Logging setup happens here and only here (DESIGN.md).

Every subcommand is a typed function; its docstring is its `--help`. Settings come from a preset
(`--preset tiny`, or a YAML path) plus trailing `key=value` overrides; each command saves the
resolved config next to its output.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from emu.errors import EmuError, os_error_line
from emu.artifacts.cli import artifacts_app
from emu.dashboard.cli import dashboard_app
from emu.lineage.cli import lineage_app
from emu.model.cli import model_app
from emu.pipeline.cli import register as register_pipeline_commands

app = typer.Typer(help="Emu training platform.", no_args_is_help=True, add_completion=False,
                  pretty_exceptions_enable=False)
data_app = typer.Typer(help="Synthetic data and import of public formats into shards.",
                       no_args_is_help=True)
config_app = typer.Typer(help="Inspect presets and settings.", no_args_is_help=True)
train_app = typer.Typer(help="Training stages on DeepSpeed (single process, or under the deepspeed launcher / torchrun).",
                        no_args_is_help=True)
evaluate_app = typer.Typer(
    help="Evaluation: score prediction files (`emu evaluate score`), or run the benchmark harness "
         "on a model (`emu evaluate --model M --bench B --out D`).",
    invoke_without_command=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
app.add_typer(train_app, name="train")
app.add_typer(evaluate_app, name="evaluate")
app.add_typer(lineage_app, name="lineage")
register_pipeline_commands(app)
app.add_typer(artifacts_app, name="artifacts")
app.add_typer(dashboard_app, name="dashboard")
app.add_typer(model_app, name="model")

DataOption = Annotated[list[Path], typer.Option("--data", help="Shard dataset folder(s); repeat for several.")]
OutOption = Annotated[Path, typer.Option(help="Output folder (re-running on it resumes from its last checkpoint).")]
#: Exit code after SIGTERM: a checkpoint was written, re-running resumes (128 + SIGTERM).
EXIT_PREEMPTED = 143

PresetOption = Annotated[Optional[str], typer.Option(
    "--preset", "--config", help="Preset name (tiny, small, emu2-37b) or path to a YAML preset.")]
OverridesArgument = Annotated[Optional[list[str]], typer.Argument(
    help="Setting overrides as key=value (dotted keys for nested settings).", show_default=False)]

#: Exit code for unusable input (bad source, bad settings), distinct from a failed gate (1).
EXIT_UNUSABLE = 2


#: Commands that read or change runs: before they do, runs whose `emu run` is gone are recorded
#: as failed (emu.pipeline.runstate), so that none of them shows a dead run as running.
RUN_READERS = ("lineage", "schedule", "scheduler", "artifacts", "dashboard")


@app.callback()
def _main(ctx: typer.Context,
          verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr, force=True)
    for noisy in ("great_expectations", "urllib3", "filelock", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if ctx.invoked_subcommand in RUN_READERS:  # `emu run` reconciles itself, after its own checks
        _reconcile_runs()


def _reconcile_runs() -> None:
    """End orphaned runs in the lineage store, if there is one to look at (never create it)."""
    from emu.home import emu_home

    if not os.environ.get("EMU_LINEAGE_URL") and not (emu_home() / "lineage.db").is_file():
        return
    from emu.lineage.store import LineageStore
    from emu.pipeline.runstate import reconcile_quietly

    reconcile_quietly(LineageStore(os.environ.get("EMU_LINEAGE_URL") or None))


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the synthetic sources into (one subfolder per public format).")],
    seed: Annotated[Optional[int], typer.Option(help="Random seed; same seed, same bytes.")] = None,
    size: Annotated[Optional[str], typer.Option(
        help="Scale of every count: a name (tiny, default, large) or a number (2 = twice default).")] = None,
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Generate the procedural shapes world, written in the public formats the importers read."""
    from emu.config import resolve
    from emu.data.synth import SynthConfig, generate, size_to_scale

    extra = [] if seed is None else [f"seed={seed}"]
    if size is not None:
        extra.append(f"scale={size_to_scale(size)}")
    config = resolve(SynthConfig, "synth", preset, extra + list(overrides or []))
    summary = generate(out, config)
    typer.echo(summary.describe())


@data_app.command("import")
def data_import(
    format: Annotated[str, typer.Option("--format", help="Source format: img2dataset, webdataset, mmc4, webvid, "
                                                         "ytsb, grit, llava, text, vqav2, coco.")],
    src: Annotated[Path, typer.Option(help="Source file or folder in that format (for vqav2, coco and llava "
                                           "also the questions, captions or records JSON file itself).")],
    out: Annotated[Path, typer.Option(help="Empty folder for the shard dataset.")],
    questions: Annotated[Optional[Path], typer.Option(help="vqav2: the questions file (sets vqav2.questions).")] = None,
    annotations: Annotated[Optional[Path], typer.Option(
        help="vqav2: the annotations file; coco: the captions file (sets vqav2/coco.annotations).")] = None,
    images: Annotated[Optional[Path], typer.Option(
        help="vqav2, coco, llava, mmc4: the image folder (sets vqav2/coco.images_dir, llava.image_folder, "
             "mmc4.images_dir).")] = None,
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Import a public-format source into webdataset shards with manifests.

    Samples that cannot be used are skipped and listed in OUT/rejects.jsonl (source, key, rule,
    message); a source that cannot be read at all, or an import that keeps nothing (or less than
    import.min_kept_fraction), exits 2 with a one-line reason.
    """
    from emu.config import resolve
    from emu.data.formats import ImportConfig, path_overrides
    from emu.data.importing import run_import

    paths = path_overrides(format, {"questions": questions, "annotations": annotations, "images": images})
    config = resolve(ImportConfig, "import", preset, paths + list(overrides or []))
    typer.echo(_describe_import(run_import(format, src, out, config)))


def _describe_import(summary) -> str:
    rules = ", ".join(f"{rule}: {n}" for rule, n in sorted(summary.rejects_by_rule.items()))
    return (f"imported {summary.samples} samples into {summary.shards} shards at {summary.out_dir}; "
            f"rejected {summary.rejected}" + (f" ({rules}; see {summary.out_dir}/rejects.jsonl)" if rules else ""))


@data_app.command("prepare")
def data_prepare(
    src: Annotated[Path, typer.Option(help="Folder with sources.json (e.g. the output of `emu data synth`).")],
    out: Annotated[Path, typer.Option(help="Folder for the datasets, one subfolder per source.")],
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Import every source listed in SRC/sources.json into OUT/<name> (one `emu data import` each)."""
    from emu.config import resolve
    from emu.data.formats import ImportConfig
    from emu.data.prepare import import_sources

    config = resolve(ImportConfig, "import", preset, list(overrides or []))
    for summary in import_sources(src, out, config):
        typer.echo(_describe_import(summary))


@app.command("validate")
def validate(
    data: Annotated[Path, typer.Option(help="A shard dataset, or a folder of datasets (searched recursively).")],
    report: Annotated[Path, typer.Option(help="Folder for report.json, the manifest and GX Data Docs.")],
    max_failure_fraction: Annotated[Optional[float], typer.Option(
        help="Tolerated fraction of failing samples per rule (overrides the preset).")] = None,
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Run the Great Expectations gate over shard datasets.

    Exit 0 when the gate passes, 1 when it fails (one line per failing rule, naming shard and
    keys), 2 on unusable input.
    """
    from emu.config import resolve
    from emu.validate import ValidateConfig
    from emu.validate.gate import run_gate

    extra = [] if max_failure_fraction is None else [f"max_failure_fraction={max_failure_fraction}"]
    config = resolve(ValidateConfig, "validate", preset, extra + list(overrides or []))
    result = run_gate(data, report, config)
    for line in result.summary_lines():
        typer.echo(line)
    raise typer.Exit(0 if result.passed else 1)


@app.command("precompute")
def precompute(
    data: DataOption,
    model: Annotated[str, typer.Option(help="Model folder or s3:// URI whose frozen encoder encodes the images "
                                            "(the stage-1 export).")],
    out: Annotated[Path, typer.Option(help="Output folder; re-running on it computes only missing or stale parts.")],
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="Ray cluster to run on (sets precompute.ray_address); default: a local Ray.")] = None,
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Precompute pooled visual embeddings (and optionally VAE latents) of every image with Ray Data.

    Writes OUT/<dataset>/<shard>.safetensors + .index.json per input shard and OUT/precompute.json;
    training reads them with stage2.precomputed / instruct.precomputed = OUT, and the decoder (with
    precompute.latents=true) with decoder.precomputed = OUT and decoder.augment=false.
    """
    from emu.config import resolve
    from emu.precompute.config import PrecomputeConfig
    from emu.precompute.job import run_precompute

    extra = [f"ray_address={ray_address}"] if ray_address else []
    config = resolve(PrecomputeConfig, "precompute", preset, extra + list(overrides or []))
    typer.echo(run_precompute(data, model, out, config).describe())


def _train(stage: str, section: str, preset: str | None, overrides: list[str], run) -> None:
    """Resolve the stage config, join the process group, run, report; exit 143 after SIGTERM."""
    from emu.config import resolve
    from emu.sections import SECTIONS
    from emu.train.engine import init_distributed, shutdown_distributed
    from emu.train.trainer import Preempted

    config = resolve(SECTIONS[section](), section, preset, overrides)
    rank, _ = init_distributed()
    try:
        result = run(config)
    except Preempted as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(EXIT_PREEMPTED) from None
    finally:
        shutdown_distributed()
    if rank == 0:
        final = result.summary["final"]
        losses = ", ".join(f"{k} {final[k]:.4f}" for k in ("loss", "text_loss", "image_loss") if isinstance(final.get(k), float))
        typer.echo(f"{stage}: {result.summary['steps']} steps ({losses}); exported {result.export}")


@train_app.command("stage1")
def train_stage1(data: DataOption, out: OutOption, preset: PresetOption = None, overrides: OverridesArgument = None) -> None:
    """Stage-1 pretraining on image/video-text pairs, captioning loss only (Emu2 §2.2.2). Builds the
    model from the preset's `model` section unless stage1.init names one; `model.key=value`
    overrides that section (e.g. model.lm.pretrained=HF_FOLDER model.vision.pretrained=EVA_FILE),
    the other overrides the stage1 section."""
    from emu.config import resolve
    from emu.model.config import EmuConfig
    from emu.train.stages import stage1

    rest = [o for o in overrides or [] if not o.startswith("model.")]
    architecture = resolve(EmuConfig, "model", preset, [o[len("model."):] for o in overrides or [] if o.startswith("model.")])
    _train("stage1", "stage1", preset, rest, lambda c: stage1(c, architecture, data, out))


@train_app.command("stage2")
def train_stage2(data: DataOption, out: OutOption, init: Annotated[Optional[str], typer.Option(
                     help="Stage-1 model folder or s3:// URI (sets stage2.init).")] = None,
                 preset: PresetOption = None, overrides: OverridesArgument = None) -> None:
    """Stage-2 pretraining on the mixture, text CE + visual regression, encoder frozen (Emu2 §2.2.2)."""
    from emu.train.stages import stage2

    extra = [f"init={init}"] if init else []
    _train("stage2", "stage2", preset, extra + list(overrides or []), lambda c: stage2(c, data, out))


@train_app.command("decoder")
def train_decoder(data: DataOption, out: OutOption, encoder: Annotated[Optional[str], typer.Option(
                      help="Model whose frozen encoder gives the conditions (sets decoder.encoder).")] = None,
                  preset: PresetOption = None, overrides: OverridesArgument = None) -> None:
    """Visual decoder: diffusion UNet as an autoencoder of visual embeddings (Emu2 §2.2.3). Builds
    the decoder from the preset's `visual_decoder` section unless decoder.init names one."""
    from emu.config import resolve
    from emu.model.config import DecoderConfig
    from emu.train.stages import train_decoder as run

    architecture = resolve(DecoderConfig, "visual_decoder", preset)
    extra = [f"encoder={encoder}"] if encoder else []
    _train("decoder", "decoder", preset, extra + list(overrides or []), lambda c: run(c, architecture, data, out))


@train_app.command("instruct")
def train_instruct(data: DataOption, out: OutOption, init: Annotated[Optional[str], typer.Option(
                       help="Stage-2 model folder or s3:// URI (sets instruct.init).")] = None,
                   mode: Annotated[str, typer.Option(help="chat (Emu2-Chat) or gen (Emu2-Gen): the preset "
                                                          "section instruct or instruct_gen.")] = "chat",
                   preset: PresetOption = None, overrides: OverridesArgument = None) -> None:
    """Instruction tuning: chat (answers-only loss, 16x16 tokens) or gen (last-image regression) (Emu2 §2.3)."""
    from emu.train.stages import instruct

    if mode not in ("chat", "gen"):
        raise EmuError(f"--mode must be chat or gen, got {mode!r}")
    section = "instruct" if mode == "chat" else "instruct_gen"
    extra = [f"init={init}"] if init else []
    _train(section, section, preset, extra + list(overrides or []), lambda c: instruct(c, data, out))


@config_app.command("show")
def config_show(
    section: Annotated[str, typer.Argument(help="Section: synth, import, validate, model, visual_decoder, stage1, stage2, decoder, instruct, instruct_gen.")],
    preset: PresetOption = None,
    overrides: OverridesArgument = None,
) -> None:
    """Print the resolved settings of one section as YAML (defaults < preset < overrides)."""
    import yaml

    from emu.config import resolve, to_dict
    from emu.sections import SECTIONS

    if section not in SECTIONS:
        raise EmuError(f"unknown section {section!r}; sections: {', '.join(SECTIONS)}")
    config = resolve(SECTIONS[section](), section, preset, list(overrides or []))
    typer.echo(yaml.safe_dump({section: to_dict(config)}, sort_keys=False).rstrip())


#: Benchmarks `emu evaluate score` reads, with the files each needs.
SCORE_BENCHES = {"vqav2": "--questions, --annotations, --predictions",
                 "coco-captions": "--annotations, --predictions"}


@evaluate_app.callback()
def evaluate(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Option(help="Model folder or s3:// URI to evaluate (benchmark harness).")] = None,
    decoder: Annotated[Optional[str], typer.Option(help="Visual decoder folder, for the image benchmarks.")] = None,
    bench: Annotated[Optional[list[str]], typer.Option(
        "--bench", help="Benchmark to run on the model (vqav2, coco-captions, autoencode, t2i); repeat for several.")] = None,
    data: Annotated[Optional[str], typer.Option(help="Folder holding the benchmark datasets (sets evaluate.data_root).")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Output folder of the harness run.")] = None,
    preset: PresetOption = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="Harness setting override key=value; repeat for several.")] = None,
) -> None:
    """Score prediction files with exact metrics, or evaluate a model on benchmarks.

    `emu evaluate score ...` scores existing prediction files (no model). The bare form
    `emu evaluate --model M --bench B --out D` runs the benchmark harness, which generates the
    predictions with the model and scores them with the same functions; it exits 1 when a gate
    (evaluate.baseline) fails.
    """
    harness_options = (model, decoder, bench, data, out, preset, set_)
    if ctx.invoked_subcommand is not None:
        if any(v for v in harness_options):
            raise EmuError(f"--model/--bench/--out/--preset/--set before `{ctx.invoked_subcommand}` belong to "
                           f"the harness form; give the subcommand's own options after its name")
        return
    if not any(v for v in harness_options):
        typer.echo(ctx.get_help())
        raise typer.Exit(0)
    missing = [name for name, value in (("--model", model), ("--out", out)) if not value]
    if missing:
        raise EmuError(f"the harness form needs {', '.join(missing)} (emu evaluate --model M --bench B --out D)")
    from emu.evaluate.harness import run_from_cli

    raise typer.Exit(run_from_cli(model=model, benches=list(bench or []), out=out, preset=preset,
                                  overrides=list(set_ or []), decoder=decoder, data=data))


@evaluate_app.command("score")
def evaluate_score(
    bench: Annotated[str, typer.Option("--bench", help="vqav2 (VQAv2 results format) or coco-captions (COCO results format).")],
    predictions: Annotated[Path, typer.Option(help="Predictions: [{question_id, answer}] (vqav2) or [{image_id, caption}] (coco-captions).")],
    annotations: Annotated[Path, typer.Option(help="Annotations: VQAv2 annotations file, or COCO captions_*.json.")],
    questions: Annotated[Optional[Path], typer.Option(help="VQAv2 questions file (vqav2 only).")] = None,
    out: Annotated[Path, typer.Option(help="Metrics JSON to write.")] = Path("metrics.json"),
    force: Annotated[bool, typer.Option("--force", help="Replace --out if it exists (otherwise an existing file is an error).")] = False,
    allow_missing: Annotated[bool, typer.Option(
        "--allow-missing", help="Score only the predicted items when some annotated ones have no prediction (the count is reported).")] = False,
    tokenizer: Annotated[str, typer.Option(
        help="coco-captions: python (built-in PTBTokenizer port) or java (pycocoevalcap's Stanford tokenizer).")] = "python",
) -> None:
    """Score a prediction file with the exact official metric and write the metrics JSON.

    vqav2: official VQA accuracy (vqaEval.py normalisation), overall / per answer type / per
    question type. coco-captions: CIDEr-D as pycocoevalcap computes it. Every annotated item needs
    a prediction unless --allow-missing; the number scored is always printed. Exit 2 on unusable
    input (missing, duplicate or unknown ids, unreadable files).
    """
    import hashlib

    from emu.evaluate.report import kfp_metrics, write_metrics_json

    if bench not in SCORE_BENCHES:
        raise EmuError(f"unknown --bench {bench!r}; score supports: "
                       + "; ".join(f"{name} ({needs})" for name, needs in SCORE_BENCHES.items()))
    if out.exists() and not force:
        raise EmuError(f"{out} already exists; pass --force to replace it, or choose another --out")
    files = {"predictions": predictions, "annotations": annotations}
    if bench == "vqav2":
        if questions is None:
            raise EmuError("--bench vqav2 needs --questions (the VQAv2 questions file)")
        files["questions"] = questions
        from emu.evaluate.vqa import score_vqa
        result = score_vqa(questions, annotations, predictions, allow_missing=allow_missing)
        lines = _describe_vqa(result)
    else:
        if questions is not None:
            raise EmuError("--questions is only for --bench vqav2")
        from emu.evaluate.cider import score_captions
        if tokenizer not in ("python", "java"):
            raise EmuError(f"--tokenizer must be python or java, got {tokenizer!r}")
        result = score_captions(annotations, predictions, allow_missing=allow_missing, tokenizer=tokenizer)
        lines = _describe_captions(result)
    inputs = {name: {"path": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
              for name, path in files.items()}
    replacing = out.exists()
    prefix = bench.replace("-", "_")
    write_metrics_json(out, result, prefix=prefix, inputs=inputs, overwrite=force)
    for line in lines:
        typer.echo(line)
    typer.echo(f"{'replaced' if replacing else 'wrote'} {out} ({len(kfp_metrics(result, prefix))} metrics)")


def _describe_vqa(result: dict) -> list[str]:
    lines = [f"vqav2: {result['overall']:.2f} VQA accuracy over {result['n_questions']} questions "
             f"(official vqaEval.py; unrounded {result['overall_unrounded']:.4f})"]
    if result["n_missing"]:
        lines.append(f"  NOT scored: {result['n_missing']} of {result['n_annotated']} annotated questions "
                     f"have no prediction (--allow-missing)")
    lines.append(f"  {'answer type':<28}{'acc':>8}{'n':>9}")
    for name, acc in result["per_answer_type"].items():
        lines.append(f"  {name:<28}{acc:>8.2f}{result['per_answer_type_count'][name]:>9}")
    lines.append(f"  {'question type':<28}{'acc':>8}{'n':>9}")
    for name, acc in sorted(result["per_question_type"].items()):
        lines.append(f"  {name:<28}{acc:>8.2f}{result['per_question_type_count'][name]:>9}")
    return lines


def _describe_captions(result: dict) -> list[str]:
    lines = [f"coco-captions: CIDEr-D {result['cider']:.4f} (x100: {result['cider_x100']:.2f}) over "
             f"{result['n_images']} images, {result['n_references']} reference captions; tokenizer: {result['tokenizer']}"]
    if result["n_missing"]:
        lines.append(f"  NOT scored: {result['n_missing']} annotated images have no prediction (--allow-missing)")
    return lines


#: No network at run time, no telemetry (../shared/ENVIRONMENT.md). Set by the entry point only.
OFFLINE_ENVIRONMENT = {
    "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
    "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "GX_ANALYTICS_ENABLED": "false",
    "DVC_NO_ANALYTICS": "1", "DO_NOT_TRACK": "1",
}


def main() -> None:
    """Console-script entry: user errors become one line on stderr and exit code 2."""
    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    try:
        # Without standalone mode click returns (not raises) the code of `typer.Exit`.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except EmuError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_UNUSABLE)
    except OSError as exc:  # disk full, read-only, permission, --out is a file: the path and the cause
        typer.echo(f"error: {os_error_line(exc, _output_option(sys.argv[1:]))}", err=True)
        sys.exit(EXIT_UNUSABLE)
    except (OverflowError, MemoryError) as exc:  # a huge number in a setting
        typer.echo(f"error: a setting is too large for this machine: {exc or type(exc).__name__}", err=True)
        sys.exit(EXIT_UNUSABLE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt as exc:  # Ctrl-C, or a signal `emu run` turned into one (its signum)
        sys.exit(128 + getattr(exc, "signum", 2))
    except typer.TyperException as exc:
        # Usage errors (missing option, unknown command, bad value). Typer vendors click, so these
        # are `typer._click` exceptions, not `click.ClickException`; all share TyperException.
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc.format_message()}", err=True)
        sys.exit(EXIT_UNUSABLE)


def _output_option(argv: list[str]) -> str | None:
    """The `--out`/`--report` folder of the command line: what a failed write without a file
    name (a full disk reports none) was writing under."""
    for i, arg in enumerate(argv):
        for option in ("--out", "--report"):
            if arg == option and i + 1 < len(argv):
                return f"{option} {argv[i + 1]}"
            if arg.startswith(option + "="):
                return f"{option} {arg.split('=', 1)[1]}"
    return None


if __name__ == "__main__":
    main()
