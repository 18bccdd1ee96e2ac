"""The user's model inside a wrapper: ``torch.compile``, DDP, DataParallel and the like.

Layer names, plans and permutation records always refer to the unwrapped model
(``model.fc``, not ``model.module.fc`` or ``model._orig_mod.fc``), so a plan made on
the plain model fits the same model under DDP or ``torch.compile``, and the other
way round. Wrapping is recognised by structure, not by class: a module with no
parameters or buffers of its own whose only child is ``module`` (DDP,
DataParallel, FSDP's wrapper, accelerate) or ``_orig_mod`` (``torch.compile``'s
``OptimizedModule``). Weights are shared, so editing the inner model in place
edits the wrapped one.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

__all__ = ["WRAPPER_ATTRS", "derived_weight_reason", "unwrap_model"]

WRAPPER_ATTRS = ("_orig_mod", "module")  # the child a wrapper forwards to


def unwrap_model(model: nn.Module) -> nn.Module:
    """The innermost model under any stack of wrappers (``model`` itself when it is not wrapped)."""
    seen = set()
    while isinstance(model, nn.Module) and id(model) not in seen:
        seen.add(id(model))
        children = list(model._modules)
        if len(children) != 1 or children[0] not in WRAPPER_ATTRS:
            break
        if model._parameters or model._buffers:
            break
        inner = model._modules[children[0]]
        if not isinstance(inner, nn.Module):
            break
        model = inner
    return model


def derived_weight_reason(module: nn.Module) -> str | None:
    """Why ``module.weight`` is not a stored tensor that can be written in place, or None when it is.

    A parametrization (``torch.nn.utils.parametrizations.weight_norm``, ``spectral_norm``,
    any ``register_parametrization``) or the old hook-based ``weight_norm`` recompute
    ``weight`` from other tensors, so a write to it is lost (or lands on a temporary).
    """
    if parametrize.is_parametrized(module, "weight"):
        kinds = ", ".join(type(p).__name__ for p in module.parametrizations["weight"])
        return (
            f"its weight is parametrized ({kinds}) and recomputed on every access; remove it first with "
            "torch.nn.utils.parametrize.remove_parametrizations(module, 'weight')"
        )
    if "weight" not in module._parameters and "weight" not in module._buffers:
        hooks = ", ".join(type(h).__name__ for h in module._forward_pre_hooks.values()) or "an attribute"
        return (
            f"its weight is not a stored parameter or buffer (computed by {hooks}, e.g. the old "
            "torch.nn.utils.weight_norm); remove that first (torch.nn.utils.remove_weight_norm(module))"
        )
    return None
