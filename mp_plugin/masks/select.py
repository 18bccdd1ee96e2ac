"""Pruning masks: unstructured (exact count), k:n along the input axis, and keeping them.

Masks are boolean tensors of the weight's own shape; ``True`` = kept. A k:n
group is n consecutive input channels of one output row at one kernel position
(``mp_plugin.layers.layout``): for a Linear, n consecutive inputs; for a conv
(C_out, C_in, kh, kw), n consecutive input channels at one (r, s), the layout
TensorRT and cuSPARSELt accelerate.

* :func:`unstructured_mask`, :func:`global_unstructured_masks` — exact counts,
  per layer or by global (SEB-weighted) |W|/w_ℓ thresholding.
* :func:`nm_mask`, :func:`check_nm`, :func:`assert_kn_exact` — magnitude k:n and checks
  (the covariance-aware CAST projection lives in ``mp_plugin.masks.cast``).
* :func:`magnitude_kn_`, :func:`fold_parametrizations` — reference k:n pruning, folding parametrizations.

Keeping masks through training is :class:`mp_plugin.masks.keep.MaskKeeper`.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.errors import ConfigError, InvalidWeightError, PatternError
from mp_plugin.layers.layout import from_kn_matrix, kn_eligible, kn_matrix, kn_width
from mp_plugin.masks.counts import global_prune_counts

__all__ = [
    "nm_mask",
    "check_nm",
    "unstructured_mask",
    "kn_group_counts",
    "assert_kn_exact",
    "global_unstructured_masks",
    "magnitude_kn_",
    "fold_parametrizations",
]


def _as_groups(weight: torch.Tensor, n: int) -> torch.Tensor:
    """(C_out, G, n) view of ``weight`` in the k:n layout (G = kh·kw·C_in / n)."""
    if not kn_eligible(weight.shape, n):
        raise PatternError(f"input channels {kn_width(weight.shape)} are not divisible by n={n}")
    mat = kn_matrix(weight)
    return mat.reshape(mat.shape[0], -1, n)


def nm_mask(weight: torch.Tensor, k: int = 2, n: int = 4, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k largest-|score| entries in every group of n consecutive input channels.

    Args:
        weight: (C_out, C_in) or (C_out, C_in, *kernel).
        k, n: keep k of every n (1 ≤ k < n ≤ 16).
        score: importance of the same shape (default |weight|).

    Returns:
        Boolean mask shaped like ``weight`` with exactly k ``True`` per group.
    """
    if not 1 <= k < n <= 16:
        raise PatternError(f"need 1 ≤ k < n ≤ 16, got {k}:{n}")
    sc = (weight if score is None else score).detach().abs()
    groups = _as_groups(sc, n)
    idx = groups.topk(k, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, idx, True)
    return from_kn_matrix(mask.reshape(groups.shape[0], -1), weight.shape).contiguous()


def check_nm(tensor: torch.Tensor, k: int, n: int) -> bool:
    """True when every group of n consecutive inputs has at most k non-zeros."""
    groups = _as_groups(tensor.detach(), n)
    return bool(((groups != 0).sum(-1) <= k).all())


def unstructured_mask(weight: torch.Tensor, n_prune: int, score: torch.Tensor | None = None) -> torch.Tensor:
    """Mask removing exactly ``n_prune`` entries with the smallest |score| (default |weight|).

    Ties at the threshold are broken by position (lowest flat index pruned first).
    Runs in O(numel) with ``kthvalue`` instead of a full sort.
    """
    numel = weight.numel()
    if not 0 <= n_prune <= numel:
        raise ConfigError(f"n_prune must lie in [0, {numel}], got {n_prune}")
    if n_prune == 0:
        return torch.ones(weight.shape, dtype=torch.bool, device=weight.device)
    sc = (weight if score is None else score).detach().abs().reshape(-1)
    if not sc.is_floating_point():
        sc = sc.float()
    if sc.numel() != numel:
        raise ConfigError(f"score has {sc.numel()} entries, the weight {numel}")
    if not bool(torch.isfinite(sc).all()):
        raise InvalidWeightError("unstructured_mask: the weight or score holds NaN or Inf, no exact count exists")
    thresh = torch.kthvalue(sc, n_prune).values
    below = sc < thresh
    ties = sc == thresh
    take = n_prune - int(below.sum())
    pruned = below | (ties & (torch.cumsum(ties, 0) <= take))
    return (~pruned).reshape(weight.shape)


