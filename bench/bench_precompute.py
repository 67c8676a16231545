"""Precompute throughput: images/s of the whole Ray Data job (read shards, decode, preprocess,
encode in the actor pool, write parts) against the bare encoder forward on random pixels of the
same batch size, in the same run, same encoder, same threads per encoder process.

    .venv/bin/python bench/bench_precompute.py [--preset tiny] [--images 512] [--batch-size 32]

The encoder is the preset's `model.vision` (the LM is replaced by the tiny default: precompute
never loads it). The baseline runs with as many torch threads as an actor has CPUs
(`precompute.cpus_per_actor`; Ray sets OMP_NUM_THREADS to it). Ray is started by the job itself
(local, in-process), as `emu precompute` does; its start-up is reported apart.

The job is run on N/2 and on N images (fresh outputs): its images/s over N includes the fixed
costs (actor start, encoder load and weights check); the marginal rate (N/2) / (t_N - t_N/2) is
what a long job approaches, fixed costs cancelling. Also times a re-run on the unchanged data (it
only re-hashes the shards). Writes bench/results/precompute.json.

    .venv/bin/python bench/bench_precompute.py --no-ray [--preset small] ...   # e.g. on a GPU machine

Without Ray (the lent GPU machine has none, and its wheel does not fit what travels there): one
actor's work on this machine's device, its parts timed apart: decode + preprocess of a batch in
one CPU process (the job runs as many such tasks as it has CPUs), and EncoderActor on decoded
batches (host-to-device copy, encode, copy back), against the bare forward on device-resident
pixels. The GPU precompute ratio is actor / forward; forward / decode is how many decoding CPU
processes one GPU needs. Writes bench/results/precompute-no-ray.json unless --out says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from emu.config import resolve
from emu.data.schema import Pair
from emu.data.shards import ShardWriter
from emu.data.tokenizer import train_tokenizer
from emu.model.config import EmuConfig, LMConfig
from emu.model.emu import EmuModel
from emu.model.io import save_model
from emu.precompute.config import PrecomputeConfig
from emu.precompute.encoder import load_encoder
from emu.precompute.job import run_precompute

RESULTS = Path(__file__).resolve().parent / "results" / "precompute.json"


def photo(rng: np.random.Generator, side: int) -> bytes:
    """A smooth random colour image as JPEG (noise would make decoding unrealistically slow)."""
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((side, side), Image.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def make_data(folder: Path, images: int, side: int, per_shard: int) -> None:
    rng = np.random.default_rng(0)
    with ShardWriter(folder, "bench", samples_per_shard=per_shard) as writer:
        for i in range(images):
            writer.write(Pair(key=f"img{i:06d}", images=[photo(rng, side)], text=f"image {i}"))
        writer.close()


def encoder_forward(model: Path, config: PrecomputeConfig, sides: list[int], threads: int, batches: int,
                    device: str = "cpu") -> dict:
    """images/s of Encoder.encode on random normalised pixels (what an actor runs per batch)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        encoder = load_encoder(model, config.image_size).to(device)
        size = encoder.config.vision.image_size
        pixels = torch.randn(config.batch_size, 3, size, size, device=device)
        encoder.encode(pixels, sides)  # warm-up
        synchronize(device)
        started = time.perf_counter()
        for _ in range(batches):
            encoder.encode(pixels, sides)
        synchronize(device)
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    return {"threads": threads, "images": batches * config.batch_size, "seconds": round(seconds, 3),
            "images_per_s": round(batches * config.batch_size / seconds, 2)}


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def actor_path(model: Path, config: PrecomputeConfig, sides: list[int], data: Path, device: str) -> dict:
    """One actor's work without Ray (module docstring): decode, then EncoderActor, timed apart."""
    from emu.precompute.content import iter_shard_images, module_sha256
    from emu.precompute.job import EncoderActor, _decode

    encoder = load_encoder(model, config.image_size)
    actor = EncoderActor(str(model), encoder.config.vision.image_size, sides,
                         module_sha256(encoder.modules(), torch.float32))
    rows = [row for shard in sorted(data.rglob("*.tar")) for row in iter_shard_images(shard)]
    vision = dataclasses.asdict(encoder.config.vision)

    def column(values) -> np.ndarray:
        out = np.empty(len(values), dtype=object)
        out[:] = values
        return out

    started = time.perf_counter()
    batches = []
    for i in range(0, len(rows), config.batch_size):
        chunk = rows[i:i + config.batch_size]
        batch = {"part": np.zeros(len(chunk), np.int64), "key": column([r.key for r in chunk]),
                 "index": np.array([r.index for r in chunk]), "image": column([r.data for r in chunk]),
                 "image_sha256": column([""] * len(chunk)), "addresses": column(["{}"] * len(chunk)),
                 "problem": column([r.problem for r in chunk])}
        batches.append(_decode(batch, vision, 0))
    decode_seconds = time.perf_counter() - started
    actor(batches[0])  # warm-up
    synchronize(device)
    started = time.perf_counter()
    for batch in batches[1:]:
        actor(batch)
    synchronize(device)
    encode_seconds = time.perf_counter() - started
    encoded = sum(len(b["key"]) for b in batches[1:])
    return {"images": len(rows), "decode_images_per_s_one_process": round(len(rows) / decode_seconds, 2),
            "actor_images_per_s": round(encoded / encode_seconds, 2)}


