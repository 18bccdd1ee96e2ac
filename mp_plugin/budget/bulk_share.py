"""``mp-bulk``: global magnitude, weighted by how much of each layer's energy lies in its MP bulk.

The rule (data-free):

1. b_ℓ = 1 − Σ_spikes s² / Σ s², the share of ‖W_ℓ‖²_F carried by the singular
   values at or below the fitted MP edge σ₊ (``SpectralFit.spike_energy_fraction``);
2. v_ℓ = log b_ℓ, standardised across the target layers: z_ℓ = (v_ℓ − mean v) / sd v
   (a missing or degenerate fit gets z_ℓ = 0; a signal that does not vary gives all 0);
3. w_ℓ = exp(−β·z_ℓ), β = ``BulkShareConfig.beta`` (0.25);
4. prune the globally smallest ⌊s·Σ n_ℓ⌋ scores |W_ij| / w_ℓ (exact total,
   :func:`~mp_plugin.masks.counts.global_prune_counts`); inside a layer that is its
   smallest |W|.

A layer whose energy sits mostly in the bulk (no dominant spikes: its function is
spread over many directions) gets a larger score, so it is pruned *less* than plain
global magnitude would; a layer whose energy is concentrated in a few spikes above
the edge is pruned more. β = 0 is global magnitude. The direction is the reverse of
the "noise is prunable" reading that ``bounded-bulk-energy`` and SEB follow: on the
three benchmark models the single-layer pruning sensitivity rises with the bulk share
(Spearman ρ = +0.42 MiniLM, +0.66 EfficientNet-Lite0 at 50 %, in
``benchmarks/results/budgets.md``), and this rule is what that measurement supports. It is a measured
regularity, not a derived guarantee.

Importing this module registers ``mp-bulk`` in :data:`mp_plugin.budget.rules.BUDGET_METHODS`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mp_plugin.budget.rules import BudgetContext, register_budget_method
from mp_plugin.errors import ConfigError
from mp_plugin.masks.counts import global_prune_counts

DEFAULT_MIX_BETA = 0.25  # β of the mix damage: the budget's β

__all__ = ["DEFAULT_MIX_BETA", "BulkShareConfig", "bulk_share_z", "bulk_share_weights"]


@dataclass
class BulkShareConfig:
    """Settings of ``mp-bulk`` (``PlanConfig.bulk_share``).

    Attributes:
        beta: β ≥ 0, the strength of the correction: w_ℓ = exp(−β·z_ℓ). 0 is global
            magnitude; 0.25 is the value measured in ``benchmarks/budgets.py``.
        mix_beta: the β of the same weights in the ``mp-bulk`` damage of the dense/2:4 mix
            (:mod:`mp_plugin.budget.mix`), where whole layers are chosen: d_ℓ = ‖W − P₂:₄(W)‖² /
            w_ℓ², w_ℓ = exp(−mix_beta·z_ℓ). The default is the budget's 0.25 (no parameter of its
            own was fitted); ``benchmarks/budgets.py`` also measures 0.5 and 1, which trade
            MiniLM at 45 % against EfficientNet-Lite0 at 35 % (``results/budget_seeds.json``).
    """

    beta: float = 0.25
    mix_beta: float = DEFAULT_MIX_BETA

    def __post_init__(self) -> None:
        for name in ("beta", "mix_beta"):
            b = getattr(self, name)
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not np.isfinite(b) or b < 0:
                raise ConfigError(f"BulkShareConfig.{name} must be a finite number ≥ 0, got {b!r}")
            setattr(self, name, float(b))

    def to_dict(self) -> dict:
        """JSON-ready copy."""
        return {"beta": self.beta, "mix_beta": self.mix_beta}

    @classmethod
    def from_dict(cls, d: dict) -> BulkShareConfig:
        """Inverse of :meth:`to_dict`."""
        return cls(**d)


def bulk_share_z(fits: Sequence[Any]) -> np.ndarray:
    """(L,) standardised log bulk energy share z_ℓ (0 where a fit is missing or degenerate)."""
    v = np.full(len(fits), np.nan)
    for i, f in enumerate(fits):
        if f is not None and not f.degenerate:
            share = 1.0 - float(f.spike_energy_fraction)
            if np.isfinite(share) and share > 0:
                v[i] = np.log(share)
    z = np.zeros(len(fits))
    ok = np.isfinite(v)
    if ok.sum() >= 2 and v[ok].std() > 0:
        z[ok] = (v[ok] - v[ok].mean()) / v[ok].std()
    return z


def bulk_share_weights(fits: Sequence[Any], beta: float) -> tuple[np.ndarray, np.ndarray]:
    """(w, z): layer weights w_ℓ = exp(−β·z_ℓ) for the global |W|/w_ℓ threshold, and z_ℓ."""
    z = bulk_share_z(fits)
    return np.exp(-float(beta) * z), z


def _config(ctx: BudgetContext) -> BulkShareConfig:
    cfg = getattr(ctx.options, "bulk_share", None)
    return cfg if isinstance(cfg, BulkShareConfig) else BulkShareConfig()


def _counts(ctx: BudgetContext) -> tuple[list[int], np.ndarray, np.ndarray]:
    w, z = bulk_share_weights(ctx.fits, _config(ctx).beta)
    return global_prune_counts(ctx.weights, w.tolist(), ctx.sparsity), w, z  # w recorded as the plan's w_ℓ


register_budget_method(
    "mp-bulk",
    None,
    counts=_counts,
    doc="global magnitude on |W|/w_ℓ, w_ℓ = exp(−β·z(log MP bulk energy share)): layers whose energy "
    "lies in the MP bulk pruned less, spike-dominated layers more; data-free, exact total",
)
