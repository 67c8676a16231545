"""Loss-curve baselines: the first few steps of every training stage on the tiny preset (CPU, fp32,
fixed seeds), run in this process and compared with the curves recorded in
tests/baselines/loss_curves.json (tests/integration/test_loss_baselines.py).

A change that moves a curve beyond the tolerance fails that test. When the move is intended (a new
loss term, another init, other data), re-record on purpose and commit the new file with the change:

    scripts/record-loss-baselines            # = .venv/bin/python -m tests.loss_baselines --write

The stages run as the tiny pipeline chains them, each from the previous one's short export:
stage 1 -> stage 2 (online encoding) -> instruct (chat), and stage 1's encoder -> the decoder
(from scratch: its VAE phase first, recorded as "decoder-vae" when the decoder stage has one).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BASELINES = Path(__file__).parent / "baselines" / "loss_curves.json"
RECORD_COMMAND = "scripts/record-loss-baselines"
STEPS = 6
#: |fresh - recorded| <= ATOL + RTOL * |recorded|, per value. fp32 on CPU with one thread is
#: bit-reproducible on one machine (the same run twice gives equal curves); another CPU or thread
#: count may sum in another order (SIMD width, oneDNN/MKL kernel choice), which moves a loss by
#: less than 2e-7 relative over these 6 steps (measured: 1 vs 2 threads, worst value of all
#: curves). 2e-3 leaves four orders of magnitude for that and still catches a real change:
#: stage 1's LM lr 5 % higher moves its loss by 2.4e-3 at step 3 and 4.8e-3 at step 6, another
#: seed by 1-2 % (measured). ATOL covers terms that are exactly 0 (stage 1's image loss).
RTOL = 2e-3
ATOL = 1e-6
#: Metrics recorded per step besides `step`: the objective and its components.
LOSS_KEYS = ("loss", "text_loss", "image_loss", "reconstruction", "kl")

PAIRS = ("img2dataset", "webvid")
MIXTURE = ("img2dataset", "webvid", "mmc4", "ytsb", "grit", "text")
CHAT = ("llava-chat", "vqav2-train", "coco-train")
DECODER = ("img2dataset",)


def common_overrides(steps: int) -> list[str]:
    """Every stage: `steps` steps, no periodic checkpoint, no progress bar; seed and precision are
    the preset's (runtime.seed 0, fp32), stated here so a preset change cannot move them silently."""
    return [f"steps={steps}", "runtime.checkpoint_every=0", "runtime.progress=false", "runtime.seed=0",
            "runtime.precision=fp32", "runtime.loader_workers=0"]


def make_world(root: Path) -> Path:
    """The tiny synthetic shapes world, imported as shards (as tests/integration/conftest.py)."""
    from emu.config import resolve
    from emu.data.formats import ImportConfig
    from emu.data.prepare import import_sources
    from emu.data.synth import SynthConfig, generate

    generate(root / "raw", resolve(SynthConfig, "synth", "tiny"))
    import_sources(root / "raw", root / "shards", resolve(ImportConfig, "import", "tiny"))
    return root / "shards"


def read_curve(metrics: Path) -> list[dict[str, float]]:
    curve = []
    for line in metrics.read_text().splitlines():
        record = json.loads(line)
        curve.append({"step": record["step"], **{k: record[k] for k in LOSS_KEYS if k in record}})
    return curve


def run_curves(world: Path, work: Path, steps: int = STEPS) -> dict[str, dict[str, Any]]:
    """Run every stage for `steps` steps under `work`; returns {curve name: {data, overrides, curve}}."""
    import torch

    from emu.config import resolve
    from emu.model.config import DecoderConfig, EmuConfig
    from emu.train.config import DecoderTrainConfig, InstructConfig, Stage1Config, Stage2Config
    from emu.train.stages import instruct, stage1, stage2, train_decoder

    torch.use_deterministic_algorithms(True, warn_only=True)
    base = common_overrides(steps)
    curves: dict[str, dict[str, Any]] = {}

    def run(name: str, fn, cls, section: str, data: tuple[str, ...], extra: list[str], *args) -> Path:
        out = work / name
        overrides = [*base, *extra]
        fn(resolve(cls, section, "tiny", overrides), *args, [world / d for d in data], out)
        shown = [o.replace(str(work), "<work>") for o in overrides]
        curves[name] = {"data": list(data), "overrides": shown, "curve": read_curve(out / "metrics.jsonl")}
        return out

    s1 = run("stage1", stage1, Stage1Config, "stage1", PAIRS, [], resolve(EmuConfig, "model", "tiny"))
    s2 = run("stage2", stage2, Stage2Config, "stage2", MIXTURE, [f"init={s1 / 'model'}"])
    run("instruct", instruct, InstructConfig, "instruct", CHAT, [f"init={s2 / 'model'}"])
    # From scratch, as the tiny pipeline trains it: its VAE phase (decoder.vae_steps) runs first,
    # for as many steps, and writes its own curve to out/vae/.
    decoder = run("decoder", train_decoder, DecoderTrainConfig, "decoder", DECODER,
                  [f"encoder={s1 / 'model'}", f"vae_steps={steps}"], resolve(DecoderConfig, "visual_decoder", "tiny"))
    curves["decoder-vae"] = {**curves["decoder"], "phase_of": "decoder",
                             "curve": read_curve(decoder / "vae" / "metrics.jsonl")}
    return curves


