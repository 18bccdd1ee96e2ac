"""``permute_channels``: search a k:n-friendly input-channel order per coupling and fold it into the weights."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from mp_plugin.errors import ConfigError, MPPluginError, PatternError, PlanMismatchError
from mp_plugin.layers.calibration import eval_mode
from mp_plugin.layers.discovery import find_target_layers
from mp_plugin.layers.layout import kn_eligible
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.permute.attention import AttentionSite, find_attention_sites, fold_attention
from mp_plugin.permute.couplings import find_couplings
from mp_plugin.permute.fold import consumer_matrix, fold_coupling
from mp_plugin.permute.graph import Coupling, shared_modules
from mp_plugin.permute.links import link_partials
from mp_plugin.permute.record import Fold, PermutationRecord, resolve_permutation, site_modules
from mp_plugin.permute.report import PermutationReport, PermutedLayer, SkippedPermutation
from mp_plugin.permute.search import channel_importance, interleave_permutation, kept_magnitude, swap_permutation
from mp_plugin.permute.verify import (
    attention_probe,
    capture_outputs,
    flat_outputs,
    max_diff,
    module_output,
    recheck,
    run_example,
    run_hooked,
    tolerance,
    undo_changed_consumers,
)
from mp_plugin.progress import progress

__all__ = ["permute_channels", "align_to_permuted", "undo_folds", "PermutationError", "METHODS"]

METHODS = ("swap", "interleave")


class PermutationError(MPPluginError):
    """Folding a permutation changed the model's function (the model was restored)."""


def _default_input(model: nn.Module) -> torch.Tensor | None:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    if not size:
        return None
    p = next(model.parameters(), None)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, *size, generator=gen)
    return x.to(p.device, p.dtype) if p is not None else x


def _activation_energy(model: nn.Module, names: list[str], example: Any) -> dict[str, torch.Tensor]:
    """E[h_c²] per input channel of each named consumer, from one forward pass."""
    stats: dict[str, torch.Tensor] = {}
    handles = []
    for name in names:
        mod = model.get_submodule(name)
        axis = -1 if isinstance(mod, nn.Linear) else 1

        def hook(_m: nn.Module, args: tuple, name: str = name, axis: int = axis) -> None:
            x = args[0].detach().double()
            x = x.movedim(axis, -1).reshape(-1, x.shape[axis])
            stats[name] = x.pow(2).mean(0).cpu()

        handles.append(mod.register_forward_pre_hook(hook))
    run_hooked(model, example, handles)
    return stats


def _fold(model: nn.Module, site: Coupling | AttentionSite, perm: torch.Tensor) -> None:
    """Fold ``perm`` into ``model`` at a coupling or an attention site (in place)."""
    if isinstance(site, Coupling):
        fold_coupling(model, site, perm)
    else:
        fold_attention(model, site, perm)


def _search(
    mats: list[torch.Tensor], k: int, n: int, method: str, importance: torch.Tensor | None, seconds: float
) -> torch.Tensor:
    stacked = torch.cat(mats, 0)
    if method == "interleave":
        return interleave_permutation(stacked, n, importance)
    return swap_permutation(stacked, k, n, max_seconds=seconds)


