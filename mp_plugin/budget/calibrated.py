"""Budgets that need calibration data: OWL's outlier allocation (a baseline) and the MP noise-floor rule.

Both use the bounded machinery of :mod:`mp_plugin.budget.bounded` (band, exact total)
and its :class:`~mp_plugin.budget.bounded.BoundedConfig` settings. Importing this module
registers ``owl``, ``noise-floor`` and ``mag-noise-floor`` in
:data:`mp_plugin.budget.rules.BUDGET_METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from mp_plugin.budget.bounded import bounded_config, bounded_counts, magnitude_center, ratios_to_counts
from mp_plugin.budget.rules import BudgetContext, register_budget_method
from mp_plugin.errors import ConfigError
from mp_plugin.layers.offload import onloaded
from mp_plugin.masks.scores import input_norms, wanda_scores
from mp_plugin.masks.select import unstructured_mask
from mp_plugin.restore import RestoreConfig, capture_grams, restore_layer

__all__ = ["owl_outlier_ratios", "noise_levels", "noise_floor_curves", "noise_floor_counts"]


def owl_outlier_ratios(ctx: BudgetContext, m: float) -> np.ndarray:
    """OWL's layer outlier ratio: the share of Wanda scores |W_ij|·‖x_j‖₂ above ``m`` × their mean.

    A layer the calibration never reaches gets NaN (neutral).
    """
    norms = input_norms(ctx.model, list(ctx.names), ctx.calibration)
    out = []
    for name, w in zip(ctx.names, ctx.weights):
        if name not in norms:
            out.append(float("nan"))
            continue
        score = wanda_scores(w, norms[name])
        out.append(float((score > m * score.mean()).double().mean()))
    return np.asarray(out, dtype=np.float64)


def _owl(ctx: BudgetContext) -> tuple[list[int], np.ndarray, np.ndarray]:
    cfg = bounded_config(ctx)
    d = owl_outlier_ratios(ctx, cfg.owl_m)
    return bounded_counts(d, ctx, -1.0, cfg.owl_lambda, cfg.block_average, cfg.max_sparsity, np.asarray(ctx.numels))


def noise_levels(fits: Sequence[Any]) -> np.ndarray:
    """ν_ℓ = σ̂²·N·M / ‖W‖²_F: the share of the layer's energy an iid matrix at its fitted bulk scale holds.

    Dimensionless, comparable with a relative output error. Missing or degenerate
    fits get the median of the others.
    """
    out = []
    for f in fits:
        if f is None or f.degenerate or f.singular_values.size == 0:
            out.append(float("nan"))
            continue
        energy = float((np.asarray(f.singular_values, dtype=np.float64) ** 2).sum())
        out.append(f.sigma**2 * f.shape[0] * f.shape[1] / energy if energy > 0 else float("nan"))
    v = np.asarray(out, dtype=np.float64)
    ok = np.isfinite(v)
    v[~ok] = float(np.median(v[ok])) if ok.any() else 1.0
    return v


@torch.no_grad()
def noise_floor_curves(
    model: torch.nn.Module,
    names: Sequence[str],
    calibration: Any,
    grid: Sequence[float],
    max_rows: int | None = 4096,
) -> dict[str, np.ndarray]:
    """Each layer's post-restore relative output error at the sparsities of ``grid``.

    For every layer alone: smallest-|W| mask at sparsity g, kept weights re-solved
    on the calibration Gram (``mp_plugin.restore.restore_layer``, OBS solver), error
    ‖(Ŵ − W)Xᵀ‖²/‖WXᵀ‖² on the calibration rows. The model is not modified.

    Returns:
        ``{name: (len(grid),) float64}`` for every layer the calibration reaches.
    """
    modules = dict(model.named_modules())
    grams = capture_grams(model, list(names), calibration, max_rows=max_rows)
    cfg = RestoreConfig(solver="obs")
    out = {}
    for name in names:
        if name not in grams:
            continue
        mod = modules[name]
        errs = []
        with onloaded([mod]):  # an accelerate-offloaded weight is read here, one layer at a time
            dense = mod.weight.detach()
            for g in grid:
                w = dense * unstructured_mask(dense, int(round(g * dense.numel()))).to(dense.dtype)
                rec = restore_layer(w, dense, grams[name], cfg, groups=int(getattr(mod, "groups", 1)))
                errs.append(rec["rel_error_after"])
        out[name] = np.asarray(errs, dtype=np.float64)
    return out


def noise_floor_counts(
    curves: dict[str, np.ndarray],
    levels: np.ndarray,
    ctx: BudgetContext,
    grid: Sequence[float],
    epsilon: float | None,
    max_sparsity: float,
    center: np.ndarray | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Noise-floor allocation: every layer stops where its error reaches one common multiple of its noise.

    Layer ℓ's error curve e_ℓ(g) (:func:`noise_floor_curves`, made non-decreasing,
    e_ℓ(0) = 0, linear between grid points) is inverted at c·ν_ℓ (ν_ℓ from
    :func:`noise_levels`): r_ℓ(c) = the sparsity where e_ℓ reaches c·ν_ℓ, clipped to
    [max(0, g_ℓ − ε), min(g_ℓ + ε, max_sparsity)] with g_ℓ = ``center`` (default s).
    Σ n_ℓ r_ℓ(c) is continuous and
    non-decreasing in c; bisection on log c makes it exactly s Σ n_ℓ, then the
    counts are rounded to the exact total. Layers without a curve keep r_ℓ = g_ℓ.

    Returns:
        (counts, r_ℓ/s, log10 c·ν_ℓ per layer).
    """
    s = ctx.sparsity
    n = np.asarray(ctx.numels, dtype=np.float64)
    eps = 1.0 if epsilon is None else epsilon
    g = np.full(len(n), s) if center is None else np.asarray(center, dtype=np.float64)
    lo, hi = np.maximum(0.0, g - eps), np.minimum(g + eps, np.maximum(g, max_sparsity))
    xs = np.concatenate([[0.0], np.asarray(grid, dtype=np.float64)])
    inv = []
    for name in ctx.names:
        if name not in curves:
            inv.append(None)
            continue
        e = np.maximum.accumulate(np.concatenate([[0.0], np.maximum(np.asarray(curves[name]), 0.0)]))
        e = e + 1e-15 * np.arange(len(e))  # strictly increasing for the inverse
        inv.append(e)
    if s == 0:
        return [0] * len(n), np.ones(len(n)), np.zeros(len(n))

    def ratios(logc: float) -> np.ndarray:
        c = 10.0**logc
        r = g.copy()
        for i, e in enumerate(inv):
            if e is not None:
                r[i] = float(np.interp(c * levels[i], e, xs))
        return np.clip(r, lo, hi)

    target = s * n.sum()
    a, b = -12.0, 12.0
    if float((n * ratios(b)).sum()) < target:
        raise ConfigError(
            "noise-floor: the error curves end below the requested sparsity: widen noise_grid (its largest "
            "sparsity) or the band epsilon"
        )
    if float((n * ratios(a)).sum()) > target:
        # a layer whose error stays 0 over part of the grid (all-zero, or already sparse) jumps there at any
        # c > 0: the limit c → 0 (every curve at its band's low end) is the other end of the blend
        r0 = np.clip(np.where([e is None for e in inv], g, 0.0), lo, hi)
        ra = ratios(a)
        t0, ta = float((n * r0).sum()), float((n * ra).sum())
        if t0 > target:
            raise ConfigError(
                "noise-floor: even the band's low ends exceed the requested sparsity: widen the band epsilon"
            )
        r = r0 + (0.0 if ta == t0 else (target - t0) / (ta - t0)) * (ra - r0)
        counts = ratios_to_counts(r, ctx.numels, ctx.target)
        return counts, r / s, np.log10(np.maximum(10.0**a * levels, 1e-300))
    for _ in range(200):
        mid = 0.5 * (a + b)
        if float((n * ratios(mid)).sum()) < target:
            a = mid
        else:
            b = mid
    # the piecewise-linear total may be flat at the solution: blend the two ends to hit it exactly
    ra, rb = ratios(a), ratios(b)
    ta, tb = float((n * ra).sum()), float((n * rb).sum())
    t = 0.0 if tb == ta else (target - ta) / (tb - ta)
    r = ra + t * (rb - ra)
    counts = ratios_to_counts(r, ctx.numels, ctx.target)
    return counts, r / s, np.log10(10.0 ** (0.5 * (a + b)) * levels)


