"""SER → k:n: project an SER result onto a k:n pattern with CAST (ALGORITHM.md §2 items 7 and 9)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import assert_kn_exact, nm_mask

__all__ = ["ser_to_kn"]


@torch.no_grad()
def ser_to_kn(
    model: nn.Module,
    dense: nn.Module,
    masks: dict[str, torch.Tensor],
    pattern: str = "2:4",
    calibration: Any = None,
    prior_alpha: float = 0.1,
    free_restoration: bool = True,
    cast_config: Any = None,
    max_rows: int = 4096,
) -> dict[str, torch.Tensor]:
    """Project an SER result onto a k:n pattern with CAST (ALGORITHM.md §2 items 7 and 9).

    For every masked layer whose input size is divisible by n, the source tuple is
    u = SER weight where the SER mask keeps, the dense weight elsewhere (free
    restoration; 0 without it), and CAST picks k of every n with a Hamming prior of
    weight ``prior_alpha`` towards the SER mask. Without ``calibration`` the magnitude
    k:n mask of u is used. Other layers keep their SER (unstructured) mask.

    Args:
        model: the SER-pruned model (changed in place).
        dense: the dense model before pruning (same layer names).
        masks: the SER masks (``True`` = kept), e.g. ``SERResult.masks``.
        pattern: ``"k:n"``.
        calibration: model inputs for the CAST covariances (captured on ``model``).
        prior_alpha, free_restoration, cast_config, max_rows: CAST settings.

    Returns:
        The new masks (k:n where eligible; each k:n group exactly k kept).
    """
    from mp_plugin.layers.calibration import capture_covariances
    from mp_plugin.masks.cast import CastConfig, cast_project, cast_source

    pat = Pattern.parse(pattern)
    if not pat.is_kn:
        raise MPPluginError(f"ser_to_kn needs a k:n pattern, got {pattern!r}")
    modules = dict(model.named_modules())
    dense_modules = dict(dense.named_modules())
    eligible = {name: pat.n for name in masks if pat.eligible(tuple(modules[name].weight.shape))}
    cfg = cast_config or CastConfig(prior_alpha=prior_alpha, source="ser", free_restoration=free_restoration)
    stats = capture_covariances(model, eligible, calibration, max_rows=max_rows) if calibration is not None else {}
    out = dict(masks)
    for name in eligible:
        w = modules[name].weight
        dense_w = dense_modules[name].weight.detach().to(w.device, w.dtype)
        u = cast_source(dense_w, masks[name], "ser", free_restoration, ser_weight=w.detach())
        if name in stats:
            mask = cast_project(u, stats[name], pat.k, pat.n, masks[name], cfg, getattr(modules[name], "groups", 1))
        else:
            mask = nm_mask(u, pat.k, pat.n)
        assert_kn_exact(mask, pat.k, pat.n, name=name)
        w.copy_(u * mask)
        out[name] = mask
    return out
