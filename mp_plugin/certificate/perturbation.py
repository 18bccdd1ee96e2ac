"""The removed component R of one layer and its effect Rψ₁(s) on a sample.

For a Linear/Conv layer with dense weight A and pruned weight S, R = A − S (and
the bias difference, if any, is carried along as an extra input of value 1).
Rψ₁(s) is computed by running the layer itself with weight R, so convs with
any padding, stride, groups or TF-style static padding are handled exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.func import functional_call

from mp_plugin.errors import NonFiniteActivationError

__all__ = [
    "in_side_pass",
    "RemovedComponent",
    "removed_component",
    "apply_removed",
    "per_sample_inf_norm",
    "max_patch_norm",
]


_STATE = threading.local()


def in_side_pass() -> bool:
    """True while a layer is being re-run with weight R; the certificate's own hooks then stand aside."""
    return getattr(_STATE, "depth", 0) > 0


@contextmanager
def _side_pass() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


@dataclass
class RemovedComponent:
    """R = A − S for one layer (weight units).

    Attributes:
        weight: R, shaped like the layer's weight (C_out, C_in[, kh, kw]).
        bias: b_A − b_S (C_out,) or None when the layer has no bias.
        dense: A (same shape as ``weight``); pruned: S.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    dense: torch.Tensor
    pruned: torch.Tensor

    @property
    def is_zero(self) -> bool:
        """True when pruning changed nothing in this layer."""
        zero_w = not bool(self.weight.any())
        return zero_w and (self.bias is None or not bool(self.bias.any()))

    def norms(self) -> dict[str, float]:
        """‖R‖²_F, ‖R‖₁, entries changed, and the exact regulariser drops ‖A‖²_F−‖S‖²_F, ‖A‖₁−‖S‖₁."""
        a, s, r = (t.double() for t in (self.dense, self.pruned, self.weight))
        return {
            "r_fro2": float((r * r).sum()),
            "r_l1": float(r.abs().sum()),
            "r_changed": int((r != 0).sum()),
            "l2_drop": float((a * a).sum() - (s * s).sum()),
            "l1_drop": float(a.abs().sum() - s.abs().sum()),
            "mask_case": bool(((s * r) == 0).all()),
        }


def removed_component(dense: nn.Module, pruned: nn.Module) -> RemovedComponent:
    """R and the bias difference between two modules of one architecture."""
    a = dense.weight.detach()
    s = pruned.weight.detach().to(a.device, a.dtype)
    bias = None
    if getattr(dense, "bias", None) is not None:
        bias = dense.bias.detach() - pruned.bias.detach().to(a.device, a.dtype)
    return RemovedComponent(weight=a - s, bias=bias, dense=a, pruned=s)


def apply_removed(module: nn.Module, x: torch.Tensor, removed: RemovedComponent, dtype: torch.dtype) -> torch.Tensor:
    """Rψ₁ (+ Δb): the layer run on input ``x`` with weight R, in ``dtype``. Same shape as the layer's output."""
    params = {"weight": removed.weight.to(dtype)}
    if removed.bias is not None:
        params["bias"] = removed.bias.to(dtype)
    with _side_pass():
        return functional_call(module, params, (x.to(dtype),))


def per_sample_inf_norm(y: torch.Tensor, name: str = "") -> torch.Tensor:
    """max |y| over everything but the batch axis: (B, …) → (B,). For token models: max over tokens and channels."""
    out = y.detach().abs().flatten(1).amax(1)  # NaN and Inf propagate through the max
    if not bool(torch.isfinite(out).all()):
        raise NonFiniteActivationError(f"non-finite values in the perturbation of layer '{name}'")
    return out


def max_patch_norm(module: nn.Module, x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """Per sample, the largest ℓ₂ norm of an input row v the weight multiplies, and the number of rows.

    Linear: rows are tokens (B, T, m) → max_t ‖v_t‖₂. Conv: rows are the receptive-field
    patches of each output position (and group). Returns ((B,) norms, rows per sample).
    """
    if isinstance(module, nn.Linear):
        sq = x.to(dtype).pow(2).sum(-1).reshape(x.shape[0], -1)
        return sq.amax(1).sqrt(), int(sq.shape[1])
    params = {"weight": torch.ones_like(module.weight, dtype=dtype)}
    if getattr(module, "bias", None) is not None:
        params["bias"] = torch.zeros_like(module.bias, dtype=dtype)
    with _side_pass():
        sq = functional_call(module, params, (x.to(dtype).pow(2),))  # every channel sums its patch's ψ²
    positions = int(sq[0, 0].numel())
    return sq.flatten(1).amax(1).clamp_min(0).sqrt(), positions
