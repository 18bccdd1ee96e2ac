"""State the torchao adapter keeps outside its config: plans bound to models, per-module decisions,
and the helpers that check, back up and put back weights (:mod:`mp_plugin.integrations.torchao`)."""

from __future__ import annotations

import hashlib
import json
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.planning.build import LayerPlan, PrunePlan

# --------------------------------------------------------------------------- module state (not in the config)


@dataclass(eq=False)
class _Binding:
    """A plan attached to one model: the live plan, and backups of what the handler changed."""

    plan: PrunePlan
    root: Any  # weakref to the bound model
    backups: dict[str, tuple[Any, nn.Parameter, torch.Tensor]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.pending = {lp.name for lp in self.plan.layers if lp.pattern != "dense"}
        self.first_log = dict(self.plan.applied.get("layers", {}))

    def roll_back(self) -> None:
        """Put every module this binding changed back as it was, and forget what was applied."""
        for name, (module_ref, param, dense) in self.backups.items():
            module = module_ref()
            if module is None:
                continue
            with torch.no_grad():
                param.copy_(dense.to(param.device))
            module.weight = param
            self.pending.add(name)
        self.backups.clear()
        self.plan.applied["layers"] = dict(self.first_log)


_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module → {plan key: (binding, fqn)}
_DECIDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module → {settings key: (LayerPlan, log)}


def _plan_key(plan_dict: dict) -> str:
    """Identity of a plan's decisions (names, shapes, patterns, counts), cheap to recompute per call."""
    layers = [(lp["name"], lp["weight_shape"], lp["pattern"], lp["n_prune"]) for lp in plan_dict["layers"]]
    text = json.dumps([layers, plan_dict.get("created", ""), plan_dict.get("model_name", "")])
    return hashlib.sha1(text.encode()).hexdigest()


def _refuse_converted(module: nn.Module) -> None:
    for name, mod in module.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, torch.Tensor) and type(w) not in (torch.Tensor, nn.Parameter):
            raise MPPluginError(
                f"{name or type(mod).__name__}: weight is a {type(w).__name__}, already converted by another "
                "tool; MPSparsifier needs plain dense weights"
            )


def _put_back_state(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    live = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, value in saved.items():
            if key in live and tuple(live[key].shape) == tuple(value.shape):
                live[key].copy_(value.to(live[key].device))


class _Holder(nn.Module):
    """Gives a lone module the name ``"m"`` so the core's plan/apply can address it (the module is not changed)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.m = module


def _one_layer_plan(the_plan: PrunePlan, lp: LayerPlan) -> PrunePlan:
    return PrunePlan(
        the_plan.sparsity,
        the_plan.pattern,
        the_plan.method,
        [LayerPlan(**{**lp.__dict__, "name": "m"})],
        config=the_plan.config,
    )


def _roll_back_models_holding(module: nn.Module, config: Any) -> None:
    """Roll back every binding of ``config``'s plan whose model holds ``module`` (a failed handler call)."""
    key = _plan_key(config.plan)
    bindings = {id(b): b for entries in list(_BOUND.values()) for k, (b, _) in entries.items() if k == key}
    for binding in bindings.values():
        root = binding.root()
        if root is not None and any(m is module for m in root.modules()):
            binding.roll_back()