def environment() -> dict[str, str]:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "machine": platform.machine(),
            "processor": _cpu_name(), "torch_threads": str(torch.get_num_threads())}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def compute(steps: int = STEPS) -> dict[str, Any]:
    """Make a world and run every stage in a temporary folder; the whole baseline document."""
    with tempfile.TemporaryDirectory(prefix="loss-baselines-") as tmp:
        world = make_world(Path(tmp) / "world")
        curves = run_curves(world, Path(tmp) / "runs", steps)
    return {
        "about": "First steps of each training stage on the tiny preset (CPU, fp32, seed 0), compared by "
                 "tests/integration/test_loss_baselines.py; re-record on purpose with the command below.",
        "command": RECORD_COMMAND,
        "steps": steps,
        "tolerance": {"rtol": RTOL, "atol": ATOL, "rule": "|fresh - recorded| <= atol + rtol * |recorded|"},
        "recorded_on": environment(),
        "stages": curves,
    }


def compare(recorded: dict[str, Any], fresh: dict[str, Any], rtol: float | None = None,
            atol: float | None = None) -> list[str]:
    """One line per value that moved beyond the tolerance (RTOL, ATOL unless given), per curve or
    step that appeared or went."""
    rtol = RTOL if rtol is None else rtol
    atol = ATOL if atol is None else atol
    problems = []
    old, new = recorded["stages"], fresh["stages"]
    for name in sorted(set(old) - set(new)):
        problems.append(f"{name}: recorded, but this run produced no such curve")
    for name in sorted(set(new) - set(old)):
        problems.append(f"{name}: produced by this run, but not recorded")
    for name in [n for n in old if n in new]:
        if old[name].get("overrides") != new[name].get("overrides"):
            problems.append(f"{name}: overrides changed: recorded {old[name].get('overrides')}, "
                            f"now {new[name].get('overrides')}")
        a = {r["step"]: r for r in old[name]["curve"]}
        b = {r["step"]: r for r in new[name]["curve"]}
        if sorted(a) != sorted(b):
            problems.append(f"{name}: steps {sorted(a)} recorded, {sorted(b)} now")
        for step in sorted(set(a) & set(b)):
            for key in sorted((set(a[step]) | set(b[step])) - {"step"}):
                if key not in a[step] or key not in b[step]:
                    problems.append(f"{name} step {step} {key}: only {'recorded' if key in a[step] else 'now'}")
                    continue
                want, got = float(a[step][key]), float(b[step][key])
                if not (math.isfinite(got) and abs(got - want) <= atol + rtol * abs(want)):
                    rel = abs(got - want) / abs(want) if want else math.inf
                    problems.append(f"{name} step {step} {key}: recorded {want:.6g}, now {got:.6g} "
                                    f"(diff {got - want:+.3g}, {rel:.2e} relative > rtol {rtol:g})")
    return problems


def report(problems: list[str]) -> str:
    return (f"{len(problems)} loss-curve value(s) moved beyond rtol {RTOL:g} (atol {ATOL:g}) from "
            f"{BASELINES.relative_to(BASELINES.parents[2])}:\n" + "\n".join(f"  {p}" for p in problems) +
            f"\nIf the change is intended, re-record the baselines with `{RECORD_COMMAND}` and commit "
            "tests/baselines/loss_curves.json with it.")


def dumps(document: dict[str, Any]) -> str:
    """Indented JSON with one line per step, so that a re-recording's diff shows the steps that moved."""
    steps = {}
    for name, stage in document["stages"].items():
        steps[name] = stage["curve"]
        stage["curve"] = f"@curve:{name}@"
    text = json.dumps(document, indent=1)
    for name, curve in steps.items():
        rows = ",\n".join(f"    {json.dumps(row)}" for row in curve)
        text = text.replace(json.dumps(f"@curve:{name}@"), f"[\n{rows}\n   ]")
        document["stages"][name]["curve"] = curve
    return text + "\n"


def write(document: dict[str, Any], path: Path = BASELINES) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(document))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help=f"(re-)record {BASELINES}")
    parser.add_argument("--out", type=Path, default=BASELINES, help="where --write writes (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=STEPS, help="steps per stage (default: %(default)s)")
    args = parser.parse_args(argv)
    from emu.cli import OFFLINE_ENVIRONMENT

    for name, value in OFFLINE_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    import logging

    from transformers.utils import logging as hf_logging

    logging.basicConfig(level=logging.WARNING)
    hf_logging.disable_progress_bar()  # a bar per export and load: noise for a 20 s script
    from emu.train.engine import shutdown_distributed

    start = time.monotonic()
    try:
        document = compute(args.steps)
    finally:
        shutdown_distributed()  # the one-process gloo group the stages joined
    if args.write:
        write(document, args.out)
        print(f"wrote {args.out} ({time.monotonic() - start:.1f} s): " +
              ", ".join(f"{n} {len(c['curve'])} steps" for n, c in document["stages"].items()))
        return 0
    if not BASELINES.is_file():
        print(f"no baselines at {BASELINES}; record them with {RECORD_COMMAND}")
        return 1
    problems = compare(json.loads(BASELINES.read_text()), document)
    print(report(problems) if problems else f"all curves within rtol {RTOL:g} of {BASELINES}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
