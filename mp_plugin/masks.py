"""Pruning masks: unstructured (exact count) and k:n along the input axis.

Masks are boolean tensors of the weight's own shape; ``True`` = kept. A conv
weight (C_out, C_in, kh, kw) is read in the unfolded C_out × (C_in·kh·kw)
layout, so a k:n group is n consecutive entries of a flattened row.
"""

from __future__ import annotations

import torch

from .errors import PatternError

__all__ = ["nm_mask", "check_nm", "unstructured_mask"]


def _as_groups(weight: torch.Tensor, n: int) -> torch.Tensor:
    rows = weight.shape[0]
    cols = weight[0].numel()
    if cols % n:
        raise PatternError(f"input size {cols} is not divisible by n={n}")
    return weight.reshape(rows, cols // n, n)


def nm_mask(weight: torch.Tensor, k: int = 2, n: int = 4, score: torch.Tensor | None = None) -> torch.Tensor:
    """Keep the k largest-|score| entries in every group of n consecutive inputs.

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
    return mask.reshape(weight.shape)


def check_nm(tensor: torch.Tensor, k: int, n: int) -> bool:
    """True when every group of n consecutive inputs has at most k non-zeros."""
    groups = _as_groups(tensor.detach(), n)
    return bool(((groups != 0).sum(-1) <= k).all())


def unstructured_mask(weight: torch.Tensor, n_prune: int, score: torch.Tensor | None = None) -> torch.Tensor:
    """Mask removing exactly ``n_prune`` entries with the smallest |score| (default |weight|)."""
    numel = weight.numel()
    if not 0 <= n_prune <= numel:
        raise ValueError(f"n_prune must lie in [0, {numel}], got {n_prune}")
    mask = torch.ones(numel, dtype=torch.bool, device=weight.device)
    if n_prune:
        sc = (weight if score is None else score).detach().abs().reshape(-1)
        idx = torch.argsort(sc, stable=True)[:n_prune]
        mask[idx] = False
    return mask.reshape(weight.shape)
