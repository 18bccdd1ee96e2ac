"""BEMA fit of the Marchenko–Pastur law to a layer's singular values.

For a weight read as p×n (p = min side, n = max side, γ = p/n ≤ 1), the
eigenvalues λ_k = s_k²/n of a noise matrix with entry std σ follow MP(γ, σ²).
BEMA (Ke, Ma & Lin) regresses the central window of sorted eigenvalues on the
unit-variance MP quantiles through the origin, σ̂² = Σ q_k λ_k / Σ q_k², then
places the spike threshold at the Tracy–Widom-corrected edge

    T₊ = σ̂²[(1+√γ)² + t_{1−β}·n^{−2/3}·γ^{−1/6}·(1+√γ)^{4/3}],   σ₊ = √(n·T₊).

Estimators (``estimator=``):

* ``"bema"`` — the authors' version: window quantiles at k/p.
* ``"bema-debiased"`` (default) — midpoint quantiles (k+½)/p, and an
  iteration that accounts for the K detected spikes. A rank-K signal lifts
  each bulk eigenvalue by at most K rank positions (eigenvalue interlacing),
  so bulk index k is matched to the noise quantile (k + ½ + K/2·(k+½)/(p−K))/p
  over the window of the p−K bulk eigenvalues. Plain BEMA reads spiked bulks
  ~0.5–2 % high; this removes that bias (see ``tests/test_spectrum.py``).

``edge_compat="authors"`` reproduces the authors' ``(1+√γ)**4/3`` typo
(ALGORITHM.md §1.2); the default uses the correct exponent 4/3.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Literal

import numpy as np
import torch

from mp_plugin.errors import ConfigError, InvalidWeightError, SpectrumFitError
from mp_plugin.spectrum.eigen import as_matrix, resolve_gram_dtype, squared_singular_values
from mp_plugin.spectrum.mp_law import mp_cdf, mp_quantile
from mp_plugin.spectrum.tracy_widom import tracy_widom_quantile

__all__ = ["SpectralFit", "fit_marchenko_pastur", "fit_many", "fit_from_eigenvalues", "float32_sigma_error"]

Estimator = Literal["bema", "bema-debiased"]
EdgeCompat = Literal["correct", "authors"]


@dataclass
class SpectralFit:
    """Result of an MP fit on one weight matrix.

    Attributes:
        shape: (rows, cols) of the 2-D view (out, in·kh·kw) that was fitted: all-zero rows
            and columns (dead units, channels pruned whole) are left out, since they add
            exact-zero singular values that are no part of the MP bulk.
        sigma: fitted entry standard deviation σ̂ (weight units).
        sigma_plus: singular-value spike threshold σ₊ = √(n·T₊) (weight units).
        lambda_plus: asymptotic eigenvalue edge σ̂²(1+√γ)² of λ = s²/n.
        threshold: TW-corrected eigenvalue threshold T₊ (same units as lambda_plus).
        n_spikes: number of singular values above σ₊.
        bulk_fraction: fraction of singular values ≤ σ₊.
        fit_error: sup-CDF gap μ between the MP law and the window's empirical CDF.
        stable_rank: Σs²/s₁² (dimensionless).
        hill_alpha: Hill tail exponent of the eigenvalues (top k=20), NaN if undefined.
        spike_energy_fraction: Σ_{spikes} s² / Σ s².
        gamma: aspect ratio p/n ≤ 1.
        singular_values: all singular values, descending (numpy float64).
        degenerate: True when σ̂ = 0 (all-zero or very low-rank matrix).
        gram_dtype: ``"float32"`` or ``"float64"``, the precision the eigenvalues were computed in.
    """

    shape: tuple[int, int]
    sigma: float
    sigma_plus: float
    lambda_plus: float
    threshold: float
    n_spikes: int
    bulk_fraction: float
    fit_error: float
    stable_rank: float
    hill_alpha: float
    spike_energy_fraction: float
    gamma: float
    alpha: float
    beta: float
    estimator: str
    degenerate: bool = False
    gram_dtype: str = "float64"
    singular_values: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)

    def to_dict(self, with_singular_values: bool = False) -> dict:
        """JSON-ready dict (NaN becomes None); singular values only on request."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        sv = d.pop("singular_values")
        if with_singular_values:
            d["singular_values"] = [float(v) for v in sv]
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict) -> SpectralFit:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["singular_values"] = np.asarray(d.pop("singular_values", []), dtype=np.float64)
        for key in ("hill_alpha", "fit_error"):
            if d.get(key) is None:
                d[key] = float("nan")
        return cls(**d)