def _noise_floor_method(anchored: bool) -> Callable[[BudgetContext], tuple]:
    def counts(ctx: BudgetContext) -> tuple[list[int], np.ndarray, np.ndarray]:
        cfg = bounded_config(ctx)
        curves = cfg.noise_curves
        if curves is None:
            curves = noise_floor_curves(ctx.model, ctx.names, ctx.calibration, cfg.noise_grid, cfg.noise_rows)
        eps, center = (cfg.anchor_epsilon, magnitude_center(ctx)) if anchored else (cfg.noise_epsilon, None)
        levels = noise_levels(ctx.fits)
        return noise_floor_counts(curves, levels, ctx, cfg.noise_grid, eps, cfg.max_sparsity, center=center)

    return counts


register_budget_method(
    "owl",
    None,
    counts=_owl,
    needs_calibration=True,
    doc="OWL outlier-weighted layer sparsity (baseline, calibration): more outliers → pruned less, band ±λ",
)
register_budget_method(
    "mag-noise-floor",
    None,
    counts=_noise_floor_method(anchored=True),
    needs_calibration=True,
    doc="noise-floor allocation inside ±anchor_epsilon of each layer's global-magnitude budget (calibration)",
)
register_budget_method(
    "noise-floor",
    None,
    counts=_noise_floor_method(anchored=False),
    needs_calibration=True,
    doc="each layer pruned until its post-restore output error reaches one common multiple of its MP "
    "noise share (calibration); bisection for the exact total",
)
