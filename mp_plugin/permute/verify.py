"""Checks that a folded permutation left the function unchanged: model output, each coupling's consumers, attention.

* :func:`undo_changed_consumers` — after the folds, each coupling's consumers must compute the
  outputs they computed before (relative to their own size); a coupling that fails is unfolded.
* :func:`attention_probe` — a within-head fold is checked on a random-weight copy of the
  attention module, where real weights cannot hide a violation.
* :func:`recheck` / :func:`module_output` — one module's output on its captured input, just
  before and after a fold.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from mp_plugin.layers.calibration import call_model, eval_mode
from mp_plugin.permute.attention import AttentionSite, fold_attention
from mp_plugin.permute.fold import fold_coupling
from mp_plugin.permute.graph import Coupling
from mp_plugin.permute.report import PermutationReport, SkippedPermutation

__all__ = [
    "CAPTURE_BYTES",
    "attention_probe",
    "capture_outputs",
    "flat_outputs",
    "max_diff",
    "module_output",
    "recheck",
    "run_example",
    "tolerance",
    "undo_changed_consumers",
]


def run_example(model: nn.Module, example: Any) -> Any:
    """``model`` on ``example`` (dict → kwargs, tuple/list → args); bad input → CalibrationError."""
    if isinstance(example, list):
        example = tuple(example)
    return call_model(model, example, "example input")


def run_hooked(model: nn.Module, example: Any, handles: list) -> None:
    """Run ``model`` on ``example`` in eval mode without gradients, then remove the hook ``handles``."""
    try:
        with torch.no_grad(), eval_mode(model):
            run_example(model, example)
    finally:
        for h in handles:
            h.remove()


def flat_outputs(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        return [t for v in out.values() for t in flat_outputs(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in flat_outputs(v)]
    return []


def tolerance(out: Any, scale: float) -> float:
    """Allowed max |Δ output| after folding: float rounding of reordered sums, not a wrong model."""
    low = any(t.dtype in (torch.float16, torch.bfloat16) for t in flat_outputs(out))
    return (2e-2 if low else 1e-4) * (1.0 + scale)


def max_diff(a: Any, b: Any) -> tuple[float, float]:
    fa, fb = flat_outputs(a), flat_outputs(b)
    if len(fa) != len(fb) or not fa:
        return float("inf"), 1.0
    diff = max(float((x.float() - y.float()).abs().max()) if x.numel() else 0.0 for x, y in zip(fa, fb))
    scale = max(float(x.float().abs().max()) if x.numel() else 0.0 for x in fa)
    return diff, scale


def module_output(model: nn.Module, name: str, captured: dict[str, tuple[tuple, dict, Any]]) -> Any:
    """Module ``name``'s output now, on the input captured for it in the reference pass."""
    args, kwargs, _ = captured[name]
    with torch.no_grad(), eval_mode(model):
        return model.get_submodule(name)(*args, **kwargs)


def recheck(model: nn.Module, name: str, captured: dict[str, tuple[tuple, dict, Any]], before: Any) -> float | None:
    """None when module ``name``'s output on its captured input is still ``before`` (computed just before
    a fold; an earlier fold upstream may have changed the captured input's basis), else max |Δ|."""
    diff, scale = max_diff(before, module_output(model, name, captured))
    return None if diff <= tolerance(before, scale) else diff


CAPTURE_BYTES = 256 << 20  # consumer outputs kept for the per-coupling check (else only the model output is checked)


def capture_outputs(model: nn.Module, names: list[str], into: dict[str, torch.Tensor]) -> list:
    """Hooks storing each named module's output (a CPU float32 copy) in ``into``, while they fit in memory."""
    budget = [CAPTURE_BYTES]

    def hook(_m: nn.Module, _args: tuple, out: Any, name: str) -> None:
        if not isinstance(out, torch.Tensor) or name in into:
            return
        size = out.numel() * 4
        if size <= budget[0]:
            budget[0] -= size
            into[name] = out.detach().float().cpu().clone()

    return [
        model.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: hook(m, a, o, n))
        for n in dict.fromkeys(names)
    ]


def undo_changed_consumers(
    model: nn.Module,
    example: Any,
    names: list[str],
    reference: dict[str, torch.Tensor],
    undo: list,
    perms: dict[str, torch.Tensor],
    report: PermutationReport,
) -> None:
    """Unfold every folded coupling one of whose consumers now computes another output.

    (A consumer that is also a producer of another fold, or an attention's qkv, has its
    output permuted on purpose and is not compared.) A consumer reads the permuted channels with permuted weight columns, so its output must
    not change at all; checking it relative to its own size catches a wrong fold that the
    model's output hides (e.g. behind a small layer scale).
    """
    if example is None or not reference:
        return
    now: dict[str, torch.Tensor] = {}
    run_hooked(model, example, capture_outputs(model, [n for n in names if n in reference], now))
    permuted_out = set()  # modules whose outputs a fold permutes on purpose: not comparable
    for site, _ in undo:
        if isinstance(site, Coupling):
            permuted_out.update(site.producers, (o for o, _ in site.ops))
        else:
            permuted_out.add(site.qkv)
    for site, perm in list(undo):
        if not isinstance(site, Coupling):
            continue
        bad = None
        for c in site.consumers:
            if c in reference and c in now and c not in permuted_out:
                diff, scale = max_diff(reference[c], now[c])
                if diff > (2e-2 if reference[c].dtype in (torch.float16, torch.bfloat16) else 1e-4) * scale + 1e-30:
                    bad = (c, diff, scale)
                    break
        if bad is None:
            continue
        fold_coupling(model, site, torch.argsort(perm))
        undo.remove((site, perm))
        for c in site.consumers:
            perms.pop(c, None)
        report.permuted = [p for p in report.permuted if p.name not in site.consumers]
        for c in site.consumers:
            report.skipped.append(
                SkippedPermutation(
                    c,
                    f"folding changed the output of {bad[0]} by {bad[1]:.2e} (of {bad[2]:.2e}): "
                    "the graph walk misread this coupling; undone",
                )
            )


def attention_probe(
    model: nn.Module, site: AttentionSite, perm: torch.Tensor, captured: dict[str, tuple[tuple, dict, Any]]
) -> float | None:
    """Fold ``perm`` into a copy of the attention module with every parameter drawn at random (N(0, 1)).

    The fold is an identity of the attention's algebra, true for any weights; the real
    weights can hide a violation (a temperature of 1e-3 flattens a channel-mixing
    softmax), random ones do not. Returns None when the copy's output is unchanged on the
    captured input, else the max |Δ|.
    """
    args, kwargs, _ = captured[site.name]
    copy_mod = copy.deepcopy(model.get_submodule(site.name))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), eval_mode(copy_mod):
        for p in copy_mod.parameters():
            if p.is_floating_point():
                p.copy_(torch.randn(p.shape, generator=gen).to(p.device, p.dtype))
        before = copy_mod(*args, **kwargs)
        fold_attention(copy_mod, AttentionSite("", "qkv", "proj", site.num_heads, site.channels), perm)
        after = copy_mod(*args, **kwargs)
    diff, scale = max_diff(before, after)
    return None if diff <= tolerance(before, scale) else diff
