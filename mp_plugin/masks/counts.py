"""Exact per-layer prune counts: global thresholding of weighted |W| and the uniform split.

Both hit ⌊s · Σ numel⌋ (prune_target) exactly. They count; the masks themselves are chosen in
:mod:`mp_plugin.masks.select`, and the budget rules of :mod:`mp_plugin.budget` supply
the per-layer weights w_ℓ.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from mp_plugin.errors import ConfigError, InvalidSparsityError, InvalidWeightError

__all__ = ["check_sparsity", "global_prune_counts", "prune_target", "uniform_prune_counts", "weight_numels"]


def check_sparsity(sparsity: float) -> float:
    """Return ``sparsity`` as float, or raise :class:`InvalidSparsityError` unless 0 ≤ s < 1."""
    try:
        s = float(sparsity)
    except (TypeError, ValueError) as exc:
        raise InvalidSparsityError(f"sparsity must be a number in [0, 1), got {sparsity!r}") from exc
    if not (0.0 <= s < 1.0) or not np.isfinite(s):
        raise InvalidSparsityError(f"sparsity must lie in [0, 1), got {s}")
    return s


def prune_target(sparsity: float, total: int) -> int:
    """⌊s · total⌋, the number of weights a sparsity s removes from ``total`` (ALGORITHM.md §2.4).

    A product within a few float ulps of an integer counts as that integer, so s = 0.3 of 10
    weights is 3 although 0.3 · 10 rounds to 2.9999999999999996 or 3.0000000000000004 in floats
    (the tolerance is absolute in float resolution, so it stays below one weight at any size).
    A sparsity below 1 never removes every weight.
    """
    s, n = float(sparsity), int(total)
    t = s * n
    near = round(t)
    out = int(near) if abs(t - near) <= 8 * math.ulp(max(abs(t), 1.0)) else int(math.floor(t))
    return min(out, n - 1) if s < 1 and n > 0 else out


_CHUNK = 1 << 22  # entries scored at once: the workspace of global_prune_counts is a few of these


def _score_bits(
    weight: torch.Tensor, layer_w: float, shift: int, scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]]
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The float32 scores |W|/w_ℓ·2^-shift of one layer as int32 bit patterns, slice by slice.

    Yields ``(bits, bits >> 16)`` per slice of at most ``_CHUNK`` weights. For
    non-negative floats the bit pattern orders like the value, so counting bit
    patterns below a threshold is counting scores below it. ``shift`` (the same for
    every layer, see :func:`_score_shift`) keeps float64 weights far outside
    float32's range (|W| ~ 1e100) from all becoming inf or 0.

    Both tensors are views of two ``_CHUNK``-sized buffers per device, kept in
    ``scratch`` and valid until the next slice: the same memory serves every slice of
    every layer, so a pass over a large model does not churn the allocator (freed
    16 MiB blocks fragment glibc's heap and stay in the process's RSS).
    """
    flat = weight.detach().reshape(-1)
    if flat.device not in scratch:
        scratch[flat.device] = (
            torch.empty(_CHUNK, dtype=torch.float32, device=flat.device),
            torch.empty(_CHUNK, dtype=torch.int32, device=flat.device),
        )
    scores, high = scratch[flat.device]
    for start in range(0, flat.numel(), _CHUNK):
        piece = flat[start : start + _CHUNK]
        out = scores[: piece.numel()]
        if shift:
            scaled = torch.ldexp(piece.abs().double(), torch.tensor(float(-shift), dtype=torch.float64))
            out.copy_(scaled / float(layer_w))
        else:
            out.copy_(piece)
            out.abs_().div_(float(layer_w))
        bits = out.view(torch.int32)
        yield bits, torch.bitwise_right_shift(bits, 16, out=high[: piece.numel()])


def _score_shift(weights: Sequence[torch.Tensor], layer_w: Sequence[float]) -> int:
    """A power-of-two exponent putting the largest score near 1 when the scores leave float32's safe range."""
    peaks = []
    for i, (w, lw) in enumerate(zip(weights, layer_w)):
        if w.numel():
            lo, hi = torch.aminmax(w.detach())  # no |W| copy of the layer; NaN/Inf show in it
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise InvalidWeightError(f"weight {i} (in layer order) holds NaN or Inf values: it cannot be ranked")
            peaks.append(max(abs(float(lo)), abs(float(hi))) / float(lw))
    peak = max(peaks, default=0.0)
    if not (0.0 < peak < math.inf):
        return 0
    exp = math.frexp(peak)[1]
    return exp if abs(exp) > 60 else 0


