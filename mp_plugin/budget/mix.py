"""The deployable dense/2:4 mix: which layers take 2:4 when the target is below 50 %.

TensorRT and cuSPARSELt run 2:4 and nothing between, so "remove 30 % of the
weights" really means: put 2:4 on layers holding 60 % of the weights (or of the
MACs) and keep the rest dense. :func:`choose_mix` makes that choice;
``plan(model, s, "auto", config=PlanConfig(auto_patterns=("dense", "2:4")))`` (CLI:
``--pattern auto --auto-patterns dense,2:4``) uses it for s < 0.5 with the rule
``PlanConfig.mix_rule``:

==============  =============================================================  ==============
rule            damage estimate d_ℓ of putting 2:4 on the layer                data
==============  =============================================================  ==============
``mp-bulk``     the energy 2:4 removes in the units of the ``mp-bulk``          data-free
                budget: ‖W − P₂:₄(W)‖²_F / w_ℓ², w_ℓ = exp(−β·z_ℓ) the
                bulk-share weight of :mod:`mp_plugin.budget.bulk_share`
                (β = ``PlanConfig.bulk_share.mix_beta``, 0.25 as the budget's)
                — the default
``mp``          the energy 2:4 removes against the layer's MP noise energy,    data-free
                ‖W − P₂:₄(W)‖²_F / (σ̂²·N·M)
``bulk-energy`` the share of ‖W‖² in the MP spikes, Σ_spikes s² / Σ s²         data-free
``measured``    the model's relative output error on the calibration data     calibration
                with only this layer magnitude 2:4, Σ‖y_ℓ − y‖² / Σ‖y‖²
                (:mod:`mp_plugin.budget.mix_measured`; a measurement)
``measured-     the same after prune–restore of that layer alone (its kept    calibration
restore``       weights re-solved on its input Gram): for ``apply(restore=)``
``scores``      ``PlanConfig.mix_scores[name]`` (e.g. measured sensitivity)    user scores
``size``        (no damage) largest layer first                                data-free
``budget``      (no damage) largest sparsity of the plan's budget first        per budget
``round``       (no selection) each layer's budget rounded to the nearest      —
                auto pattern, the rule for s ≥ 0.5 and other candidates
==============  =============================================================  ==============

The damage rules are a registry (:data:`DAMAGE_FUNCTIONS`; add one with
:func:`register_mix_damage`, a function of :class:`MixLayers` returning d_ℓ) and solve a
knapsack exactly (:func:`knapsack_kn_layers`): of all the
sets of eligible layers whose removed cost lies within ``tolerance`` (default 0.5 % of
the total cost) of the target, the one with the least total damage Σ d_ℓ (dynamic
programming over the removed cost, discretised into at least 4096 steps and 100 per
eligible layer; with thousands of layers, by damage per removed cost instead). Summing the
d_ℓ treats the layers' damages as additive, an approximation (the layers of a network
interact). The rank rules (``size``, ``budget``) visit the layers in rank order and take a layer
when it brings the removed total closer to the target (:func:`choose_kn_layers`).

``mp-bulk`` is the default because it is the MP rule that measured best
(``benchmarks/results/budgets.md``): it carries the default budget's per-layer weight
w_ℓ over to the choice of whole layers, so that 2:4 goes where it removes the least
score energy Σ(|W|/w_ℓ)², with the budget's β (no parameter of its own).

The target is s · Σ cost over the eligible and ineligible target layers, cost =
weights (default) or ``PlanConfig.mix_costs`` (e.g. each layer's dense MACs from
``mp_plugin.masks.macs.count_macs``: equal sparse-execution MACs). A 2:4 layer removes
half its cost.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mp_plugin.budget.bulk_share import DEFAULT_MIX_BETA, bulk_share_weights
from mp_plugin.budget.mix_measured import measured_damage_array, measured_restore_damage_array
from mp_plugin.errors import ConfigError, PatternError
from mp_plugin.masks.counts import weight_numels

__all__ = [
    "CALIBRATED_MIX_RULES",
    "DAMAGE_FUNCTIONS",
    "DEFAULT_MIX_RULE",
    "MixLayers",
    "RANK_RULES",
    "DEPLOYABLE_MIX",
    "MAX_KNAPSACK_CELLS",
    "choose_kn_layers",
    "choose_mix",
    "default_mix_rule",
    "kn_noise_ratio",
    "kn_removed_energy",
    "knapsack_kn_layers",
    "layer_damage",
    "layer_sizes",
    "mix_order",
    "mix_rules",
    "register_mix_damage",
]

CALIBRATED_MIX_RULES = ("measured", "measured-restore")  # damage rules that run the model on calibration data
RANK_RULES = ("size", "budget", "round")  # no damage estimate: an order (or, for "round", no selection)
DEFAULT_MIX_RULE = "mp-bulk"
DEPLOYABLE_MIX = ("dense", "2:4")
MAX_KNAPSACK_CELLS = 50_000_000  # booleans of the knapsack table (50 MB); beyond, layers go by damage per cost


@dataclass(frozen=True)
class MixLayers:
    """What a damage rule reads about the L target layers.

    Attributes:
        weights: the layers' weights (any shape with the k:n layout of ``masks.select.nm_mask``).
        fits: their MP fits (``None`` where missing).
        names: layer names (keys of ``scores``).
        scores: ``PlanConfig.mix_scores`` ({name: damage}) or None.
        beta: β of the ``mp-bulk`` weights w_ℓ = exp(−β·z_ℓ) (``PlanConfig.bulk_share.mix_beta``).
        model: the model the layers belong to (for rules that measure; ``names`` are its module names).
        calibration: calibration batches (for rules that measure), or None.
        show_progress: whether a measuring rule shows a progress bar.
    """

    weights: Sequence[torch.Tensor]
    fits: Sequence[Any]
    names: Sequence[str]
    scores: dict[str, float] | None = None
    beta: float = DEFAULT_MIX_BETA
    model: Any = None
    calibration: Any = None
    show_progress: bool = False


DamageFn = Callable[[MixLayers], np.ndarray]
DAMAGE_FUNCTIONS: dict[str, DamageFn] = {}


def register_mix_damage(name: str, fn: DamageFn) -> None:
    """Register a damage rule ``fn(layers) -> (L,) d_ℓ`` (NaN: unknown) as ``PlanConfig.mix_rule=name``."""
    if name in RANK_RULES:
        raise ConfigError(f"{name!r} is a built-in rank rule and cannot be a damage rule")
    DAMAGE_FUNCTIONS[name] = fn


def default_mix_rule(calibration: Any = None, offloaded: bool = False) -> str:
    """The mix rule ``plan`` uses when ``PlanConfig.mix_rule`` is None.

    ``"measured"`` when calibration data is given (it beat size and every MP rule without
    restore on MiniLM and EfficientNet-Lite0 in ``benchmarks/results/budgets.md``) and the
    model's layers are in memory, else :data:`DEFAULT_MIX_RULE` (``"mp-bulk"``, data-free;
    also for an accelerate-offloaded model: ``measured`` runs there when asked for, but each
    layer costs one pass of the offloaded model, reading every offloaded weight again).
    """
    return "measured" if calibration is not None and not offloaded else DEFAULT_MIX_RULE


def mix_rules() -> tuple[str, ...]:
    """Every mix rule: the registered damage rules, then the rank rules."""
    return (*DAMAGE_FUNCTIONS, *RANK_RULES)


def layer_sizes(weights: Sequence[torch.Tensor]) -> np.ndarray:
    """(L,) number of weights per layer; a sequence with ``numels()`` (``LayerWeights``) is not loaded."""
    return np.asarray(weight_numels(weights), dtype=np.float64)


def kn_removed_energy(weight: torch.Tensor, k: int = 2, n: int = 4) -> float:
    """‖W − P_k:n(W)‖²_F: the energy (weight units²) that magnitude k:n removes from ``weight``."""
    from mp_plugin.masks.select import nm_mask

    w = weight.detach().to(torch.float64)
    return float(w.masked_fill(nm_mask(w, k, n), 0.0).square().sum())


def kn_noise_ratio(weight: torch.Tensor, fit: Any, k: int = 2, n: int = 4) -> float:
    """‖W − P_k:n(W)‖²_F / (σ̂²·N·M): the energy magnitude k:n removes over the layer's MP noise energy.

    Below 1, k:n removes less than the fitted noise bulk holds. NaN without a fit.
    """
    if fit is None or fit.degenerate or fit.sigma <= 0:
        return float("nan")
    return kn_removed_energy(weight, k, n) / (fit.sigma**2 * fit.shape[0] * fit.shape[1])


def _or_nan(fn: Any, *args: Any) -> float:
    """``fn(*args)``, or NaN for a layer that cannot take 2:4 (its input width is not a multiple of 4):
    such a layer stays dense in the mix, so its damage is never read."""
    try:
        return fn(*args)
    except PatternError:
        return float("nan")


def _mp_bulk_damage(layers: MixLayers) -> np.ndarray:
    w, _ = bulk_share_weights(layers.fits, layers.beta)
    energy = [_or_nan(kn_removed_energy, x) for x in layers.weights]
    return np.asarray(energy, dtype=np.float64) / np.square(w)


def _noise_damage(layers: MixLayers) -> np.ndarray:
    return np.asarray([_or_nan(kn_noise_ratio, w, f) for w, f in zip(layers.weights, layers.fits)], dtype=np.float64)


def _spike_share_damage(layers: MixLayers) -> np.ndarray:
    return np.asarray([f.spike_energy_fraction if f is not None else np.nan for f in layers.fits], dtype=np.float64)


def _score_damage(layers: MixLayers) -> np.ndarray:
    if not layers.scores:
        raise ConfigError("mix rule 'scores' needs PlanConfig.mix_scores {layer name: score}")
    return np.asarray([layers.scores.get(nm, np.nan) for nm in layers.names], dtype=np.float64)


register_mix_damage("mp-bulk", _mp_bulk_damage)
register_mix_damage("mp", _noise_damage)
register_mix_damage("bulk-energy", _spike_share_damage)
register_mix_damage("scores", _score_damage)
register_mix_damage("measured", measured_damage_array)
register_mix_damage("measured-restore", measured_restore_damage_array)


def layer_damage(rule: str, layers: MixLayers) -> np.ndarray:
    """(L,) damage estimates d_ℓ of putting 2:4 on each layer under a registered damage rule (NaN: unknown).

    ``rule`` is a key of :data:`DAMAGE_FUNCTIONS`; ``layers`` is what the rule reads.
    """
    if rule not in DAMAGE_FUNCTIONS:
        raise ConfigError(f"{rule!r} is not a damage rule; use one of {tuple(DAMAGE_FUNCTIONS)}")
    return DAMAGE_FUNCTIONS[rule](layers)


def mix_order(
    rule: str,
    layers: MixLayers,
    budgets: Sequence[float] | None = None,
    costs: Sequence[float] | None = None,
) -> np.ndarray:
    """Per-layer rank keys for ``rule`` (lower → takes 2:4 first); NaN keys go last.

    Damage rules (:data:`DAMAGE_FUNCTIONS`) return d_ℓ / cost_ℓ (cost default: weights).
    """
    c = layer_sizes(layers.weights) if costs is None else np.asarray(costs, dtype=np.float64)
    if rule in DAMAGE_FUNCTIONS:
        return layer_damage(rule, layers) / c
    if rule == "size":
        return -layer_sizes(layers.weights)
    if rule == "budget":
        if budgets is None:
            raise ConfigError("mix rule 'budget' needs the per-layer budgets")
        return -np.asarray(budgets, dtype=np.float64)
    raise ConfigError(f"unknown mix rule {rule!r}; use one of {mix_rules()}")


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


def knapsack_kn_layers(
    damage: np.ndarray,
    costs: Sequence[float],
    eligible: Sequence[bool],
    sparsity: float,
    fraction: float = 0.5,
    tolerance: float = 0.005,
    resolution: int = 4096,
    max_cells: int = MAX_KNAPSACK_CELLS,
) -> np.ndarray:
    """The set of layers that takes the k:n pattern with the least total damage near the target.

    Minimises Σ_{chosen} d_ℓ over the sets whose removed cost fraction·Σ_{chosen} c_ℓ lies
    within ``tolerance``·Σ c of the target s·Σ c; when no set does, the reachable removed
    cost closest to the target is used (the larger of two equally close ones: the target
    asked for that much sparsity). Exact up to the discretisation of the removed cost
    into R steps of Σ c / R (dynamic programming, O(L·R) time and booleans), with
    R = max(``resolution``, 100·L) for L eligible layers, so that the rounding of the chosen
    layers' costs (at most half a step each) moves the total by at most ``tolerance`` more;
    a layer that removes less than half a step stays dense. When L·R would exceed
    ``max_cells`` (thousands of layers, e.g. the experts of a mixture-of-experts model,
    each small against the total) the layers are instead taken in order of damage per
    removed cost, d_ℓ / c_ℓ (:func:`choose_kn_layers`, exact costs; close to the optimum
    when every layer is small against the target).

    Args:
        damage: (L,) d_ℓ (a measured loss may be slightly negative; NaN: unknown, treated as
            more than all known damages together, so such a layer is taken only when the
            target cannot be reached without it).
        costs: (L,) per-layer cost (weights or MACs), ≥ 0.
        eligible: (L,) whether the layer can take the pattern.
        sparsity: overall target s (fraction of the total cost to remove).
        fraction: cost fraction the pattern removes (0.5 for 2:4).
        tolerance: accepted distance from the target, as a fraction of the total cost.
        resolution: the fewest cost steps of the discretisation (raised to 100 per eligible layer).
        max_cells: the largest dynamic-programming table (layers × steps booleans) before the
            damage-per-cost order is used instead.

    Returns:
        (L,) bool, True where the layer takes the pattern.
    """
    d = np.asarray(damage, dtype=np.float64)
    c = np.asarray(costs, dtype=np.float64)
    if d.shape != c.shape or len(eligible) != len(c):
        raise ConfigError(
            f"damage {d.shape}, costs {c.shape} and eligible ({len(eligible)}) must have one entry per layer"
        )
    if (c < 0).any():
        raise ConfigError("knapsack_kn_layers: costs must be ≥ 0")
    total = float(c.sum())
    if total <= 0 or sparsity <= 0:
        return np.zeros(len(c), dtype=bool)
    n_ok = int((np.asarray(eligible, dtype=bool) & (c > 0)).sum())
    steps = max(int(resolution), 100 * n_ok)
    if n_ok * steps > max_cells:
        with np.errstate(divide="ignore", invalid="ignore"):
            return choose_kn_layers(np.where(c > 0, d / c, np.nan), c, eligible, sparsity, fraction)
    known = np.isfinite(d)
    d = np.where(known, d, float(np.abs(d[known]).sum()) + 1.0 if known.any() else 1.0)
    unit = total / steps
    size = np.rint(fraction * c / unit).astype(np.int64)
    ok = np.asarray(eligible, dtype=bool) & (size > 0)
    top = int(size[ok].sum())
    best = np.full(top + 1, np.inf)
    best[0] = 0.0
    took = np.zeros((len(c), top + 1), dtype=bool)
    for i in np.flatnonzero(ok):
        k = int(size[i])
        cand = np.full(top + 1, np.inf)
        cand[k:] = best[: top + 1 - k] + d[i]
        better = cand < best
        took[i] = better
        best = np.where(better, cand, best)
    reach = np.flatnonzero(np.isfinite(best))
    target = float(sparsity) * total / unit
    items = np.flatnonzero(ok)

    def members(k: int) -> np.ndarray:
        out = np.zeros(len(c), dtype=bool)
        for i in items[::-1]:
            if took[i, k]:
                out[i] = True
                k -= int(size[i])
        return out

    near = reach[np.abs(reach - target) <= tolerance * steps]
    if near.size:
        return members(int(near[np.argmin(best[near])]))
    # none within tolerance: the closest reachable total below or above, compared in exact (undiscretised)
    # cost; of two equally close (at s = 25 % a set and its complement are), the larger
    below, above = reach[reach <= target], reach[reach >= target]
    sets = [members(int(k)) for k in ([below.max()] if below.size else []) + ([above.min()] if above.size else [])]
    goal = float(sparsity) * total
    removed = [fraction * float(c[m].sum()) for m in sets]
    return min(zip(sets, removed), key=lambda t: (round(abs(t[1] - goal), 6), -t[1]))[0]


def choose_mix(
    rule: str,
    layers: MixLayers,
    eligible: Sequence[bool],
    sparsity: float,
    costs: Sequence[float] | None = None,
    budgets: Sequence[float] | None = None,
) -> np.ndarray:
    """(L,) bool: which layers take 2:4 under ``rule`` (damage rules: exact knapsack; rank rules: greedy).

    ``layers.model`` and ``layers.calibration`` are read by the rules of :data:`CALIBRATED_MIX_RULES` only.
    """
    c = layer_sizes(layers.weights) if costs is None else np.asarray(costs, dtype=np.float64)
    if rule in DAMAGE_FUNCTIONS:
        return knapsack_kn_layers(layer_damage(rule, layers), c, eligible, sparsity)
    return choose_kn_layers(mix_order(rule, layers, budgets, c), c, eligible, sparsity)
