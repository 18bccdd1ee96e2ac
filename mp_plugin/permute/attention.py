"""Attention with a fused qkv projection: permute V's rows within each head and proj's input columns.

For a module with ``qkv`` (Linear, 3·C outputs ordered q|k|v, heads contiguous),
``proj`` (Linear, C inputs) and ``num_heads``, the attention output's channel
h·D + d is head h's value dimension d. Permuting the value dimensions inside a
head (the same reordering of V's rows and of proj's columns) leaves the
attention weights, and so the function, unchanged. Q and K rows are untouched.
The layout assumption is checked numerically on a captured input before the
permutation is kept (see :func:`mp_plugin.permute.permute_channels`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mp_plugin.permute.ops import permute_tensor_

__all__ = ["AttentionSite", "find_attention_sites", "fold_attention"]


@dataclass
class AttentionSite:
    """One fused-qkv attention module.

    Attributes:
        name: qualified name of the attention module.
        qkv, proj: qualified names of its projections.
        num_heads: heads H; head_dim D = C / H.
        channels: C = proj.in_features.
    """

    name: str
    qkv: str
    proj: str
    num_heads: int
    channels: int

    @property
    def head_dim(self) -> int:
        """D = C / H."""
        return self.channels // self.num_heads


def find_attention_sites(model: nn.Module) -> tuple[list[AttentionSite], list[tuple[str, str]]]:
    """Return the fused-qkv attention modules of ``model`` and (proj name, reason) for rejected ones."""
    sites: list[AttentionSite] = []
    rejected: list[tuple[str, str]] = []
    for name, mod in model.named_modules():
        qkv, proj, heads = getattr(mod, "qkv", None), getattr(mod, "proj", None), getattr(mod, "num_heads", None)
        if not (isinstance(qkv, nn.Linear) and isinstance(proj, nn.Linear) and isinstance(heads, int)):
            continue
        pname = f"{name}.proj" if name else "proj"
        c = proj.in_features
        if qkv.out_features != 3 * c or c % heads:
            rejected.append((pname, f"qkv has {qkv.out_features} outputs, not 3×{c} split into {heads} heads"))
            continue
        extra = [a for a in ("q_bias", "v_bias", "k_bias") if getattr(mod, a, None) is not None]
        norm = getattr(mod, "norm", None)
        if extra or (norm is not None and not isinstance(norm, nn.Identity)):
            why = f"separate biases {extra}" if extra else f"a {type(norm).__name__} between attention and proj"
            rejected.append((pname, f"attention has {why}"))
            continue
        sites.append(AttentionSite(name, f"{name}.qkv" if name else "qkv", pname, heads, c))
    return sites, rejected


def fold_attention(model: nn.Module, site: AttentionSite, perm: torch.Tensor) -> None:
    """Permute V's rows of qkv (weight, bias) and proj's columns by ``perm`` (C,), in place.

    ``perm`` must map every head onto itself (checked).
    """
    c, d = site.channels, site.head_dim
    if not torch.equal(torch.div(perm, d, rounding_mode="floor"), torch.arange(c) // d):
        raise ValueError("attention permutation must stay within each head")
    rows = torch.cat([torch.arange(2 * c), 2 * c + perm])
    qkv = model.get_submodule(site.qkv)
    permute_tensor_(qkv.weight, rows, 0)
    if qkv.bias is not None:
        permute_tensor_(qkv.bias, rows, 0)
    permute_tensor_(model.get_submodule(site.proj).weight, perm, 1)
