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
* :class:`MaskKeeper` — re-zeroes pruned weights after every optimiser step.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.errors import ConfigError, PatternError, PlanMismatchError
from mp_plugin.layers.layout import from_kn_matrix, kn_eligible, kn_matrix, kn_width
from mp_plugin.masks.counts import global_prune_counts

__all__ = [
    "nm_mask",
    "check_nm",
    "unstructured_mask",
    "kn_group_counts",
    "assert_kn_exact",
    "global_unstructured_masks",
    "MaskKeeper",
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
    """Masks removing exactly round(s·Σ numel) weights by global |W_ij|/w_ℓ thresholding.

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


# --------------------------------------------------------------------------- keeping masks in training


def _prunable_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """Linear/Conv weights by module name, a shared weight listed once (first name)."""
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        out[name] = weight
    return out


class MaskKeeper:
    """Keep pruned weights at zero while a model trains.

    The model stays an ordinary ``nn.Module``: masks live in this object (and in
    its :meth:`state_dict`), never as parametrizations or extra model state.

    Args:
        model: the pruned model.
        masks: ``{module name: bool mask shaped like its weight}`` (``True`` =
            kept). ``None`` derives masks from the current exact zeros of every
            Linear/Conv weight that has any.

    Example::

        keeper = MaskKeeper(model).attach(optimizer)   # re-zero after every step
        ...
        torch.save({"model": model.state_dict(), "masks": keeper.state_dict()}, path)
    """

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor] | None = None) -> None:
        self.model = model
        self._weights = _prunable_weights(model)
        self._handles: list[Any] = []
        self.masks: dict[str, torch.Tensor] = {}
        if masks is None:
            for name, weight in self._weights.items():
                mask = weight.detach() != 0
                if not bool(mask.all()):
                    self.masks[name] = mask
        else:
            self.load_state_dict({"masks": dict(masks)})

    def _weight(self, name: str) -> torch.Tensor:
        weight = self._weights.get(name)
        if weight is None:
            modules = dict(self.model.named_modules())
            weight = getattr(modules.get(name), "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise KeyError(f"the model has no Linear/Conv weight named {name!r}")
        return weight

    @torch.no_grad()
    def apply(self) -> None:
        """Set every masked-out weight to exactly zero (in place)."""
        for name, mask in self.masks.items():
            self._weight(name).masked_fill_(~mask, 0)

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.apply()

    def attach(self, optimizer: torch.optim.Optimizer) -> MaskKeeper:
        """Re-zero pruned weights after every ``optimizer.step()``; returns ``self``."""
        self._handles.append(optimizer.register_step_post_hook(self._after_step))
        self.apply()
        return self

    def detach(self) -> None:
        """Remove every hook registered by :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    @property
    def sparsity(self) -> float:
        """Fraction of masked-out entries over the masked layers."""
        total = sum(m.numel() for m in self.masks.values())
        return sum(int((~m).sum()) for m in self.masks.values()) / total if total else 0.0

    def state_dict(self) -> dict[str, Any]:
        """``{"masks": {name: bool CPU tensor}}`` for checkpoints."""
        return {"masks": {name: m.detach().cpu().clone() for name, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Load masks written by :meth:`state_dict` (moved to each weight's device; shapes checked)."""
        masks = state.get("masks", state)
        new: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            weight = self._weight(name)
            if tuple(mask.shape) != tuple(weight.shape):
                raise PlanMismatchError(
                    f"mask for {name!r} has shape {tuple(mask.shape)}, the weight {tuple(weight.shape)}"
                )
            new[name] = mask.to(device=weight.device, dtype=torch.bool)
        self.masks = new


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