# --------------------------------------------------------------------------- exact k:n check


def kn_group_counts(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Number of ``True``/non-zero entries in every k:n group: (C_out, kh·kw·C_in / n) int64."""
    return (_as_groups(mask.detach(), n) != 0).sum(-1)


def assert_kn_exact(mask: torch.Tensor, k: int, n: int, name: str = "mask") -> None:
    """Raise :class:`PatternError` unless every group of n has exactly k kept entries.

    A real check (not an ``assert`` statement), so it also runs under ``python -O``.
    """
    counts = kn_group_counts(mask, n)
    bad = int((counts != k).sum())
    if bad:
        raise PatternError(f"{name}: {bad} of {counts.numel()} groups do not keep exactly {k} of {n}")


# --------------------------------------------------------------------------- global unstructured


def global_unstructured_masks(
    weights: Sequence[torch.Tensor], sparsity: float, layer_w: Sequence[float] | None = None
) -> list[torch.Tensor]:
    """Masks removing exactly ⌊s·Σ numel⌋ weights by global |W_ij|/w_ℓ thresholding.

    Args:
        weights: the layers' weights, any shapes.
        sparsity: global fraction s ∈ [0, 1) to remove.
        layer_w: SEB weights w_ℓ (higher → pruned more); ``None`` gives plain
            global magnitude (all w_ℓ = 1).

    Returns:
        One boolean mask per weight (``True`` = kept); the pruned total is exact.
    """
    lw = [1.0] * len(weights) if layer_w is None else list(layer_w)
    if len(lw) != len(weights):
        raise ConfigError(f"{len(weights)} weights but {len(lw)} layer weights")
    counts = global_prune_counts(list(weights), lw, sparsity)
    return [unstructured_mask(w, c) for w, c in zip(weights, counts)]


def fold_parametrizations(model: nn.Module, original: bool = False) -> nn.Module:
    """A copy of ``model`` with every ``torch.nn.utils.parametrize`` parametrization folded into plain tensors.

    Args:
        model: the model; it is not modified (parametrized copies share their injected class
            with the original, so the copy is re-classed instead of calling
            ``remove_parametrizations``, which would edit that shared class).
        original: keep the unparametrized originals (e.g. the dense weights under a
            torch.ao sparsifier's mask) instead of the parametrized values.
    """
    clone = copy.deepcopy(model)
    sources = dict(model.named_modules())
    for name, module in clone.named_modules():
        if not parametrize.is_parametrized(module):
            continue
        src = sources[name]
        with torch.no_grad():
            values = {
                t: (src.parametrizations[t].original if original else getattr(src, t)).detach().clone()
                for t in src.parametrizations.keys()
            }
        module.__class__ = type(module).__bases__[0]  # the plain class the parametrized one derives from
        del module._modules["parametrizations"]
        for t, value in values.items():
            module._parameters[t] = nn.Parameter(value, requires_grad=False)
    return clone


def magnitude_kn_(
    model: nn.Module, k: int = 2, n: int = 4, selection: Any = None, limit: int | None = None
) -> list[str]:
    """Zero every eligible target layer of ``model`` to magnitude k:n in place; returns their names.

    The reference pruning of speed and MAC measurements (no plan, no budget): the target
    layers of :func:`mp_plugin.layers.discovery.find_target_layers` under ``selection`` (a
    :class:`~mp_plugin.layers.discovery.LayerSelection`; default: Linear and Conv), the first
    ``limit`` of them when given, each whose input width is divisible by ``n``.
    """
    from mp_plugin.layers.discovery import find_target_layers

    targets, _ = find_target_layers(model, selection) if selection is not None else find_target_layers(model)
    names = []
    with torch.no_grad():
        for t in targets[:limit]:
            if kn_eligible(t.module.weight.shape, n):
                t.module.weight.mul_(nm_mask(t.module.weight, k, n))
                names.append(t.name)
    return names
