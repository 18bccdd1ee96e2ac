"""Bounded layer budgets: every layer's sparsity stays within [s − ε, s + ε] and the total is exact.

The paper's SEB rule z-scores a spectral signal and lets a global threshold turn
any spread into large reallocations (``benchmarks/budget_diagnosis.py``). The
methods here instead follow AlphaPruning's mapping (Lu et al., NeurIPS 2024):

1. a per-layer signal v_ℓ (NaN where the layer has no usable fit);
2. averaged per block (``block_average``: the layers sharing a transformer
   block / conv stage prefix, :func:`layer_blocks`; AlphaPruning averages per
   decoder block), NaN entries left out, so a NaN takes its block's mean;
3. mapped linearly onto u_ℓ = 2(v_ℓ − min v)/(max v − min v) − 1 ∈ [−1, 1] over the
   finite values (all 0 when the signal does not vary); a value still NaN gets u_ℓ = 0,
   the middle of the band;
4. r_ℓ = clip(s + c + d·ε·u_ℓ, max(0, s − ε), min(s + ε, max_sparsity)), with the
   direction d = ±1 of the method and one shift c found by bisection so that the
   parameter-weighted mean Σ n_ℓ r_ℓ / Σ n_ℓ is exactly s;
5. integer counts ⌊r_ℓ n_ℓ⌋ plus one for the largest remainders, so the total is
   ⌊s · Σ n_ℓ⌋ to the weight (``masks.counts.prune_target``).

AlphaPruning's code maps onto [1 − ε, 1 + ε] and *scales* the ratios to mean s,
which can leave the band; shifting keeps every layer inside it.

=========================  ========================================================  ===  ==============
method                     signal v_ℓ                                                d    data
=========================  ========================================================  ===  ==============
``alpha``                  Hill/PL tail exponent α of the ESD (our fit, top 20       +1   data-free
                           eigenvalues): heavier tail (smaller α) → prune less
``bounded-bulk-energy``    share of ‖W‖² in the MP bulk, 1 − Σ_spikes s²/Σ s²         +1   data-free
``bounded-spikes``         spikes per dimension, n_spikes / min(N, M)                −1   data-free
``bounded-edge``           σ₊ / (rms(W)·(√N + √M)): the fitted edge over the edge    +1   data-free
                           an iid matrix of the layer's shape and energy would have
``owl``                    OWL outlier ratio: share of Wanda scores |W_ij|·‖x_j‖     −1   calibration
                           above M × their layer mean (Yin et al. 2024, a baseline)
``noise-floor``            see :func:`~mp_plugin.budget.calibrated.noise_floor_counts`                             —    calibration
=========================  ========================================================  ===  ==============

``mag-alpha``, ``mag-bulk-energy``, ``mag-spikes``, ``mag-edge`` and
``mag-noise-floor`` apply the same rules as a bounded *correction of global
magnitude*: the band is [g_ℓ − ε, g_ℓ + ε] around each layer's global-magnitude
budget g_ℓ (ε = ``anchor_epsilon``) and the shift c starts from g_ℓ instead of s.

Settings live in :class:`BoundedConfig` (``PlanConfig.bounded``). Importing this
module registers the data-free methods in :data:`mp_plugin.budget.rules.BUDGET_METHODS`; ``owl`` and
the noise-floor rules live in :mod:`mp_plugin.budget.calibrated`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mp_plugin.budget.rules import BudgetContext, register_budget_method
from mp_plugin.errors import ConfigError

__all__ = [
    "BoundedConfig",
    "layer_blocks",
    "block_mean",
    "bounded_ratios",
    "ratios_to_counts",
    "bounded_counts",
    "mp_signal",
    "MP_SIGNALS",
    "bounded_config",
]


@dataclass
class BoundedConfig:
    """Settings of the bounded budgets (``PlanConfig.bounded``).

    Attributes:
        epsilon: ε, the half-width of the band [s − ε, s + ε] (AlphaPruning: 0.2–0.3).
        anchor_epsilon: ε of the ``mag-*`` methods, whose band is centred on each layer's
            global-magnitude budget instead of s.
        block_average: average the signal over the layers of a block first.
        max_sparsity: no layer is pruned above this fraction.
        owl_m: OWL's outlier multiple M (an outlier scores above M × the layer mean).
        owl_lambda: OWL's band half-width λ (used instead of ε by ``owl``).
        noise_epsilon: band of ``noise-floor`` (None: only [0, max_sparsity]).
        noise_grid: sparsities at which ``noise-floor`` measures each layer's error.
        noise_rows: at most this many calibration rows per layer for its Gram.
        noise_curves: precomputed :func:`noise_floor_curves` (``{name: errors on
            noise_grid}``) to reuse across plans of the same weights and
            calibration; not saved with the plan.
    """

    epsilon: float = 0.2
    anchor_epsilon: float = 0.1
    block_average: bool = True
    max_sparsity: float = 0.95
    owl_m: float = 5.0
    owl_lambda: float = 0.08
    noise_epsilon: float | None = 0.3
    noise_grid: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
    noise_rows: int | None = 4096
    noise_curves: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in ("epsilon", "anchor_epsilon", "owl_lambda"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
                raise ConfigError(f"BoundedConfig.{name} must be a number in [0, 1), got {v!r}")
        if self.noise_epsilon is not None and not 0 <= self.noise_epsilon < 1:
            raise ConfigError(f"BoundedConfig.noise_epsilon must be None or in [0, 1), got {self.noise_epsilon!r}")
        if not 0 < self.max_sparsity < 1:
            raise ConfigError(f"BoundedConfig.max_sparsity must lie in (0, 1), got {self.max_sparsity!r}")
        grid = tuple(float(g) for g in self.noise_grid)
        if not grid or any(not 0 < g < 1 for g in grid) or any(b <= a for a, b in zip(grid, grid[1:])):
            raise ConfigError(f"BoundedConfig.noise_grid must be increasing sparsities in (0, 1), got {grid!r}")
        self.noise_grid = grid

    def to_dict(self) -> dict:
        """JSON-ready copy (without ``noise_curves``)."""
        return {
            "epsilon": self.epsilon,
            "anchor_epsilon": self.anchor_epsilon,
            "block_average": self.block_average,
            "max_sparsity": self.max_sparsity,
            "owl_m": self.owl_m,
            "owl_lambda": self.owl_lambda,
            "noise_epsilon": self.noise_epsilon,
            "noise_grid": list(self.noise_grid),
            "noise_rows": self.noise_rows,
        }

    @classmethod
    def from_dict(cls, d: dict) -> BoundedConfig:
        """Inverse of :meth:`to_dict`."""
        d = dict(d)
        if "noise_grid" in d:
            d["noise_grid"] = tuple(d["noise_grid"])
        return cls(**d)


# --------------------------------------------------------------------------- the mapping


def layer_blocks(names: Sequence[str]) -> list[str]:
    """The block of each layer: its name up to and including the first numeric component.

    ``encoder.layer.3.attention.self.query`` → ``encoder.layer.3``; ``_blocks.5._expand_conv``
    → ``_blocks.5``; a name without an index (``conv_stem``) is its own block.
    """
    from mp_plugin.restore.driver import block_key

    return [block_key(n) for n in names]


def block_mean(values: np.ndarray, blocks: Sequence[str], weights: np.ndarray | None = None) -> np.ndarray:
    """Replace each value by the (weighted) mean over its block; NaN entries are ignored."""
    vals = np.asarray(values, dtype=np.float64)
    wts = np.ones_like(vals) if weights is None else np.asarray(weights, dtype=np.float64)
    out = vals.copy()
    for key in dict.fromkeys(blocks):
        idx = np.array([i for i, b in enumerate(blocks) if b == key])
        ok = idx[np.isfinite(vals[idx])]
        if len(ok):
            out[idx] = float(np.sum(vals[ok] * wts[ok]) / np.sum(wts[ok]))
    return out


def _unit(values: np.ndarray) -> np.ndarray:
    """Linear map of the finite values onto [−1, 1] (NaN → 0, constant → 0)."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    u = np.zeros_like(v)
    if ok.sum() >= 2:
        lo, hi = v[ok].min(), v[ok].max()
        if hi > lo:
            u[ok] = 2.0 * (v[ok] - lo) / (hi - lo) - 1.0
    return u


