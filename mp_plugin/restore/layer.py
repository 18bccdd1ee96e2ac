"""Prune and restore one layer: choose its mask, then re-solve its kept weights.

:func:`restore_layer` restores any already chosen mask (magnitude, SEB, CAST,
SER, Wanda, …) against the layer's dense weights. :func:`select_mask` chooses
the mask with one of the registered :data:`PROJECTIONS`, some of which use the
layer's Gram. Both work in the k:n layout (``mp_plugin.layers.layout``), one conv
group at a time, so Linear, Conv1d, 1×1, k×k and grouped/depthwise convs are
all handled (a grouped conv's groups are solved one by one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from mp_plugin.errors import MPPluginError, PatternError
from mp_plugin.layers.calibration import GroupCovariance
from mp_plugin.layers.layout import from_kn_matrix, kn_matrix
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.cast import CastConfig, cast_project, cast_source
from mp_plugin.masks.select import assert_kn_exact, nm_mask, unstructured_mask
from mp_plugin.restore.config import RestoreConfig
from mp_plugin.restore.hessian import LayerGram
from mp_plugin.restore.select import compensated_kn_mask, compensated_unstructured_mask
from mp_plugin.restore.solve import damped, direct_cost, obs_sweep, output_energy, restore_cg, restore_direct

__all__ = ["restore_layer", "select_mask", "PROJECTIONS", "register_projection", "NEEDS_GRAM"]

_DIRECT_FLOPS = 2e8  # "auto" solves directly below this many flops, else by CG (measured: CG is 5× faster at 4e9)

SelectFn = Callable[[torch.Tensor, Pattern, int, "LayerGram | None", RestoreConfig, CastConfig, int], torch.Tensor]
PROJECTIONS: dict[str, SelectFn] = {}
NEEDS_GRAM: set[str] = set()


def register_projection(name: str, fn: SelectFn, needs_gram: bool = False) -> None:
    """Register a mask projection ``fn(dense, pattern, n_prune, gram, restore_cfg, cast_cfg, groups) -> mask``."""
    PROJECTIONS[name] = fn
    if needs_gram:
        NEEDS_GRAM.add(name)


def _split_rows(total: int, parts: int) -> list[int]:
    cum = [round(total * i / parts) for i in range(parts + 1)]
    return [cum[i + 1] - cum[i] for i in range(parts)]


def _group_views(dense: torch.Tensor, groups: int) -> list[slice]:
    rows = dense.shape[0]
    if rows % groups:
        raise PatternError(f"{rows} output channels do not split into {groups} conv groups")
    per = rows // groups
    return [slice(q * per, (q + 1) * per) for q in range(groups)]


def _hinv(gram: LayerGram, q: int, cfg: RestoreConfig) -> torch.Tensor:
    h, _ = damped(gram.gram[q], cfg.damp)
    return torch.cholesky_inverse(torch.linalg.cholesky(h))


def _magnitude(dense, pat, n_prune, gram, cfg, cast_cfg, groups):  # noqa: ANN001, ANN202
    return nm_mask(dense, pat.k, pat.n) if pat.is_kn else unstructured_mask(dense, n_prune)


def _cast(dense, pat, n_prune, gram, cfg, cast_cfg, groups):  # noqa: ANN001, ANN202
    if not pat.is_kn:
        return unstructured_mask(dense, n_prune)
    need_prior = cast_cfg.prior_alpha > 0 or cast_cfg.source == "ser"
    prior = unstructured_mask(dense, n_prune) if need_prior else None
    u = cast_source(dense, prior, cast_cfg.source, cast_cfg.free_restoration)
    stats = GroupCovariance(gram.block_covariance(pat.n), gram.rows, pat.n)
    return cast_project(u, stats, pat.k, pat.n, prior_mask=prior, config=cast_cfg, conv_groups=groups)


def _per_group(dense: torch.Tensor, groups: int, gram: LayerGram, cfg: RestoreConfig, fn: Callable) -> torch.Tensor:
    dt = torch.float64 if cfg.dtype == "float64" else torch.float32
    w = kn_matrix(dense.detach()).to(dt)
    out = torch.empty(w.shape, dtype=torch.bool, device=w.device)
    for q, sl in enumerate(_group_views(w, groups)):
        out[sl] = fn(w[sl], q)
    return from_kn_matrix(out, dense.shape)


def _obs(dense, pat, n_prune, gram, cfg, cast_cfg, groups):  # noqa: ANN001, ANN202
    quota = _split_rows(n_prune, groups)

    def fn(w: torch.Tensor, q: int) -> torch.Tensor:
        h, _ = damped(gram.gram[q].to(w.dtype), cfg.damp)
        select = (pat.k, pat.n) if pat.is_kn else quota[q]
        return obs_sweep(w, h, select=select, blocksize=cfg.blocksize)[1]

    return _per_group(dense, groups, gram, cfg, fn)


def _cast_obs(dense, pat, n_prune, gram, cfg, cast_cfg, groups):  # noqa: ANN001, ANN202
    if pat.is_kn:
        return _per_group(
            dense, groups, gram, cfg, lambda w, q: compensated_kn_mask(w, _hinv(gram, q, cfg).to(w.dtype), pat.k, pat.n)
        )
    if groups == 1:
        return _per_group(
            dense, 1, gram, cfg, lambda w, q: compensated_unstructured_mask(w, _hinv(gram, q, cfg).to(w.dtype), n_prune)
        )
    dt = torch.float64 if cfg.dtype == "float64" else torch.float32
    w = kn_matrix(dense.detach()).to(dt)
    score = torch.empty_like(w)
    for q, sl in enumerate(_group_views(w, groups)):
        score[sl] = w[sl].square() / torch.diagonal(_hinv(gram, q, cfg)).to(dt)[None, :]
    return unstructured_mask(dense, n_prune, score=from_kn_matrix(score, dense.shape))


register_projection("magnitude", _magnitude)
register_projection("cast", _cast, needs_gram=True)
register_projection("obs", _obs, needs_gram=True)
register_projection("cast-obs", _cast_obs, needs_gram=True)


def select_mask(
    dense: torch.Tensor,
    pattern: Pattern,
    n_prune: int,
    projection: str,
    gram: LayerGram | None,
    config: RestoreConfig,
    cast_config: CastConfig | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """Choose a layer's keep mask.

    Args:
        dense: the layer's dense weight (C_out, C_in/groups, *kernel) or (out, in).
        pattern: unstructured or k:n.
        n_prune: weights to remove (unstructured patterns).
        projection: a name in :data:`PROJECTIONS`: ``"magnitude"``, ``"cast"`` (CAST,
            covariance blocks of the Gram), ``"obs"`` (SparseGPT's selection inside the
            column sweep) or ``"cast-obs"`` (compensated CAST cost w_Pᵀ[(H⁻¹)_PP]⁻¹w_P;
            unstructured: smallest w²/[H⁻¹]ⱼⱼ).
        gram: the layer's Gram (needed unless ``projection="magnitude"``).
        config: damping, dtype and sweep block of the Gram-based projections.
        cast_config: CAST settings for ``"cast"``.
        groups: the conv's ``groups``.

    Returns:
        Bool mask shaped like ``dense`` (True = kept), the pattern checked.
    """
    fn = PROJECTIONS.get(projection)
    if fn is None:
        raise MPPluginError(f"unknown projection {projection!r}; use one of {sorted(PROJECTIONS)}")
    if projection in NEEDS_GRAM and gram is None:
        raise MPPluginError(f"projection {projection!r} needs calibration data (the layer's input Gram)")
    mask = fn(dense.detach(), pattern, n_prune, gram, config, cast_config or CastConfig(), groups)
    if pattern.is_kn:
        assert_kn_exact(mask, pattern.k, pattern.n, name=f"{projection} mask")
    elif int((~mask).sum()) != n_prune:
        raise MPPluginError(f"{projection} mask prunes {int((~mask).sum())} weights, the plan says {n_prune}")
    return mask


def _solve(w: torch.Tensor, m: torch.Tensor, h: torch.Tensor, cfg: RestoreConfig) -> tuple[torch.Tensor, str, int]:
    solver = cfg.solver
    if solver == "auto":
        solver = "direct" if direct_cost(m) < _DIRECT_FLOPS else "cg"
    if solver == "direct":
        return restore_direct(w, m, h), "direct", 0
    if solver == "obs":
        return obs_sweep(w, h, mask=m, blocksize=cfg.blocksize)[0], "obs", 0
    x, it, _ = restore_cg(w, m, h, tol=cfg.tol, max_iter=cfg.max_iter, blocksize=cfg.blocksize)
    return x, "cg", it


def restore_layer(
    weight: torch.Tensor, dense: torch.Tensor, gram: LayerGram, config: RestoreConfig, groups: int = 1
) -> dict[str, Any]:
    """Re-solve the non-zeros of ``weight`` so the layer's output stays close to ``dense``'s.

    The mask is ``weight != 0`` (exact zeros stay zero). In place; the weight
    keeps its dtype and device, the solve runs in ``config.dtype``. When the solve is
    worse on the calibration rows than the weights as given, or overflows the weight's
    dtype, the weights are left as they were (with a note).

    Args:
        weight: the pruned weight (parameter or tensor), shaped like ``dense``.
        dense: the layer's dense weight before pruning.
        gram: the layer's input Gram (:func:`~mp_plugin.restore.capture_grams`).
        config: damping and solver.
        groups: the conv's ``groups`` (one solve per conv group).

    Returns:
        A record: ``rel_error_before`` / ``rel_error_after`` (‖(Ŵ−W)Xᵀ‖²/‖WXᵀ‖² on the
        calibration rows, the weights as given vs restored), ``solver``, ``iterations``,
        ``rows``, ``damping`` (λ of each group) and ``notes`` (fallbacks, warnings).
    """
    dt = torch.float64 if config.dtype == "float64" else torch.float32
    w_all = kn_matrix(dense.detach()).to(dt)
    m_all = kn_matrix(weight.detach() != 0)
    if gram.gram.shape[0] != groups or gram.width != w_all.shape[1]:
        raise PatternError(
            f"Gram is {tuple(gram.gram.shape)} but the weight needs {groups} group(s) of width {w_all.shape[1]}"
        )
    current = kn_matrix(weight.detach()).to(dt)  # the kept weights as they are (dense×mask after apply's masking)
    out = current.clone()
    notes: list[str] = []
    num_b = den = 0.0
    solvers, iters, lams = set(), 0, []
    need = math.ceil(config.min_rows_factor * gram.width)
    if gram.rows < gram.width:
        notes.append(
            f"only {gram.rows} calibration rows for {gram.width} inputs: H is singular and the damping does the "
            f"work; give at least {need} rows"
        )
    elif gram.rows < need:
        notes.append(
            f"{gram.rows} calibration rows for {gram.width} inputs: restore may fit the calibration data more "
            f"than the data it will see; give at least {need} rows"
        )
    views = _group_views(w_all, groups)
    h0s = [gram.gram[q].to(device=w_all.device, dtype=dt) for q in range(len(views))]
    for q, sl in enumerate(views):
        w, m, h0 = w_all[sl], m_all[sl], h0s[q]
        masked = current[sl]
        x = None
        for attempt, damp in enumerate((config.damp, config.damp * 10, config.damp * 100)):
            h, lam = damped(h0, damp)
            try:
                x, solver, it = _solve(w, m, h, config)
            except torch.linalg.LinAlgError:
                continue
            if bool(torch.isfinite(x).all()):
                if attempt:
                    notes.append(f"group {q}: H not positive definite at damp={config.damp}; used damp={damp}")
                lams.append(lam)
                solvers.add(solver)
                iters = max(iters, it)
                break
            x = None
        if x is None:
            notes.append(f"group {q}: restore failed (ill-conditioned H); kept the masked weights")
            x = masked
        den += output_energy(w, h0)
        num_b += output_energy(masked - w, h0)
        out[sl] = torch.where(m, x, torch.zeros((), dtype=dt))
    # judged as stored: rounded to the weight's dtype (fp16/bf16 rounding can undo a small gain), and a kept
    # weight that rounds to zero keeps its given value, so the mask is unchanged
    stored = out.to(weight.dtype).to(dt)
    stored = torch.where(m_all & (stored == 0) & (out != 0), current, stored)
    if not bool(torch.isfinite(stored).all()):  # e.g. restored values beyond float16's range
        notes.append(f"restored weights overflow {weight.dtype}; kept the masked weights")
        stored, num_a = current, num_b
    else:
        num_a = sum(output_energy(stored[sl] - w_all[sl], h0s[q]) for q, sl in enumerate(views))
        if num_a > num_b:  # never make the calibration error worse (damping trades it for ‖Ŵ − W‖)
            notes.append(
                "restored error above the masked error (after rounding to the weight's dtype); kept the masked weights"
            )
            stored, num_a = current, num_b
    new = from_kn_matrix(stored, dense.shape).to(device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        weight.copy_(new)
    finite = den > 0 and math.isfinite(den)  # a Gram that overflowed says nothing: NaN, not 0
    return {
        "rel_error_before": num_b / den if finite else (0.0 if den == 0 else float("nan")),
        "rel_error_after": num_a / den if finite else (0.0 if den == 0 else float("nan")),
        "solver": "+".join(sorted(solvers)) or "none",
        "iterations": iters,
        "rows": gram.rows,
        "damping": lams,
        "notes": notes,
    }
