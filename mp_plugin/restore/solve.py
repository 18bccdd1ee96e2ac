"""Re-solve the kept weights of one layer inside a fixed mask (ALGORITHM.md §7).

Everything here works on 2-D problems: ``w`` (rows × d) is ``kn_matrix(weight)``
of one conv group, ``mask`` its kept positions and ``h`` the damped Gram
H = H₀ + λI (d × d). Each row's objective is E(ŵ) = (ŵ − w)ᵀ H (ŵ − w) with
ŵ = 0 off the mask; its minimiser is ŵ_K = H_KK⁻¹ (H w)_K.

Solvers:

* :func:`restore_direct` — exact: one Cholesky solve of H_KK per row, batched.
  Cost rows·|K|³/3; the reference for the others.
* :func:`obs_sweep` — SparseGPT's column sweep on the upper Cholesky factor of
  H⁻¹ (lazy batches of ``blocksize`` columns). With a fixed mask each pruned
  weight is compensated only by the columns to its right, so the result is
  close to, but above, the optimum. With ``select=`` it also chooses the mask
  (SparseGPT's saliency w²/[U]ⱼⱼ², per k:n group or per column block).
  Cost d³ + rows·d².
* :func:`restore_cg` — the OBS sweep as warm start, then preconditioned
  conjugate gradients on the exact objective, all rows at once: each step is one
  (rows × d)·(d × d) product. Converges to the direct solution.
"""

from __future__ import annotations

import math

import torch

from mp_plugin.errors import PatternError

__all__ = [
    "damped",
    "restore_direct",
    "restore_cg",
    "obs_sweep",
    "relative_error",
    "output_energy",
    "direct_cost",
    "upper_cholesky_inverse",
]

_CHUNK_BYTES = 1 << 28  # 256 MiB per batched solve


