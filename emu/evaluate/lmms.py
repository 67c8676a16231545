"""Evaluation results in lmms-eval's file layout, so users of that harness can read and compare them.

lmms-eval (and lm-evaluation-harness, whose output it keeps) writes, per run:

  results.json            {"results": {task: {"alias": task, "<metric>,<filter>": value, ...}},
                           "configs": {task: {...}}, "versions": {task: ...}, "n-shot": {task: k},
                           "n-samples": {task: {"original": N, "effective": N}}, "config": {...},
                           "date": ...}
  samples_<task>.jsonl    one line per document: {"doc_id", "doc", "target", "arguments" / input,
                           "resps", "filtered_resps", and each metric's per-document score}

Our metrics take lmms-eval's "none" filter (the answer as generated, after emu.evaluate.harness's
first-line cut). Few-shot VQA is its own task (`vqav2_4shot`), as lmms-eval names variants.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

#: Version of our task definitions (prompts, normalisation); lmms-eval records one per task.
TASK_VERSION = 1
FILTER = "none"


def write_results(out: Path, results: dict[str, dict[str, Any]], samples: dict[str, list[dict[str, Any]]], *,
                  config: dict[str, Any], model: str, decoder: str | None) -> Path:
    """Write `out/results.json` and `out/samples_<task>.jsonl` for every task that logged samples.
    `results` is the harness's per-bench result (bench -> metric -> value); a task named
    `<bench>_<k>shot` takes that bench's `*_<k>shot` metrics."""
    out = Path(out)
    tasks: dict[str, dict[str, Any]] = {}
    n_shot: dict[str, int] = {}
    for bench, result in results.items():
        base = bench.replace("-", "_")
        for task, metrics, shots in _tasks(base, result):
            tasks[task] = {"alias": task, **{f"{name},{FILTER}": value for name, value in metrics.items()}}
            n_shot[task] = shots
    for task, lines in samples.items():
        with open(out / f"samples_{task}.jsonl", "w", encoding="utf-8") as f:
            for line in lines:
                f.write(json.dumps(_finite(line), ensure_ascii=False) + "\n")
    payload = {
        "results": tasks,
        "configs": {task: {"task": task, "output_type": "generate_until", "num_fewshot": n_shot[task],
                           "metric_list": [name.split(",")[0] for name in tasks[task] if name != "alias"]}
                    for task in tasks},
        "versions": {task: TASK_VERSION for task in tasks},
        "n-shot": n_shot,
        "n-samples": {task: {"original": len(samples.get(task, [])), "effective": len(samples.get(task, []))}
                      for task in tasks},
        "config": {"model": "emu", "model_args": f"pretrained={model}" + (f",decoder={decoder}" if decoder else ""),
                   "batch_size": config.get("batch_size"), "limit": config.get("limit") or None,
                   "gen_kwargs": {"max_new_tokens": config.get("max_new_tokens"),
                                  "num_beams": config.get("num_beams")},
                   "random_seed": config.get("seed"), "emu_evaluate": config},
        "date": time.time(),
    }
    path = out / "results.json"
    path.write_text(json.dumps(_finite(payload), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def _tasks(base: str, result: dict[str, Any]):
    """(task, {metric: value}, shots) of one bench: the zero-shot task with every plain numeric
    metric (chance and baselines included: they are this run's references), one task per few-shot k."""
    plain: dict[str, float] = {}
    shots: dict[int, dict[str, float]] = {}
    for name, value in result.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or name == "seconds":
            continue
        head, _, tail = name.rpartition("_")
        if head and tail.endswith("shot") and tail[:-4].isdigit():
            shots.setdefault(int(tail[:-4]), {})[head] = float(value)
        else:
            plain[name] = float(value)
    yield base, plain, 0
    for k, metrics in sorted(shots.items()):
        yield f"{base}_{k}shot", metrics, k


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the files stay strict JSON (lmms-eval readers use json.loads)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
