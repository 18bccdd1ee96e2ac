"""The earlier papers' spectral operators (ALGORITHM.md §1.2, §1.4 (i)–(ii)).

Each operator takes a weight (Linear (out, in) or Conv (out, in, kh, kw), read
as the C_out × C_in·kh·kw matrix W = U diag(s) Vᵀ) and its
:class:`~mp_plugin.spectrum.SpectralFit`, and returns a new weight of the same
shape (the input is not modified):

* :func:`remove_singular_values` — keep the spikes (s > σ₊) plus the largest
  fraction f of the bulk singular values, drop the rest (2023 RMT-SVD).
* :func:`sparsify_singular_vectors` — zero small entries of uⱼ, vⱼ with the 2025
  power-30 threshold Tⱼ = θ·max{1/750, (1 − sⱼ/σ₊)₊³⁰}.
* :func:`shrink_spikes` — inverse-BBP map: move each spike's singular value
  down to the estimate of the clean signal it came from.

:func:`low_rank_split` turns a Linear/Conv into two smaller layers when that
saves parameters, and :func:`replace_module` swaps it into the model.
``SPECTRAL_OPERATORS`` maps names to the weight→weight operators.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.spectrum import SpectralFit, as_matrix

__all__ = [
    "SPECTRAL_OPERATORS",
    "register_operator",
    "kept_rank",
    "remove_singular_values",
    "sparsify_singular_vectors",
    "shrink_spikes",
    "low_rank_split",
    "replace_module",
]

Operator = Callable[..., torch.Tensor]
SPECTRAL_OPERATORS: dict[str, Operator] = {}


def register_operator(name: str) -> Callable[[Operator], Operator]:
    """Decorator adding a ``(weight, fit, **options) -> weight`` operator to :data:`SPECTRAL_OPERATORS`."""

    def deco(fn: Operator) -> Operator:
        SPECTRAL_OPERATORS[name] = fn
        return fn

    return deco


def _svd(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mat = as_matrix(weight).to(torch.float64)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return u, s, vh


def _back(mat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mat.reshape(like.shape).to(like.dtype)


def kept_rank(fit: SpectralFit, keep_fraction: float, min_rank: int = 1) -> int:
    """#spikes + ⌊f·#bulk⌋, floored at ``min_rank`` and capped at min(N, M)."""
    if not 0.0 <= keep_fraction <= 1.0:
        raise MPPluginError(f"keep_fraction must lie in [0, 1], got {keep_fraction}")
    p = min(fit.shape)
    bulk = p - fit.n_spikes
    return int(min(p, max(min_rank, fit.n_spikes + math.floor(keep_fraction * bulk))))


@register_operator("sv_removal")
def remove_singular_values(
    weight: torch.Tensor, fit: SpectralFit, keep_fraction: float = 0.45, min_rank: int = 1
) -> torch.Tensor:
    """Keep the spikes plus the largest ``keep_fraction`` of the bulk singular values.

    Args:
        weight: (N, M) or (N, C_in, kh, kw), any float dtype.
        fit: the weight's MP fit (σ₊ and the spike count are used).
        keep_fraction: f ∈ [0, 1] of the sub-edge singular values kept (S4 used 0.45).
        min_rank: floor of the kept rank (the 2023 papers floor at the output size).

    Returns:
        U_r diag(s_r) V_rᵀ reshaped like ``weight``: rank ``kept_rank(fit, f, min_rank)``.
    """
    u, s, vh = _svd(weight)
    r = kept_rank(fit, keep_fraction, min_rank)
    return _back((u[:, :r] * s[:r]) @ vh[:r], weight)


@register_operator("sv_sparsify")
def sparsify_singular_vectors(
    weight: torch.Tensor,
    fit: SpectralFit,
    theta: float | None = None,
    target_reduction: float = 0.06,
    power: float = 30.0,
    floor: float = 1.0 / 750.0,
) -> torch.Tensor:
    """The 2025 rule: zero entries of uⱼ and vⱼ below Tⱼ = θ·max{floor, (1 − sⱼ/σ₊)₊^power}.

    Args:
        weight: (N, M) or conv weight.
        fit: MP fit (σ₊ is used).
        theta: threshold θ in singular-vector units (entries of unit vectors);
            default 750·1.5e−8·t·N·M with t = ``target_reduction`` (the 2025 schedule).
        target_reduction: t of the schedule, used only when ``theta`` is None.
        power, floor: 30 and 1/750 in the paper.

    Returns:
        U' diag(s) V'ᵀ with the sparsified singular vectors, shaped like ``weight``.
    """
    u, s, vh = _svd(weight)
    n_rows, n_cols = fit.shape
    th = 750.0 * 1.5e-8 * target_reduction * n_rows * n_cols if theta is None else float(theta)
    if fit.sigma_plus > 0:
        bulk = (1.0 - s / fit.sigma_plus).clamp_min(0.0) ** power
    else:
        bulk = torch.zeros_like(s)
    t = th * bulk.clamp_min(floor)  # (p,)
    u = torch.where(u.abs() < t[None, :], torch.zeros_like(u), u)
    vh = torch.where(vh.abs() < t[:, None], torch.zeros_like(vh), vh)
    return _back((u * s) @ vh, weight)


