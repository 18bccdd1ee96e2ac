"""What bound mode must rule out before it may say "proven", and its allowance for float rounding.

The bound of :func:`~mp_plugin.certificate.lipschitz.sequential_bound` reads module types,
weights and hyperparameters. It is a proof only when the forward is exactly what those
describe, so bound mode refuses:

* forward hooks, pre-hooks, global module hooks and per-instance ``forward`` overrides
  (:func:`hook_problem`): they can rescale any activation unseen;
* a pruned layer whose class overrides ``forward`` (e.g. a weight-standardised conv), since
  f(W_A) − f(W_S) is then not R = W_A − W_S (:func:`own_forward_problem`);
* a pruned weight shared with another module (:func:`tied_problem`): pruning one prunes both;
* an active ``torch.autocast`` (:func:`autocast_problem`) and a Rψ₁ precision below float32;
* modules whose hyperparameters differ between the models (:func:`hyperparameter_mismatch`):
  the bound uses the dense model's downstream network for the pruned one.

The bound is proven in exact arithmetic; the models' logits are computed in floating point.
:func:`rounding_allowance` is the extra margin a sample needs beyond 2η before it is marked
preserved, so a prediction that only rounding could flip is not claimed.
"""

from __future__ import annotations

import torch
from torch import nn

from mp_plugin.certificate.inputs import LAYER_TYPES

__all__ = [
    "DEFAULT_ROUNDING_RTOL",
    "autocast_problem",
    "hook_problem",
    "hyperparameter_mismatch",
    "own_forward_problem",
    "rounding_allowance",
    "tied_problem",
]

DEFAULT_ROUNDING_RTOL = 1e-4
"""Relative allowance for float rounding of the logits (float32's unit roundoff is 6e-8)."""

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


def hook_problem(model: nn.Module, what: str = "the model") -> str | None:
    """Why ``model``'s forward may differ from its modules' own forwards (hooks, overrides), or None."""
    from torch.nn.modules import module as module_mod

    for attr in ("_global_forward_hooks", "_global_forward_pre_hooks"):
        if getattr(module_mod, attr, None):
            return f"a global module forward hook is registered ({attr.lstrip('_')})"
    for name, m in model.named_modules():
        where = f"'{name}'" if name else "the root"
        for attr in _HOOK_DICTS:
            if getattr(m, attr, None):
                return f"{what} has a {attr.strip('_').replace('_', ' ')[:-1]} on {type(m).__name__} at {where}"
        if "forward" in vars(m):
            return f"{what} replaces the forward of {type(m).__name__} at {where} (e.g. a patch or an offload hook)"
    return None


def own_forward_problem(module: nn.Module, name: str) -> str | None:
    """Why a pruned layer's output change is not f(x; W_A − W_S) by its base class's forward, or None."""
    base = next((b for b in LAYER_TYPES if isinstance(module, b)), None)
    if base is None:
        return f"'{name}' is a {type(module).__name__}, not a Linear/Conv1d/Conv2d"
    methods = ("forward",) if base is nn.Linear else ("forward", "_conv_forward")
    for method in methods:
        if getattr(type(module), method) is not getattr(base, method):
            return (
                f"'{name}' is a {type(module).__name__} whose {method} differs from {base.__name__}'s "
                "(e.g. weight standardisation): its output change is not the removed weight's product"
            )
    return None


def tied_problem(model: nn.Module, names: list[str]) -> str | None:
    """Why certifying layers ``names`` alone is unsound: one of their weights is another module's too."""
    owners: dict[int, list[str]] = {}
    for name, m in model.named_modules():
        for attr in ("weight", "bias"):
            t = getattr(m, attr, None)
            if isinstance(t, torch.Tensor):
                owners.setdefault(id(t), []).append(name)
    modules = dict(model.named_modules())
    for name in names:
        for attr in ("weight", "bias"):
            t = getattr(modules[name], attr, None)
            others = [o for o in owners.get(id(t), []) if o != name] if isinstance(t, torch.Tensor) else []
            if others:
                return f"the {attr} of '{name}' is shared with '{others[0]}' (tied weights): pruning one prunes both"
    return None


def autocast_problem() -> str | None:
    """Why the forwards would not run in the models' own dtypes (an active ``torch.autocast``), or None."""
    for device in ("cpu", "cuda"):
        try:
            on = torch.is_autocast_enabled(device)
        except TypeError:  # torch without the device argument
            on = torch.is_autocast_enabled() if device == "cuda" else False
        if on:
            return f"torch.autocast is active on {device}: the forwards would run in reduced precision"
    return None


