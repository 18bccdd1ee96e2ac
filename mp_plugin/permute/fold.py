"""Fold a channel permutation into the weights of a coupling (no hooks, no new tensors)."""

from __future__ import annotations

import torch
from torch import nn

from mp_plugin.permute.graph import Coupling, tensor_by_name
from mp_plugin.permute.ops import permute_tensor_

__all__ = ["fold_coupling", "consumer_matrix"]


def consumer_matrix(module: nn.Module) -> torch.Tensor:
    """The consumer's weight as a 2-D (rows, C_in) matrix whose columns are input channels, detached.

    Linear: the weight itself. Conv (C_out, C_in, kh, kw): (C_out·kh·kw, C_in), one
    row per output channel and kernel position — k:n groups run along the input
    channels at each position (``mp_plugin.layers.layout``), so a channel permutation
    moves the same columns in every row.
    """
    w = module.weight.detach()
    return w if w.dim() == 2 else w.movedim(1, -1).reshape(-1, w.shape[1])


def fold_coupling(model: nn.Module, coupling: Coupling, perm: torch.Tensor) -> None:
    """Permute, in place, producer rows (+bias), per-channel tensors and consumer input channels.

    New channel s carries old channel ``perm[s]`` everywhere, so the model's
    function is unchanged. Apply ``torch.argsort(perm)`` to undo.
    """
    for name in coupling.producers:
        mod = model.get_submodule(name)
        permute_tensor_(mod.weight, perm, 0)
        if getattr(mod, "bias", None) is not None:
            permute_tensor_(mod.bias, perm, 0)
    for name, tensors in coupling.ops:
        mod = model.get_submodule(name)
        for attr, axis in tensors:
            permute_tensor_(getattr(mod, attr), perm, axis)
    for qualified, axis in coupling.params:
        permute_tensor_(tensor_by_name(model, qualified), perm, axis)
    for name in coupling.consumers:
        permute_tensor_(model.get_submodule(name).weight, perm, 1)
