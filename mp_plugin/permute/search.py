"""Permutation searches for k:n sparsity on one 2-D weight.

Conventions (all functions): ``weight`` is a 2-D (rows, C) matrix whose columns
are input channels and whose k:n groups are n consecutive columns. A Linear
weight is used as is; a conv weight (C_out, C, kh, kw) as the (C_out·kh·kw, C)
matrix of :func:`mp_plugin.permute.fold.consumer_matrix`, because its groups
run along the input channels at each kernel position (``mp_plugin.layers.layout``), so
every kernel position is one more row sharing the channel order.
A permutation ``perm`` is a LongTensor of length C: new slot ``s`` holds old
channel ``perm[s]``, i.e. the permuted weight is ``W[:, perm]``.
Magnitudes are sums of |w| in the weight's own units.
"""

from __future__ import annotations

import math
import time

import torch

from mp_plugin.errors import PatternError

__all__ = [
    "kept_magnitude",
    "channel_importance",
    "interleave_permutation",
    "swap_permutation",
    "apply_column_permutation",
]


def _check(weight: torch.Tensor, k: int, n: int) -> tuple[int, int]:
    if weight.dim() != 2:
        raise PatternError(f"expected a 2-D weight (rows, channels), got shape {tuple(weight.shape)}")
    if not 1 <= k < n <= 16:
        raise PatternError(f"need 1 ≤ k < n ≤ 16, got {k}:{n}")
    rows, cols = weight.shape
    if cols % n:
        raise PatternError(f"input channels {cols} are not divisible by n={n}")
    return rows, cols