_PLAIN = (bool, int, float, str, type(None), torch.dtype)


def _plain_settings(module: nn.Module) -> dict:
    """The module's plain public attributes (numbers, strings, dtypes and tuples of them): its hyperparameters,
    also those its ``extra_repr`` leaves out (``AvgPool2d.divisor_override``, ``count_include_pad``, ...)."""
    out = {}
    for key, value in vars(module).items():
        if key.startswith("_") or key == "training":
            continue
        if isinstance(value, _PLAIN) or (
            isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
        ):
            out[key] = value
    return out


def hyperparameter_mismatch(dense: nn.Module, pruned: nn.Module) -> str | None:
    """The first module whose class or hyperparameters (``extra_repr`` and plain attributes) differ, or None."""
    for (name, a), (_, b) in zip(dense.named_modules(), pruned.named_modules()):
        where = f"'{name}'" if name else "the root"
        if type(a) is not type(b):
            return f"the module at {where} is a {type(a).__name__} in the dense model, a {type(b).__name__} pruned"
        if a.extra_repr() != b.extra_repr():
            return f"{type(a).__name__} at {where} is ({a.extra_repr()}) in the dense model, ({b.extra_repr()}) pruned"
        # torch.nn's own modules (the ones the bound propagates through) keep settings in plain attributes;
        # a framework's wrapper (ModelOpt's SparseModule) keeps its bookkeeping there too, which is not a setting
        # (an attribute only one side has is such bookkeeping, added to one copy)
        sa, sb = (_plain_settings(a), _plain_settings(b)) if type(a).__module__.startswith("torch.nn") else ({}, {})
        key = next((k for k in sorted(set(sa) & set(sb)) if sa[k] != sb[k]), None)
        if key is not None:
            return f"{type(a).__name__} at {where} has {key}={sa[key]!r} in the dense model, {sb[key]!r} pruned"
    return None


def precision_problem(models: tuple[nn.Module, ...], precision: torch.dtype) -> str | None:
    """Why ``precision`` is coarser than a floating parameter of the models (Rψ₁ would round to less), or None."""
    finest = min(
        (p.dtype for m in models for p in m.parameters() if p.is_floating_point()),
        key=lambda d: torch.finfo(d).eps,
        default=None,
    )
    if finest is not None and torch.finfo(precision).eps > torch.finfo(finest).eps:
        return f"precision {precision} is coarser than the models' {finest} weights: use precision={finest}"
    return None


def rounding_allowance(z_dense: torch.Tensor, z_pruned: torch.Tensor, rtol: float) -> torch.Tensor:
    """(B,) extra margin for float rounding: rtol·(‖z_A(s)‖∞ + ‖z_S(s)‖∞), in logit units."""
    scale = z_dense.double().abs().amax(1) + z_pruned.double().abs().amax(1).to(z_dense.device)
    return rtol * scale


def bound_preserved(
    margin: torch.Tensor,
    eta: torch.Tensor,
    z_dense: torch.Tensor,
    z_pruned: torch.Tensor,
    pred: torch.Tensor,
    pred_pruned: torch.Tensor,
    rtol: float,
    notes: list[str],
) -> torch.Tensor:
    """(B,) bool: the bound mode's preserved samples, with a note for each kind left out.

    A sample counts when its margin beats 2(η + allowance) (:func:`rounding_allowance`) and the two
    models' computed predictions agree: rounding inside the network (a large value cancelled by a
    bias) can exceed an allowance measured on the logits.
    """
    preserved = margin > 2 * eta
    allowance = rounding_allowance(z_dense, z_pruned, rtol).to(eta.device)
    proven = margin > 2 * (eta + allowance)
    if bool((preserved & ~proven).any()):
        notes.append(
            f"{int((preserved & ~proven).sum())} samples with margin > 2η are not marked preserved: their "
            f"margin is within the float-rounding allowance ({rtol:g}·(‖z_A‖∞ + ‖z_S‖∞))"
        )
    agree = (pred.to(pred_pruned.device) == pred_pruned).to(proven.device)
    if bool((proven & ~agree).any()):
        notes.append(
            f"{int((proven & ~agree).sum())} samples beat 2η plus the allowance but their computed predictions "
            "differ (float rounding inside the network): not marked preserved"
        )
    return proven & agree
