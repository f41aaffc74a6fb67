"""The paper's scores (percentages in [0, 100]) and retained-quality distances. Plain arithmetic, no model."""

from __future__ import annotations

import numpy as np


def harmonic_object(acc_e: float, acc_s: float, acc_g: float) -> float:
    """H_o = 3 / (1/(100 - Acc_e) + 1/Acc_s + 1/(100 - Acc_g)); 0 when any term is 0."""
    terms = (100.0 - acc_e, acc_s, 100.0 - acc_g)
    if min(terms) <= 0:
        return 0.0
    return 3.0 / sum(1.0 / t for t in terms)


def harmonic_celebrity(acc_e: float, acc_retained: float) -> float:
    """H_c = 2 / (1/(100 - Acc_e) + 1/Acc_retained)."""
    terms = (100.0 - acc_e, acc_retained)
    if min(terms) <= 0:
        return 0.0
    return 2.0 / sum(1.0 / t for t in terms)


def artist_gap(clip_e: float, clip_s: float) -> float:
    """H_a = CLIP_s - CLIP_e: how much closer retained artists' images stay to their prompts than erased ones'."""
    return clip_s - clip_e


def accuracy(predicted: list[str], target: str) -> float:
    """Percentage of predictions equal to ``target``."""
    return 100.0 * sum(p == target for p in predicted) / max(1, len(predicted))


# ------------------------------------------------------------------------------------------------
# retained quality: arithmetic on embeddings/features (the models that produce them: quality.py)


def clip_score_from_embeddings(image_emb: np.ndarray, text_emb: np.ndarray) -> float:
    """CLIP score: mean over pairs of 100 * max(cos(image_i, text_i), 0).

    image_emb, text_emb: [N, D] (row i of each is one image and its own prompt; they need not be
    normalised). Returns a number in [0, 100]; 0 for N = 0.
    """
    a = np.asarray(image_emb, dtype=np.float64)
    b = np.asarray(text_emb, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"expected two [N, D] arrays of one shape, got {a.shape} and {b.shape}")
    if len(a) == 0:
        return 0.0
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(np.mean(100.0 * np.maximum(cos, 0.0)))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, N-1) of features [N, D], N >= 2, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"expected features [N, D] with N >= 2, got {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def _sqrtm_product(s1: np.ndarray, s2: np.ndarray) -> np.ndarray:
    """A square root of s1 @ s2 [D, D] for PSD s1, s2 [D, D].

    scipy.linalg.sqrtm when scipy is there (the reference FID code uses it). Without scipy:
    sqrt(s1 s2) is similar to sqrt(s1)^(1/2) s2 s1^(1/2) (a symmetric PSD matrix), and only its
    trace enters the distance, so the trace of the symmetric root is exact.
    """
    try:
        from scipy import linalg
    except ImportError:
        w, v = np.linalg.eigh(s1)
        r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
        w2, v2 = np.linalg.eigh(r1 @ s2 @ r1)
        return (v2 * np.sqrt(np.clip(w2, 0, None))) @ v2.T
    root = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(root).all():
        # singular product (fewer samples than dimensions): regularise as pytorch-fid does
        eps = 1e-6 * np.eye(len(s1))
        root = linalg.sqrtm((s1 + eps) @ (s2 + eps))
    return root.real  # tiny imaginary parts are round-off


def frechet_from_stats(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2): mu [D], sigma [D, D].

    d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)); clipped at 0 (round-off).
    """
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(_sqrtm_product(s1, s2))
    return float(max(d, 0.0))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID-style distance between two feature sets [N, D] and [M, D] (Gaussian fit of each).

    Only comparable between runs that use the same feature extractor and similar set sizes
    (the estimate is biased upward for small N).
    """
    return frechet_from_stats(*gaussian_stats(features_a), *gaussian_stats(features_b))
