"""The Marchenko–Pastur law for any aspect ratio: density, closed-form CDF, quantiles.

Convention: ``ratio`` is y = M/N for X = WᵀW/N with W of shape N×M and iid
entries of variance ``sigma2``. For y ≤ 1 the law is continuous on
[λ₋, λ₊] = [σ²(1−√y)², σ²(1+√y)²]; for y > 1 it carries an atom of mass
1 − 1/y at zero. The library always fits the smaller Gram side, so fits use
y = γ = p/n ≤ 1, but every function here accepts any y > 0.

The CDF uses the antiderivative

    ∫ √((b−x)(x−a))/x dx = R + (a+b)/2·asin((2x−a−b)/(b−a)) − √(ab)·asin(((a+b)x−2ab)/(x(b−a)))

with R = √((b−x)(x−a)), which is exact and equals 1 at and above λ₊ (the
authors' ``MP_CDF`` returned 0 there; see ALGORITHM.md §1.1).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from mp_plugin.errors import ConfigError

__all__ = ["mp_edges", "mp_density", "mp_cdf", "mp_quantile"]


def _check(ratio: float, sigma2: float) -> None:
    if not (np.isfinite(ratio) and ratio > 0):
        raise ConfigError(f"MP ratio must be a positive finite number, got {ratio!r}")
    if not (np.isfinite(sigma2) and sigma2 > 0):
        raise ConfigError(f"MP variance must be a positive finite number, got {sigma2!r}")


def mp_edges(ratio: float, sigma2: float = 1.0) -> tuple[float, float]:
    """Return the support edges (λ₋, λ₊) = σ²(1 ∓ √y)² of the continuous part."""
    _check(ratio, sigma2)
    r = float(np.sqrt(ratio))
    return sigma2 * (1.0 - r) ** 2, sigma2 * (1.0 + r) ** 2


def mp_density(x: np.ndarray | float, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Density of the continuous part of MP(y, σ²) at eigenvalues ``x`` (any shape).

    For y > 1 the continuous part integrates to 1/y (the rest is the atom at 0).
    """
    a, b = mp_edges(ratio, sigma2)
    x = np.asarray(x, dtype=np.float64)
    inside = (x > a) & (x < b) & (x > 0)
    xs = np.where(inside, x, 1.0)
    val = np.sqrt(np.clip((b - xs) * (xs - a), 0.0, None)) / (2.0 * np.pi * ratio * sigma2 * xs)
    return np.where(inside, val, 0.0)


def _antiderivative(x: np.ndarray, a: float, b: float) -> np.ndarray:
    width = b - a
    root = np.sqrt(np.clip((b - x) * (x - a), 0.0, None))
    term1 = 0.5 * (a + b) * np.arcsin(np.clip((2.0 * x - a - b) / width, -1.0, 1.0))
    sqrt_ab = np.sqrt(a * b)
    if sqrt_ab == 0.0:
        return root + term1
    term2 = sqrt_ab * np.arcsin(np.clip(((a + b) * x - 2.0 * a * b) / (x * width), -1.0, 1.0))
    return root + term1 - term2


def mp_cdf(x: np.ndarray | float, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Closed-form CDF of MP(y, σ²) at ``x`` (any shape), including the atom for y > 1.

    Returns 0 below min(0, λ₋), 1 at and above λ₊, for every aspect ratio.
    """
    a, b = mp_edges(ratio, sigma2)
    x = np.asarray(x, dtype=np.float64)
    atom = max(0.0, 1.0 - 1.0 / ratio)
    xc = np.clip(x, a if a > 0 else np.finfo(np.float64).tiny, b)
    start = _antiderivative(np.asarray(max(a, np.finfo(np.float64).tiny)), a, b)
    cont = (_antiderivative(xc, a, b) - start) / (2.0 * np.pi * ratio * sigma2)
    out = np.where(x >= 0, atom, 0.0) + np.where(x > a, cont, 0.0)
    return np.clip(np.where(x >= b, 1.0, out), 0.0, 1.0)


@lru_cache(maxsize=256)
def _quantile_cached(probs: tuple[float, ...], ratio: float) -> np.ndarray:
    q = np.asarray(probs, dtype=np.float64)
    a, b = mp_edges(ratio, 1.0)
    atom = max(0.0, 1.0 - 1.0 / ratio)
    lo = np.full_like(q, a)
    hi = np.full_like(q, b)
    for _ in range(64):  # bisection: 2^-64 of the support, below float64 resolution
        mid = 0.5 * (lo + hi)
        below = mp_cdf(mid, ratio) < q
        lo = np.where(below, mid, lo)
        hi = np.where(below, hi, mid)
    out = 0.5 * (lo + hi)
    return np.where(q <= atom, 0.0, out)


def mp_quantile(prob: np.ndarray | float, ratio: float, sigma2: float = 1.0) -> np.ndarray:
    """Quantile function of MP(y, σ²): the x with F(x) = ``prob`` (vectorised, cached)."""
    _check(ratio, sigma2)
    p = np.asarray(prob, dtype=np.float64)
    if np.any((p < 0) | (p > 1)) or not np.all(np.isfinite(p)):
        raise ConfigError("probabilities must lie in [0, 1]")
    flat = tuple(float(v) for v in p.ravel())
    return sigma2 * _quantile_cached(flat, float(ratio)).reshape(p.shape)