def bounded_ratios(
    u: np.ndarray,
    numels: Sequence[int],
    sparsity: float,
    epsilon: float,
    max_sparsity: float = 0.95,
    center: np.ndarray | None = None,
) -> np.ndarray:
    """Per-layer sparsities r_ℓ = clip(g_ℓ + c + ε·u_ℓ, lo_ℓ, hi_ℓ) with Σ n_ℓ r_ℓ = s Σ n_ℓ.

    Args:
        u: (L,) mapped signal, nominally in [−1, 1] (the direction already applied).
        numels: (L,) weights per layer.
        sparsity: s ∈ [0, 1).
        epsilon: ε ≥ 0; lo_ℓ = max(0, g_ℓ − ε), hi_ℓ = min(g_ℓ + ε, max(g_ℓ, max_sparsity)).
        max_sparsity: cap of any layer.
        center: (L,) anchor g_ℓ with Σ n_ℓ g_ℓ = s Σ n_ℓ (default g_ℓ = s, AlphaPruning;
            e.g. the global-magnitude budgets for a bounded correction of global magnitude).

    Returns:
        (L,) float64 ratios inside [lo_ℓ, hi_ℓ] whose parameter-weighted mean is s (to
        float64 precision; the shift c is found by bisection).
    """
    n = np.asarray(numels, dtype=np.float64)
    u = np.asarray(u, dtype=np.float64)
    s = float(sparsity)
    g = np.full(len(n), s) if center is None else np.asarray(center, dtype=np.float64)
    lo, hi = np.maximum(0.0, g - epsilon), np.minimum(g + epsilon, np.maximum(g, max_sparsity))
    if epsilon == 0 or s == 0:
        return g.copy()
    target = s * n.sum()

    def total(c: float) -> float:
        return float((n * np.clip(g + c + epsilon * u, lo, hi)).sum())

    a, b = -2.0 - 2 * epsilon, 2.0 + 2 * epsilon  # total(a) = lo·Σn ≤ target ≤ hi·Σn = total(b)
    for _ in range(200):
        mid = 0.5 * (a + b)
        if total(mid) < target:
            a = mid
        else:
            b = mid
    return np.clip(g + 0.5 * (a + b) + epsilon * u, lo, hi)