def no_ray(args, architecture: EmuConfig, config: PrecomputeConfig, sides: list[int]) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="emu-bench-precompute-") as tmp:
        root = Path(tmp)
        make_data(root / "data", args.images, args.source_px, args.per_shard)
        tokenizer = train_tokenizer([f"image {i}" for i in range(100)], vocab_size=300)
        torch.manual_seed(0)
        save_model(EmuModel.build(architecture, tokenizer), tokenizer, root / "model")
        batches = max(2, args.images // config.batch_size)
        forward = encoder_forward(root / "model", config, sides, torch.get_num_threads(), batches, device)
        actor = actor_path(root / "model", config, sides, root / "data", device)
    vision = architecture.vision
    result = {
        "benchmark": "precompute without Ray: one actor's decode and encode vs the bare encoder forward",
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "cpus": os.cpu_count(),
        "encoder": {"preset": args.preset, "image_size": vision.image_size, "patch_size": vision.patch_size,
                    "width": vision.width, "layers": vision.layers, "sides": sides},
        "batch_size": config.batch_size, "source_px": args.source_px, "encoder_forward": forward, "actor": actor,
        "ratio_actor_to_forward": round(actor["actor_images_per_s"] / forward["images_per_s"], 3),
        "decoding_processes_per_device": round(forward["images_per_s"] / actor["decode_images_per_s_one_process"], 1),
    }
    out = args.out if args.out != RESULTS else RESULTS.with_name("precompute-no-ray.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"{result['device']}: encoder forward {forward['images_per_s']:.0f} images/s; actor (copies + encode) "
          f"{actor['actor_images_per_s']:.0f} -> ratio {result['ratio_actor_to_forward']:.2f}; decode "
          f"{actor['decode_images_per_s_one_process']:.0f} images/s per CPU process -> "
          f"{result['decoding_processes_per_device']:.1f} processes to feed it")
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", help="preset whose model.vision is the encoder")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--source-px", type=int, default=256, help="side of the JPEGs in the shards")
    parser.add_argument("--per-shard", type=int, default=128, help="samples per input shard")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--no-ray", action="store_true", help="one actor's work on this device, without Ray")
    args = parser.parse_args()
    for name, value in {"RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled"}.items():
        os.environ.setdefault(name, value)

    architecture = dataclasses.replace(resolve(EmuConfig, "model", args.preset), lm=LMConfig())
    config = dataclasses.replace(resolve(PrecomputeConfig, "precompute", args.preset),
                                 batch_size=args.batch_size, image_size=0, latents=False, gpus_per_actor=0,
                                 actors=1, dtype="float32")
    sides = list(config.sides) or sorted({architecture.image_tokens_side, architecture.video_tokens_side})
    config = dataclasses.replace(config, sides=sides)
    if args.no_ray:
        no_ray(args, architecture, config, sides)
        return
    with tempfile.TemporaryDirectory(prefix="emu-bench-precompute-") as tmp:
        root = Path(tmp)
        make_data(root / "half", args.images // 2, args.source_px, args.per_shard)
        make_data(root / "data", args.images, args.source_px, args.per_shard)
        tokenizer = train_tokenizer([f"image {i}" for i in range(100)], vocab_size=300)
        torch.manual_seed(0)
        save_model(EmuModel.build(architecture, tokenizer), tokenizer, root / "model")

        threads = max(1, int(config.cpus_per_actor))
        batches = max(2, args.images // config.batch_size)
        baseline = encoder_forward(root / "model", config, sides, threads, batches)
        all_threads = encoder_forward(root / "model", config, sides, torch.get_num_threads(), batches)

        half = run_precompute([root / "half"], str(root / "model"), root / "out-half", config)
        started = time.perf_counter()
        first = run_precompute([root / "data"], str(root / "model"), root / "out", config)
        wall = time.perf_counter() - started
        started = time.perf_counter()
        again = run_precompute([root / "data"], str(root / "model"), root / "out", config)
        rerun = time.perf_counter() - started
        assert again.images_computed == 0 and again.parts_kept == first.parts

    vision = architecture.vision
    marginal = (first.images_computed - half.images_computed) / (first.compute_seconds - half.compute_seconds)
    result = {
        "benchmark": "precompute: Ray Data job vs bare encoder forward (same encoder, batch, threads per process)",
        "device": "cpu", "cpus": os.cpu_count(), "platform": platform.platform(),
        "encoder": {"preset": args.preset, "image_size": vision.image_size, "patch_size": vision.patch_size,
                    "width": vision.width, "layers": vision.layers, "sides": sides},
        "images": args.images, "batch_size": config.batch_size, "actors": 1, "source_px": args.source_px,
        "shards": first.parts,
        "encoder_forward": baseline,
        "encoder_forward_all_threads": all_threads,
        "ray_job": {"images_per_s": round(first.images_per_s, 2), "compute_seconds": round(first.compute_seconds, 3),
                    "half_images": half.images_computed, "half_compute_seconds": round(half.compute_seconds, 3),
                    "marginal_images_per_s": round(marginal, 2),
                    "run_seconds": round(first.seconds, 3), "wall_seconds_with_ray_start": round(wall, 3),
                    "images_per_s_with_ray_start": round(first.images_computed / wall, 2)},
        "rerun_unchanged_seconds": round(rerun, 3),
        "ratio_job_to_forward": round(first.images_per_s / baseline["images_per_s"], 3),
        "ratio_job_marginal_to_forward": round(marginal / baseline["images_per_s"], 3),
        "ratio_job_with_ray_start_to_forward": round(first.images_computed / wall / baseline["images_per_s"], 3),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"encoder forward ({threads} thread(s), batch {config.batch_size}): {baseline['images_per_s']:.1f} images/s "
          f"({all_threads['images_per_s']:.1f} with {all_threads['threads']} threads)")
    print(f"Ray job end to end ({args.images} {args.source_px}px JPEGs, {first.parts} shards, 1 actor): "
          f"{first.images_per_s:.1f} images/s; with Ray start {result['ray_job']['images_per_s_with_ray_start']:.1f}")
    print(f"  marginal (N/2 -> N images, fixed costs cancel): {marginal:.1f} images/s")
    print(f"ratio job / forward: {result['ratio_job_to_forward']:.3f}; marginal "
          f"{result['ratio_job_marginal_to_forward']:.3f}; "
          f"with Ray start: {result['ratio_job_with_ray_start_to_forward']:.3f}; "
          f"re-run on unchanged data: {rerun:.1f} s")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