def _hill_alpha(eig_desc: np.ndarray, k: int = 20) -> float:
    k = min(k, len(eig_desc) - 1)
    if k < 1 or eig_desc[k] <= 0:
        return float("nan")
    gaps = np.log(eig_desc[:k]) - np.log(eig_desc[k])
    mean_gap = float(gaps.mean())
    return float("nan") if mean_gap <= 0 else 1.0 + 1.0 / mean_gap


def _tw_term(n: int, gamma: float, beta: float, edge_compat: EdgeCompat) -> float:
    rg = math.sqrt(gamma)
    scale = (1.0 + rg) ** 4 / 3.0 if edge_compat == "authors" else (1.0 + rg) ** (4.0 / 3.0)
    return tracy_widom_quantile(1.0 - beta) * n ** (-2.0 / 3.0) * gamma ** (-1.0 / 6.0) * scale


def check_fit_options(alpha: float, beta: float, estimator: str, edge_compat: str) -> None:
    """Raise :class:`~mp_plugin.errors.ConfigError` unless the fit options are valid.

    alpha ∈ [0, 0.5), beta ∈ (0, 1) (real numbers, not bool), estimator ∈
    {"bema", "bema-debiased"}, edge_compat ∈ {"correct", "authors"}.
    """
    for name, value in (("alpha", alpha), ("beta", beta)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise ConfigError(f"{name} must be a real number, got {value!r}")
    if not 0.0 <= alpha < 0.5:
        raise ConfigError(f"alpha must lie in [0, 0.5), got {alpha}")
    if not 0.0 < beta < 1.0:
        raise ConfigError(f"beta must lie in (0, 1), got {beta}")
    if estimator not in ("bema", "bema-debiased"):
        raise ConfigError(f"unknown estimator {estimator!r}: use 'bema' or 'bema-debiased'")
    if edge_compat not in ("correct", "authors"):
        raise ConfigError(f"unknown edge_compat {edge_compat!r}: use 'correct' or 'authors'")


_SAFE_EXPONENT = 30  # |W| within 2^±30 forms a Gram product far from float32 overflow or underflow


def _power_of_two_scaled(mat: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(mat / 2^e, e) with 2^e near max|mat| when that is beyond 2^±30, else (mat, 0).

    Dividing by a power of two is exact in binary floating point, so an MP fit of
    the scaled matrix, scaled back by :func:`_rescale`, is the fit of ``mat``.
    """
    peak = float(mat.detach().abs().max().to(torch.float64))
    if peak == 0.0:
        return mat, 0
    exp = math.frexp(peak)[1]
    if abs(exp) <= _SAFE_EXPONENT:
        return mat, 0
    wide = mat.detach().to(torch.float64)
    half = exp // 2  # two steps: 2^-e alone can overflow for subnormal peaks
    return torch.ldexp(torch.ldexp(wide, torch.tensor(float(-half))), torch.tensor(float(half - exp))), exp


def _rescale(fit: SpectralFit, exp: int) -> SpectralFit:
    """``fit`` of W/2^e turned into the fit of W: σ-like fields × 2^e, eigenvalue-like × 4^e."""
    if exp == 0:
        return fit
    with np.errstate(over="ignore", under="ignore"):
        fit.sigma = float(np.ldexp(fit.sigma, exp))
        fit.sigma_plus = float(np.ldexp(fit.sigma_plus, exp))
        fit.lambda_plus = float(np.ldexp(fit.lambda_plus, 2 * exp))
        fit.threshold = float(np.ldexp(fit.threshold, 2 * exp))
        fit.singular_values = np.ldexp(fit.singular_values, exp)
    if not all(math.isfinite(v) for v in (fit.lambda_plus, fit.threshold)):
        raise InvalidWeightError(
            f"weight entries up to ~1e{exp * math.log10(2):.0f} make the eigenvalues s²/n overflow float64 "
            "(fitting needs |W| below ~1e150): rescale the weight before fitting"
        )
    return fit


def fit_from_eigenvalues(
    eigs: np.ndarray | torch.Tensor,
    shape: tuple[int, int],
    alpha: float = 0.25,
    beta: float = 0.8,
    estimator: Estimator = "bema-debiased",
    edge_compat: EdgeCompat = "correct",
    max_iter: int = 10,
    zero_tol: float = 1e-12,
) -> SpectralFit:
    """Fit MP to precomputed squared singular values ``eigs`` (length p, any order).

    Args:
        eigs: the p = min(shape) squared singular values s² of the matrix.
        shape: (rows, cols) of the matrix.
        alpha: trimmed fraction on each side of the BEMA window, in [0, 0.5).
        beta: TW confidence; the threshold uses the (1−β)-quantile of TW₁.
        estimator: ``"bema-debiased"`` (default) or the authors' ``"bema"``.
        edge_compat: ``"correct"`` exponent 4/3, or the authors' ``"authors"`` typo.
        max_iter: iterations of the spike-count fixed point (debiased only).
        zero_tol: eigenvalues below ``zero_tol``·λ_max count as exact zeros.
    """
    check_fit_options(alpha, beta, estimator, edge_compat)
    sq = np.sort(np.asarray(eigs, dtype=np.float64))
    if not np.isfinite(sq).all():
        raise InvalidWeightError("eigenvalues are NaN or infinite: the weight's s² overflow float64")
    if len(sq) and sq[-1] > 0:  # round-off of the Gram product: exact zeros come out as ~1e-16·λ_max
        sq = np.where(sq < sq[-1] * zero_tol, 0.0, sq)
    rows, cols = int(shape[0]), int(shape[1])
    p, n = min(rows, cols), max(rows, cols)
    if len(sq) != p:
        raise ConfigError(f"expected {p} eigenvalues for shape {shape}, got {len(sq)}")
    if p < 2:
        raise SpectrumFitError(f"a {rows}×{cols} matrix has a single singular value: the MP law cannot be fitted")
    gamma = p / n
    lam = sq / n
    tw = _tw_term(n, gamma, beta, edge_compat)
    debias = estimator == "bema-debiased"
    offset = 0.5 if debias else 0.0
    n_spk = 0
    sigma2 = 0.0
    probs = np.zeros(0)
    window = np.zeros(0)
    for _ in range(max_iter if debias else 1):
        bulk = p - n_spk
        lo, hi = int(math.floor(alpha * bulk)), int(math.floor((1.0 - alpha) * bulk))
        if hi - lo < 8:
            lo, hi = 0, bulk
        k = np.arange(lo, hi, dtype=np.float64)
        probs = (k + offset) / bulk
        if debias:
            probs = (k + offset + 0.5 * n_spk * (k + offset) / bulk) / p
        probs = np.clip(probs, 1e-12, 1.0 - 1e-12)
        q = mp_quantile(probs, gamma)
        window = lam[lo:hi]
        denom = float(q @ q)
        sigma2 = float(q @ window) / denom if denom > 0 else 0.0
        threshold = sigma2 * ((1.0 + math.sqrt(gamma)) ** 2 + tw)
        new_spk = int(np.count_nonzero(lam > threshold)) if sigma2 > 0 else int(np.count_nonzero(lam > 0))
        new_spk = min(new_spk, p - 2)
        if new_spk == n_spk:
            break
        n_spk = new_spk
    s_desc = np.sqrt(sq[::-1])
    total = float(sq.sum())
    stable_rank = total / float(sq[-1]) if sq[-1] > 0 else 0.0
    hill = _hill_alpha(sq[::-1])
    if sigma2 <= 0.0:
        spikes = int(np.count_nonzero(sq > 0))
        return SpectralFit(
            shape=(rows, cols),
            sigma=0.0,
            sigma_plus=0.0,
            lambda_plus=0.0,
            threshold=0.0,
            n_spikes=spikes,
            bulk_fraction=1.0 - spikes / p,
            fit_error=float("nan"),
            stable_rank=stable_rank,
            hill_alpha=hill,
            spike_energy_fraction=1.0 if spikes else 0.0,
            gamma=gamma,
            alpha=alpha,
            beta=beta,
            estimator=estimator,
            degenerate=True,
            singular_values=s_desc,
        )
    lambda_plus = sigma2 * (1.0 + math.sqrt(gamma)) ** 2
    threshold = sigma2 * ((1.0 + math.sqrt(gamma)) ** 2 + tw)
    sigma_plus = math.sqrt(n * max(threshold, 0.0))
    spike_mask = s_desc > sigma_plus
    n_spikes = int(spike_mask.sum())
    fit_error = float(np.max(np.abs(mp_cdf(window, gamma, sigma2) - probs))) if len(window) else float("nan")
    return SpectralFit(
        shape=(rows, cols),
        sigma=math.sqrt(sigma2),
        sigma_plus=sigma_plus,
        lambda_plus=lambda_plus,
        threshold=threshold,
        n_spikes=n_spikes,
        bulk_fraction=1.0 - n_spikes / p,
        fit_error=fit_error,
        stable_rank=stable_rank,
        hill_alpha=hill,
        spike_energy_fraction=float((s_desc[spike_mask] ** 2).sum() / total) if total > 0 else 0.0,
        gamma=gamma,
        alpha=alpha,
        beta=beta,
        estimator=estimator,
        singular_values=s_desc,
    )


def fit_marchenko_pastur(
    weight: torch.Tensor,
    alpha: float = 0.25,
    beta: float = 0.8,
    estimator: Estimator = "bema-debiased",
    edge_compat: EdgeCompat = "correct",
    gram_dtype: torch.dtype | str = torch.float32,
    float32_sigma_rtol: float | None = 1e-6,
) -> SpectralFit:
    """Fit the MP law to one Linear (out, in) or Conv (out, in, kh, kw) weight.

    The weight may be any float dtype (fp16/bf16 are read in the Gram dtype) on any
    device; eigenvalues are computed on that device. See :func:`fit_from_eigenvalues`
    for the parameters and :func:`fit_many` for ``gram_dtype`` / ``float32_sigma_rtol``
    (float32 where σ̂ stays within 1e-6 relative of float64, float64 elsewhere).

    Weights of any magnitude are fitted exactly: the matrix is scaled by a power of
    two before the Gram product, and the fit scaled back.

    Raises:
        InvalidWeightError: NaN/Inf, complex or integer dtype, meta device, fewer than 2 dims,
            or entries so large that s² overflows float64 (beyond ~1e150).
        SpectrumFitError: the matrix has a single singular value (1×n).
        ConfigError: alpha, beta, estimator, edge_compat or gram_dtype invalid.
    """
    return fit_many([weight], alpha, beta, estimator, edge_compat, gram_dtype, float32_sigma_rtol)[0]


def float32_sigma_error(fit: SpectralFit) -> float:
    """Estimated relative error of σ̂ when the eigenvalues come from a float32 Gram product.

    Float32 round-off perturbs every eigenvalue by about u·s₁² (u = 2⁻²⁴), so the
    bulk fit, whose eigenvalues are about n·σ̂², moves by about u·r with
    r = s₁²/(n·σ̂²). The estimate u·(8 + 0.1·r) lies 2–4× above the error measured
    against float64 on spiked matrices from r = 2 to 10⁷ (``tests/test_spectrum.py``).
    Infinite for a degenerate fit (σ̂ = 0), whose zero eigenvalues float32 cannot resolve.
    """
    if fit.degenerate or fit.sigma <= 0.0 or not len(fit.singular_values):
        return math.inf
    n = max(fit.shape)
    ratio = float(fit.singular_values[0]) ** 2 / (n * fit.sigma**2)
    return 2.0**-24 * (8.0 + 0.1 * ratio)


def _without_zero_lines(mat: torch.Tensor) -> torch.Tensor:
    """``mat`` without its all-zero rows and columns (unchanged when fewer than 2 of either would remain)."""
    nonzero = mat.ne(0)
    rows, cols = nonzero.any(1), nonzero.any(0)
    if bool(rows.all()) and bool(cols.all()):
        return mat
    if int(rows.sum()) < 2 or int(cols.sum()) < 2:  # all-zero or nearly: the degenerate fit says so
        return mat
    return mat[rows][:, cols]


def fit_many(
    weights: Sequence[torch.Tensor],
    alpha: float = 0.25,
    beta: float = 0.8,
    estimator: Estimator = "bema-debiased",
    edge_compat: EdgeCompat = "correct",
    gram_dtype: torch.dtype | str = torch.float32,
    float32_sigma_rtol: float | None = 1e-6,
) -> list[SpectralFit]:
    """Fit many weights at once; equal shapes share one batched eigen-solve.

    Args:
        weights: Linear/Conv weights, any float dtype, on any device.
        alpha, beta, estimator, edge_compat: see :func:`fit_from_eigenvalues`.
        gram_dtype: precision of the Gram product and eigen-solve. ``float32``
            (default) is about twice as fast; a layer whose estimated σ̂ error
            (:func:`float32_sigma_error`) exceeds ``float32_sigma_rtol`` is computed
            again in float64, so σ̂ stays within that relative distance of the float64
            fit. ``float64`` computes every layer in float64.
        float32_sigma_rtol: the relative σ̂ tolerance of the float32 path; None keeps
            every float32 result unchecked.

    Returns:
        One :class:`SpectralFit` per weight; ``fit.gram_dtype`` says which precision it used.
    """
    check_fit_options(alpha, beta, estimator, edge_compat)
    mats = [_without_zero_lines(as_matrix(w)) for w in weights]  # validates: finite, real float, not meta, ≥2-D
    for m in mats:
        if min(m.shape) < 2:
            raise SpectrumFitError(
                f"a {m.shape[0]}×{m.shape[1]} matrix has a single singular value: the MP law cannot be fitted"
            )
    gram_dtype = resolve_gram_dtype(gram_dtype)
    scaled = [_power_of_two_scaled(m) for m in mats]  # huge/tiny weights: W/2^e, no Gram overflow
    mats, exps = [m for m, _ in scaled], [e for _, e in scaled]

    def fits_in(dtype: torch.dtype, idx: list[int]) -> list[SpectralFit]:
        eigs = squared_singular_values([mats[i] for i in idx], gram_dtype=dtype)
        out = []
        for e, i in zip(eigs, idx):
            f = fit_from_eigenvalues(e.numpy(), tuple(mats[i].shape), alpha, beta, estimator, edge_compat)
            f.gram_dtype = "float32" if dtype == torch.float32 else "float64"
            out.append(f)
        return out

    fits = fits_in(gram_dtype, list(range(len(mats))))
    if gram_dtype == torch.float32 and float32_sigma_rtol is not None:
        redo = [i for i, f in enumerate(fits) if float32_sigma_error(f) > float32_sigma_rtol]
        if redo:
            for i, f in zip(redo, fits_in(torch.float64, redo)):
                fits[i] = f
    return [_rescale(f, x) for f, x in zip(fits, exps)]
