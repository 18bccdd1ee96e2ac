"""Baseline pruners, run on the same layers and the same budget as the MP methods.

Every baseline has one signature::

    prune_baseline(name, model, sparsity=0.5, pattern="unstructured", calibration=None, report=None) -> model

and prunes ``model`` in place (dense tensors with exact zeros). What a baseline
has to report beyond the weights (today ``sparsegpt``'s per-layer fallbacks) goes
into a :class:`SparseGPTReport` the caller passes as ``report`` and holds; nothing
is attached to the model. The target layers
and the per-layer counts come from the core's :func:`~mp_plugin.plan.plan`, so a
baseline and an MP method always touch the same layers with the same total.

==================  ==========================================================  =============================
name                what                                                        patterns
==================  ==========================================================  =============================
uniform-magnitude   the same fraction per layer, smallest |W| (plan + apply)    unstructured, k:n
global-magnitude    one global |W| threshold (plan + apply)                     unstructured, k:n
wanda               |W_ij|·‖x_j‖₂ per output row (Sun et al. 2023), own code     unstructured, k:n
sparsegpt           ModelOpt's own ``sparsegpt`` mode, then ``mts.export``       2:4
                    ("ModelOpt sparsegpt (mask only)")
sparsegpt-obs       SparseGPT with its OBS weight update, own code, sequential   unstructured, k:n
torchao-wanda       torchao 0.18 ``WandaSparsifier`` (prepare/step/squash)       unstructured, k:(2k); Linear
==================  ==========================================================  =============================

Notes on the framework implementations, as installed:

* ModelOpt's ``sparsegpt`` mode uses SparseGPT's Hessian-aware, column-sequential
  *mask selection*, but writes only the mask: the kept weights are not updated
  (``create_sgpt_mask`` compensates on a copy). It needs out and in sizes
  divisible by 4 and supports only 2:4. Layers it skips fall back to magnitude 2:4.
  It converts only exact ``nn.Linear``/``nn.Conv2d`` (or subclasses keeping their
  ``forward``); other subclasses among the targets (EfficientNet's
  ``Conv2dStaticSamePadding``) are registered for the call when its Hessian is
  exact for them (checked on the calibration input), else they fall back too.
  Every fallback and its reason is in the caller's :class:`SparseGPTReport`.
  For k×k convs it groups the flattened C_in·kh·kw row, not the input channels
  at each kernel position that TensorRT accelerates (``mp_plugin.layers.layout``; its
  own magnitude mode uses the channel layout); such masks fail our k:n check
  and those layers fall back to magnitude 2:4 too.
* torchao's ``WandaSparsifier`` scores |W|·Σx² (its observer keeps the *squared*
  norm) and compares over the whole layer, not per output row; it handles
  Linear layers only.

Imports of modelopt and torchao happen inside the functions.
"""

from __future__ import annotations

import contextlib
import glob
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.calibration import eval_mode, first_batch, run_batches, token_mask
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.scores import input_norms, per_row_mask, wanda_scores
from mp_plugin.masks.select import assert_kn_exact, check_nm, nm_mask
from mp_plugin.planning.build import plan
from mp_plugin.planning.plan import PlanConfig, PrunePlan
from mp_plugin.pruning.apply_plan import apply
from mp_plugin.restore.sparsegpt import sparsegpt_obs

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineNotApplicable",
    "SparseGPTReport",
    "register_baseline",
    "prune_baseline",
    "wanda_prune",
]

PruneFn = Callable[[nn.Module, float, str, Any, PlanConfig | None], nn.Module]


class BaselineNotApplicable(MPPluginError):
    """The baseline cannot run on this model or pattern (e.g. SparseGPT at 4:8)."""


@dataclass
class Baseline:
    """One registered baseline.

    Attributes:
        fn: ``fn(model, sparsity, pattern, calibration, plan_config) -> model`` (in place);
            with ``reports``, also a keyword ``report`` it fills in.
        needs_calibration: whether ``calibration`` batches are required.
        doc: one line.
        reports: whether ``fn`` takes ``report=`` (a :class:`SparseGPTReport`).
    """

    fn: PruneFn
    needs_calibration: bool
    doc: str
    reports: bool = False


BASELINES: dict[str, Baseline] = {}