def weight_numels(weights: Sequence[torch.Tensor]) -> list[int]:
    """Number of entries of each weight; a sequence with ``numels()`` (``LayerWeights``) answers
    without loading an accelerate-offloaded weight."""
    numels = getattr(weights, "numels", None)
    return [int(n) for n in numels()] if callable(numels) else [int(w.numel()) for w in weights]


def global_prune_counts(weights: Sequence[torch.Tensor], layer_w: Sequence[float], sparsity: float) -> list[int]:
    """Exact per-layer counts for global thresholding of |W|/w_ℓ.

    Selects exactly ⌊s · Σ numel⌋ (:func:`prune_target`) entries with the smallest scores
    |W_ij|/w_ℓ across all layers (ties broken by layer order), and returns how
    many fall in each layer. Within a layer the pruned entries are then its
    smallest-|W| ones, since the score is monotone in |W| there.

    The threshold is found by a two-pass radix select on the float32 scores' bit
    patterns (high 16 bits, then low 16 bits inside the selected bin), reading the
    weights slice by slice on their own device: the workspace is a few slices of
    4M scores plus 64K-bin histograms, whatever the model's size, and no copy of
    all scores is made. The counts equal those of a k-th-value selection on the
    concatenated scores.
    """
    s = check_sparsity(sparsity)
    sizes = weight_numels(weights)
    if len(layer_w) != len(sizes):
        raise ConfigError(f"{len(layer_w)} layer weights for {len(sizes)} layers")
    bad = next(((i, v) for i, v in enumerate(layer_w) if not (math.isfinite(float(v)) and float(v) > 0)), None)
    if bad is not None:
        raise ConfigError(
            f"layer weight w_ℓ of layer {bad[0]} is {bad[1]!r}: every w_ℓ must be finite and > 0 (the score is |W|/w_ℓ; "
            "e.g. a very large BulkShareConfig.beta overflows exp(−β·z))"
        )
    total = sum(sizes)
    target = prune_target(s, total)
    if target == 0:
        return [0] * len(sizes)
    shift = _score_shift(weights, layer_w)
    scratch: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
    high = torch.zeros(len(sizes), 1 << 15, dtype=torch.int64)
    for i, (w, lw) in enumerate(zip(weights, layer_w)):
        for _, top_bits in _score_bits(w, lw, shift, scratch):
            high[i] += torch.bincount(top_bits, minlength=1 << 15).cpu()
    cum = high.sum(0).cumsum(0)
    top = int(torch.searchsorted(cum, torch.tensor(target, dtype=torch.int64)))  # first bin reaching target
    before = int(cum[top - 1]) if top > 0 else 0
    low = torch.zeros(1 << 16, dtype=torch.int64)
    low_layers: dict[int, torch.Tensor] = {}
    for i, (w, lw) in enumerate(zip(weights, layer_w)):
        if int(high[i, top]) == 0:
            continue
        hist = torch.zeros(1 << 16, dtype=torch.int64)
        for bits, top_bits in _score_bits(w, lw, shift, scratch):
            inside = bits[top_bits == top] & 0xFFFF
            if inside.numel():
                hist += torch.bincount(inside, minlength=1 << 16).cpu()
        low += hist
        low_layers[i] = hist.to(torch.int32) if sizes[i] < 2**31 else hist  # 64K bins per layer kept
    cum_low = low.cumsum(0) + before
    bottom = int(torch.searchsorted(cum_low, torch.tensor(target, dtype=torch.int64)))
    below = [int(v) for v in high[:, :top].sum(1)]
    ties = [0] * len(sizes)
    for i, hist in low_layers.items():
        below[i] += int(hist[:bottom].sum(dtype=torch.int64))
        ties[i] = int(hist[bottom])
    remaining = target - sum(below)
    counts = []
    for b, t in zip(below, ties):
        take = min(t, remaining)
        counts.append(b + take)
        remaining -= take
    assert sum(counts) == target
    return counts


def uniform_prune_counts(weights: Sequence[torch.Tensor], sparsity: float) -> list[int]:
    """Per-layer counts for the same fraction in every layer, total still exact."""
    s = check_sparsity(sparsity)
    sizes = np.array([int(w.numel()) for w in weights])
    target = prune_target(s, int(sizes.sum()))
    raw = s * sizes
    counts = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - counts), kind="stable")
    for i in order[: target - int(counts.sum())]:
        counts[i] += 1
    return [int(c) for c in counts]
