"""Evaluation: exact, reproducible metrics and scoring of prediction files (DESIGN.md, `evaluate`).

No model runs here. The benchmark harness (emu.evaluate.harness, which generates predictions
with a model) calls these functions; `emu evaluate score` runs them on prediction files.

  vqa       official VQAv2 accuracy (vqaEval.py normalisation, leave-one-out min(1, n/3))
  cider     CIDEr-D exactly as pycocoevalcap computes it; `score_captions` for COCO files
  ptb       pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1) in pure Python
  metrics   exact match for video QA, CLIP-T / CLIP-I cosines, FID
  gate      thresholds a model must meet (register step)
  report    KFP metric names, metrics JSON, Markdown / HTML reports

Importing this package imports nothing heavy (numpy, scipy and torch load inside the functions
that need them).
"""

from __future__ import annotations

from emu.errors import EmuError

__all__ = ["EvaluationError"]


class EvaluationError(EmuError):
    """Predictions do not fit the benchmark they are scored against (missing, duplicate or
    unknown ids, wrong types). Never "fixed" silently: every published number must cover the
    whole benchmark or say exactly what it covers."""
