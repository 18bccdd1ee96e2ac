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

__all__ = ["WRAPPER_ATTRS", "unwrap_model"]

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
