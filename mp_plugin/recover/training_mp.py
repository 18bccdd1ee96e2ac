"""Training-time MP pruning (ALGORITHM.md §1.4 (i), (ii) step 4, §4 "L2 / L1 regularisation").

* :class:`MPSingularValuePruning` — the 2023 RMT-SVD callback. Every ℓ epochs,
  for each target layer: fit MP, keep every spike (s > σ₊) plus the largest
  fraction f(epoch) of the bulk singular values, floored at a minimum rank
  (default: the network's output size), and recompose W' = U Σ' Vᵀ in place.
  With ``split=True`` a layer whose kept rank r satisfies r·(N+M) < N·M is
  replaced by two layers (in → r → out) instead. The weight operators are
  :func:`mp_plugin.spectrum.operators.remove_singular_values` and
  :func:`mp_plugin.spectrum.operators.low_rank_split`.
* Schedules f(epoch): :class:`ConstantKeep` (S4: 0.45) and :class:`LinearDecayKeep`
  (S3: max(0, 1 − epoch/300); ESM_2 FC example: horizon 200, every 4 epochs).
* :func:`elastic_net_penalty` — λ₁‖W‖₁ + λ₂‖W‖²_F over the target weights, to add to the loss.
* :func:`regulariser_shrink` — the 2025 data-free step: AdamW on the regularisers
  only (L1, L2, and a per-layer group lasso ‖W‖_F), each layer's group-lasso term
  and gradient scaled by c_ℓ = 1/(1 + 10⁴·μ_ℓ/i) with μ_ℓ the MP fit error and i
  the cycle; gradients of pruned (zero) weights are zeroed, so zeros stay zero. It runs on
  the one training loop (:func:`mp_plugin.recover.distill.distill`, data-free) with a
  :class:`~mp_plugin.masks.keep.MaskKeeper` holding the zeros.

Epochs count from 1; a callback called after epoch e prunes when e % ℓ == 0.

Refitting a truncated layer. After a step keeps rank r < p = min(N, M), training
regrows the dropped p − r directions only to gradient-noise size. A plain BEMA
fit on the next step then regresses mostly on those regrown values, finds a tiny
σ̂ and calls every kept value a spike, so the kept rank jumps back up. The
callback therefore refits such a layer on its top r values only: the eigenvalues
λ = s²/max(N, M) at descending ranks k ≤ r (spikes excluded, top α trimmed) are
regressed through the origin on the unit MP quantiles at levels 1 − (k − ½)/p,
σ̂² = Σ qλ / Σ q²; the TW-corrected edge factor T₊/σ̂² of the ordinary fit is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection, TargetLayer, find_target_layers
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.recover.distill import DistillConfig, distill
from mp_plugin.spectrum import SpectralFit, fit_marchenko_pastur, mp_quantile
from mp_plugin.spectrum.operators import kept_rank, low_rank_split, remove_singular_values, replace_module

__all__ = [
    "ConstantKeep",
    "LayerPruneRecord",
    "LinearDecayKeep",
    "MPSingularValuePruning",
    "PruneStep",
    "ShrinkReport",
    "elastic_net_penalty",
    "output_dim",
    "refit_truncated",
    "regulariser_shrink",
]

Schedule = Callable[[int], float]


@dataclass(frozen=True)
class ConstantKeep:
    """f(epoch) = ``fraction`` of the bulk kept at every pruning step (S4: 0.45)."""

    fraction: float = 0.45

    def __call__(self, epoch: int) -> float:
        return float(self.fraction)


@dataclass(frozen=True)
class LinearDecayKeep:
    """f(epoch) = max(0, 1 − epoch/``horizon``) (S3: horizon 300; ESM_2 FC example: 200)."""

    horizon: float = 300.0

    def __call__(self, epoch: int) -> float:
        return max(0.0, 1.0 - epoch / self.horizon)


def _default_selection() -> LayerSelection:
    # The 2023 papers prune every FC layer, the last one included (the rank floor protects it).
    return LayerSelection(include_conv=False, exclude_head=False)


def output_dim(model: nn.Module) -> int:
    """Output size of the last Linear in module order (the 2023 papers' rank floor)."""
    last = None
    for module in model.modules():
        if isinstance(module, nn.Linear):
            last = module
    if last is None:
        raise MPPluginError(f"{type(model).__name__} has no Linear layer: give min_rank explicitly")
    return int(last.out_features)


@dataclass
class LayerPruneRecord:
    """What one pruning step did to one layer.

    Attributes:
        name: qualified module name (before any split).
        shape: (N, M) matrix view (out, in·kh·kw).
        sigma_plus: fitted spike threshold σ₊ (weight units).
        n_spikes: singular values above σ₊.
        keep_fraction: f(epoch) used.
        kept: rank after the step, spikes + ⌊f·bulk⌋ floored at the minimum rank.
        split: True when the layer was replaced by two layers.
    """

    name: str
    shape: tuple[int, int]
    sigma_plus: float
    n_spikes: int
    keep_fraction: float
    kept: int
    split: bool

    @property
    def full_rank(self) -> int:
        """min(N, M)."""
        return min(self.shape)


@dataclass
class PruneStep:
    """One pruning step: the epoch, f(epoch), and per-layer records."""

    epoch: int
    keep_fraction: float
    layers: list[LayerPruneRecord] = field(default_factory=list)

    @property
    def replaced(self) -> list[str]:
        """Names of layers replaced by low-rank splits in this step."""
        return [r.name for r in self.layers if r.split]

    @property
    def kept_singular_values(self) -> int:
        """Σ kept rank over layers."""
        return sum(r.kept for r in self.layers)

    @property
    def total_singular_values(self) -> int:
        """Σ min(N, M) over layers."""
        return sum(r.full_rank for r in self.layers)


def refit_truncated(fit: SpectralFit, rank: int, alpha: float = 0.25, max_iter: int = 10) -> SpectralFit:
    """Re-estimate σ̂, σ₊ and the spike count of a layer last truncated to ``rank`` from its top values.

    Args:
        fit: ordinary fit of the current weight (gives the singular values and the edge factor).
        rank: r, the rank kept at the previous step; r ≥ p returns ``fit`` unchanged.
        alpha: fraction of the kept bulk trimmed from the top of the regression window.

    Returns:
        A copy of ``fit`` with sigma, sigma_plus, lambda_plus, threshold, n_spikes, bulk_fraction updated.
    """
    rows, cols = fit.shape
    p, n = min(rows, cols), max(rows, cols)
    if rank >= p or fit.sigma <= 0 or rank < 4:
        return fit
    edge = fit.threshold / fit.sigma**2  # T₊/σ̂²: depends on shape and β only
    lam = np.asarray(fit.singular_values[:rank], dtype=np.float64) ** 2 / n  # descending
    n_spk, sigma2 = 0, fit.sigma**2
    for _ in range(max_iter):
        k = np.arange(n_spk, rank)
        k = k[k >= n_spk + int(alpha * (rank - n_spk))]  # trim the top of the kept bulk
        if len(k) < 2:
            break
        q = mp_quantile(1.0 - (k + 0.5) / p, fit.gamma)
        sigma2 = float(q @ lam[k]) / float(q @ q)
        new = min(int(np.count_nonzero(lam > sigma2 * edge)), rank - 2)
        if new == n_spk:
            break
        n_spk = new
    sigma_plus = math.sqrt(n * sigma2 * edge)
    spikes = int(np.count_nonzero(fit.singular_values > sigma_plus))
    return replace(
        fit,
        sigma=math.sqrt(sigma2),
        sigma_plus=sigma_plus,
        lambda_plus=sigma2 * (1.0 + math.sqrt(fit.gamma)) ** 2,
        threshold=sigma2 * edge,
        n_spikes=spikes,
        bulk_fraction=1.0 - spikes / p,
    )


def _swap_in_optimizer(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module) -> None:
    """Replace ``old``'s parameters by ``new``'s in the param group that held them; the bias keeps its state."""
    old_params = list(old.parameters())
    old_ids = {id(p) for p in old_params}
    new_params = list(new.parameters())
    for group in optimizer.param_groups:
        if any(id(p) in old_ids for p in group["params"]):
            group["params"] = [p for p in group["params"] if id(p) not in old_ids] + new_params
            break
    else:
        return
    old_bias = getattr(old, "bias", None)
    new_bias = getattr(new[-1], "bias", None) if isinstance(new, nn.Sequential) else None
    if old_bias is not None and new_bias is not None and old_bias in optimizer.state:
        optimizer.state[new_bias] = optimizer.state.pop(old_bias)
    for p in old_params:
        optimizer.state.pop(p, None)


class MPSingularValuePruning:
    """Every ``every`` epochs, drop sub-edge singular values of each target layer on a schedule.

    Use as ``on_epoch_end`` hook: ``callback(model, epoch, optimizer)``; it returns a
    :class:`PruneStep` on pruning epochs and None otherwise. When a layer is split
    and ``optimizer`` is given, the old layer's parameters are replaced by the new
    ones in the optimizer (the bias keeps its momentum state); without an
    optimizer, rebuild yours when ``step.replaced`` is non-empty.

    Args:
        every: ℓ, epochs between pruning steps.
        schedule: f(epoch) ∈ [0, 1], fraction of the bulk kept (default :class:`ConstantKeep` (0.45)).
        min_rank: rank floor; None = the model's output size (:func:`output_dim`).
        split: replace a layer by the two-layer low-rank split when that saves parameters.
        selection: which layers (default: every Linear, the head included; set
            ``include_conv=True`` for ungrouped convs).
        fit_options: keyword arguments of :func:`fit_marchenko_pastur` (alpha, beta, estimator).
    """

    def __init__(
        self,
        every: int = 4,
        schedule: Schedule | None = None,
        min_rank: int | None = None,
        split: bool = False,
        selection: LayerSelection | None = None,
        fit_options: dict | None = None,
    ) -> None:
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise MPPluginError(f"every must be a whole number of epochs ≥ 1, got {every!r}")
        if min_rank is not None and (isinstance(min_rank, bool) or not isinstance(min_rank, int) or min_rank < 1):
            raise MPPluginError(f"min_rank must be None or an integer ≥ 1, got {min_rank!r}")
        self.every = int(every)
        self.schedule: Schedule = schedule if schedule is not None else ConstantKeep(0.45)
        self.min_rank = min_rank
        self.split = bool(split)
        self.selection = selection if selection is not None else _default_selection()
        self.fit_options = dict(fit_options or {})
        self.history: list[PruneStep] = []
        self._rank: dict[str, int] = {}  # layer name → rank kept at its last step

    def __call__(
        self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None
    ) -> PruneStep | None:
        """Prune when ``epoch % every == 0``; otherwise do nothing and return None."""
        if epoch % self.every != 0:
            return None
        return self.step(model, epoch, optimizer)

    def targets(self, model: nn.Module) -> list[TargetLayer]:
        """The layers a step would prune now (re-evaluated each step, so split halves are included)."""
        return find_target_layers(model, self.selection)[0]

    @torch.no_grad()
    def step(self, model: nn.Module, epoch: int, optimizer: torch.optim.Optimizer | None = None) -> PruneStep:
        """Prune every target layer of ``model`` now with f = schedule(epoch); return the records."""
        f = float(self.schedule(epoch))
        if not 0.0 <= f <= 1.0:
            raise MPPluginError(f"schedule gave keep fraction {f} at epoch {epoch}; it must lie in [0, 1]")
        floor = output_dim(model) if self.min_rank is None else int(self.min_rank)
        record = PruneStep(epoch, f)
        for layer in self.targets(model):
            weight = layer.module.weight
            fit = fit_marchenko_pastur(weight.detach(), **self.fit_options)
            if layer.name in self._rank:
                fit = refit_truncated(fit, self._rank[layer.name], self.fit_options.get("alpha", 0.25))
            kept = kept_rank(fit, f, floor)
            new = low_rank_split(layer.module, fit, f, floor) if self.split else None
            if new is not None:
                replace_module(model, layer.name, new)
                if optimizer is not None:
                    _swap_in_optimizer(optimizer, layer.module, new)
            elif kept < min(layer.shape):
                weight.copy_(remove_singular_values(weight.detach(), fit, f, floor))
            if new is None:
                self._rank[layer.name] = kept
            record.layers.append(
                LayerPruneRecord(layer.name, layer.shape, fit.sigma_plus, fit.n_spikes, f, kept, new is not None)
            )
        self.history.append(record)
        return record


def _weights(model: nn.Module, selection: LayerSelection | None) -> list[tuple[str, torch.Tensor]]:
    sel = selection if selection is not None else LayerSelection(exclude_head=False, exclude_stem=False)
    return [(t.name, t.module.weight) for t in find_target_layers(model, sel)[0]]


def elastic_net_penalty(
    model: nn.Module, l1: float = 1e-6, l2: float = 1e-6, selection: LayerSelection | None = None
) -> torch.Tensor:
    """λ₁·Σ|W| + λ₂·Σ W² over the target weights (biases and norms excluded); a differentiable scalar.

    Args:
        model: any model.
        l1, l2: coefficients (S3 used 5e−6 each; the ESM_2 FC example 1e−6 each).
        selection: which layers (default: every Linear and ungrouped conv, stem and head included).
    """
    total = torch.zeros(())
    for _, w in _weights(model, selection):
        total = total + l1 * w.abs().sum() + l2 * w.square().sum()
    return total


@dataclass
class ShrinkReport:
    """Outcome of :func:`regulariser_shrink`.

    Attributes:
        penalty_before / penalty_after: the regulariser objective (dimensionless) before and after.
        layer_scale: c_ℓ = 1/(1 + mu_scale·μ_ℓ/cycle) per layer name.
        zeros: number of exactly-zero target weights (unchanged by construction).
        steps: optimiser steps taken.
    """

    penalty_before: float
    penalty_after: float
    layer_scale: dict[str, float]
    zeros: int
    steps: int


def _shrink_objective(
    weights: Iterable[tuple[str, torch.Tensor]], scale: dict[str, float], l1: float, l2: float, group_lasso: float
) -> torch.Tensor:
    total = torch.zeros(())
    for name, w in weights:
        norm = w.square().sum().clamp_min(1e-30).sqrt()
        total = total + l1 * w.abs().sum() + l2 * w.square().sum() + group_lasso * scale[name] * norm
    return total


def regulariser_shrink(
    model: nn.Module,
    steps: int = 5000,
    lr: float = 5e-8,
    l1: float = 5e-7,
    l2: float = 2e-7,
    group_lasso: float = 1e-6,
    mu_scale: float = 1e4,
    cycle: int = 1,
    selection: LayerSelection | None = None,
    fits: dict[str, SpectralFit] | None = None,
    show_progress: bool = False,
) -> ShrinkReport:
    """The 2025 data-free "fine-tune": AdamW on L1 + L2 + scaled group lasso only, zeros kept exact.

    Objective: Σ_ℓ λ₁‖W_ℓ‖₁ + λ₂‖W_ℓ‖²_F + λ_g·c_ℓ·‖W_ℓ‖_F with c_ℓ = 1/(1 + mu_scale·μ_ℓ/cycle),
    μ_ℓ the MP fit error of layer ℓ. Each layer's gradient is also multiplied by c_ℓ
    and by its nonzero mask, as in ALGORITHM.md §1.4 (ii) step 4. AdamW is used without
    decoupled weight decay (the L2 term is explicit). Adam is nearly invariant to a constant
    gradient scale, so c_ℓ acts mostly through the group-lasso weight.

    Args:
        model: modified in place; only the target weights change.
        steps, lr, l1, l2, group_lasso: the spec's defaults are 5000, 5e−8, 5e−7, 2e−7, 1e−6.
        mu_scale: the 10⁴ in c_ℓ.
        cycle: i ≥ 1, the pruning cycle (later cycles scale less).
        selection: which layers (default: every Linear and ungrouped conv, stem and head included).
        fits: precomputed MP fits by layer name (fitted here when absent).
        show_progress: tqdm bar over steps.
    """
    if steps < 0 or cycle < 1:
        raise MPPluginError(f"need steps ≥ 0 and cycle ≥ 1, got steps={steps}, cycle={cycle}")
    for what, value in (("lr", lr), ("l1", l1), ("l2", l2), ("group_lasso", group_lasso), ("mu_scale", mu_scale)):
        if not 0 <= value < math.inf or (what == "lr" and value == 0):  # NaN fails too
            raise MPPluginError(f"{what} must be {'> 0' if what == 'lr' else '≥ 0'} and finite, got {value}")
    weights = _weights(model, selection)
    if not weights:
        raise MPPluginError(f"{type(model).__name__} has no target layer to shrink")
    scale: dict[str, float] = {}
    for name, w in weights:
        fit = (fits or {}).get(name) or fit_marchenko_pastur(w.detach())
        mu = fit.fit_error if math.isfinite(fit.fit_error) else 0.0
        scale[name] = 1.0 / (1.0 + mu_scale * mu / cycle)
    masks = {name: (w != 0) for name, w in weights}
    params = [w for _, w in weights]
    grad_flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        before, after = _shrink(model, weights, scale, steps, lr, l1, l2, group_lasso, masks, show_progress)
    finally:  # the caller's requires_grad flags come back, also after an error
        for p, flag in zip(params, grad_flags):
            p.grad = None
            p.requires_grad_(flag)
    zeros = sum(int((~m).sum()) for m in masks.values())
    return ShrinkReport(before, after, scale, zeros, steps)


def _shrink(
    model: nn.Module,
    weights: list[tuple[str, torch.Tensor]],
    scale: dict[str, float],
    steps: int,
    lr: float,
    l1: float,
    l2: float,
    group_lasso: float,
    masks: dict[str, torch.Tensor],
    show_progress: bool,
) -> tuple[float, float]:
    """The training part of :func:`regulariser_shrink`: (objective before, after)."""
    with torch.no_grad():
        before = float(_shrink_objective(weights, scale, l1, l2, group_lasso))
    if steps:
        # the one training loop: data-free (the loss is the objective), zeros held by the keeper's
        # gradient gate and post-step re-zeroing, c_ℓ applied to the gradients before each step
        by_name = dict(weights)

        def scale_grads(_step: int, _model: nn.Module) -> None:
            with torch.no_grad():
                for name, w in by_name.items():
                    if w.grad is not None:
                        w.grad.mul_(scale[name])

        config = DistillConfig(
            epochs=1, optimizer="adamw", lr=lr, weight_decay=0.0, schedule="constant", seed=None,
            eval_mode=True, allow_dense=True, log_every=max(1, steps),
        )  # fmt: skip
        distill(
            model,
            None,
            [None] * steps,
            config,
            keeper=MaskKeeper(model, masks, zero_grads=True),
            show_progress=show_progress,
            loss=lambda _model, _batch: _shrink_objective(weights, scale, l1, l2, group_lasso),
            before_step=[scale_grads],
        )
    with torch.no_grad():
        after = float(_shrink_objective(weights, scale, l1, l2, group_lasso))
    return before, after