def ratios_to_counts(ratios: np.ndarray, numels: Sequence[int], target: int) -> list[int]:
    """Integer counts ⌊r_ℓ n_ℓ⌋ (+1 for the largest remainders) summing exactly to ``target``.

    Counts stay within [0, n_ℓ]; each differs from r_ℓ n_ℓ by less than one weight
    when Σ r_ℓ n_ℓ = target.
    """
    n = np.asarray(numels, dtype=np.int64)
    raw = np.clip(np.asarray(ratios, dtype=np.float64) * n, 0, n)
    counts = np.floor(raw).astype(np.int64)
    rest = int(target) - int(counts.sum())
    order = np.argsort(-(raw - counts), kind="stable")
    if rest >= 0:
        room = [i for i in order if counts[i] < n[i]]
        for i in room[:rest]:
            counts[i] += 1
    else:
        for i in [i for i in order[::-1] if counts[i] > 0][:-rest]:
            counts[i] -= 1
    if int(counts.sum()) != int(target):
        raise ConfigError(f"cannot distribute {target} pruned weights over layers of {int(n.sum())} weights")
    return [int(c) for c in counts]


def bounded_counts(
    values: Sequence[float],
    ctx: BudgetContext,
    direction: float,
    epsilon: float,
    block_average: bool,
    max_sparsity: float,
    block_weights: np.ndarray | None = None,
    center: np.ndarray | None = None,
) -> tuple[list[int], np.ndarray, np.ndarray]:
    """Steps 1–5 of the module rule on ``values``: (counts, r_ℓ/s, u_ℓ); ``center`` as in :func:`bounded_ratios`."""
    v = np.asarray(values, dtype=np.float64)
    if block_average:
        v = block_mean(v, layer_blocks(ctx.names), block_weights)
    u = _unit(v)
    r = bounded_ratios(direction * u, ctx.numels, ctx.sparsity, epsilon, max_sparsity, center)
    counts = ratios_to_counts(r, ctx.numels, ctx.target)
    rel = r / ctx.sparsity if ctx.sparsity > 0 else np.ones_like(r)
    return counts, rel, u


