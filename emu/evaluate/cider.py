"""CIDEr-D exactly as pycocoevalcap computes it, and COCO caption prediction scoring.

Reference: pycocoevalcap 1.2, `cider/cider.py` + `cider/cider_scorer.py` (Vedantam, Zitnick,
Parikh, "CIDEr: Consensus-based Image Description Evaluation", arXiv 1411.5726). Its `Cider` class
is CIDEr-D, the variant the COCO server reports: the scorer carries the two "vrama91" changes
that define CIDEr-D (clipping of candidate n-gram weights by the reference's, and a Gaussian
length penalty with sigma 6), there is no stemming, and the score is multiplied by 10. The
COCOEvalCap pipeline (pycocoevalcap/eval.py) calls `Cider()` with its defaults n=4, sigma=6.

What the scorer computes, quoted from cider_scorer.py and reproduced here step for step:
- n-grams n = 1..4 of `s.split()` (any whitespace);
- document frequency: per evaluated image, the SET of n-grams over all its references counts once
  ("for ngram in set([ngram for ref in refs ...]): self.document_frequency[ngram] += 1"), so
  idf is over the images being scored, not over COCO;
- `self.ref_len = np.log(float(len(self.crefs)))` (log of the number of images) and the weight of
  an n-gram with term frequency tf is `tf * (ref_len - log(max(1.0, df)))`; candidate n-grams that
  no reference has get df 1 (weight tf * log N);
- per n, similarity `sum(min(vec_hyp, vec_ref) * vec_ref) / (norm_hyp * norm_ref)` (the division
  is skipped when either norm is 0), times `e ** (-(delta ** 2) / (2 * sigma ** 2))`;
- QUIRK: `delta = length_hyp - length_ref` where `length` counts BIGRAMS (`if n == 1: length +=
  term_freq` with n the 0-based n-gram index), i.e. max(words - 1, 0), not words;
- per image: mean over n of the similarities summed over references, divided by the number of
  references, times 10; the corpus score is the mean over images.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from emu.errors import ConfigError
from emu.evaluate import EvaluationError
from emu.evaluate._io import JsonInput, describe, id_sample, load_json, require_int, require_str

__all__ = ["CiderResult", "cider_d", "score_captions"]

Ngram = tuple[str, ...]


@dataclass(frozen=True)
class CiderResult:
    """The corpus CIDEr-D (pycocoevalcap units: ~1.2 for a strong model; papers print x100) and
    each image's score, in the order of the input."""

    score: float
    per_image: dict[Hashable, float]