def apply_column_permutation(weight: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Return ``weight`` (rows, C) with its columns (channels) reordered by ``perm`` (length C)."""
    return weight[:, perm]


def kept_magnitude(weight: torch.Tensor, k: int, n: int, perm: torch.Tensor | None = None) -> float:
    """Σ|w| kept by the magnitude k:n mask of ``weight`` (rows, C), optionally after ``perm``."""
    _check(weight, k, n)
    a = weight.detach().abs().double()
    if perm is not None:
        a = apply_column_permutation(a, perm)
    return float(a.reshape(a.shape[0], -1, n).topk(k, dim=-1).values.sum())


def channel_importance(weight: torch.Tensor, activation_sq: torch.Tensor | None = None) -> torch.Tensor:
    """Importance of each input channel, shape (C,).

    Default Σ_i W[i, c]² (weights only, as in the spec's code); with
    ``activation_sq`` (C,) = E‖h_c‖² it becomes ‖W[:, c]‖²·E‖h_c‖² (activation-weighted).
    """
    imp = weight.detach().double().pow(2).sum(dim=0)
    if activation_sq is not None:
        if activation_sq.numel() != imp.numel():
            raise PatternError(f"activation_sq has {activation_sq.numel()} entries, expected {imp.numel()}")
        imp = imp * activation_sq.detach().double().reshape(-1).to(imp.device)
    return imp


def interleave_permutation(
    weight: torch.Tensor,
    n: int,
    importance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Importance-stratified interleave (spec §2 item 8).

    Channels are sorted by importance (descending) and cut into n strata of
    G = C/n; group g takes stratum s's g-th channel at slot s, so every n-tuple
    holds one channel from each stratum. Returns the identity when C % n ≠ 0.

    Args:
        weight: (rows, C).
        n: group size.
        importance: (C,) per-channel score; default :func:`channel_importance`.

    Returns:
        LongTensor (C,) permutation.
    """
    c = weight.shape[1]
    if c % n:
        return torch.arange(c)
    imp = channel_importance(weight) if importance is None else importance.double().reshape(-1).cpu()
    order = torch.argsort(imp.cpu(), descending=True, stable=True)
    groups = c // n
    return order.reshape(n, groups).t().reshape(-1).clone()


# ----------------------------------------------------------------------------------------------
# Exact swap search: windowed gain matrix, updated incrementally.
# ----------------------------------------------------------------------------------------------


def _remove_one_stats(xg: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For groups xg (..., n): kept top-k sum, and for each member removed: top-(k−1) sum and k-th largest."""
    n = xg.shape[-1]
    kept = xg.topk(k, dim=-1).values.sum(-1)
    idx = torch.tensor([[q for q in range(n) if q != p] for p in range(n)], device=xg.device)
    rest = xg[..., idx]  # (..., n, n-1)
    top = rest.topk(k, dim=-1).values
    return kept, top[..., : k - 1].sum(-1), top[..., k - 1]


def _pair_sums(x: torch.Tensor, t: torch.Tensor, budget: int = 1 << 22) -> torch.Tensor:
    """E[w, i, j] = Σ_r max(x[r, w, j], t[r, w, i]) for x (rows, W, m), t (rows, W, q); float32 result."""
    rows, wn, m = x.shape
    xs = x.permute(1, 2, 0).float().contiguous()  # (W, m, rows)
    ts = t.permute(1, 2, 0).float().contiguous()  # (W, q, rows)
    q = ts.shape[1]
    out = torch.empty(wn, q, m, dtype=torch.float32, device=x.device)
    step = max(1, budget // max(1, rows * m * q))
    for s in range(0, wn, step):
        out[s : s + step] = torch.maximum(ts[s : s + step, :, None, :], xs[s : s + step, None, :, :]).sum(-1)
    return out


def _window_greedy(
    x: torch.Tensor, k: int, n: int, max_steps: int, deadline: float = float("inf")
) -> tuple[torch.Tensor, int]:
    """Greedy exact swaps inside W independent windows.

    Each step takes, for every group, its best swap partner group; mutually-best
    pairs touch disjoint groups, so all of them are applied at once (the global
    best swap is always among them) and only the touched groups are re-scored.

    Args:
        x: (rows, W, m) magnitudes of the windows' columns (m = groups·n), float64.

    Returns:
        order (W, m): the window-local slot permutation found, and the number of swaps made.
    """
    rows, wn, m = x.shape
    ng = m // n
    dev = x.device
    x = x.clone()
    order = torch.arange(m, device=dev).repeat(wn, 1)
    grp = torch.arange(m, device=dev) // n
    same = grp[:, None] == grp[None, :]
    ar_n = torch.arange(n, device=dev)

    kept, s1, kth = _remove_one_stats(x.reshape(rows, wn, ng, n), k)
    base = (s1 - kept[..., None]).sum(0).reshape(wn, m).float()
    e = _pair_sums(x, kth.reshape(rows, wn, m))  # (W, m, m)
    tol = float(x.sum()) / m * 1e-5 + 1e-30  # above float32 rounding of the gain sums
    swaps = 0
    garange = torch.arange(ng, device=dev)
    for _ in range(max_steps):
        if time.perf_counter() > deadline:
            break
        d = base[:, :, None] + e
        gain = (d + d.transpose(1, 2)).masked_fill_(same, float("-inf"))
        blocks = gain.reshape(wn, ng, n, ng, n).permute(0, 1, 3, 2, 4).reshape(wn, ng, ng, n * n)
        bval, barg = blocks.max(-1)  # best swap per group pair
        gval, partner = bval.max(-1)  # best partner group per group, (W, ng)
        mutual = (partner.gather(1, partner) == garange) & (garange < partner) & (gval > tol)
        if not bool(mutual.any()):
            break
        w_sel, g_sel = mutual.nonzero(as_tuple=True)
        h_sel = partner[w_sel, g_sel]
        pos = barg[w_sel, g_sel, h_sel]
        i = g_sel * n + torch.div(pos, n, rounding_mode="floor")
        j = h_sel * n + pos % n
        swaps += int(i.numel())
        xi, xj = x[:, w_sel, i].clone(), x[:, w_sel, j].clone()
        x[:, w_sel, i], x[:, w_sel, j] = xj, xi
        oi, oj = order[w_sel, i].clone(), order[w_sel, j].clone()
        order[w_sel, i], order[w_sel, j] = oj, oi
        ei, ej = e[w_sel, :, i].clone(), e[w_sel, :, j].clone()
        e[w_sel, :, i], e[w_sel, :, j] = ej, ei
        # re-score the touched groups: S = 2·(number of swaps) groups
        w_aff = torch.cat([w_sel, w_sel])
        slots = torch.cat([g_sel, h_sel])[:, None] * n + ar_n  # (S, n)
        xs = x[:, w_aff[:, None], slots]  # (rows, S, n)
        kept2, s12, kth2 = _remove_one_stats(xs, k)
        base[w_aff[:, None], slots] = (s12 - kept2[..., None]).sum(0).float()
        e[w_aff[:, None], slots] = _pair_sums(x[:, w_aff], kth2)
    return order, swaps


def _swap_search_columns(
    a: torch.Tensor,
    k: int,
    n: int,
    perm: torch.Tensor,
    window_groups: int,
    max_rounds: int,
    gen: torch.Generator,
    deadline: float,
) -> torch.Tensor:
    rows, c = a.shape
    groups = c // n
    wg = groups if groups <= window_groups else max(d for d in range(1, window_groups + 1) if groups % d == 0)
    if wg < 2:
        wg = groups  # no useful divisor: one window over everything
    nwin = groups // wg
    idle = 0
    current = kept_magnitude(a, k, n, perm)
    for rnd in range(max_rounds):
        gorder = torch.arange(groups) if (nwin == 1 or rnd == 0) else torch.randperm(groups, generator=gen)
        slots = (gorder.reshape(nwin, wg)[..., None] * n + torch.arange(n)).reshape(nwin, wg * n)
        x = a[:, perm[slots]]  # (rows, W, m)
        order, swaps = _window_greedy(x, k, n, 4 * wg * n, deadline)
        new = perm.clone()
        new[slots] = perm[slots.gather(1, order)]
        value = kept_magnitude(a, k, n, new)  # exact float64 check of the float32-scored round
        if value > current:
            perm, current = new, value
            idle = 0
        else:
            idle += 1
        if nwin == 1 or idle >= 2 or time.perf_counter() > deadline:
            break
    return perm


def swap_permutation(
    weight: torch.Tensor,
    k: int,
    n: int,
    init: torch.Tensor | str | None = "best",
    window_groups: int = 16,
    max_rounds: int = 12,
    restarts: int = 0,
    perturb: float = 0.05,
    seed: int = 0,
    max_seconds: float = 30.0,
) -> torch.Tensor:
    """Exact channel-swap search maximising Σ|w| kept under the k:n mask (Pool & Yu objective).

    For a window of columns, the gain of swapping
    columns i and j (in different groups) is computed exactly for all pairs at
    once: removing i from its group leaves, per row, the top-(k−1) sum S and the
    k-th largest t of the rest, so the group's new kept magnitude with j added is
    Σ_r S_r + max(|W_rj|, t_r). The best swap per window is applied and only the
    two touched groups' rows of the gain matrix are recomputed; this repeats
    until no swap improves. Windows (``window_groups`` groups each; one window
    when the layer has fewer groups) are re-drawn at random between rounds.

    Args:
        weight: (rows, C); a conv as (C_out·kh·kw, C) (module docstring).
        k, n: keep k of every n consecutive input channels.
        init: start permutation (C,), ``"identity"``, ``"interleave"`` or ``"best"``
            (whichever of the two keeps more).
        window_groups: groups per search window.
        max_rounds: window re-draws.
        restarts: extra runs from a randomly perturbed copy of the best permutation.
        perturb: fraction of channels shuffled by each restart's perturbation.
        seed: random seed (the result is deterministic for a given seed).
        max_seconds: wall-clock bound; the best permutation so far is returned.

    Returns:
        LongTensor (C,): never keeps less than ``init`` does.
    """
    rows, c = _check(weight, k, n)
    a = weight.detach().abs().double().cpu()
    gen = torch.Generator().manual_seed(seed)
    deadline = time.perf_counter() + max_seconds
    if isinstance(init, torch.Tensor):
        start = init.clone().long().cpu()
    elif init == "identity" or init is None:
        start = torch.arange(c)
    elif init in ("interleave", "best"):
        inter = interleave_permutation(a, n)
        start = inter
        if init == "best" and kept_magnitude(a, k, n, None) >= kept_magnitude(a, k, n, inter):
            start = torch.arange(c)
    else:
        raise ValueError(f"unknown init {init!r}")

    def run(p: torch.Tensor) -> torch.Tensor:
        return _swap_search_columns(a, k, n, p, window_groups, max_rounds, gen, deadline)

    best = run(start.clone())
    best_val = kept_magnitude(a, k, n, best)
    for _ in range(restarts):
        if time.perf_counter() > deadline:
            break
        cand = best.clone()
        m = max(2, math.ceil(perturb * c))
        idx = torch.randperm(c, generator=gen)[:m]
        cand[idx] = cand[idx[torch.randperm(m, generator=gen)]]
        cand = run(cand)
        val = kept_magnitude(a, k, n, cand)
        if val > best_val:
            best, best_val = cand, val
    if best_val < kept_magnitude(a, k, n, start):
        return start
    return best