# --------------------------------------------------------------------------- MP signals


def _edge_iid(fit: Any) -> float:
    n_rows, n_cols = fit.shape
    sv = np.asarray(fit.singular_values, dtype=np.float64)
    if sv.size == 0:
        return float("nan")
    rms = math.sqrt(float((sv**2).sum()) / (n_rows * n_cols))
    return fit.sigma_plus / (rms * (math.sqrt(n_rows) + math.sqrt(n_cols))) if rms > 0 else float("nan")


MP_SIGNALS: dict[str, Callable[[Any], float]] = {
    "alpha": lambda f: f.hill_alpha,
    "bulk-energy": lambda f: 1.0 - f.spike_energy_fraction,
    "spikes": lambda f: f.n_spikes / min(f.shape),
    "edge": _edge_iid,
}


def mp_signal(fits: Sequence[Any], name: str) -> np.ndarray:
    """Per-layer values of the signal ``name`` (a key of :data:`MP_SIGNALS`); NaN where the fit is missing."""
    fn = MP_SIGNALS[name]
    return np.asarray([fn(f) if f is not None and not f.degenerate else float("nan") for f in fits], dtype=np.float64)


def magnitude_center(ctx: BudgetContext) -> np.ndarray:
    """The global-magnitude budgets (one |W| threshold, exact total) as per-layer fractions."""
    from mp_plugin.masks.counts import global_prune_counts

    counts = global_prune_counts(ctx.weights, [1.0] * len(ctx.weights), ctx.sparsity)
    return np.asarray(counts, dtype=np.float64) / np.asarray(ctx.numels, dtype=np.float64)


def _bounded_method(signal: str, direction: float, anchored: bool = False) -> Callable[[BudgetContext], tuple]:
    def counts(ctx: BudgetContext) -> tuple[list[int], np.ndarray, np.ndarray]:
        cfg = bounded_config(ctx)
        eps, center = (cfg.anchor_epsilon, magnitude_center(ctx)) if anchored else (cfg.epsilon, None)
        signal_values = mp_signal(ctx.fits, signal)
        return bounded_counts(signal_values, ctx, direction, eps, cfg.block_average, cfg.max_sparsity, center=center)

    return counts


def bounded_config(ctx: BudgetContext) -> BoundedConfig:
    """The plan's :class:`BoundedConfig` (``PlanConfig.bounded``), or the defaults."""
    cfg = getattr(ctx.options, "bounded", None)
    return cfg if isinstance(cfg, BoundedConfig) else BoundedConfig()


register_budget_method(
    "alpha",
    None,
    counts=_bounded_method("alpha", +1.0),
    doc="AlphaPruning's bounded mapping on our Hill α: heavier-tailed layers (smaller α) pruned less, "
    "r ∈ [s−ε, s+ε], per-block mean, exact total",
)
register_budget_method(
    "bounded-bulk-energy",
    None,
    counts=_bounded_method("bulk-energy", +1.0),
    doc="bounded mapping on the MP bulk energy share: more noise-like layers pruned more",
)
register_budget_method(
    "bounded-spikes",
    None,
    counts=_bounded_method("spikes", -1.0),
    doc="bounded mapping on spikes per dimension: layers with more structure pruned less",
)
register_budget_method(
    "bounded-edge",
    None,
    counts=_bounded_method("edge", +1.0),
    doc="bounded mapping on σ₊ / iid edge of the layer's shape and energy: noise-like layers pruned more",
)
for _sig, _d, _what in (
    ("alpha", +1.0, "Hill α"),
    ("bulk-energy", +1.0, "MP bulk energy share"),
    ("spikes", -1.0, "spikes per dimension"),
    ("edge", +1.0, "σ₊ / iid edge"),
):
    register_budget_method(
        f"mag-{_sig}",
        None,
        counts=_bounded_method(_sig, _d, anchored=True),
        doc=f"global magnitude corrected by the bounded mapping on the {_what}: band ±anchor_epsilon around "
        "each layer's global-magnitude budget, exact total",
    )