def _inverse_bbp(x: torch.Tensor, gamma: float) -> torch.Tensor:
    """Clean signal θ from an observed singular value x, both in noise units σ_e·√max(N, M).

    Rectangular spiked model with aspect ratio γ = min/max ≤ 1: a spike θ > γ^¼
    appears at x² = θ² + 1 + γ + γ/θ². Inverting, θ² = (x² − 1 − γ + √((x² − 1 − γ)² − 4γ)) / 2;
    at the bulk edge x = 1 + √γ it gives θ = γ^¼ (below the edge the root is clamped there).
    """
    a = x.square() - 1.0 - gamma
    disc = (a.square() - 4.0 * gamma).clamp_min(0.0)
    theta2 = (a + disc.sqrt()) / 2.0
    return theta2.clamp_min(math.sqrt(gamma)).sqrt()


@register_operator("bbp_shrink")
def shrink_spikes(weight: torch.Tensor, fit: SpectralFit) -> torch.Tensor:
    """Inverse-BBP shrinkage: replace every spike sⱼ > σ₊ by its clean-signal estimate.

    With entry noise σ_e = ``fit.sigma`` (weight units) and c = σ_e·√max(N, M),
    each spike becomes c·θ(sⱼ/c) (see :func:`_inverse_bbp`); in the square case this
    is ½(s + √(s² − 4σ_e²N)), main.tex Cor. 4.9. The noise scale enters as σ_e,
    not σ_e², unlike the authors' ``shift``. Bulk singular values are unchanged.

    Returns:
        U diag(s') Vᵀ shaped like ``weight``, with s' ≤ s.
    """
    u, s, vh = _svd(weight)
    n_big = max(fit.shape)
    gamma = min(fit.shape) / n_big
    scale = fit.sigma * math.sqrt(n_big)
    if scale <= 0:
        return weight.detach().clone()
    spikes = (s > fit.sigma_plus) & (s > scale * (1.0 + math.sqrt(gamma)))
    shrunk = torch.where(spikes, scale * _inverse_bbp(s / scale, gamma), s)
    return _back((u * torch.minimum(shrunk, s)) @ vh, weight)


def low_rank_split(
    module: nn.Module, fit: SpectralFit, keep_fraction: float = 0.45, min_rank: int = 1
) -> nn.Sequential | None:
    """Factor a Linear or ungrouped Conv into two layers of rank r, when that saves parameters.

    W ≈ (U_r √S_r)(√S_r V_rᵀ) with r = ``kept_rank(fit, keep_fraction, min_rank)``:

    * Linear(in → out) → Sequential(Linear(in → r, no bias), Linear(r → out, bias));
    * Conv(C_in → C_out, k×k, stride, padding, dilation) → Sequential(
      Conv(C_in → r, same k×k geometry, no bias), Conv(r → C_out, 1×1, bias)).

    Returns:
        The replacement (same dtype/device, same function as the rank-r
        recomposed weight), or ``None`` when r·(N + M) ≥ N·M (then recompose
        in place with :func:`remove_singular_values` instead).

    Raises:
        MPPluginError: grouped convs and other module types.
    """
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.groups != 1:
            raise MPPluginError("low_rank_split does not handle grouped/depthwise convs")
    elif not isinstance(module, nn.Linear):
        raise MPPluginError(f"low_rank_split handles Linear, Conv1d and Conv2d, not {type(module).__name__}")
    weight = module.weight
    n_out, n_in = weight.shape[0], weight[0].numel()
    r = kept_rank(fit, keep_fraction, min_rank)
    if r * (n_out + n_in) >= n_out * n_in:
        return None
    u, s, vh = _svd(weight)
    root = s[:r].sqrt()
    first_w = root[:, None] * vh[:r]  # (r, M)
    second_w = u[:, :r] * root[None, :]  # (N, r)
    bias = module.bias is not None
    kw = {"device": weight.device, "dtype": weight.dtype}
    if isinstance(module, nn.Linear):
        first: nn.Module = nn.Linear(n_in, r, bias=False, **kw)
        second: nn.Module = nn.Linear(r, n_out, bias=bias, **kw)
    else:
        conv = nn.Conv2d if isinstance(module, nn.Conv2d) else nn.Conv1d
        first = conv(
            module.in_channels,
            r,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            bias=False,
            padding_mode=module.padding_mode,
            **kw,
        )
        second = conv(r, n_out, 1, bias=bias, **kw)
    with torch.no_grad():
        first.weight.copy_(first_w.reshape(first.weight.shape))
        second.weight.copy_(second_w.reshape(second.weight.shape))
        if bias:
            second.bias.copy_(module.bias)
    return nn.Sequential(first, second)


def replace_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where the submodule ``name`` (dotted path) of ``root`` is; return the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    old = getattr(parent, child, None)
    if old is None:
        raise MPPluginError(f"{type(root).__name__} has no submodule {name!r}")
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old
