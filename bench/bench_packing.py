"""Sequence packing on the synthetic stage-2 mixture: tokens/s and padding fraction, packed vs
one sequence per row, in the same run, same model, same batches.

    .venv/bin/python bench/bench_packing.py [--steps 8] [--max-len 512] [--micro-rows 4]

Writes bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
from _world import synthetic_mixture

from emu.config import resolve
from emu.data.sequence import SequenceBuilder, SequenceRules
from emu.data.tokenizer import train_tokenizer
from emu.model.config import EmuConfig
from emu.model.emu import EmuModel
from emu.train.config import RuntimeConfig, Stage2Config
from emu.train.data import build_mixture
from emu.train.engine import Engine, init_distributed, shutdown_distributed
from emu.train.lm_step import LMBatcher, LMStep

def measure(model, tokenizer, data, batch_sizes, steps, max_len, micro_rows, packing) -> dict:
    engine = Engine(model, [{"name": "all", "lr": 1e-4, "params": list(model.parameters())}],
                    RuntimeConfig(micro_batch_size=micro_rows), Stage2Config().optimizer, lambda s: 1.0)
    rules = SequenceRules(mode="pretrain", image_tokens=model.config.tokens_per_image(),
                          frame_tokens=model.config.tokens_per_image(model.config.video_tokens_side), max_len=max_len)
    batcher = LMBatcher(SequenceBuilder(tokenizer, rules), max_len=max_len, packing=packing, micro_rows=micro_rows,
                        pad_id=tokenizer.pad_token_id, seed=0, vision=model.visual.config,
                        attn_implementation=model.config.lm.attn_implementation, mask_dtype=torch.float32)
    step = LMStep(engine=engine, batcher=batcher, world=1)
    mixture = build_mixture(data, batch_sizes, seed=0)
    batches = [batcher.prepare(mixture.next_batch(), i) for i in range(steps + 1)]  # inputs outside the timing
    step(batches[0], 0)  # warm-up
    engine.step()
    tokens = padding = 0
    started = time.perf_counter()
    for i, prepared in enumerate(batches[1:], start=1):
        result = step(prepared, i)
        engine.step()
        tokens += result.tokens
        padding += result.padding
    seconds = time.perf_counter() - started
    return {"tokens_per_s": tokens / seconds, "padding_fraction": padding / (tokens + padding),
            "real_tokens": tokens, "padding_tokens": padding, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-len", type=int, default=512)
    parser.add_argument("--micro-rows", type=int, default=4)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "packing.json")
    args = parser.parse_args()
    init_distributed()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = synthetic_mixture(root)
        batch_sizes = {"image_text": 16, "video_text": 4, "interleaved": 4, "video_interleaved": 4, "grounded": 8,
                       "text": 4}
        architecture = resolve(EmuConfig, "model", "tiny")
        tokenizer = train_tokenizer(["a red circle at the top left and a blue square"] * 50, 600)
        results = {}
        for packing in (False, True):
            torch.manual_seed(0)
            model = EmuModel.build(architecture, tokenizer)
            results["packed" if packing else "unpacked"] = measure(
                model, tokenizer, data, batch_sizes, args.steps, args.max_len, args.micro_rows, packing)
    shutdown_distributed()
    packed, unpacked = results["packed"], results["unpacked"]
    record = {"benchmark": "packing on the synthetic stage-2 mixture (tiny model, CPU)",
              "device": platform.processor() or "cpu", "threads": torch.get_num_threads(), "steps": args.steps,
              "max_len": args.max_len, "micro_rows": args.micro_rows, **results,
              "tokens_per_s_ratio": packed["tokens_per_s"] / unpacked["tokens_per_s"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"unpacked: {unpacked['tokens_per_s']:.0f} tokens/s, padding {unpacked['padding_fraction']:.1%}; "
          f"packed: {packed['tokens_per_s']:.0f} tokens/s, padding {packed['padding_fraction']:.1%}; "
          f"packing is {record['tokens_per_s_ratio']:.2f}x the throughput")


if __name__ == "__main__":
    main()
