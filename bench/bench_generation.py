"""Image-embedding generation: KV cache vs recomputing the sequence (the official Emu2 loop).

Both paths generate the same 64 embeddings (tests/unit/test_generation.py checks equality); this
measures how much faster the cached one is, in the same process, on the same model and prompt.

    .venv/bin/python bench/bench_generation.py [--device cpu|cuda] [--hidden 512 --layers 8 --prompt 256]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from emu.data.tokenizer import IMG, train_tokenizer
from emu.model.config import EmuConfig, LMConfig
from emu.model.emu import EmuModel
from emu.model.generation import generate_image_embeddings


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=512, help="prompt length in tokens")
    parser.add_argument("--tokens", type=int, default=64, help="embeddings per image (Emu2: 64)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "generation.json")
    args = parser.parse_args()

    torch.manual_seed(0)
    tok = train_tokenizer(["a red circle at the top left"] * 10, 400)
    config = EmuConfig(lm=LMConfig(hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                   layers=args.layers, heads=max(1, args.hidden // 64), kv_heads=max(1, args.hidden // 64)))
    model = EmuModel.build(config, tok).eval().to(args.device)
    word = tok("a", add_special_tokens=False).input_ids[0]
    ids = torch.tensor([[word] * (args.prompt - 1) + [tok.convert_tokens_to_ids(IMG)]], device=args.device)

    cached = timed(lambda: generate_image_embeddings(model, ids, args.tokens, use_cache=True), args.repeats)
    uncached = timed(lambda: generate_image_embeddings(model, ids, args.tokens, use_cache=False), args.repeats)
    result = {
        "benchmark": "image-embedding generation, KV cache vs full recompute",
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(), "lm_hidden": args.hidden, "lm_layers": args.layers,
        "prompt_tokens": args.prompt, "generated_embeddings": args.tokens,
        "cached_s": round(cached, 4), "uncached_s": round(uncached, 4), "speedup": round(uncached / cached, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"cached {cached:.3f} s, uncached {uncached:.3f} s: KV cache is {uncached / cached:.1f}x faster "
          f"({args.tokens} embeddings after a {args.prompt}-token prompt; {result['device']})")


if __name__ == "__main__":
    main()
