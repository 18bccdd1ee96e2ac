"""Mask selection that knows the kept weights will be re-solved (ALGORITHM.md §7).

* :func:`compensated_kn_mask` — CAST with the compensated cost: for output row i
  and k:n group g, the candidate that prunes the set P (|P| = n − k) costs
  w_Pᵀ [(H⁻¹)_PP]⁻¹ w_P, the output error left after every other weight of the
  row re-solves (the Schur complement of H), instead of CAST's rᵀ C_g r which
  assumes nothing compensates. For 2:4 that is a 2×2 inverse per candidate.
* :func:`compensated_unstructured_mask` — the unstructured counterpart: prune
  the ``n_prune`` weights with the smallest single-weight OBS cost w²/[H⁻¹]ⱼⱼ.

Both take the k:n-layout matrix of one conv group, ``w`` (rows × d), and the
inverse of the damped Gram, ``hinv`` (d × d).
"""

from __future__ import annotations

import torch

from mp_plugin.errors import PatternError
from mp_plugin.masks.cast import kn_patterns
from mp_plugin.masks.select import assert_kn_exact

__all__ = ["compensated_kn_mask", "compensated_unstructured_mask"]


def compensated_kn_mask(
    w: torch.Tensor, hinv: torch.Tensor, k: int, n: int, max_enumerate: int = 5000, n_samples: int = 1024
) -> torch.Tensor:
    """Per row and group, keep the k of n weights whose removal set P minimises w_Pᵀ[(H⁻¹)_PP]⁻¹w_P.

    Args:
        w: (rows, d) weights, d divisible by n.
        hinv: (d, d) inverse of the damped Gram, same dtype as ``w``.
        k, n: the pattern.
        max_enumerate, n_samples: candidate patterns as in CAST (``mp_plugin.masks.cast.kn_patterns``).

    Returns:
        (rows, d) bool mask with exactly k True per group.
    """
    rows, d = w.shape
    if d % n:
        raise PatternError(f"input width {d} is not divisible by n={n}")
    g = d // n
    pats = kn_patterns(k, n, max_enumerate, n_samples, torch.Generator().manual_seed(0)).to(w.device)
    m = n - k
    drop = torch.argsort(pats.to(torch.int8), dim=1, stable=True)[:, :m]  # (K, m) pruned indices
    hb = hinv.reshape(g, n, g, n)
    gi = torch.arange(g, device=w.device)
    blocks = hb[gi, :, gi, :]  # (g, n, n)
    sub = blocks[:, drop[:, :, None], drop[:, None, :]]  # (g, K, m, m)
    inv = torch.linalg.inv(sub)
    wg = w.reshape(rows, g, n)
    out = torch.empty(rows, g, n, dtype=torch.bool, device=w.device)
    step = max(1, (1 << 24) // max(1, g * len(pats) * m * m))
    for s in range(0, rows, step):
        wp = wg[s : s + step][:, :, drop]  # (r, g, K, m)
        cost = torch.einsum("rgka,gkab,rgkb->rgk", wp, inv, wp)
        out[s : s + step] = pats[cost.argmin(dim=-1)]
    mask = out.reshape(rows, d)
    assert_kn_exact(mask, k, n, name="compensated k:n mask")
    return mask


def compensated_unstructured_mask(w: torch.Tensor, hinv: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep all but the ``n_prune`` weights with the smallest OBS cost w²/[H⁻¹]ⱼⱼ (exact count).

    Args:
        w: (rows, d) weights; hinv: (d, d) inverse of the damped Gram.
        n_prune: weights to remove in this matrix (0 ≤ n_prune ≤ rows·d).

    Returns:
        (rows, d) bool mask, True = kept.
    """
    if not 0 <= n_prune <= w.numel():
        raise PatternError(f"cannot prune {n_prune} of {w.numel()} weights")
    score = w.square() / torch.diagonal(hinv)[None, :]
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)  # contiguous, whatever w's strides
    if n_prune:
        mask.view(-1)[torch.topk(score.reshape(-1), n_prune, largest=False).indices] = False
    return mask