def _precook(sentence: str, n: int) -> dict[Ngram, int]:
    # cider_scorer.precook: "words = s.split()", counts of every k-gram, k = 1..n.
    words = sentence.split()
    counts: dict[Ngram, int] = defaultdict(int)
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, Sequence[str] | str],
            *, n: int = 4, sigma: float = 6.0) -> CiderResult:
    """CIDEr-D of tokenised captions: `gts[image] = [reference, ...]`, `res[image] = [candidate]`
    (or the candidate string), the same keys on both sides, as `pycocoevalcap Cider.compute_score`
    takes them."""
    if n < 1 or sigma <= 0:
        raise ConfigError(f"CIDEr-D needs n >= 1 and sigma > 0, got n={n}, sigma={sigma}")
    if set(gts) != set(res):
        # Cider.compute_score: "assert(gts.keys() == res.keys())"
        raise EvaluationError(f"CIDEr-D: references and candidates must cover the same images "
                              f"({len(set(gts) - set(res))} without candidate, {len(set(res) - set(gts))} without references)")
    if not gts:
        raise EvaluationError("CIDEr-D of zero images is undefined")
    images = list(gts)
    crefs: list[list[dict[Ngram, int]]] = []
    ctest: list[dict[Ngram, int]] = []
    for image in images:
        hypo = res[image]
        if not isinstance(hypo, str):
            if len(hypo) != 1:  # Cider.compute_score: "assert(len(hypo) == 1)"
                raise EvaluationError(f"CIDEr-D: image {image!r} has {len(hypo)} candidates, expected exactly 1")
            hypo = hypo[0]
        refs = gts[image]
        if isinstance(refs, str) or len(refs) == 0:  # "assert(len(ref) > 0)"
            raise EvaluationError(f"CIDEr-D: image {image!r} needs a non-empty list of references")
        crefs.append([_precook(ref, n) for ref in refs])
        ctest.append(_precook(hypo, n))

    # compute_doc_freq: each image's references count an n-gram once.
    document_frequency: dict[Ngram, float] = defaultdict(float)
    for refs in crefs:
        for ngram in {ngram for ref in refs for ngram in ref}:
            document_frequency[ngram] += 1
    ref_len = math.log(float(len(crefs)))

    def counts2vec(counts: dict[Ngram, int]) -> tuple[list[dict[Ngram, float]], list[float], int]:
        vec: list[dict[Ngram, float]] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for ngram, term_freq in counts.items():
            df = math.log(max(1.0, document_frequency.get(ngram, 0.0)))
            k = len(ngram) - 1
            vec[k][ngram] = float(term_freq) * (ref_len - df)
            norm[k] += vec[k][ngram] ** 2
            if k == 1:  # sic: bigram count, see the module docstring
                length += term_freq
        return vec, [math.sqrt(x) for x in norm], length

    penalty_denominator = 2 * sigma ** 2

    def sim(vec_hyp, vec_ref, norm_hyp, norm_ref, length_hyp, length_ref) -> list[float]:
        delta = float(length_hyp - length_ref)
        penalty = math.e ** (-(delta ** 2) / penalty_denominator)
        val = [0.0] * n
        for k in range(n):
            ref_k = vec_ref[k]
            for ngram, weight in vec_hyp[k].items():
                ref_weight = ref_k.get(ngram, 0.0)
                val[k] += min(weight, ref_weight) * ref_weight  # "vrama91 : added clipping"
            if norm_hyp[k] != 0 and norm_ref[k] != 0:
                val[k] /= norm_hyp[k] * norm_ref[k]
            val[k] *= penalty  # "vrama91: added a length based gaussian penalty"
        return val

    per_image: dict[Hashable, float] = {}
    for image, test, refs in zip(images, ctest, crefs):
        vec, norm, length = counts2vec(test)
        score = [0.0] * n
        for ref in refs:
            vec_ref, norm_ref, length_ref = counts2vec(ref)
            for k, value in enumerate(sim(vec, vec_ref, norm, norm_ref, length, length_ref)):
                score[k] += value
        # "mean of ngram scores, instead of sum", "divide by number of references", "multiply by 10"
        per_image[image] = sum(score) / n / len(refs) * 10.0
    import numpy as np  # compute_score: "np.mean(np.array(score))" (pairwise summation)

    return CiderResult(score=float(np.mean(np.array(list(per_image.values())))), per_image=per_image)


# ----------------------------------------------------------------------------------------------
# COCO caption files


def score_captions(annotations_json: JsonInput, predictions: JsonInput, *, allow_missing: bool = False,
                   tokenizer: Literal["python", "java"] = "python", per_image: bool = False) -> dict[str, Any]:
    """CIDEr-D of caption predictions against COCO caption annotations.

    `annotations_json`: a COCO captions file (`{"images": [...], "annotations": [{"image_id",
    "caption"}, ...]}`) or its parsed object. `predictions`: the COCO results format
    `[{"image_id": int, "caption": str}, ...]` (path or list).

    Every image that has reference captions must have exactly one prediction; a missing one is
    an EvaluationError unless `allow_missing` (then only predicted images are scored and the
    count left out is reported). Duplicate predictions and predictions for images without
    references are always errors (pycocoevalcap asserts both).

    Tokenisation: both sides go through pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1
    `PTBTokenizer -preserveLines -lowerCase`, then its PUNCTUATIONS removed), references and
    predictions in two separate batches in the order COCOEvalCap uses (annotation-file image
    order, each image's captions in file order). `tokenizer="python"` (default) uses
    emu.evaluate.ptb, a Java-free re-implementation (see that module for the documented
    differences, none of which affects ordinary English captions); `tokenizer="java"` runs
    pycocoevalcap's own tokenizer (needs `pip install pycocoevalcap` and `java`).

    Returns `{"bench", "metric", "cider", "cider_x100", "n_images", "n_references",
    "n_predictions", "n_missing", "tokenizer"}` (+ `"per_image"` when asked).
    """
    annotations = load_json(annotations_json, "COCO captions annotations")
    results = load_json(predictions, "caption predictions")
    refs_by_image, image_order = _coco_references(annotations, describe(annotations_json))
    preds = _caption_predictions(results, refs_by_image, describe(predictions))

    missing = [image for image in image_order if image not in preds]
    if missing and not allow_missing:
        raise EvaluationError(
            f"{len(missing)} of {len(image_order)} annotated images have no caption prediction "
            f"(image ids {id_sample(missing)}); predict every image or pass allow_missing "
            f"(--allow-missing) to score only the {len(preds)} predicted ones")
    images = [image for image in image_order if image in preds]
    if not images:
        raise EvaluationError("no caption predictions to score")

    gts = {image: refs_by_image[image] for image in images}
    res = {image: [preds[image]] for image in images}
    if tokenizer == "python":
        from emu.evaluate.ptb import tokenize_captions
        gts_tok, res_tok = tokenize_captions(gts), tokenize_captions(res)
    elif tokenizer == "java":
        gts_tok, res_tok = _java_tokenize(gts), _java_tokenize(res)
    else:
        raise ConfigError(f"tokenizer must be 'python' or 'java', got {tokenizer!r}")
    result = cider_d(gts_tok, res_tok)
    out: dict[str, Any] = {
        "bench": "coco-captions",
        "metric": "CIDEr-D (pycocoevalcap 1.2 Cider)",
        "cider": result.score,
        "cider_x100": result.score * 100.0,
        "n_images": len(images),
        "n_references": sum(len(gts[image]) for image in images),
        "n_predictions": len(preds),
        "n_missing": len(missing),
        "tokenizer": "emu.evaluate.ptb (Python PTBTokenizer)" if tokenizer == "python"
                     else "pycocoevalcap PTBTokenizer (Stanford CoreNLP 3.4.1, Java)",
    }
    if missing:
        out["missing_image_ids"] = missing
    if per_image:
        out["per_image"] = {str(image): score for image, score in result.per_image.items()}
    return out


