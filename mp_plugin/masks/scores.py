"""Calibration-aware importance scores: per-input-column activation norms and the Wanda score.

Wanda (Sun et al. 2023) scores a weight by |W_ij|·‖x_j‖₂, where x_j is input column j
over all calibration rows. The budget rules that need calibration (``owl``) and the
Wanda baseline both read these, so they live with the masks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import PatternError
from mp_plugin.layers.calibration import eval_mode, layer_input_rows, run_batches

__all__ = ["input_norms", "wanda_scores", "per_row_mask"]


@torch.no_grad()
def input_norms(model: nn.Module, names: list[str], calibration: Any) -> dict[str, torch.Tensor]:
    """‖x_j‖₂ over all calibration rows of each named layer's input column j.

    Rows are tokens (Linear) or unfolded output positions (Conv), laid out like
    ``weight.reshape(C_out, -1)`` (see :func:`mp_plugin.layers.calibration.layer_input_rows`).

    Returns:
        ``{name: (C_in·kh·kw,) float64}`` in input units; a layer the forward pass
        never reached is missing.
    """
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            rows = layer_input_rows(module, inputs[0].detach()).to(torch.float64)
            sq = rows.pow(2).sum(0)
            sums[name] = sq if name not in sums else sums[name] + sq

        return fn

    try:
        with eval_mode(model):
            for name in names:
                handles.append(modules[name].register_forward_hook(hook(name)))
            run_batches(model, calibration)
    finally:
        for h in handles:
            h.remove()
    return {name: s.sqrt() for name, s in sums.items()}


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """Wanda importance |W_ij|·‖x_j‖₂ of a (C_out, C_in, *kernel) weight: (C_out, C_in·kh·kw) float64."""
    w2 = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    if norms.numel() != w2.shape[1]:
        raise PatternError(f"input norms have {norms.numel()} entries, the weight has {w2.shape[1]} columns")
    return w2.abs() * norms.to(w2.device, torch.float64)[None, :]


def _row_counts(total: int, rows: int, cols: int) -> torch.Tensor:
    """Split ``total`` pruned entries over rows as evenly as possible: (rows,) int64."""
    base, extra = divmod(total, rows)
    counts = torch.full((rows,), base, dtype=torch.int64)
    counts[:extra] += 1
    if base + (extra > 0) > cols:
        raise PatternError(f"cannot prune {total} of {rows}×{cols} entries")
    return counts


def per_row_mask(score: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask (rows, cols) removing the smallest scores of each row; row r loses its share of ``n_prune``."""
    rows, cols = score.shape
    counts = _row_counts(n_prune, rows, cols).to(score.device)
    order = torch.argsort(score, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(cols, device=score.device).expand(rows, cols).contiguous())
    return rank >= counts[:, None]
