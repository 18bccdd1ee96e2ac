"""Build the prune plan: what to prune where, decided before anything is applied.

``plan(model, sparsity, pattern, budget)`` fits MP to every target layer,
computes budgets, rounds them to deployable patterns and returns a
:class:`~mp_plugin.planning.plan.PrunePlan` (the plan's data, JSON and tables
live in :mod:`mp_plugin.planning.plan` and :mod:`mp_plugin.planning.table`; the
names are re-exported here). Applying it (``mp_plugin.apply``), exporting and
certifying are separate steps that read it.

The module is ``mp_plugin.planning.build``; ``mp_plugin.plan`` is the function.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import warnings
from typing import Any

from torch import nn

from mp_plugin.budget.mix import CALIBRATED_MIX_RULES, DEPLOYABLE_MIX, MixLayers, choose_mix, default_mix_rule
from mp_plugin.budget.rules import BUDGET_METHODS, DEFAULT_BUDGET, BudgetContext, default_budget
from mp_plugin.errors import ConfigError, InvalidWeightError, NoPrunableLayersError, PatternError
from mp_plugin.layers.discovery import TargetLayer, find_target_layers
from mp_plugin.layers.offload import is_offloaded, preload_reason
from mp_plugin.layers.patterns import Pattern, round_budget_to_pattern
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.masks.counts import check_sparsity, global_prune_counts, uniform_prune_counts
from mp_plugin.planning.plan import SCHEMA_VERSION, LayerPlan, PlanConfig, PrunePlan
from mp_plugin.spectrum.analysis import LayerWeights, fit_target_layers

__all__ = ["PlanConfig", "LayerPlan", "PrunePlan", "plan", "split_method", "SCHEMA_VERSION"]


def _fit_layers(
    targets: list[TargetLayer],
    cfg: PlanConfig,
    show_progress: bool,
    reuse: PrunePlan | None = None,
    distributed: bool = False,
) -> tuple[list, list[str]]:
    """Fit every target in bounded work units (``mp_plugin.spectrum.analysis``); undefined fits become None with a note."""
    kept = {t.name: tuple(t.weight.shape) for t in targets}
    old = {
        lp.name: lp.fit
        for lp in (reuse.layers if reuse is not None else [])
        if lp.fit is not None and kept.get(lp.name) == tuple(lp.weight_shape)
    }
    return fit_target_layers(
        targets,
        cfg.alpha,
        cfg.beta,
        cfg.estimator,
        cfg.edge_compat,
        cfg.gram_dtype,
        cfg.float32_sigma_rtol,
        show_progress=show_progress,
        reuse=old,
        distributed=distributed,
    )


PROJECTIONS = ("magnitude", "cast")  # k:n projections an adapter's old ``method`` could name


def split_method(
    budget: str | None, projection: str | None, method: str | None, who: str, restore: Any = False
) -> tuple[str, str]:
    """Resolve an adapter's ``budget`` and deprecated ``method`` into ``(budget, projection)``.

    ``budget=None`` (no ``method``) is the route's default, :func:`~mp_plugin.budget.rules.default_budget`
    of ``restore``.

    The adapters' old ``method`` meant both: ``"cast"`` was SEB budgets plus the CAST
    projection, any other value the budget method. ``budget="cast"`` (the old value
    passed positionally) is read the same way. Both emit a DeprecationWarning.
    """
    if method is None and budget is None:
        return default_budget(restore), projection
    if method is None and budget != "cast":
        return budget, projection
    old = method if method is not None else budget
    warnings.warn(
        f"{who}(method=...) is deprecated: use budget=... (seb, seb-hill, magnitude, uniform) and "
        "projection=... (magnitude, cast)",
        DeprecationWarning,
        stacklevel=3,
    )
    return ("seb", "cast") if old == "cast" else (old, projection)


def uses_mix(pattern: str | Pattern, config: PlanConfig, sparsity: float) -> bool:
    """Whether ``plan`` chooses the dense/2:4 mix: pattern "auto" with candidates dense and 2:4, 0 < s < 0.5,
    and a mix rule other than ``"round"``."""
    return (
        pattern == "auto"
        and set(config.auto_patterns) == set(DEPLOYABLE_MIX)
        and 0 < sparsity < 0.5
        and config.mix_rule != "round"
    )


def _choose_mix(
    targets: list[TargetLayer],
    fits: list,
    budgets: list[float],
    s: float,
    cfg: PlanConfig,
    model: nn.Module,
    calibration: Any,
    show_progress: bool,
) -> list[bool]:
    """The dense/2:4 mix of :mod:`mp_plugin.budget.mix` for ``cfg.mix_rule``: True = the layer takes 2:4."""
    names = [t.name for t in targets]
    shapes = [tuple(t.weight.shape) for t in targets]  # shapes and sizes never load an offloaded weight
    for field in ("mix_scores", "mix_costs"):
        given = getattr(cfg, field) or {}
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise ConfigError(
                f"{field} names {len(unknown)} layer(s) that are not target layers of this model, e.g. "
                f"{unknown[:3]}; the targets are named like {names[:2]}"
            )
    missing = [n for n in names if cfg.mix_costs is not None and n not in cfg.mix_costs]
    if missing:  # weights for some layers and MACs for others would be no cost at all
        raise ConfigError(f"mix_costs has no cost for {len(missing)} target layer(s), e.g. {missing[:3]}; give all")
    costs = [float((cfg.mix_costs or {}).get(n, math.prod(sh))) for n, sh in zip(names, shapes)]
    kn = Pattern.parse("2:4")
    eligible = [kn.eligible(sh) for sh in shapes]
    layers = MixLayers(
        LayerWeights(targets),  # an offloaded weight is read one layer at a time
        fits,
        names,
        cfg.mix_scores,
        cfg.bulk_share.mix_beta,
        model,
        calibration,
        show_progress,
    )
    chosen = choose_mix(cfg.mix_rule, layers, eligible, s, costs, budgets)
    total = sum(costs)
    removed = 0.5 * sum(c for c, x in zip(costs, chosen) if x) / total
    if abs(removed - s) > 0.01:
        room = 0.5 * sum(c for c, ok in zip(costs, eligible) if ok) / total
        unit = "MACs" if cfg.mix_costs is not None else "weights"
        warnings.warn(
            f"dense/2:4 mix: whole layers take 2:4, and the chosen ones remove {removed:.2%} of the target "
            f"layers' {unit}, asked {s:.2%} (the closest the chosen rule reached; 2:4 on every eligible layer "
            f"would remove {room:.2%})",
            stacklevel=3,
        )
    return [bool(x) for x in chosen]


def plan(
    model: nn.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    budget: str = DEFAULT_BUDGET,
    config: PlanConfig | None = None,
    model_name: str = "",
    show_progress: bool = False,
    reuse_fits: PrunePlan | None = None,
    *,
    method: str | None = None,
    distributed: bool = False,
    calibration: Any = None,
) -> PrunePlan:
    """Fit MP to each target layer of ``model`` and decide per-layer budgets and patterns.

    Args:
        model: any ``nn.Module``; weights may be on CPU or CUDA, any float dtype. A wrapped
            model (``torch.compile``, DDP, …) is planned by the model inside it, so layer
            names carry no wrapper prefix (:func:`mp_plugin.layers.wrappers.unwrap_model`).
        sparsity: global fraction s ∈ [0, 1) of target weights to remove
            (for k:n patterns, the unstructured budget that guides the projection).
        pattern: ``"unstructured"``, a k:n string such as ``"2:4"`` (every
            eligible layer takes it, the rest stay dense), or ``"auto"``
            (round each layer's budget to the nearest of ``config.auto_patterns``;
            with ``auto_patterns=("dense", "2:4")`` and s < 0.5, the deployable mix:
            ``config.mix_rule`` picks the layers that take 2:4, see :mod:`mp_plugin.budget.mix`).
        budget: the budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS``
            (``"magnitude"``, ``"uniform"``, ``"seb"``, ``"seb-hill"``, ``"alpha"``,
            ``"bounded-bulk-energy"``, ``"bounded-spikes"``, ``"bounded-edge"``, and with
            calibration ``"owl"`` and ``"noise-floor"``); default
            :data:`mp_plugin.budget.rules.DEFAULT_BUDGET`.
        config: :class:`PlanConfig`.
        model_name: recorded in the plan.
        show_progress: show a tqdm bar over layers.
        reuse_fits: a plan of the same, unchanged weights: its MP fits are reused for
            layers of equal name and shape instead of being recomputed.
        method: deprecated name of ``budget`` (DeprecationWarning).
        distributed: layer-parallel analysis under ``torchrun``: every rank of the
            initialised ``torch.distributed`` default group calls ``plan`` on its full
            copy of the model, fits a share of the layers, and all ranks get the same
            plan (see :mod:`mp_plugin.spectrum.analysis`).
        calibration: a batch or list of batches, for budget methods that need data
            (``"owl"``, ``"noise-floor"``) and the ``"measured"`` mix rule; not stored in the plan.

    Returns:
        A :class:`PrunePlan`. Nothing in ``model`` is modified.

    Raises:
        InvalidSparsityError, PatternError, NoPrunableLayersError, InvalidWeightError.
    """
    if method is not None:
        warnings.warn("plan(method=...) is deprecated: use budget=...", DeprecationWarning, stacklevel=2)
        budget = method
    method = budget
    cfg = config or PlanConfig()
    s = check_sparsity(sparsity)
    if not isinstance(method, str) or method not in BUDGET_METHODS:
        hint = (
            "; 'cast' is a k:n projection, not a budget: plan with a budget method, then apply(..., projection='cast')"
            if method in ("cast", "obs", "cast-obs")
            else ""
        )
        raise ConfigError(f"unknown budget method {method!r}; known: {sorted(BUDGET_METHODS)}{hint}")
    if not isinstance(cfg, PlanConfig):
        raise ConfigError(f"config must be a PlanConfig, got {type(cfg).__name__}")
    if not isinstance(pattern, (str, Pattern)):
        raise PatternError(f"pattern must be a string ('unstructured', 'auto' or k:n such as '2:4'), got {pattern!r}")
    pat = None if pattern == "auto" else Pattern.parse(pattern)
    if pat is not None and pat.kind == "dense":
        raise PatternError(f"pattern {pattern!r} prunes nothing; use 'unstructured', 'auto' or a k:n pattern")
    use_mix = uses_mix(pattern, cfg, s)
    if use_mix and cfg.mix_rule in CALIBRATED_MIX_RULES and calibration is None:
        raise ConfigError(f"mix rule {cfg.mix_rule!r} needs calibration data: plan(..., calibration=batches)")
    model = unwrap_model(model)
    targets, skipped = find_target_layers(model, cfg.selection)
    if not targets:
        raise NoPrunableLayersError(
            f"{type(model).__name__} has no prunable Linear/Conv layer under the selection rules"
            + (f" ({len(skipped)} skipped: {skipped[0].name}: {skipped[0].reason}, …)" if skipped else "")
        )
    for t in targets:
        why = preload_reason(model, t.name) if t.weight.is_meta and not is_offloaded(t.module) else None
        if why is not None:
            raise InvalidWeightError(why)
    if use_mix and cfg.mix_rule is None:  # the plan records the rule it used (None: no mix was chosen)
        offloaded = any(is_offloaded(t.module) for t in targets)
        cfg = dataclasses.replace(cfg, mix_rule=default_mix_rule(calibration, offloaded))
    fits, notes = _fit_layers(targets, cfg, show_progress, reuse_fits, distributed)
    types = [t.layer_type for t in targets]
    spec = BUDGET_METHODS[method]
    weights = [t.weight for t in targets]
    if spec.counts is not None:
        if spec.needs_calibration and calibration is None:
            raise ConfigError(f"budget method {method!r} needs calibration data: plan(..., calibration=batches)")
        ctx = BudgetContext(
            names=[t.name for t in targets],
            weights=LayerWeights(targets),  # an accelerate-offloaded weight is brought in as it is read
            numels=[int(t.weight.numel()) for t in targets],
            layer_types=types,
            fits=list(fits),
            sparsity=s,
            options=cfg,
            model=model,
            calibration=calibration,
        )
        counts, w, z = spec.counts(ctx)
    else:
        w, z = spec.weights(fits, types, s, cfg.seb)
        layer_weights = LayerWeights(targets)  # accelerate-offloaded weights are read one layer at a time
        counts = uniform_prune_counts(weights, s) if spec.uniform else global_prune_counts(layer_weights, w, s)
    mix = None
    if use_mix:
        budgets = [c / int(t.weight.numel()) for t, c in zip(targets, counts)]
        mix = _choose_mix(targets, fits, budgets, s, cfg, model, calibration, show_progress)
    layers = []
    for i, (t, f, note, wl, zl, c) in enumerate(zip(targets, fits, notes, w, z, counts)):
        numel = int(t.weight.numel())
        budget = c / numel
        if mix is not None:
            lp_pat = Pattern.parse("2:4") if mix[i] else Pattern("dense")
            c = numel // 2 if mix[i] else 0
            budget = c / numel
        elif pat is None:
            lp_pat = round_budget_to_pattern(budget, tuple(t.weight.shape), cfg.auto_patterns)
        elif pat.is_kn and not pat.eligible(tuple(t.weight.shape)):
            lp_pat = Pattern("dense")
            note = (
                note + "; " if note else ""
            ) + f"input channels {t.weight.shape[1]} not divisible by {pat.n}: kept dense"
        else:
            lp_pat = pat
        sparsity_l = budget if lp_pat.kind == "unstructured" else float(lp_pat.sparsity)
        layers.append(
            LayerPlan(
                name=t.name,
                kind=t.kind,
                layer_type=t.layer_type,
                shape=t.shape,
                weight_shape=tuple(t.weight.shape),
                numel=numel,
                fit=f,
                z=float(zl),
                w=float(wl),
                unstructured_budget=budget,
                n_prune=int(c),
                pattern=str(lp_pat),
                sparsity=sparsity_l,
                note=note,
            )
        )
    return PrunePlan(
        sparsity=s,
        pattern=str(pattern) if pat is None else str(pat),
        method=method,
        layers=layers,
        skipped=[{"name": k.name, "reason": k.reason} for k in skipped],
        config=cfg,
        model_name=model_name,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    )