def register_baseline(
    name: str, fn: PruneFn, needs_calibration: bool = False, doc: str = "", reports: bool = False
) -> None:
    """Add a baseline to :data:`BASELINES` (``reports``: ``fn`` takes a ``report=`` keyword to fill in)."""
    BASELINES[name] = Baseline(fn, needs_calibration, doc, reports)


def prune_baseline(
    name: str,
    model: nn.Module,
    sparsity: float = 0.5,
    pattern: str = "unstructured",
    calibration: Any = None,
    plan_config: PlanConfig | None = None,
    report: SparseGPTReport | None = None,
) -> nn.Module:
    """Prune ``model`` in place with baseline ``name`` and return it.

    Args:
        name: a key of :data:`BASELINES`.
        model: the dense model.
        sparsity: global fraction of target weights to remove (unstructured patterns).
        pattern: ``"unstructured"`` or ``"k:n"``.
        calibration: a batch or list of batches (tensor, tuple or dict; see
            :func:`mp_plugin.layers.calibration.run_batches`), for calibration-aware baselines.
        plan_config: the :class:`PlanConfig` whose layer selection defines the targets.
        report: a :class:`SparseGPTReport` the baseline fills in (left empty by baselines
            that have nothing to report); the caller keeps it.

    Raises:
        MPPluginError: unknown name, or calibration missing.
        BaselineNotApplicable: the baseline does not support this pattern or model.
    """
    if name not in BASELINES:
        raise MPPluginError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
    spec = BASELINES[name]
    if spec.needs_calibration and calibration is None:
        raise MPPluginError(f"baseline {name!r} needs calibration data")
    if spec.reports:
        return spec.fn(model, sparsity, pattern, calibration, plan_config, report=report)
    return spec.fn(model, sparsity, pattern, calibration, plan_config)


def _target_plan(model: nn.Module, sparsity: float, pattern: str, config: PlanConfig | None) -> PrunePlan:
    """The uniform plan: target layers, per-layer counts and patterns shared by all baselines."""
    return plan(model, sparsity, pattern, "uniform", config)


# --------------------------------------------------------------------------- magnitude


def _magnitude(method: str) -> PruneFn:
    def fn(model: nn.Module, sparsity: float, pattern: str, calibration: Any, config: PlanConfig | None) -> nn.Module:
        return apply(model, plan(model, sparsity, pattern, method, config), projection="magnitude")

    return fn


# --------------------------------------------------------------------------- Wanda (own)


@torch.no_grad()
def wanda_prune(
    model: nn.Module, sparsity: float, pattern: str, calibration: Any, config: PlanConfig | None = None
) -> nn.Module:
    """Wanda (Sun et al. 2023): prune by |W_ij|·‖x_j‖₂, compared within each output row.

    Unstructured: every layer loses the plan's uniform count, spread evenly over
    its output rows (the paper's per-output comparison group). k:n: in every group
    of n consecutive inputs of a row, the k highest scores stay. ``calibration``
    supplies the input norms (one forward pass of the dense model).
    """
    p = _target_plan(model, sparsity, pattern, config)
    modules = p.check_model(model)
    active = [lp for lp in p.layers if Pattern.parse(lp.pattern).kind != "dense"]
    norms = input_norms(model, [lp.name for lp in active], calibration)
    for lp in active:
        weight = modules[lp.name].weight
        if lp.name not in norms:
            raise MPPluginError(f"calibration never reached layer {lp.name!r}")
        score = wanda_scores(weight, norms[lp.name])
        pat = Pattern.parse(lp.pattern)
        if pat.is_kn:
            mask = nm_mask(weight.detach(), pat.k, pat.n, score=score.reshape(weight.shape))
            assert_kn_exact(mask, pat.k, pat.n, name=f"wanda {lp.name}")
        else:
            mask = per_row_mask(score, lp.n_prune).reshape(weight.shape)
        weight.mul_(mask.to(weight.dtype))
    return model


# --------------------------------------------------------------------------- SparseGPT (own, with update)


def sparsegpt_obs_prune(
    model: nn.Module, sparsity: float, pattern: str, calibration: Any, config: PlanConfig | None = None
) -> nn.Module:
    """SparseGPT with the OBS weight update written back (``mp_plugin.restore.sparsegpt``), sequential."""
    p = _target_plan(model, sparsity, pattern, config)
    layers = {
        lp.name: (Pattern.parse(lp.pattern), lp.n_prune) for lp in p.layers if Pattern.parse(lp.pattern).kind != "dense"
    }
    sparsegpt_obs(model, layers, calibration)
    return model