def damped(h0: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """H = H₀ + λI with λ = damp · mean diag(H₀), and λ (dead inputs get at least λ on the diagonal).

    A Gram whose diagonal is all zero (a layer whose calibration input is zero) gets λ = 1.
    """
    mean = float(torch.diagonal(h0).mean())
    lam = damp * mean if mean > 0 and math.isfinite(mean) else 1.0
    h = h0.clone()
    h.diagonal().add_(lam)
    return h, lam


def output_energy(delta: torch.Tensor, h0: torch.Tensor) -> float:
    """‖Δ Xᵀ‖² = Σ_rows δᵀ H₀ δ for Δ (rows × d) and the Gram H₀ = XᵀX (d × d), in float64."""
    d64 = delta.to(torch.float64)
    return float(((d64 @ h0.to(torch.float64)) * d64).sum())


def relative_error(w: torch.Tensor, w_new: torch.Tensor, h0: torch.Tensor) -> float:
    """‖(Ŵ − W)Xᵀ‖² / ‖W Xᵀ‖² from the undamped Gram H₀ = XᵀX (0 when W Xᵀ = 0)."""
    den = output_energy(w, h0)
    return output_energy(w_new - w, h0) / den if den > 0 else 0.0


def direct_cost(mask: torch.Tensor) -> float:
    """Flops estimate of :func:`restore_direct` for this mask: Σ_rows |K|³/3 + |K|²."""
    k = mask.sum(dim=1).to(torch.float64)
    return float((k**3 / 3 + k**2).sum())


def restore_direct(w: torch.Tensor, mask: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Exact restore: ŵ_K = H_KK⁻¹ (H w)_K for every row, ŵ = 0 off the mask.

    Args:
        w: (rows, d) dense weights, in ``h``'s dtype.
        mask: (rows, d) bool, True = kept.
        h: (d, d) damped Gram (positive definite).

    Returns:
        (rows, d) restored weights, exact zeros off the mask.
    """
    rows, d = w.shape
    counts = mask.sum(dim=1)
    kmax = int(counts.max()) if rows else 0
    out = torch.zeros_like(w)
    if kmax == 0:
        return out
    b_full = w @ h  # (rows, d): row i is (H w_i)ᵀ, H symmetric
    # kept indices first (stable), padded with arbitrary indices whose slots are masked out
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :kmax]
    valid = torch.arange(kmax, device=w.device)[None, :] < counts[:, None]
    chunk = max(1, _CHUNK_BYTES // (kmax * kmax * w.element_size() * 3))
    eye = torch.eye(kmax, dtype=w.dtype, device=w.device)
    for s in range(0, rows, chunk):
        idx = order[s : s + chunk]
        v = valid[s : s + chunk]
        a = h[idx[:, :, None], idx[:, None, :]]
        vv = v[:, :, None] & v[:, None, :]
        a = torch.where(vv, a, eye)
        b = torch.where(v, torch.gather(b_full[s : s + chunk], 1, idx), torch.zeros((), dtype=w.dtype))
        factor = torch.linalg.cholesky(a)
        x = torch.cholesky_solve(b[..., None], factor)[..., 0]
        x = torch.where(v, x, torch.zeros((), dtype=w.dtype))
        out[s : s + chunk].scatter_(1, idx, x)
    return torch.where(mask, out, torch.zeros((), dtype=w.dtype))


def upper_cholesky_inverse(h: torch.Tensor) -> torch.Tensor:
    """U with Uᵀ U = H⁻¹ (upper triangular), SparseGPT's factor."""
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _block_quota(n_prune: int, d: int, blocksize: int) -> list[int]:
    """Pruned weights per column block, proportional to its width, summing to ``n_prune``."""
    bounds = list(range(0, d, blocksize)) + [d]
    cum = [round(n_prune * b / d) for b in bounds]
    return [cum[i + 1] - cum[i] for i in range(len(bounds) - 1)]


def obs_sweep(
    w: torch.Tensor,
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    select: tuple[int, int] | int | None = None,
    blocksize: int = 128,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT's column sweep: prune column by column, updating the columns to the right.

    Args:
        w: (rows, d) weights in ``h``'s dtype.
        h: (d, d) damped Gram.
        mask: (rows, d) bool fixed mask (True = kept); or None with ``select``.
        select: choose the mask during the sweep: ``(k, n)`` keeps the k of every n
            consecutive columns with the largest saliency w²/[U]ⱼⱼ² (at the group's
            first column, after the updates so far); an int prunes exactly that many
            weights, a share per column block proportional to its width, chosen by
            the lowest saliency over the block (at the block's start).
        blocksize: lazy-batch width.

    Returns:
        (restored weights, mask) — exact zeros off the mask.
    """
    if (mask is None) == (select is None):
        raise PatternError("obs_sweep needs exactly one of mask= and select=")
    rows, d = w.shape
    u = upper_cholesky_inverse(h)
    w = w.clone()
    keep = torch.ones(rows, d, dtype=torch.bool, device=w.device) if mask is None else mask.clone()
    quotas = _block_quota(select, d, blocksize) if isinstance(select, int) else None
    kn = select if isinstance(select, tuple) else None
    if kn is not None and blocksize % kn[1]:
        blocksize = max(kn[1], blocksize - blocksize % kn[1])
    for bi, i1 in enumerate(range(0, d, blocksize)):
        i2 = min(i1 + blocksize, d)
        w1 = w[:, i1:i2].clone()
        u1 = u[i1:i2, i1:i2]
        diag = torch.diagonal(u1)
        err1 = torch.zeros_like(w1)
        m1 = keep[:, i1:i2].clone()
        if quotas is not None and quotas[bi] > 0:
            sal = (w1.square() / diag.square()[None, :]).reshape(-1)
            drop = torch.topk(sal, quotas[bi], largest=False).indices
            m1.view(-1)[drop] = False
        for i in range(i2 - i1):
            if kn is not None and i % kn[1] == 0:
                k, n = kn
                sal = w1[:, i : i + n].square() / diag[i : i + n].square()[None, :]
                drop = torch.topk(sal, n - k, dim=1, largest=False).indices
                m1[:, i : i + n].scatter_(1, drop, False)
            col = w1[:, i]
            q = torch.where(m1[:, i], col, torch.zeros((), dtype=w.dtype))
            e = (col - q) / diag[i]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
        keep[:, i1:i2] = m1
    return torch.where(keep, w, torch.zeros((), dtype=w.dtype)), keep


def restore_cg(
    w: torch.Tensor,
    mask: torch.Tensor,
    h: torch.Tensor,
    tol: float = 1e-6,
    max_iter: int = 200,
    blocksize: int = 128,
    start: torch.Tensor | None = None,
    fast_products: bool = True,
) -> tuple[torch.Tensor, int, float]:
    """Exact restore by preconditioned CG on all rows at once, warm-started by :func:`obs_sweep`.

    Args:
        w, mask, h: as for :func:`restore_direct`.
        tol: stop when every row's residual ‖M⊙H(w − ŵ)‖ is below tol × ‖M⊙Hw‖.
        max_iter: iteration cap.
        blocksize: OBS sweep block for the warm start.
        start: warm start instead of the sweep (kept positions only are used).
        fast_products: form the per-iteration products p·H in float32 (2× faster on CPU);
            residuals, steps and the solution stay in ``w``'s dtype. float32's 1e-7
            rounding is far below the stopping tolerance.

    Returns:
        (restored weights, iterations, worst relative residual).
    """
    x = obs_sweep(w, h, mask=mask, blocksize=blocksize)[0] if start is None else torch.where(mask, start, 0.0)
    m = mask.to(w.dtype)
    b = (w @ h) * m
    r = b - (x @ h) * m
    bnorm = b.norm(dim=1).clamp_min(torch.finfo(w.dtype).tiny)
    dinv = 1.0 / torch.diagonal(h)
    z = r * dinv
    p = z.clone()
    rz = (r * z).sum(dim=1)
    it = 0
    worst = float((r.norm(dim=1) / bnorm).max()) if len(r) else 0.0
    h_fast = h.float() if fast_products and h.dtype == torch.float64 else h
    while it < max_iter and worst > tol:
        ap = (p.to(h_fast.dtype) @ h_fast).to(w.dtype) * m
        pap = (p * ap).sum(dim=1)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(pap))
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        z = r * dinv
        rz_new = (r * z).sum(dim=1)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(torch.finfo(w.dtype).tiny), torch.zeros_like(rz))
        p = z + beta[:, None] * p
        rz = rz_new
        it += 1
        worst = float((r.norm(dim=1) / bnorm).max())
    return torch.where(mask, x, torch.zeros((), dtype=w.dtype)), it, worst
