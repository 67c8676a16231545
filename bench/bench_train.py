"""Training throughput: can the input path feed a GPU, and how fast does each stage train?

    .venv/bin/python bench/bench_train.py [--preset tiny] [--steps 6] [--workers 2] [--peak-tflops 989.4]

In one run, on the synthetic shapes world (bench/_world.py):

1. Loader alone, always at the `small` preset's shapes (its batch sizes, image size, max_len,
   packing): samples/s that StepLoader sustains with 0 and N workers preparing
     * stage 1's steps: images decoded and resized in the loader (the encoder trains on the GPU);
     * stage 2's steps, as the pipeline runs it: visual embeddings read from a real precompute
       (`emu precompute`'s Ray job) of an encoder with the small preset's output shape (its width
       and pooling, one block deep: a lookup reads exactly the same tensors, and the precompute
       takes seconds). Left out where Ray is not installed (the GPU machine).
   against the samples/s one GPU consumes at 50% MFU: 0.5 x peak / (FLOPs per sample), the FLOPs
   from emu/train/metrics.py's formula for the small model (built on the meta device: no weights)
   and the sequences the loader produced. Target: the loader at >= 4x that.
2. Training on this machine's device at --preset, each stage for --steps steps (the first, warm-up,
   left out), chained as the pipeline chains them (stage 1 from scratch, stage 2 and the decoder
   from stage 1's export): tokens/s, samples/s, MFU (all FLOPs, and the LM's alone: the encoder's
   share is reported apart), peak device memory, the share of step time spent waiting for inputs,
   padding. Ratios in the same run, on stage 2: N loader workers vs inputs prepared inline, packed
   vs unpacked rows, and where a GPU runs, varlen flex_attention vs the dense-mask sdpa reference
   (FlexAttention has no backward on CPU). Stage 2 encodes online here (precompute needs Ray).

Writes bench/results/train.json (--out); prints one line per figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import shutil
import tempfile
import time
import traceback
from pathlib import Path

import torch
from _world import MIXTURE, synthetic_mixture

from emu.config import resolve
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.tokenizer import train_tokenizer
from emu.model.config import DecoderConfig, EmuConfig, LMConfig
from emu.model.emu import EmuModel
from emu.train.config import DecoderTrainConfig, Stage1Config, Stage2Config
from emu.train.data import build_mixture
from emu.train.engine import init_distributed, shutdown_distributed
from emu.train.loader import StepLoader
from emu.train.lm_step import LMBatcher
from emu.train.metrics import KNOWN_PEAK_TFLOPS, flop_model
from emu.train.stages import stage1, stage2, train_decoder

# ---- 1. the loader alone ---------------------------------------------------------------------------


def small_batcher(tokenizer, model: EmuModel, mode: str, config, embeddings=None) -> LMBatcher:
    """The LMBatcher a `small` stage builds on a GPU (emu.train.stages._lm_step), without the engine."""
    rules = SequenceRules(mode=mode, image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side),
                          max_len=config.sequence.max_len, too_long="skip")
    vision = dataclasses.replace(model.config.vision, image_size=config.image_size)
    return LMBatcher(SequenceBuilder(tokenizer, rules), max_len=config.sequence.max_len,
                     packing=config.sequence.packing, micro_rows=config.runtime.micro_batch_size,
                     pad_id=tokenizer.pad_token_id, seed=0, vision=vision, attn_implementation="sdpa",
                     mask_dtype=torch.bfloat16, video_frames=getattr(config, "video_frames", None),
                     embeddings=embeddings, max_visuals=config.runtime.micro_batch_images,
                     resize_on_device=True)  # as on a GPU: the device resizes the stored images


def loader_rate(data, batcher: LMBatcher, batch_sizes, flops_model, steps: int, workers: int, peak_tflops: float,
                workers_list: tuple[int, ...]) -> dict:
    results = {}
    for n in workers_list:
        loader = StepLoader(build_mixture(data, batch_sizes, seed=0), batcher.prepare, 0, steps + 1, workers=n)
        it = iter(loader)
        next(it)  # warm-up: workers start, shards open
        samples = flops = padding = tokens = 0.0
        started = time.perf_counter()
        for _, prepared in it:
            samples += prepared.samples
            tokens += prepared.tokens
            padding += prepared.padding
            text = sum(m.text_targets for m in prepared.micro)
            flops += flops_model.step_flops(prepared.tokens, prepared.lengths, text, prepared.images)
        seconds = time.perf_counter() - started
        results[f"workers_{n}"] = {"samples_per_s": samples / seconds, "seconds": seconds}
    flops_per_sample = flops / samples
    consumed = 0.5 * peak_tflops * 1e12 / flops_per_sample
    best = max(r["samples_per_s"] for r in results.values())
    return {**results, "flops_per_sample": flops_per_sample, "gpu_samples_per_s_at_50pct_mfu": consumed,
            "loader_over_gpu": best / consumed, "padding_fraction": padding / (tokens + padding)}


def small_precompute(data, tokenizer, root: Path):
    """A real precompute of the mixture by an encoder of the small preset's output shape, one
    block deep; returns (its lookup, the model it was made with). None without Ray."""
    try:
        import ray  # noqa: F401
    except ImportError:
        return None
    from emu.model.io import save_model
    from emu.precompute.config import PrecomputeConfig
    from emu.precompute.job import run_precompute
    from emu.precompute.store import embedding_lookup

    small = resolve(EmuConfig, "model", "small")
    shallow = dataclasses.replace(small, vision=dataclasses.replace(small.vision, layers=1), lm=LMConfig())
    torch.manual_seed(0)
    model = EmuModel.build(shallow, tokenizer)
    save_model(model, tokenizer, root / "small-shape-encoder")
    config = dataclasses.replace(resolve(PrecomputeConfig, "precompute", "small"), image_size=0, latents=False,
                                 gpus_per_actor=0, actors=1, dtype="bfloat16",
                                 sides=[small.image_tokens_side, small.video_tokens_side])
    run_precompute(data, str(root / "small-shape-encoder"), root / "small-precompute", config)
    return embedding_lookup(root / "small-precompute", model)


def loader_alone(data, tokenizer, root: Path, steps: int, workers: int, peak_tflops: float) -> dict:
    with torch.device("meta"):  # sizes only: a 1.1B model's FLOPs without its weights
        model = EmuModel.build(resolve(EmuConfig, "model", "small"), tokenizer)
    pool = (0, workers)
    s1 = resolve(Stage1Config, "stage1", "small")
    result = {"stage1_online_pixels": {
        **loader_rate(data, small_batcher(tokenizer, model, "caption", s1), s1.batch_sizes,
                      flop_model(model, encoder_trains=True), steps, workers, peak_tflops, pool),
        "batch_sizes": s1.batch_sizes, "image_size": s1.image_size, "max_len": s1.sequence.max_len}}
    s2 = resolve(Stage2Config, "stage2", "small")
    lookup = small_precompute(data, tokenizer, root)
    if lookup is None:
        result["stage2_precomputed"] = {"skipped": "ray is not installed here"}
    else:
        result["stage2_precomputed"] = {
            **loader_rate(data, small_batcher(tokenizer, model, "pretrain", s2, embeddings=lookup), s2.batch_sizes,
                          flop_model(model, encoder_trains=False), steps, workers, peak_tflops, pool),
            "batch_sizes": s2.batch_sizes, "max_len": s2.sequence.max_len}
    return {**result, "peak_tflops": peak_tflops}


# ---- 2. training ---------------------------------------------------------------------------------


def measure(train, out: Path, peak_tflops: float | None) -> dict:
    """Run one stage (a callable writing `out`) and summarise its metrics.jsonl, warm-up left out."""
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        train()
    except Exception as exc:  # one broken variant must not hide the others' figures
        traceback.print_exc()
        return {"error": f"{type(exc).__name__}: {exc}"}
    wall = time.perf_counter() - started
    # Optimizer state is most of a checkpoint (15 GB at the small preset): drop it, the disk is finite.
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    seconds = sum(r["step_seconds"] for r in records)

    def total(name: str) -> float:
        return sum((r.get(name) or 0.0) * r["step_seconds"] for r in records)

    flops = sum(r.get("step_tflops", 0.0) for r in records) * 1e12
    vision = sum(r.get("vision_step_tflops", 0.0) for r in records) * 1e12
    summary = {"steps_measured": len(records), "wall_seconds": round(wall, 2),
               "tokens_per_s": total("tokens_per_s") / seconds, "samples_per_s": total("samples_per_s") / seconds,
               "loader_wait_fraction": total("loader_wait_fraction") / seconds,
               "padding_fraction": sum(r.get("padding_fraction", 0.0) for r in records) / len(records),
               "tflops_per_s": flops / seconds / 1e12, "vision_flop_share": vision / flops if flops else None,
               "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
    if peak_tflops and flops:
        summary["mfu"] = flops / seconds / (peak_tflops * 1e12)
        summary["mfu_lm_only"] = (flops - vision) / seconds / (peak_tflops * 1e12)
    return summary


def training(data, preset: str, root: Path, steps: int, workers: int, peak_tflops: float | None) -> dict:
    common = [f"steps={steps + 1}", "runtime.progress=false", "runtime.checkpoint_every=0"]
    architecture = resolve(EmuConfig, "model", preset)
    results: dict = {}
    out = root / "stage1"
    results["stage1"] = measure(lambda: stage1(resolve(Stage1Config, "stage1", preset, common), architecture, data,
                                               out), out, peak_tflops)
    init = out / "model"
    if not init.exists():
        return results
    variants = {"inline": ["runtime.loader_workers=0"], "workers": [f"runtime.loader_workers={workers}"],
                "unpacked": [f"runtime.loader_workers={workers}", "sequence.packing=false"]}
    if torch.cuda.is_available():
        variants["flex_attention"] = [f"runtime.loader_workers={workers}", "runtime.attention=flex_attention"]
    for name, extra in variants.items():
        out = root / f"stage2-{name}"
        overrides = common + [f"init={init}", "precomputed=", *extra]
        results[f"stage2_{name}"] = measure(
            lambda: stage2(resolve(Stage2Config, "stage2", preset, overrides), data, out), out, peak_tflops)
    out = root / "decoder"
    results["decoder"] = measure(
        lambda: train_decoder(resolve(DecoderTrainConfig, "decoder", preset, common + [f"encoder={init}", "precomputed="]),
                              resolve(DecoderConfig, "visual_decoder", preset), data, out), out, peak_tflops)

    def ratio(a: str, b: str) -> float | None:
        x, y = results.get(a, {}), results.get(b, {})
        return x["tokens_per_s"] / y["tokens_per_s"] if "tokens_per_s" in x and "tokens_per_s" in y else None

    results["ratios_tokens_per_s"] = {"workers_over_inline": ratio("stage2_workers", "stage2_inline"),
                                      "packed_over_unpacked": ratio("stage2_workers", "stage2_unpacked"),
                                      "flex_over_sdpa": ratio("stage2_flex_attention", "stage2_workers")}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="preset of the training part (tiny on CPU, small on a GPU)")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per stage (plus one warm-up)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--peak-tflops", type=float, default=KNOWN_PEAK_TFLOPS["H100"],
                        help="bf16 dense peak the loader is compared with (H100 SXM)")
    parser.add_argument("--skip-loader", action="store_true", help="only the training part")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "train.json")
    args = parser.parse_args()
    init_distributed()
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    from emu.train.metrics import peak_flops

    device_peak = peak_flops(0.0)
    with tempfile.TemporaryDirectory(prefix="emu-bench-train-") as tmp:
        root = Path(tmp)
        data = synthetic_mixture(root)
        from emu.data.shards import iter_samples

        texts = [t for name in MIXTURE for s in iter_samples(root / "shards" / name) for t in s.texts()]
        tokenizer = train_tokenizer(texts, 1024)
        loader = {} if args.skip_loader else loader_alone(data, tokenizer, root, args.steps, args.workers,
                                                          args.peak_tflops)
        train = training(data, args.preset, root, args.steps, args.workers,
                         device_peak / 1e12 if device_peak else None)
    shutdown_distributed()
    record = {"benchmark": "training throughput (synthetic shapes world)", "device": device,
              "cpu_threads": torch.get_num_threads(), "steps": args.steps, "workers": args.workers,
              "preset": args.preset, "loader_alone_small_preset": loader, "training": train}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    report(record)


def report(record: dict) -> None:
    w = f"workers_{record['workers']}"
    for name, part in record["loader_alone_small_preset"].items():
        if isinstance(part, dict) and "loader_over_gpu" in part:
            print(f"loader alone, small preset, {name}: {part['workers_0']['samples_per_s']:.0f} samples/s inline, "
                  f"{part[w]['samples_per_s']:.0f} with {record['workers']} workers; one GPU at 50% MFU consumes "
                  f"{part['gpu_samples_per_s_at_50pct_mfu']:.0f} -> loader / GPU = {part['loader_over_gpu']:.2f} "
                  f"(padding {part['padding_fraction']:.1%})")
        elif isinstance(part, dict) and "skipped" in part:
            print(f"loader alone, small preset, {name}: skipped ({part['skipped']})")
    for name, run in record["training"].items():
        if name == "ratios_tokens_per_s":
            print("ratios (tokens/s): " + ", ".join(f"{k} {v:.2f}" for k, v in run.items() if v is not None))
        elif "error" in run:
            print(f"{record['preset']} {name}: FAILED {run['error']}")
        else:
            mfu = f", MFU {run['mfu']:.1%} (LM alone {run['mfu_lm_only']:.1%})" if "mfu" in run else ""
            memory = f", peak {run['peak_memory_gib']:.1f} GiB" if run["peak_memory_gib"] is not None else ""
            print(f"{record['preset']} {name}: {run['tokens_per_s']:.0f} tokens/s, {run['samples_per_s']:.1f} "
                  f"samples/s{mfu}{memory}, loader wait {run['loader_wait_fraction']:.1%}, "
                  f"padding {run['padding_fraction']:.1%}")


if __name__ == "__main__":
    main()