# --------------------------------------------------------------------------- SparseGPT (ModelOpt)


@dataclass
class SparseGPTReport:
    """What :func:`sparsegpt_modelopt` did with each 2:4 target layer (filled in for the caller, who holds it).

    Attributes:
        modelopt: targets that kept ModelOpt's SparseGPT mask.
        fallback: ``{target: reason}`` for targets pruned by magnitude 2:4 instead.
        registered: registry keys (``"mp_plugin:<module>.<qualname>"``) of the nn.Conv2d/nn.Linear
            subclasses registered with ModelOpt's sparsity registry for this call only.
    """

    modelopt: list[str] = field(default_factory=list)
    fallback: dict[str, str] = field(default_factory=dict)
    registered: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy."""
        return {"modelopt": list(self.modelopt), "fallback": dict(self.fallback), "registered": list(self.registered)}


def _subclass_refusal(module: nn.Module) -> str | None:
    """Why ModelOpt's SparseGPT Hessian hook cannot be trusted on this subclass, statically (None = no reason)."""
    cls = type(module)
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"{cls.__name__} is a grouped conv (groups={module.groups}); ModelOpt's Hessian assumes groups=1"
        return None
    if isinstance(module, nn.Linear):
        if "Linear" not in cls.__name__:
            # the hook transposes the input only when the dynamic class name contains "Linear"
            return f"ModelOpt's Hessian hook treats a module as Linear by class name; {cls.__name__!r} lacks it"
        return None
    return f"{cls.__name__} is not an nn.Conv2d/nn.Linear subclass; ModelOpt's sparsity registry cannot convert it"


