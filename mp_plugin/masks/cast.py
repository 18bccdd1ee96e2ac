"""CAST: covariance-aware k:n projection (ALGORITHM.md §2.7).

For every output row i and k:n group g (n consecutive input channels at one
kernel position, ``mp_plugin.layers.layout``), CAST picks the
keep pattern m ∈ {0,1}ⁿ with |m| = k that minimises

    c(m) = rᵀ C_g r  +  α · c̄ · |m − M_prior|₁,      r = (1 − m) ⊙ u,

where u is the source tuple (dense weights, or the SER/SEB-pruned weights with
optional free restoration), C_g the calibration input covariance of the group
(``mp_plugin.layers.calibration``) and M_prior an unstructured mask (Hamming prior).
rᵀC_g r is the expected squared output error the group's removed weights cause
on calibration inputs, so CAST keeps the weights that matter for the data, not
only the largest ones.

Candidates: all C(n, k) patterns when fewer than ``max_enumerate``, else
``n_samples`` uniformly sampled ones. The magnitude top-k pattern of every
(i, g) is always a candidate, so without the prior CAST's surrogate loss is
never above magnitude k:n's. Everything is batched torch, chunked over rows.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Literal

import torch

from mp_plugin.errors import CalibrationError, MPPluginError, PatternError
from mp_plugin.layers.calibration import GroupCovariance, group_index
from mp_plugin.layers.layout import from_kn_matrix, kn_eligible, kn_matrix, kn_width
from mp_plugin.masks.select import assert_kn_exact

__all__ = ["CastConfig", "kn_patterns", "cast_source", "cast_project"]


@dataclass
class CastConfig:
    """Settings of the CAST projection.

    Attributes:
        prior_alpha: weight α of the Hamming prior towards the unstructured mask (0 = off).
        prior_scale: c̄ of the prior: ``"code"`` = mean cost over the candidate
            patterns of that (i, g) (what the authors ran); ``"esm"`` = mean over
            the layer's rows and the group's inputs of u²·E[h²] (the paper's text).
        source: ``"dense"`` (u = W) or ``"ser"`` (u = W where the unstructured
            mask keeps, else dense values with free restoration, else 0).
        free_restoration: with ``source="ser"``, refill pruned slots from the dense weights.
        max_enumerate: enumerate every pattern when C(n, k) is below this.
        n_samples: otherwise, sample this many patterns.
        seed: seed of the pattern sampling.
        chunk_elements: rows per chunk are chosen so that one chunk holds about
            this many numbers (memory bound ≈ 8 bytes × 3 × chunk_elements).
        dtype: ``"float64"`` (exact comparisons) or ``"float32"`` (faster on GPU).
    """

    prior_alpha: float = 0.0
    prior_scale: Literal["code", "esm"] = "code"
    source: Literal["dense", "ser"] = "dense"
    free_restoration: bool = True
    max_enumerate: int = 5000
    n_samples: int = 1024
    seed: int = 0
    chunk_elements: int = 1 << 22
    dtype: Literal["float64", "float32"] = "float64"

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return asdict(self)


def kn_patterns(
    k: int, n: int, max_enumerate: int = 5000, n_samples: int = 1024, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Candidate keep patterns: (K, n) bool, each row with exactly k ``True``.

    All C(n, k) patterns when C(n, k) < ``max_enumerate``; otherwise ``n_samples``
    distinct patterns drawn uniformly (fewer only if duplicates were drawn).
    """
    if not 1 <= k < n <= 16:
        raise PatternError(f"need 1 ≤ k < n ≤ 16, got {k}:{n}")
    if math.comb(n, k) < max_enumerate:
        idx = torch.tensor(list(itertools.combinations(range(n), k)), dtype=torch.long)
    else:
        idx = torch.rand(n_samples, n, generator=generator).argsort(dim=1)[:, :k]
    pats = torch.zeros(idx.shape[0], n, dtype=torch.bool).scatter_(1, idx, True)
    return torch.unique(pats, dim=0)


def cast_source(
    dense: torch.Tensor,
    prior_mask: torch.Tensor | None = None,
    source: str = "dense",
    free_restoration: bool = True,
    ser_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """The tuple u that CAST projects.

    Args:
        dense: the dense weight.
        prior_mask: the unstructured (SER/SEB) mask, ``True`` = kept; needed for ``source="ser"``.
        source: ``"dense"`` → u = dense. ``"ser"`` → u = ser_weight where the mask
            keeps, dense (free restoration) or 0 elsewhere.
        free_restoration: see above.
        ser_weight: weights after SER fine-tuning (default: ``dense``).
    """
    if source == "dense":
        return dense
    if source != "ser":
        raise MPPluginError(f"unknown CAST source {source!r}: use 'dense' or 'ser'")
    if prior_mask is None:
        raise MPPluginError("CAST source 'ser' needs the unstructured mask")
    kept = dense if ser_weight is None else ser_weight
    fill = dense if free_restoration else torch.zeros_like(dense)
    return torch.where(prior_mask, kept, fill)


def _unit_scale(t: torch.Tensor) -> torch.Tensor:
    """``t`` divided by a power of two near its largest |entry| (exact), or ``t`` when it is all zero/non-finite."""
    peak = float(t.abs().max()) if t.numel() else 0.0
    if not (0.0 < peak < math.inf):
        return t
    exp = math.frexp(peak)[1]
    half = exp // 2  # two steps: 2^-exp alone overflows for subnormal peaks
    for step in (-half, half - exp):
        t = torch.ldexp(t, torch.tensor(float(step), dtype=t.dtype, device=t.device))
    return t


def cast_project(
    u: torch.Tensor,
    stats: GroupCovariance,
    k: int,
    n: int,
    prior_mask: torch.Tensor | None = None,
    config: CastConfig | None = None,
    conv_groups: int = 1,
) -> torch.Tensor:
    """Choose, per output row and k:n group, the keep pattern minimising rᵀC_g r (+ prior).

    Args:
        u: source weight (C_out, C_in/groups, *kernel) or (C_out, in); any float dtype/device.
        stats: the layer's calibration covariances, with ``stats.n == n``.
        k, n: keep k of every n consecutive input channels (1 ≤ k < n ≤ 16).
        prior_mask: unstructured mask (bool, shaped like ``u``) for the Hamming prior.
        config: :class:`CastConfig` (``prior_alpha`` > 0 needs ``prior_mask``).
        conv_groups: the conv's ``groups`` (1 for Linear).

    Returns:
        Boolean mask shaped like ``u`` with exactly k ``True`` per group (checked);
        the projected weight is ``u * mask``.
    """
    cfg = config or CastConfig()
    if stats.n != n:
        raise PatternError(f"covariance was captured for groups of {stats.n}, not {n}")
    if not bool(torch.isfinite(stats.cov).all()):  # inf·0 in the pattern costs would pick arbitrary slots
        raise CalibrationError("the CAST covariance holds NaN or Inf: check the calibration inputs")
    rows = u.shape[0]
    if not kn_eligible(u.shape, n):
        raise PatternError(f"input channels {kn_width(u.shape)} are not divisible by n={n}")
    width = u[0].numel()
    if cfg.prior_alpha > 0 and prior_mask is None:
        raise MPPluginError("prior_alpha > 0 needs a prior mask")
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    dev = u.device
    G = width // n
    # positive power-of-two scalings of u and C leave every argmin unchanged; they keep the
    # products u²·C of very large or very small weights and inputs from over/underflowing
    ug_all = _unit_scale(kn_matrix(u.detach()).reshape(rows, G, n).to(torch.float64)).to(dtype)
    cov = _unit_scale(stats.cov.to(device=dev, dtype=torch.float64)).to(dtype)
    idx_all = group_index(rows, G, conv_groups, stats.groups, device=dev)
    gen = torch.Generator().manual_seed(cfg.seed)
    pats = kn_patterns(k, n, cfg.max_enumerate, cfg.n_samples, gen).to(dev)
    drop = (~pats).to(dtype)  # (K, n): 1 where removed
    drop_outer = (drop[:, :, None] * drop[:, None, :]).reshape(len(pats), n * n)  # (K, n²)
    use_prior = cfg.prior_alpha > 0
    prior_all = kn_matrix(prior_mask).reshape(rows, G, n).to(device=dev, dtype=dtype) if use_prior else None
    cbar_esm = None
    if use_prior and cfg.prior_scale == "esm":
        diag = torch.diagonal(cov, dim1=-2, dim2=-1)[idx_all]  # (R, G, n)
        cbar_esm = (ug_all.square() * diag).mean(dim=(0, 2))  # (G,)
    elif use_prior and cfg.prior_scale != "code":
        raise MPPluginError(f"unknown prior_scale {cfg.prior_scale!r}: use 'code' or 'esm'")

    out = torch.empty(rows, G, n, dtype=torch.bool, device=dev)
    step = max(1, cfg.chunk_elements // (G * max(n * n, len(pats) + 1)))
    for start in range(0, rows, step):
        sl = slice(start, min(rows, start + step))
        ug = ug_all[sl]
        r = ug.shape[0]
        q = ug[..., :, None] * ug[..., None, :] * cov[idx_all[sl]]  # (r, G, n, n)
        cost = (q.reshape(r * G, n * n) @ drop_outer.T).reshape(r, G, -1)  # (r, G, K)
        mag = torch.zeros_like(ug, dtype=torch.bool).scatter_(-1, ug.abs().topk(k, dim=-1).indices, True)
        d_mag = (~mag).to(dtype)
        cost_mag = torch.einsum("rgab,rga,rgb->rg", q, d_mag, d_mag)
        total = torch.cat([cost_mag[..., None], cost], dim=-1)  # (r, G, 1+K): ties go to magnitude
        if use_prior:
            p = prior_all[sl]
            base = k + p.sum(-1, keepdim=True)
            ham = torch.cat(
                [base - 2 * (p * mag.to(dtype)).sum(-1, keepdim=True), base - 2 * p @ pats.to(dtype).T], dim=-1
            )
            cbar = cost.mean(-1, keepdim=True) if cbar_esm is None else cbar_esm[None, :, None]
            total = total + cfg.prior_alpha * cbar * ham
        best = total.argmin(dim=-1)  # (r, G)
        chosen = pats[(best - 1).clamp_min(0)]
        out[sl] = torch.where((best == 0)[..., None], mag, chosen)
    mask = from_kn_matrix(out.reshape(rows, -1), u.shape).contiguous()
    assert_kn_exact(mask, k, n, name="CAST mask")
    return mask