def permute_channels(
    model: nn.Module,
    pattern: str | Pattern = "2:4",
    method: str = "swap",
    example_input: Any = None,
    show_progress: bool = False,
    importance: str = "weight",
    max_seconds_per_layer: float = 10.0,
    record: PermutationRecord | None = None,
) -> PermutationRecord:
    """Permute input channels for k:n sparsity and fold the permutations into the weights, in place.

    For every coupling found in the module graph (producer rows and bias → per-channel
    ops → consumer input channels; fused-qkv attention V rows → proj columns within
    each head) an input-channel order is searched that keeps more magnitude under the
    k:n mask of the consumer (conv groups run along input channels at each kernel
    position, ``mp_plugin.layers.layout``), and it
    is folded into all tensors of the coupling so the function is unchanged. No hooks,
    buffers, state_dict keys or attributes are added: what was folded is returned as a
    :class:`PermutationRecord` (``apply(..., permute=...)`` keeps it in the plan). Couplings the graph walk does not understand
    (residual streams, reshapes, unknown modules, shared weights, grouped convs) are
    left unpermuted and reported.

    Args:
        model: any ``nn.Module``; modified in place. A wrapped model (``torch.compile``,
            DDP, …) is permuted through the model inside it; names carry no wrapper prefix.
        pattern: ``"k:n"`` (1 ≤ k < n ≤ 16).
        method: ``"swap"`` (exact swap search, Pool & Yu objective) or ``"interleave"``
            (importance-stratified interleave of the spec).
        example_input: a tensor, tuple of args or dict of kwargs for ``model``. Used to
            verify the function after folding: each coupling's consumers must compute the
            same outputs (relative to their own size; a coupling that fails is undone and
            reported), then the model output (all undone on a change). Attention couplings
            need it (skipped without it); they are also checked on a random-weight copy.
            Without it only the static checks apply: the graph walk, and a random-copy probe
            of Linear/Conv subclasses. Default: a random batch of the timm config's
            ``input_size`` when the model has one.
        show_progress: show a progress bar over couplings.
        importance: channel importance of the interleave: ``"weight"`` (Σ_i W_ij²) or
            ``"activation"`` (‖W_:j‖²·E h_j², needs an input). The swap search ignores it.
        max_seconds_per_layer: time bound of the swap search per coupling.
        record: the record of earlier ``permute_channels`` calls on this model; the new
            permutations are composed with it (it is not modified).

    Returns:
        A :class:`PermutationRecord`: ``permutations`` (consumer name → list[int]: new input
        channel s is old channel perm[s], composed with ``record``), ``folds`` (``record``'s
        folds, then this call's) and ``report`` (this call's :class:`PermutationReport`).

    Raises:
        PatternError: malformed pattern, not k:n, k ≥ n or n > 16.
        ConfigError: unknown ``method`` or ``importance`` (a ValueError).
        CalibrationError: ``example_input`` is malformed, non-finite or does not run the model.
        PermutationError: the verification found a changed output (model restored).
            Any error or interrupt part-way also unfolds what was folded before it is re-raised.
    """
    pat = Pattern.parse(pattern)
    if not pat.is_kn:
        raise PatternError(f"channel permutation needs a k:n pattern, got {pat}")
    if method not in METHODS:
        raise ConfigError(f"method must be one of {METHODS}, got {method!r}")
    if importance not in ("weight", "activation"):
        raise ConfigError(f"importance must be 'weight' or 'activation', got {importance!r}")
    if record is not None and not isinstance(record, PermutationRecord):
        raise ConfigError(f"record must be a PermutationRecord or None, got {type(record).__name__}")
    model = unwrap_model(model)
    k, n = pat.k, pat.n
    report = PermutationReport(str(pat), method)
    example = example_input if example_input is not None else _default_input(model)
    if importance == "activation" and example is None:
        raise ConfigError("importance='activation' needs example_input")

    targets, skipped_targets = find_target_layers(model)
    target_names = {t.name for t in targets}
    not_target = {s.name: s.reason for s in skipped_targets}
    partials: list[Coupling] = []
    couplings, failures, notes = find_couplings(model, partials)
    report.notes.extend(notes)
    if example is not None and partials:
        try:
            with eval_mode(model):
                couplings += link_partials(model, partials, example, run_example)
        except Exception as exc:
            if example_input is not None:
                raise
            report.notes.append(f"inferred example input failed ({type(exc).__name__}); no linked couplings")
    covered = {c for cp in couplings for c in cp.consumers}
    attn_sites, attn_rejected = find_attention_sites(model)
    shared = shared_modules(model)
    attn_sites = [s for s in attn_sites if s.proj not in covered]
    failure_reason = {name: f.reason for f in failures for name in f.consumers}
    for pname, why in attn_rejected:
        failure_reason[pname] = why

    # reference output + attention inputs + the coupling consumers' outputs, captured in one forward pass
    captured: dict[str, tuple[tuple, dict, Any]] = {}
    reference = None
    consumer_out: dict[str, torch.Tensor] = {}
    watch = [c for cp in couplings for c in cp.consumers]
    if example is not None:
        handles = []
        verify = [s.name for s in attn_sites] + [c.verify_module for c in couplings if c.verify_module]
        for vname in verify:

            def hook(_m: nn.Module, args: tuple, kwargs: dict, out: Any, name: str = vname) -> None:
                captured[name] = (args, kwargs, out)

            handles.append(model.get_submodule(vname).register_forward_hook(hook, with_kwargs=True))
        handles += capture_outputs(model, watch, consumer_out)
        try:
            with torch.no_grad(), eval_mode(model):
                reference = run_example(model, example)
        except Exception as exc:
            if example_input is not None:
                raise
            # the input inferred from the timm config does not fit this model: no verification
            report.notes.append(f"inferred example input failed ({type(exc).__name__}); output not verified")
            example, captured = None, {}
        finally:
            for h in handles:
                h.remove()

    if reference is not None and not all(
        bool(torch.isfinite(t).all()) for t in flat_outputs(reference) if t.is_floating_point()
    ):
        raise PermutationError(
            "the model's output on the example input is not finite (NaN/Inf), so a permutation cannot be verified; "
            "check the weights and the example input"
        )
    if example is None:  # verify or refuse: couplings of children traced on their own need a run to check
        for cp in [cp for cp in couplings if cp.region]:
            for c in cp.consumers:
                report.skipped.append(
                    SkippedPermutation(
                        c,
                        f"found inside {cp.region}, which traced only on its own (its parent did not trace); "
                        "without an example_input the parent's use of it cannot be verified: pass example_input",
                    )
                )
        couplings = [cp for cp in couplings if not cp.region]

    all_consumers = [c for cp in couplings for c in cp.consumers] + [s.proj for s in attn_sites]
    if importance == "activation" and example is None:
        raise ConfigError("importance='activation' needs an example_input that runs the model")
    energy = _activation_energy(model, all_consumers, example) if importance == "activation" else {}
    perms: dict[str, torch.Tensor] = {}
    undo: list[tuple[Any, torch.Tensor]] = []

    def eligible(name: str) -> tuple[bool, str]:
        if name not in target_names:
            return False, f"not a pruning target ({not_target.get(name, 'excluded')})"
        mod = model.get_submodule(name)
        if getattr(mod, "groups", 1) != 1:
            return False, f"grouped conv (groups={mod.groups}): channels cannot move between its groups"
        if not kn_eligible(mod.weight.shape, n):
            return False, f"input channels {mod.weight.shape[1]} are not divisible by n={n}"
        return True, ""

    try:
        sites: list[Coupling | AttentionSite] = [*couplings, *attn_sites]
        for site in progress(sites, disable=not show_progress, desc=f"permute {pat}"):
            t0 = time.perf_counter()
            if isinstance(site, Coupling):
                names = site.consumers
                ok = [(c, *eligible(c)) for c in names]
                use = [c for c, good, _ in ok if good]
                if not use:
                    for c, _, why in ok:
                        report.skipped.append(SkippedPermutation(c, why))
                    continue
                mats = [consumer_matrix(model.get_submodule(c)) for c in use]
                imp = None
                if importance == "activation":
                    unrun = [c for c in use if c not in energy]
                    if unrun:
                        for c in names:
                            report.skipped.append(
                                SkippedPermutation(
                                    c, f"{unrun[0]} did not run on the example input: no activation energy"
                                )
                            )
                        continue
                    imp = sum(channel_importance(m, energy[c]) for m, c in zip(mats, use))
                perm = _search(mats, k, n, method, imp, max_seconds_per_layer)
                before = [kept_magnitude(m, k, n, None) for m in mats]
                after = [kept_magnitude(m, k, n, perm) for m in mats]
                if any(a < b for a, b in zip(after, before)) or torch.equal(perm, torch.arange(site.channels)):
                    why = "identity is best: no order found that keeps more magnitude on every consumer"
                    for c in names:
                        report.skipped.append(SkippedPermutation(c, why))
                    continue
                check = module_output(model, site.verify_module, captured) if site.verify_module else None
                fold_coupling(model, site, perm)
                if site.verify_module is not None:
                    diff = recheck(model, site.verify_module, captured, check)
                    if diff is not None:
                        fold_coupling(model, site, torch.argsort(perm))
                        for c in names:
                            report.skipped.append(
                                SkippedPermutation(
                                    c,
                                    f"linked across untraced {site.verify_module}, "
                                    f"but its output changed ({diff:.2e}); undone",
                                )
                            )
                        continue
                undo.append((site, perm))
                dt = time.perf_counter() - t0
                partners = site.producers + [o for o, _ in site.ops]
                for c in names:
                    perms[c] = perm
                for c, b, a in zip(use, before, after):
                    report.permuted.append(PermutedLayer(c, "graph", partners, b, a, dt))
                for c, good, why in ok:
                    if not good:
                        report.skipped.append(
                            SkippedPermutation(c, f"permuted with its coupling but not searched: {why}")
                        )
                continue
            # attention
            good, why = eligible(site.proj)
            if not good:
                report.skipped.append(SkippedPermutation(site.proj, why))
                continue
            if any(nm in shared for nm in (site.qkv, site.proj)):
                report.skipped.append(SkippedPermutation(site.proj, "shared weights"))
                continue
            d = site.head_dim
            if d % n:
                report.skipped.append(SkippedPermutation(site.proj, f"head_dim {d} is not divisible by n={n}"))
                continue
            if site.name not in captured:
                report.skipped.append(
                    SkippedPermutation(
                        site.proj,
                        "attention layout can only be verified with an example_input (none given or inferable)",
                    )
                )
                continue
            if importance == "activation" and site.proj not in energy:
                report.skipped.append(
                    SkippedPermutation(site.proj, "it did not run on the example input: no activation energy")
                )
                continue
            w = consumer_matrix(model.get_submodule(site.proj))
            parts = []
            for h in range(site.num_heads):
                sub = w[:, h * d : (h + 1) * d]
                imp = None
                if importance == "activation":
                    imp = channel_importance(sub, energy[site.proj][h * d : (h + 1) * d])
                parts.append(h * d + _search([sub], k, n, method, imp, max_seconds_per_layer / site.num_heads))
            perm = torch.cat(parts)
            before, after = kept_magnitude(w, k, n), kept_magnitude(w, k, n, perm)
            if after <= before:
                report.skipped.append(
                    SkippedPermutation(site.proj, "identity is best: no within-head order keeps more")
                )
                continue
            probe = attention_probe(model, site, perm, captured)
            if probe is not None:
                report.skipped.append(
                    SkippedPermutation(
                        site.proj,
                        f"with random weights the within-head permutation changes the attention output "
                        f"({probe:.2e}): this attention mixes channels inside a head; left unpermuted",
                    )
                )
                continue
            check = module_output(model, site.name, captured)
            fold_attention(model, site, perm)
            diff = recheck(model, site.name, captured, check)
            if diff is not None:
                fold_attention(model, site, torch.argsort(perm))
                report.skipped.append(
                    SkippedPermutation(
                        site.proj, f"attention layout check failed (max |Δ| {diff:.2e}); left unpermuted"
                    )
                )
                continue
            undo.append((site, perm))
            perms[site.proj] = perm
            report.permuted.append(
                PermutedLayer(site.proj, "attention", [site.qkv], before, after, time.perf_counter() - t0)
            )

        undo_changed_consumers(model, example, watch, consumer_out, undo, perms, report)
        if reference is not None:
            with torch.no_grad(), eval_mode(model):
                after_out = run_example(model, example)
            diff, scale = max_diff(reference, after_out)
            report.verified, report.max_abs_diff = diff <= tolerance(reference, scale), diff
            if not report.verified:
                raise PermutationError(f"folding changed the output by {diff:.3e}; all permutations were undone")
    except BaseException:  # an error or Ctrl-C part-way: no half-permuted model without a record
        for site, perm in reversed(undo):
            _fold(model, site, torch.argsort(perm))
        raise

    done = set(perms) | {s.name for s in report.skipped}
    for name in sorted(target_names - done):
        report.skipped.append(SkippedPermutation(name, failure_reason.get(name, "no coupling found in the graph")))

    return (record or PermutationRecord()).extended(perms, undo, report)


