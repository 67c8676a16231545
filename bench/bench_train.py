"""The training input path: can the data loader feed a GPU, and what does moving it off the
training thread buy? In one run, on the synthetic stage-2 mixture:

1. loader alone: samples/s that `StepLoader` sustains preparing the `small` preset's stage-2 steps
   (its tokens per image, image size, max_len, packing), with 0 and N workers, against the samples/s
   one GPU step consumes at 50% MFU. That consumption is computed from the FLOP formula of
   emu/train/metrics.py for the small preset's model (built on the meta device: no weights) and
   the sequence lengths the loader produced: samples/s = 0.5 x peak / (step FLOPs / step samples).
2. training: the tiny preset's stage 2 on this machine, inputs prepared inline vs by N workers:
   tokens/s and the share of each step spent waiting for inputs.

    .venv/bin/python bench/bench_train.py [--steps 12] [--workers 2] [--peak-tflops 989.4]

Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _world import MIXTURE, synthetic_mixture

from emu.config import resolve
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.tokenizer import train_tokenizer
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel
from emu.train.config import Stage2Config
from emu.train.data import build_mixture
from emu.train.engine import init_distributed, shutdown_distributed
from emu.train.loader import StepLoader
from emu.train.lm_step import LMBatcher
from emu.train.metrics import KNOWN_PEAK_TFLOPS, flop_model
from emu.train.stages import stage2

def small_batcher(tokenizer, model, config: Stage2Config) -> LMBatcher:
    rules = SequenceRules(mode="pretrain", image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side),
                          max_len=config.sequence.max_len, too_long="skip")
    vision = dataclasses.replace(model.config.vision, image_size=config.image_size)
    return LMBatcher(SequenceBuilder(tokenizer, rules), max_len=config.sequence.max_len,
                     packing=config.sequence.packing, micro_rows=config.runtime.micro_batch_size,
                     pad_id=tokenizer.pad_token_id, seed=0, vision=vision,
                     attn_implementation="sdpa", mask_dtype=torch.bfloat16)


def loader_alone(data, tokenizer, steps: int, workers: int, peak_tflops: float) -> dict:
    config = resolve(Stage2Config, "stage2", "small")
    with torch.device("meta"):  # sizes only: a 1.1B model's FLOPs without its weights
        model = EmuModel.build(resolve(EmuConfig, "model", "small"), tokenizer)
    flops_model = flop_model(model, encoder_trains=False)
    batcher = small_batcher(tokenizer, model, config)
    results = {}
    for n in (0, workers):
        loader = StepLoader(build_mixture(data, config.batch_sizes, seed=0), batcher.prepare, 0, steps + 1, workers=n)
        it = iter(loader)
        next(it)  # warm-up: workers start, shards open
        samples = flops = 0.0
        started = time.perf_counter()
        for _, prepared in it:
            samples += prepared.samples
            text = sum(m.text_targets for m in prepared.micro)
            flops += flops_model.step_flops(prepared.tokens, prepared.lengths, text, prepared.images)
        seconds = time.perf_counter() - started
        results[f"workers_{n}"] = {"samples_per_s": samples / seconds, "seconds": seconds}
    flops_per_sample = flops / samples
    consumed = 0.5 * peak_tflops * 1e12 / flops_per_sample
    best = max(r["samples_per_s"] for r in results.values())
    return {**results, "flops_per_sample": flops_per_sample, "gpu_samples_per_s_at_50pct_mfu": consumed,
            "peak_tflops": peak_tflops, "loader_over_gpu": best / consumed,
            "batch_sizes": config.batch_sizes, "image_size": config.image_size, "max_len": config.sequence.max_len}


def training(data, init: Path, root: Path, steps: int, workers: int) -> dict:
    results = {}
    for n in (0, workers):
        out = root / f"stage2-workers{n}"
        overrides = [f"steps={steps + 1}", f"init={init}", "runtime.progress=false", f"runtime.loader_workers={n}"]
        stage2(resolve(Stage2Config, "stage2", "tiny", overrides), data, out)
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]  # no warm-up
        seconds = sum(r["step_seconds"] for r in records)
        tokens = sum(r["tokens_per_s"] * r["step_seconds"] for r in records)
        waited = sum(r["loader_wait_fraction"] * r["step_seconds"] for r in records)
        results[f"workers_{n}"] = {"tokens_per_s": tokens / seconds, "loader_wait_fraction": waited / seconds}
    results["tokens_per_s_ratio"] = results[f"workers_{workers}"]["tokens_per_s"] / results["workers_0"]["tokens_per_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=KNOWN_PEAK_TFLOPS["H100"])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_mixture(root)
        from emu.data.shards import iter_samples
        from emu.model.io import save_model

        texts = [t for name in MIXTURE for s in iter_samples(root / "shards" / name) for t in s.texts()]
        tokenizer = train_tokenizer(texts, 1024)
        loader = loader_alone(data, tokenizer, args.steps, args.workers, args.peak_tflops)
        torch.manual_seed(0)
        init = save_model(EmuModel.build(resolve(EmuConfig, "model", "tiny"), tokenizer), tokenizer, root / "init")
        train = training(data, init, root, args.steps, args.workers)
    shutdown_distributed()
    record = {"benchmark": "training input path (synthetic stage-2 mixture)", "device": platform.processor() or "cpu",
              "cpu_threads": torch.get_num_threads(), "steps": args.steps, "workers": args.workers,
              "loader_alone_small_preset": loader, "training_tiny_preset": train}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    w = f"workers_{args.workers}"
    print(f"loader alone (small preset's stage 2): {loader['workers_0']['samples_per_s']:.1f} samples/s inline, "
          f"{loader[w]['samples_per_s']:.1f} with {args.workers} workers; one GPU at 50% MFU of "
          f"{args.peak_tflops:.0f} TFLOP/s consumes {loader['gpu_samples_per_s_at_50pct_mfu']:.1f} samples/s "
          f"-> loader / GPU = {loader['loader_over_gpu']:.2f}")
    print(f"training (tiny preset, this CPU): {train['workers_0']['tokens_per_s']:.0f} tokens/s inline "
          f"(waiting {train['workers_0']['loader_wait_fraction']:.1%} of each step), "
          f"{train[w]['tokens_per_s']:.0f} with {args.workers} workers "
          f"(waiting {train[w]['loader_wait_fraction']:.1%}): {train['tokens_per_s_ratio']:.2f}x")


if __name__ == "__main__":
    main()