@torch.no_grad()
def _hook_input_refusals(model: nn.Module, modules: dict[str, nn.Module], calibration: Any) -> dict[str, str]:
    """Targets whose output is not the plain op of their hook input, on the first calibration batch.

    ModelOpt's SparseGPT Hessian is the Gram matrix of the forward hook's input,
    unfolded with the module's kernel size, dilation and stride and *no padding*
    (``SparseGPTSearcher._hook_compute_hessian``). That is exact only when the
    module computes ``conv2d(x, W, b, stride, padding=0, dilation)`` (or
    ``linear(x, W, b)``) of that very input. A subclass that pads inside
    ``forward`` (TF "same" padding with a k×k kernel) fails this check; a 1×1
    same-padding conv (zero padding) passes it. Returns ``{name: reason}``.
    """
    seen: dict[str, str | None] = {}
    handles = []

    def hook(name: str) -> Callable:
        def fn(module: nn.Module, inputs: tuple, output: Any) -> None:
            if name in seen:
                return
            x = inputs[0]
            if isinstance(module, nn.Conv2d):
                ref = F.conv2d(x, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
                what = "conv2d(hook input, padding=0)"
            else:
                ref = F.linear(x, module.weight, module.bias)
                what = "linear(hook input)"
            if not isinstance(output, torch.Tensor) or output.shape != ref.shape:
                shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
                seen[name] = f"output {shape} ≠ {what} {tuple(ref.shape)}: forward pads or reshapes its input"
                return
            err = float((output - ref).abs().max())
            scale = max(1.0, float(ref.abs().max()))
            seen[name] = None if err <= 1e-5 * scale else f"output differs from {what} by {err:.3g}"

        return fn

    try:
        with eval_mode(model):
            for name, module in modules.items():
                handles.append(module.register_forward_hook(hook(name)))
            run_batches(model, first_batch(calibration))
    finally:
        for h in handles:
            h.remove()
    out = {name: reason for name, reason in seen.items() if reason is not None}
    out.update({name: "the calibration forward never reached it" for name in modules if name not in seen})
    return out


def _modelopt_miss(weight: torch.Tensor, dense: torch.Tensor) -> str:
    """Why ModelOpt's result on an accepted target is not usable as 2:4 along the input channels."""
    shape = tuple(weight.shape)
    if torch.equal(weight, dense):
        size = " (out or in size not divisible by 4)" if shape[0] % 4 or shape[1] % 4 else ""
        return f"ModelOpt left {shape} dense{size}"
    why = " (ModelOpt groups the flattened C_in·kh·kw row of a k×k conv)" if weight[0, 0].numel() > 1 else ""
    return f"ModelOpt's mask on {shape} is not 2:4 along input channels at each kernel position{why}"


def sparsegpt_modelopt(
    model: nn.Module,
    sparsity: float,
    pattern: str,
    calibration: Any,
    config: PlanConfig | None = None,
    report: SparseGPTReport | None = None,
) -> nn.Module:
    """SparseGPT 2:4 through ModelOpt's own ``sparsegpt`` mode, restricted to the plan's target layers.

    ModelOpt converts exact ``nn.Linear``/``nn.Conv2d`` modules (and subclasses
    that keep their ``forward``). A target whose class is a subclass with its own
    ``forward`` (e.g. EfficientNet's ``Conv2dStaticSamePadding``) is registered
    with ModelOpt's sparsity registry for this call (the registry's intended
    extension point: ``SpDMRegistry.register({cls: key})(SparseModule)``), but
    only when its Hessian is exact: not grouped, and its output equals the plain
    op of its hook input on the first calibration batch (see
    :func:`_hook_input_refusals`). The mode's rules sparsify the 2:4 targets only.

    Targets that are refused, that ModelOpt skips (out/in size not divisible by 4),
    or whose mask is not 2:4 along the input channels (k×k convs, see the module
    notes) get magnitude 2:4 of the dense weights. The model is exported
    (``mts.export``) back to its ordinary classes, the registration undone, and
    ``report`` (a :class:`SparseGPTReport` the caller holds; a fresh one when None)
    filled in with what went where; a warning names the fallbacks.
    """
    pat = Pattern.parse(pattern)
    if not (pat.is_kn and pat.k == 2 and pat.n == 4):
        raise BaselineNotApplicable(f"ModelOpt's sparsegpt mode supports only 2:4, not {pattern!r}")
    import modelopt.torch.sparsity as mts
    from modelopt.torch.sparsity.weight_sparsity.module import SparseModule, SpDMRegistry

    p = _target_plan(model, 0.5, "2:4", config)
    modules = p.check_model(model)
    targets = [lp.name for lp in p.layers if Pattern.parse(lp.pattern).is_kn]
    report = SparseGPTReport() if report is None else report
    candidates: dict[str, nn.Module] = {}
    for name in targets:
        module = modules[name]
        if module in SpDMRegistry:
            continue
        reason = _subclass_refusal(module)
        if reason is None:
            candidates[name] = module
        else:
            report.fallback[name] = reason
    report.fallback.update(_hook_input_refusals(model, candidates, calibration) if candidates else {})
    accepted = [n for n in targets if n not in report.fallback]
    new_classes = {type(modules[n]) for n in accepted if modules[n] not in SpDMRegistry}
    keys = {cls: f"mp_plugin:{cls.__module__}.{cls.__qualname__}" for cls in sorted(new_classes, key=str)}
    report.registered = sorted(keys.values())

    dense = {
        name: mod.weight.detach().clone()
        for name, mod in model.named_modules()
        if isinstance(getattr(mod, "weight", None), torch.Tensor)
    }
    device = next(model.parameters()).device
    samples = unpadded_samples(calibration)  # ModelOpt's Hessian hooks would count padding tokens
    if keys:
        SpDMRegistry.register(keys)(SparseModule)
    try:
        # every key the model's convertible classes map to: freeze all ("*": None) but the accepted targets
        rule: dict[str, dict | None] = {
            "*": None,
            **{glob.escape(n): {} for n in accepted},
        }  # ModelOpt rules are fnmatch patterns
        found = {SpDMRegistry.get_key(type(m)) for m in model.modules() if m in SpDMRegistry}
        rules = {key: rule for key in sorted(found | {"nn.Linear", "nn.Conv2d"})}
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            mts.sparsify(
                model,
                mode=[("sparsegpt", rules)],
                config={"forward_loop": lambda m: run_batches(m, samples), "device": str(device.type)},
            )
            mts.export(model)
    finally:
        for cls in keys:
            SpDMRegistry.unregister(cls)

    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, w in dense.items():
            if name not in targets:
                modules[name].weight.copy_(w)
        for name in targets:
            weight = modules[name].weight
            if name in accepted and check_nm(weight, 2, 4):
                report.modelopt.append(name)
                continue
            w = dense[name]
            if name not in report.fallback:
                report.fallback[name] = _modelopt_miss(weight, w)
            weight.copy_(w * nm_mask(w, 2, 4).to(w.dtype))
    if report.fallback:
        shown = "; ".join(f"{n}: {r}" for n, r in list(report.fallback.items())[:3])
        more = f" (+{len(report.fallback) - 3} more)" if len(report.fallback) > 3 else ""
        warnings.warn(
            f"sparsegpt: {len(report.fallback)} of {len(targets)} 2:4 targets fell back to magnitude 2:4 — "
            f"{shown}{more}",
            stacklevel=2,
        )
    return model


def _take_sample(v: Any, i: int, cut: int, rows: int, length: int) -> Any:
    if isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim >= 1 and v.shape[0] == rows:
        v = v[i : i + 1]
        return v[:, :cut] if v.ndim >= 2 and v.shape[1] == length else v
    return v


def unpadded_samples(calibration: Any) -> Any:
    """Token batches split into one batch per sample with its padding cut off; other data unchanged.

    ModelOpt's and torchao's calibration hooks see every position of the batches
    they are given, padding included, while the MP methods and our own baselines
    count only real tokens (``layers.calibration.real_tokens``). Feeding those
    frameworks one unpadded sample at a time gives them the same tokens. A sample
    whose real tokens are not a prefix (left padding) is kept as it was.
    """
    batches = calibration if isinstance(calibration, list) else [calibration]
    out: list[Any] = []
    for batch in batches:
        mask = token_mask(batch)
        if mask is None:
            out.append(batch)
            continue
        rows, length = mask.shape
        for i in range(rows):
            n = int(mask[i].sum())
            if n == 0:  # all padding: nothing real to calibrate on
                continue
            cut = n if bool(mask[i, :n].all()) else length
            out.append({k: _take_sample(v, i, cut, rows, length) for k, v in batch.items()})
    return out if isinstance(calibration, list) or len(out) > 1 else out[0]


# --------------------------------------------------------------------------- torchao WandaSparsifier


def torchao_wanda(
    model: nn.Module, sparsity: float, pattern: str, calibration: Any, config: PlanConfig | None = None
) -> nn.Module:
    """torchao 0.18 ``WandaSparsifier`` on the plan's targets (Linear layers only).

    Unstructured: ``sparsity_level=s`` per layer (torchao floors s·numel per layer).
    k:n with k = n/2: ``semi_structured_block_size=n``. Calibration batches run
    between ``prepare`` and ``step``; ``squash_mask`` folds the masks.
    """
    from torchao.sparsity import WandaSparsifier

    pat = Pattern.parse(pattern)
    if pat.is_kn and 2 * pat.k != pat.n:
        raise BaselineNotApplicable(f"torchao's WandaSparsifier supports k:n only with k = n/2, not {pattern!r}")
    p = _target_plan(model, sparsity, pattern, config)
    modules = p.check_model(model)
    layers = [lp for lp in p.layers if Pattern.parse(lp.pattern).kind != "dense"]
    if any(not isinstance(modules[lp.name], nn.Linear) for lp in layers):
        raise BaselineNotApplicable("torchao's WandaSparsifier handles Linear layers only; this model has conv targets")
    level = float(sparsity) if not pat.is_kn else 0.5
    sparsifier = WandaSparsifier(sparsity_level=level, semi_structured_block_size=pat.n if pat.is_kn else None)
    with warnings.catch_warnings(), eval_mode(model):
        warnings.simplefilter("ignore")
        sparsifier.prepare(model, [{"tensor_fqn": f"{lp.name}.weight"} for lp in layers])
        run_batches(model, unpadded_samples(calibration))  # its observer would count padding tokens
        sparsifier.step()
        sparsifier.squash_mask()
    return model


register_baseline("uniform-magnitude", _magnitude("uniform"), doc="same fraction per layer, smallest |W|")
register_baseline("global-magnitude", _magnitude("magnitude"), doc="one global |W| threshold")
register_baseline("wanda", wanda_prune, needs_calibration=True, doc="|W|·‖x‖₂ per output row (own implementation)")
register_baseline(
    "sparsegpt", sparsegpt_modelopt, needs_calibration=True, doc="ModelOpt sparsegpt (mask only), 2:4", reports=True
)
register_baseline(
    "sparsegpt-obs", sparsegpt_obs_prune, needs_calibration=True, doc="SparseGPT with its weight update (own code)"
)
register_baseline("torchao-wanda", torchao_wanda, needs_calibration=True, doc="torchao WandaSparsifier, Linear only")