def undo_folds(model: nn.Module, folds: list[Fold]) -> None:
    """Unfold ``folds`` from ``model`` (last first), in place: the inverse of folding them in order."""
    model = unwrap_model(model)
    with torch.no_grad():
        for site, perm in reversed(folds):
            _fold(model, site, torch.argsort(perm))


def align_to_permuted(reference: nn.Module, permutation: Any) -> nn.Module:
    """A copy of ``reference`` with a permuted model's channel permutations folded in, in the same order.

    ``permutation`` is the :class:`PermutationRecord` ``permute_channels`` returned, or the
    :class:`~mp_plugin.planning.plan.PrunePlan` that ``apply(..., permute=...)`` stored it in
    (also after ``PrunePlan.save``/``load``). Replaying its folds on a copy of the dense
    model gives the same function in the permuted basis, so weights can be compared layer
    by layer with the permuted (and pruned) model — e.g. the certificate's per-layer
    R = W_dense − W_pruned. ``reference`` itself is not modified (a wrapped reference is
    copied without its wrapper).

    Raises:
        PermutationError: the record lists permutations but no folds (a hand-made record).
    """
    record = resolve_permutation(permutation)
    out = copy.deepcopy(unwrap_model(reference))
    if record is None:
        return out
    if not record.folds:
        raise PermutationError(
            "the permutation record lists permutations but no folds; "
            "align the reference by re-running permute_channels on it"
        )
    names = dict(out.named_modules())
    missing = sorted({n for site, _ in record.folds for n in site_modules(site) if n not in names})
    if missing:
        raise PlanMismatchError(
            f"the permutation record folds modules this model does not have: {missing[:5]}: a plan of another model?"
        )
    try:
        with torch.no_grad():
            for site, perm in record.folds:
                _fold(out, site, perm)
    except (RuntimeError, IndexError, ValueError) as exc:  # a site whose shapes do not fit this model
        raise PlanMismatchError(f"the permutation record does not fit this model: {exc}") from exc
    return out
