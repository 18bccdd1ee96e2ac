"""``torch.ao.pruning`` adapter: :class:`MPPruningSparsifier`, a ``BaseSparsifier`` with MP budgets.

Usage (the torch.ao.pruning workflow, unchanged)::

    sparsifier = MPPruningSparsifier(sparsity=0.5, pattern="2:4")
    sparsifier.prepare(model, config=None)   # MP budgets over all layers, masks as parametrizations
    for batch in loader: ...; optimizer.step(); sparsifier.step()   # masks follow |W|, budgets fixed
    sparsifier.squash_mask()                 # fold masks: an ordinary dense-with-zeros model

``prepare`` plans once for the whole model (``mp_plugin.plan``); ``step``
recomputes each layer's mask from its current weights with the budget or
k:n pattern fixed by that plan. Between steps the parametrization multiplies
every forward by the mask, so pruned weights stay zero through training.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from torch.ao.pruning import BaseSparsifier

from mp_plugin.budget.rules import DEFAULT_BUDGET
from mp_plugin.errors import MPPluginError
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import nm_mask, unstructured_mask
from mp_plugin.planning.build import PlanConfig, PrunePlan, plan

__all__ = ["MPPruningSparsifier"]


class MPPruningSparsifier(BaseSparsifier):
    """A ``torch.ao.pruning`` sparsifier whose per-layer budgets come from MP spectra.

    Args:
        sparsity: global fraction of target weights to remove.
        pattern: ``"unstructured"``, ``"k:n"`` (e.g. ``"2:4"``) or ``"auto"``.
        budget: budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS`` (default
            ``mp_plugin.budget.rules.DEFAULT_BUDGET``; the paper's rule is ``"seb"``).
        plan_config: :class:`mp_plugin.PlanConfig` (fit and layer-selection settings).
        method: deprecated name of ``budget`` (DeprecationWarning).
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        budget: str = DEFAULT_BUDGET,
        plan_config: PlanConfig | None = None,
        *,
        method: str | None = None,
    ) -> None:
        if method is not None:
            warnings.warn(
                "MPPruningSparsifier(method=...) is deprecated: use budget=...", DeprecationWarning, stacklevel=2
            )
            budget = method
        super().__init__(defaults={"sparsity": sparsity, "pattern": pattern, "budget": budget})
        self.plan_config = plan_config
        self.plan: PrunePlan | None = None

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None = None) -> None:
        """Plan MP budgets over ``model`` and attach mask parametrizations.

        Args:
            model: the model to sparsify.
            config: torch.ao.pruning config list (``[{"tensor_fqn": "layer.weight"}, ...]``);
                ``None`` selects the plan's target layers.
        """
        d = self.defaults
        self.plan = plan(model, d["sparsity"], d["pattern"], d["budget"], self.plan_config)
        planned = {lp.name: lp for lp in self.plan.layers}
        if config is None:
            config = [{"tensor_fqn": f"{name}.weight"} for name in planned]
        for entry in config:
            fqn = entry["tensor_fqn"]
            module_name = fqn.rsplit(".", 1)[0]
            if module_name not in planned:
                raise MPPluginError(f"{fqn} is not a planned target layer (skipped: {self._skip_reason(module_name)})")
        super().prepare(model, config)
        self.step()

    def _skip_reason(self, name: str) -> str:
        assert self.plan is not None
        for s in self.plan.skipped:
            if s["name"] == name:
                return s["reason"]
        return "not a Linear/Conv layer"

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Recompute the mask of ``module.<tensor_name>`` from its current (unmasked) weights."""
        assert self.plan is not None, "call prepare() first"
        lp = self.plan.layer(kwargs["module_fqn"])
        weight = module.parametrizations[tensor_name].original
        mask = module.parametrizations[tensor_name][0].mask
        pat = Pattern.parse(lp.pattern)
        with torch.no_grad():
            if pat.is_kn:
                new = nm_mask(weight, pat.k, pat.n)
            elif pat.kind == "unstructured":
                new = unstructured_mask(weight, lp.n_prune)
            else:
                new = torch.ones_like(mask, dtype=torch.bool)
            mask.copy_(new.to(mask.dtype))
