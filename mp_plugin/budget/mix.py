"""The deployable dense/2:4 mix: which layers take 2:4 when the target is below 50 %.

TensorRT and cuSPARSELt run 2:4 and nothing between, so "remove 30 % of the
weights" really means: put 2:4 on layers holding 60 % of the weights (or of the
MACs) and keep the rest dense. :func:`choose_kn_layers` makes that choice from a
per-layer ranking; ``plan(model, s, "auto", config=PlanConfig(auto_patterns=("dense",
"2:4")))`` uses it for s < 0.5 with the rule ``PlanConfig.mix_rule``:

==============  =============================================================  ==============
rule            damage estimate d_ℓ of putting 2:4 on the layer                data
==============  =============================================================  ==============
``mp``          the energy 2:4 removes against the layer's MP noise energy,    data-free
                ‖W − P₂:₄(W)‖²_F / (σ̂²·N·M)
``bulk-energy`` the share of ‖W‖² in the MP spikes, Σ_spikes s² / Σ s²         data-free
``scores``      ``PlanConfig.mix_scores[name]`` (e.g. measured sensitivity)    user scores
``size``        (no damage) largest layer first                                data-free
``budget``      (no damage) largest sparsity of the plan's budget first        per budget
``round``       (no selection) each layer's budget rounded to the nearest      —
                auto pattern, the rule for s ≥ 0.5 and other candidates
==============  =============================================================  ==============

The damage rules are a greedy knapsack: layers go by damage per unit of cost,
d_ℓ / cost_ℓ, lowest first, so a large layer that is barely hurt comes before a
small one that is barely hurt.

The target is s · Σ cost over the eligible and ineligible target layers, cost =
weights (default) or ``PlanConfig.mix_costs`` (e.g. each layer's dense MACs from
``mp_plugin.masks.macs.count_macs``: equal sparse-execution MACs). A 2:4 layer removes
half its cost; layers are taken in rank order when they bring the removed total
closer to the target.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from mp_plugin.errors import ConfigError

__all__ = ["MIX_RULES", "DAMAGE_RULES", "DEPLOYABLE_MIX", "choose_kn_layers", "kn_noise_ratio", "mix_order"]

MIX_RULES = ("mp", "bulk-energy", "size", "budget", "scores", "round")
DAMAGE_RULES = ("mp", "bulk-energy", "scores")
DEPLOYABLE_MIX = ("dense", "2:4")


def kn_noise_ratio(weight: torch.Tensor, fit: Any, k: int = 2, n: int = 4) -> float:
    """‖W − P_k:n(W)‖²_F / (σ̂²·N·M): the energy magnitude k:n removes over the layer's MP noise energy.

    Below 1, k:n removes less than the fitted noise bulk holds. NaN without a fit.
    """
    from mp_plugin.masks.select import nm_mask

    if fit is None or fit.degenerate or fit.sigma <= 0:
        return float("nan")
    w = weight.detach().to(torch.float64)
    removed = float(w.masked_fill(nm_mask(w, k, n), 0.0).square().sum())
    return removed / (fit.sigma**2 * fit.shape[0] * fit.shape[1])


def mix_order(
    rule: str,
    weights: Sequence[torch.Tensor],
    fits: Sequence[Any],
    names: Sequence[str],
    budgets: Sequence[float] | None = None,
    scores: dict[str, float] | None = None,
    costs: Sequence[float] | None = None,
) -> np.ndarray:
    """Per-layer rank keys for ``rule`` (lower → takes 2:4 first); NaN keys go last.

    Damage rules (:data:`DAMAGE_RULES`) return d_ℓ / cost_ℓ (cost default: weights).
    """
    c = np.asarray([w.numel() for w in weights] if costs is None else costs, dtype=np.float64)
    if rule == "mp":
        return np.asarray([kn_noise_ratio(w, f) for w, f in zip(weights, fits)], dtype=np.float64) / c
    if rule == "bulk-energy":
        return np.asarray([f.spike_energy_fraction if f is not None else np.nan for f in fits], dtype=np.float64) / c
    if rule == "size":
        return -np.asarray([w.numel() for w in weights], dtype=np.float64)
    if rule == "budget":
        if budgets is None:
            raise ConfigError("mix rule 'budget' needs the per-layer budgets")
        return -np.asarray(budgets, dtype=np.float64)
    if rule == "scores":
        if not scores:
            raise ConfigError("mix rule 'scores' needs PlanConfig.mix_scores {layer name: score}")
        return np.asarray([scores.get(nm, np.nan) for nm in names], dtype=np.float64) / c
    raise ConfigError(f"unknown mix rule {rule!r}; use one of {MIX_RULES}")


def choose_kn_layers(
    keys: np.ndarray, costs: Sequence[float], eligible: Sequence[bool], sparsity: float, fraction: float = 0.5
) -> np.ndarray:
    """Which layers take the k:n pattern (True) so that the removed cost is closest to s·Σ cost.

    Args:
        keys: (L,) rank keys, lower first (NaN last, ties by layer order).
        costs: (L,) per-layer cost (weights or MACs), ≥ 0.
        eligible: (L,) whether the layer can take the pattern.
        sparsity: overall target s (fraction of the total cost to remove).
        fraction: cost fraction the pattern removes (1 − k/n; 0.5 for 2:4).

    Returns:
        (L,) bool. Layers are visited in key order and taken when taking them brings
        the removed total closer to the target.
    """
    keys = np.asarray(keys, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    target = float(sparsity) * float(c.sum())
    order = np.lexsort((np.arange(len(keys)), np.where(np.isfinite(keys), keys, np.inf), ~np.isfinite(keys)))
    chosen = np.zeros(len(keys), dtype=bool)
    removed = 0.0
    for i in order:
        if not eligible[i]:
            continue
        gain = fraction * c[i]
        if abs(removed + gain - target) < abs(removed - target):
            chosen[i] = True
            removed += gain
    return chosen
