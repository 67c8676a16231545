"""Exact match (video QA), CLIP-T / CLIP-I cosines and FID (Emu2 §3.3, ../notes/emu2_settings.md §5).

The encoders (CLIP-ViT-B for CLIP-T, CLIP-ViT-L for CLIP-I, Inception for FID) are run by the
benchmark harness; these functions take their outputs, so they are exact and testable on CPU.
numpy/scipy/torch are imported inside the functions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from emu.evaluate import EvaluationError

__all__ = ["clip_i", "clip_t", "exact_match", "fid_from_features", "frechet_distance",
           "gaussian_statistics", "normalize_em", "paired_cosine"]

_SPACES = re.compile(r"\s+")


def normalize_em(text: str) -> str:
    """Exact-match normalisation: lower-case, strip, collapse every whitespace run to one space.
    Nothing else (no punctuation or article removal): "a dog." and "a dog" differ."""
    return _SPACES.sub(" ", text.strip().lower())


def exact_match(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> dict[str, Any]:
    """EM accuracy (MSVD-QA, MSRVTT-QA and GQA report EM, Emu2 Table 10): a prediction is right
    when its normalised text equals the normalised reference (or any of several). Returns
    `{"accuracy": percent, "correct", "n"}`."""
    if len(predictions) != len(references):
        raise EvaluationError(f"exact match needs one reference per prediction: "
                              f"{len(predictions)} predictions, {len(references)} references")
    if not predictions:
        raise EvaluationError("exact match over zero predictions is undefined")
    correct = 0
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if not isinstance(pred, str):
            raise EvaluationError(f"prediction {i} must be a string, got {pred!r}")
        options = [ref] if isinstance(ref, str) else list(ref)
        if not options or not all(isinstance(o, str) for o in options):
            raise EvaluationError(f"reference {i} must be a string or a non-empty list of strings, got {ref!r}")
        correct += normalize_em(pred) in {normalize_em(o) for o in options}
    return {"accuracy": 100.0 * correct / len(predictions), "correct": correct, "n": len(predictions)}


# ----------------------------------------------------------------------------------------------
# CLIP scores


def _as_float64_2d(x: Any, name: str):
    import numpy as np

    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu").double().numpy()
    array = np.asarray(x, dtype=np.float64)
    if array.ndim != 2:
        raise EvaluationError(f"{name} must be a 2-D array (N, D), got shape {array.shape}")
    if not np.isfinite(array).all():
        raise EvaluationError(f"{name} holds NaN or infinite values")
    return array


def paired_cosine(a_ND: Any, b_ND: Any, names: tuple[str, str] = ("a", "b")):
    """cos(a_i, b_i) for each row pair, in float64 (numpy array of N). Inputs: torch tensors or
    arrays of shape (N, D); zero vectors have no direction and are an error."""
    import numpy as np

    a = _as_float64_2d(a_ND, names[0])
    b = _as_float64_2d(b_ND, names[1])
    if a.shape != b.shape:
        raise EvaluationError(f"{names[0]} {a.shape} and {names[1]} {b.shape} must have the same shape (N, D)")
    if a.shape[0] == 0:
        raise EvaluationError("cosine similarity of zero pairs is undefined")
    norm_a = np.linalg.norm(a, axis=1)
    norm_b = np.linalg.norm(b, axis=1)
    for name, norm in zip(names, (norm_a, norm_b)):
        if (norm == 0).any():
            raise EvaluationError(f"{name} has zero vectors (rows {np.flatnonzero(norm == 0)[:10].tolist()})")
    return np.einsum("nd,nd->n", a, b) / (norm_a * norm_b)


def _summary(cosines) -> dict[str, Any]:
    return {"mean": float(cosines.mean()), "std": float(cosines.std()), "n": int(cosines.shape[0])}


def clip_t(image_embeds_ND: Any, text_embeds_ND: Any) -> dict[str, Any]:
    """CLIP-T: mean cosine between each generated image's CLIP image embedding and its prompt's
    CLIP text embedding (Emu2 §3.3 uses CLIP-ViT-B; Emu2-Gen: 0.297). Plain cosine, no 2.5x
    rescaling or clipping at 0 as in CLIPScore (Hessel et al.)."""
    return _summary(paired_cosine(image_embeds_ND, text_embeds_ND, ("image_embeds", "text_embeds")))


def clip_i(generated_embeds_ND: Any, reference_embeds_ND: Any) -> dict[str, Any]:
    """CLIP-I: mean cosine between each generated image's CLIP image embedding and its reference
    image's (Emu2 §3.3 uses CLIP-ViT-L; Emu2-Gen: 0.686 on COCO, 0.907 autoencoding, where the
    reference is the image that was encoded and decoded)."""
    return _summary(paired_cosine(generated_embeds_ND, reference_embeds_ND,
                                  ("generated_embeds", "reference_embeds")))


# ----------------------------------------------------------------------------------------------
# FID


def gaussian_statistics(features_ND: Any):
    """Mean and covariance of features, as pytorch-fid computes them
    (`mu = np.mean(act, axis=0)`, `sigma = np.cov(act, rowvar=False)`: unbiased, N - 1)."""
    import numpy as np

    act = _as_float64_2d(features_ND, "features")
    if act.shape[0] < 2:
        raise EvaluationError(f"FID needs at least 2 feature vectors per set, got {act.shape[0]}")
    return np.mean(act, axis=0), np.cov(act, rowvar=False)


def frechet_distance(mu1: Any, sigma1: Any, mu2: Any, sigma2: Any, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)).

    The reference implementation's steps (pytorch-fid `calculate_frechet_distance`, itself from
    the TTUR FID code): `scipy.linalg.sqrtm` of the product; if that is not finite, add `eps` to
    both diagonals and retry; a complex result whose diagonal's imaginary part is within 1e-3 of
    0 is taken as its real part, a larger one is an error ("Imaginary component").
    """
    import numpy as np
    from scipy import linalg

    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape:
        raise EvaluationError(f"FID: mean vectors have different lengths {mu1.shape} and {mu2.shape}")
    if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0], mu1.shape[0]):
        raise EvaluationError(f"FID: covariances {sigma1.shape}, {sigma2.shape} do not fit means of length {mu1.shape[0]}")

    diff = mu1 - mu2
    # "Product might be almost singular"
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    # "Numerical error might give slight imaginary component"
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            m = np.max(np.abs(covmean.imag))
            raise EvaluationError(f"FID: imaginary component {m} in sqrtm(sigma1 sigma2)")
        covmean = covmean.real
    tr_covmean = np.trace(covmean)
    value = float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * tr_covmean)
    if not math.isfinite(value):
        raise EvaluationError(f"FID is not finite ({value})")
    return value


def fid_from_features(features1_ND: Any, features2_ND: Any, eps: float = 1e-6) -> float:
    """FID between two sets of feature vectors (e.g. Inception pool3, 2048-d): their Gaussian
    statistics, then `frechet_distance`. Both sets must have the same dimension."""
    mu1, sigma1 = gaussian_statistics(features1_ND)
    mu2, sigma2 = gaussian_statistics(features2_ND)
    return frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
