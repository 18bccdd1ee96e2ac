"""``torch.ao.pruning`` adapter: :class:`MPPruningSparsifier`, a ``BaseSparsifier`` with MP budgets and fixed masks.

Usage (the torch.ao.pruning workflow, unchanged)::

    sparsifier = MPPruningSparsifier(sparsity=0.5, pattern="2:4")
    sparsifier.prepare(model, config=None)   # MP plan and masks, handed to torch.ao's FakeSparsity
    for batch in loader: ...; optimizer.step(); sparsifier.step()   # the masks MP chose stay fixed
    sparsifier.squash_mask()                 # fold masks: an ordinary dense-with-zeros model

``prepare`` plans once for the whole model (``mp_plugin.plan``) and selects each layer's
mask from its weights with the plan's budget or k:n pattern. The masks are held by a
:class:`mp_plugin.masks.keep.MaskKeeper` (``sparsifier.keeper``; its ``state_dict`` goes in
checkpoints) and handed to torch.ao through its public config: every config entry carries
``"mask"``, which ``BaseSparsifier.prepare`` installs as the FakeSparsity parametrization.
Between steps the parametrization multiplies every forward by the mask, so pruned weights
stay zero through training. ``step()`` keeps the masks as they are (it writes the keeper's
masks back); with ``reselect=True`` it re-selects them from the current weights instead,
with the plan's budgets fixed (torch.ao's usual behaviour).
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
from mp_plugin.masks.keep import MaskKeeper
from mp_plugin.masks.select import nm_mask, unstructured_mask
from mp_plugin.planning.build import LayerPlan, PlanConfig, PrunePlan, plan

__all__ = ["MPPruningSparsifier"]


def _select(weight: torch.Tensor, lp: LayerPlan) -> torch.Tensor:
    """The plan layer's mask (``True`` = kept) chosen by magnitude from ``weight``."""
    pat = Pattern.parse(lp.pattern)
    with torch.no_grad():
        if pat.is_kn:
            return nm_mask(weight, pat.k, pat.n)
        if pat.kind == "unstructured":
            return unstructured_mask(weight, lp.n_prune)
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)


class MPPruningSparsifier(BaseSparsifier):
    """A ``torch.ao.pruning`` sparsifier whose per-layer budgets and masks come from MP spectra.

    Args:
        sparsity: global fraction of target weights to remove.
        pattern: ``"unstructured"``, ``"k:n"`` (e.g. ``"2:4"``) or ``"auto"``.
        budget: budget method, a key of ``mp_plugin.budget.rules.BUDGET_METHODS`` (default
            ``mp_plugin.budget.rules.DEFAULT_BUDGET``; the paper's rule is ``"seb"``).
        plan_config: :class:`mp_plugin.PlanConfig` (fit and layer-selection settings).
        reselect: ``step()`` re-selects every mask from the current weights (budgets fixed)
            instead of keeping the masks chosen in ``prepare`` (default: keep them).
        method: deprecated name of ``budget`` (DeprecationWarning).

    Attributes:
        plan: the :class:`PrunePlan` made by ``prepare``.
        keeper: the :class:`MaskKeeper` holding the masks (``True`` = kept) by module name.
    """

    def __init__(
        self,
        sparsity: float = 0.5,
        pattern: str = "unstructured",
        budget: str = DEFAULT_BUDGET,
        plan_config: PlanConfig | None = None,
        *,
        reselect: bool = False,
        method: str | None = None,
    ) -> None:
        if method is not None:
            warnings.warn(
                "MPPruningSparsifier(method=...) is deprecated: use budget=...", DeprecationWarning, stacklevel=2
            )
            budget = method
        super().__init__(defaults={"sparsity": sparsity, "pattern": pattern, "budget": budget})
        self.plan_config = plan_config
        self.reselect = bool(reselect)
        self.plan: PrunePlan | None = None
        self.keeper: MaskKeeper | None = None

    def prepare(self, model: nn.Module, config: list[dict[str, Any]] | None = None) -> None:
        """Plan MP budgets over ``model``, select the masks and attach them as torch.ao parametrizations.

        Args:
            model: the model to sparsify.
            config: torch.ao.pruning config list (``[{"tensor_fqn": "layer.weight"}, ...]``);
                ``None`` selects the plan's target layers. Each entry's ``"mask"`` is set to MP's.
        """
        d = self.defaults
        self.plan = plan(model, d["sparsity"], d["pattern"], d["budget"], self.plan_config)
        planned = {lp.name: lp for lp in self.plan.layers}
        if config is None:
            config = [{"tensor_fqn": f"{name}.weight"} for name in planned]
        modules = dict(model.named_modules())
        masks: dict[str, torch.Tensor] = {}
        for entry in config:
            fqn = entry["tensor_fqn"]
            module_name = fqn.rsplit(".", 1)[0]
            if module_name not in planned:
                raise MPPluginError(f"{fqn} is not a planned target layer (skipped: {self._skip_reason(module_name)})")
            masks[module_name] = _select(modules[module_name].weight.detach(), planned[module_name])
        self.keeper = MaskKeeper(model, masks)
        entries = []
        for entry in config:
            name = entry["tensor_fqn"].rsplit(".", 1)[0]
            weight = modules[name].weight
            entries.append({**entry, "mask": self.keeper.masks[name].to(weight.dtype)})
        super().prepare(model, entries)

    def _skip_reason(self, name: str) -> str:
        assert self.plan is not None
        for s in self.plan.skipped:
            if s["name"] == name:
                return s["reason"]
        return "not a Linear/Conv layer"

    def update_mask(self, module: nn.Module, tensor_name: str, **kwargs: Any) -> None:
        """Keep the mask of ``module.<tensor_name>`` (or, with ``reselect``, re-select it from the weights)."""
        if self.plan is None or self.keeper is None:
            raise MPPluginError("call prepare() first")
        name = kwargs["module_fqn"]
        mask = module.parametrizations[tensor_name][0].mask
        if self.reselect:
            self.keeper.masks[name] = _select(module.parametrizations[tensor_name].original, self.plan.layer(name))
        with torch.no_grad():
            mask.copy_(self.keeper.masks[name].to(mask.dtype))