def _coco_references(annotations: Any, source: str) -> tuple[dict[int, list[str]], list[int]]:
    """Captions per image, and images in COCOEvalCap's order: the `images` list first (that is
    `coco.getImgIds()`), then any other annotated image in order of first caption."""
    if not isinstance(annotations, Mapping) or not isinstance(annotations.get("annotations"), list):
        raise EvaluationError(f"{source}: a COCO captions file is an object with an \"annotations\" list")
    refs: dict[int, list[str]] = {}
    for i, ann in enumerate(annotations["annotations"]):
        if not isinstance(ann, Mapping):
            raise EvaluationError(f"{source}: annotations[{i}] must be an object")
        image = require_int(ann.get("image_id"), f"{source}: annotations[{i}].image_id")
        refs.setdefault(image, []).append(require_str(ann.get("caption"), f"{source}: annotations[{i}].caption"))
    if not refs:
        raise EvaluationError(f"{source}: no caption annotations")
    order: list[int] = []
    seen: set[int] = set()
    for img in annotations.get("images") or []:
        image = img.get("id") if isinstance(img, Mapping) else None
        if image in refs and image not in seen:
            order.append(image)
            seen.add(image)
    order += [image for image in refs if image not in seen]
    return refs, order


def _caption_predictions(results: Any, refs: Mapping[int, list[str]], source: str) -> dict[int, str]:
    if not isinstance(results, list):
        raise EvaluationError(f"{source}: caption predictions are a JSON list of "
                              f"{{\"image_id\": int, \"caption\": str}}, got {type(results).__name__}")
    preds: dict[int, str] = {}
    duplicates: list[int] = []
    unknown: list[int] = []
    for i, row in enumerate(results):
        if not isinstance(row, Mapping):
            raise EvaluationError(f"{source}: predictions[{i}] must be an object with image_id and caption")
        image = require_int(row.get("image_id"), f"{source}: predictions[{i}].image_id")
        caption = require_str(row.get("caption"), f"{source}: predictions[{i}].caption")
        if image in preds:
            duplicates.append(image)
        elif image not in refs:
            unknown.append(image)
        preds[image] = caption
    if duplicates:
        raise EvaluationError(f"{source}: {len(duplicates)} images have more than one caption prediction "
                              f"(image ids {id_sample(duplicates)}); COCO scores exactly one per image")
    if unknown:
        raise EvaluationError(f"{source}: {len(unknown)} predictions are for images without reference "
                              f"captions (image ids {id_sample(unknown)})")
    return preds


def _java_tokenize(captions: Mapping[int, list[str]]) -> dict[int, list[str]]:
    """pycocoevalcap's own PTBTokenizer (Java)."""
    import shutil

    if shutil.which("java") is None:
        raise ConfigError("tokenizer 'java' needs a `java` executable on PATH")
    try:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError:
        raise ConfigError("tokenizer 'java' needs pycocoevalcap (pip install pycocoevalcap==1.2)") from None
    return PTBTokenizer().tokenize({image: [{"caption": c} for c in caps] for image, caps in captions.items()})
