"""``certify``: the data-path certificate of ALGORITHM.md §3 for a dense/pruned model pair."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.certificate.gaussian import gaussian_mp_budget
from mp_plugin.certificate.inputs import (
    Batch,
    batch_size,
    check_labels,
    check_same_architecture,
    forward_logits,
    linear_layers,
    model_device,
    move_batch,
    numpy_to_torch,
)
from mp_plugin.certificate.labels import ESTIMATE, EXACT, LOWER, MEASURED, MODES, RIGOROUS
from mp_plugin.certificate.lipschitz import batchnorm_input_ndim, jacobian_estimate, sequential_bound
from mp_plugin.certificate.perturbation import (
    RemovedComponent,
    apply_removed,
    in_side_pass,
    max_patch_norm,
    per_sample_inf_norm,
    removed_component,
)
from mp_plugin.certificate.result import Certificate, LayerCertificate
from mp_plugin.certificate.rigor import (
    DEFAULT_ROUNDING_RTOL,
    autocast_problem,
    bound_preserved,
    hook_problem,
    hyperparameter_mismatch,
    own_forward_problem,
    precision_problem,
    tied_problem,
)
from mp_plugin.errors import CertificateInputError, NonFiniteActivationError, NotCertifiable
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.masks.select import fold_parametrizations
from mp_plugin.permute import align_to_permuted, resolve_permutation
from mp_plugin.progress import progress

__all__ = ["certify"]


class _Capture:
    """Forward hooks computing ‖Rψ₁(s)‖∞ (and optionally max patch norms) for some layers in one pass."""

    def __init__(self, modules: dict[str, nn.Module], removed: dict[str, RemovedComponent], dtype, patches: bool):
        self.modules, self.removed, self.dtype, self.patches = modules, removed, dtype, patches
        self.order: list[str] = []
        self.calls: dict[str, int] = {}
        self.rpsi: dict[str, torch.Tensor] = {}
        self.patch: dict[str, tuple[torch.Tensor, int]] = {}

    def hook(self, name: str):
        def fn(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            if in_side_pass():
                return
            x = inputs[0].detach()
            if not bool(torch.isfinite(x.abs().amax())):  # one reduction; NaN/Inf propagate
                raise NonFiniteActivationError(f"the input ψ₁ of layer '{name}' contains NaN or Inf")
            self.calls[name] = self.calls.get(name, 0) + 1
            if name not in self.order:
                self.order.append(name)
            r = per_sample_inf_norm(apply_removed(module, x, self.removed[name], self.dtype), name)
            self.rpsi[name] = r if name not in self.rpsi else torch.maximum(self.rpsi[name], r)
            if self.patches:
                self.patch[name] = max_patch_norm(module, x, self.dtype)

        return fn

    def run(self, model: nn.Module, batch: Batch, n: int) -> torch.Tensor:
        handles = [m.register_forward_hook(self.hook(name)) for name, m in self.modules.items()]
        try:
            with torch.no_grad():
                return forward_logits(model, batch, n)
        finally:
            for h in handles:
                h.remove()


def _eval_view(model: nn.Module, device: torch.device | None = None) -> nn.Module:
    """The model itself when it is already plain, in eval mode and on ``device``; else a folded eval copy."""
    plain = not any(parametrize.is_parametrized(m) or m.training for m in model.modules())
    if plain and (device is None or model_device(model) == device):
        return model
    clone = fold_parametrizations(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    return clone.to(device) if device is not None else clone


def _copy_layer(dst: nn.Module, src: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(dst, "bias", None) is not None:
            dst.bias.copy_(src.bias)


def _changed_other_params(dense: nn.Module, pruned: nn.Module, layer_names: Sequence[str]) -> list[str]:
    covered = {f"{n}.{p}" if n else p for n in layer_names for p in ("weight", "bias")}
    ds, ps = dense.state_dict(), pruned.state_dict()
    out = []
    for key, value in ds.items():
        if key in covered or not isinstance(value, torch.Tensor) or not value.is_floating_point():
            continue
        if not torch.equal(value, ps[key].to(value.device)):
            out.append(key)
    return out


def _bound_mode_checks(dense: nn.Module, pruned: nn.Module, precision: torch.dtype, rounding_rtol: float) -> None:
    """Refuse what the rigorous bound does not cover (see :mod:`mp_plugin.certificate.rigor`)."""
    if not (rounding_rtol >= 0 and np.isfinite(rounding_rtol)):
        raise CertificateInputError(f"rounding_rtol must be a finite number ≥ 0, got {rounding_rtol!r}")
    if not precision.is_floating_point or torch.finfo(precision).eps > torch.finfo(torch.float32).eps:
        raise CertificateInputError(f"bound mode needs precision float32 or float64 for Rψ₁, got {precision}")
    why = (
        hook_problem(dense, "the dense model")
        or hook_problem(pruned, "the pruned model")
        or autocast_problem()
        or hyperparameter_mismatch(dense, pruned)
        or precision_problem((dense, pruned), precision)
    )
    if why is not None:
        raise NotCertifiable(f"bound mode cannot prove a bound here: {why}; use mode='empirical'")


def _check_lambdas(lambdas: Sequence[float] | None) -> tuple[float, float] | None:
    if lambdas is None:
        return None
    if len(lambdas) != 2 or any(not np.isfinite(v) or v < 0 for v in lambdas):
        raise CertificateInputError(f"lambdas must be (λ₁, λ₂) with finite λ ≥ 0, got {lambdas!r}")
    return float(lambdas[0]), float(lambdas[1])


def _margins(z: torch.Tensor, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    top = z.topk(2, dim=1)
    pred = z.argmax(1)  # as the pruned prediction: a tie picks the same index in both
    margin_pred = top.values[:, 0] - top.values[:, 1]
    if labels is None:
        return pred, margin_pred, None
    idx = labels.to(z.device)[:, None]
    others = z.scatter(1, idx, float("-inf")).amax(1)
    return pred, margin_pred, z.gather(1, idx)[:, 0] - others


def certify(
    dense: nn.Module,
    pruned: nn.Module,
    batch: Batch,
    labels: torch.Tensor | None = None,
    mode: str = "empirical",
    layers: Sequence[str] | None = None,
    lambdas: Sequence[float] | None = None,
    sequential: bool = False,
    delta: float = 0.05,
    precision: torch.dtype = torch.float64,
    gaussian: bool = True,
    show_progress: bool = False,
    plan: Any = None,
    permutation: Any = None,
    rounding_rtol: float = DEFAULT_ROUNDING_RTOL,
) -> Certificate:
    """Certify which samples of ``batch`` keep their prediction when ``dense`` is pruned to ``pruned``.

    Args:
        dense: the model before pruning (A). Not modified; evaluated in eval mode.
        pruned: the same architecture after pruning (S). ``torch.nn.utils.parametrize``
            parametrizations (e.g. torch.ao sparsifier masks) are folded on a copy. Either
            model may be wrapped (``torch.compile``, DDP, …): the model inside is certified
            (:func:`mp_plugin.layers.wrappers.unwrap_model`; a wrapper must not change the
            forward).
        batch: |T| samples: a tensor, a tuple (``model(*batch)``) or a dict (``model(**batch)``).
            The model must return (|T|, K) logits (or an object with ``.logits``).
        labels: optional (|T|,) true classes, for Δ^true, the accuracy-change bound and CE.
        mode: ``"empirical"`` (η_s = ‖z_A(s) − z_S(s)‖∞ measured; exact for the realised
            pruning), ``"bound"`` (rigorous L_s from induced ∞-norms; Sequential chains only)
            or ``"jacobian"`` (local L_s from vector-Jacobian products; an estimate).
        layers: names of the pruned Linear/Conv layers to certify (default: every one whose
            weight or bias differs). Others keep their dense weights in the certified model.
        lambdas: (λ₁, λ₂) for the elastic-net check B_T < λ₂‖R‖²_F + λ₁‖R‖₁ (exact norm drops).
        sequential: prune the layers one at a time in execution order; each layer's ψ₁ and
            B_j come from the already-pruned network and η_s sums over layers. Needed for a
            rigorous multi-layer bound; in empirical mode it gives per-layer η.
        delta: failure probability of the Gaussian MP-edge form.
        gaussian: compute the Gaussian MP-edge form (bound/jacobian modes; fits σ₊ of each R).
        precision: dtype of the Rψ₁ products (float32 or float64 in bound mode).
        show_progress: tqdm bars over the layers bounded, estimated or measured one by one.
        plan: the :class:`~mp_plugin.planning.plan.PrunePlan` that pruned ``pruned`` (also one
            loaded with ``PrunePlan.load``). When ``apply(..., permute=...)`` recorded a channel
            permutation in it, a copy of ``dense`` gets the same permutations
            (:func:`mp_plugin.permute.align_to_permuted`), so per-layer R = W_A − W_S compares
            like with like. Without it, a permuted model's R compares different channel
            orders (η and the preserved set stay exact in empirical mode).
        permutation: instead of ``plan``, the :class:`~mp_plugin.permute.PermutationRecord`
            that ``permute_channels`` returned.
        rounding_rtol: bound mode only: the bound is proven in exact arithmetic, the logits
            are computed in floating point, so a sample is marked preserved only when its
            margin exceeds 2(η_s + a_s), a_s = ``rounding_rtol``·(‖z_A(s)‖∞ + ‖z_S(s)‖∞)
            (:func:`mp_plugin.certificate.rigor.rounding_allowance`).

    Returns:
        A :class:`Certificate`; every number carries its kind (rigorous / estimate / exact).

    Raises:
        ArchitectureMismatchError, CertificateInputError, NonFiniteActivationError,
        NotCertifiable (bound mode on an op it cannot bound, on forward hooks or overridden
        forwards, tied pruned weights, active autocast, precision below float32 or coarser than the
        weights, BatchNorm with a negative running variance, or modules whose class or
        hyperparameters differ; bound/jacobian when parameters other than Linear/Conv weights and
        biases differ).
    """
    if mode not in MODES:
        raise CertificateInputError(f"mode must be one of {MODES}, got {mode!r}")
    lam = _check_lambdas(lambdas)
    if not 0 < delta < 1:
        raise CertificateInputError(f"delta must lie in (0, 1), got {delta}")
    if plan is not None and permutation is not None:
        raise CertificateInputError("give the channel permutation once: plan=... or permutation=..., not both")
    record = resolve_permutation(permutation if permutation is not None else plan)
    dense, pruned = unwrap_model(dense), unwrap_model(pruned)
    aligned = record is not None and bool(record.folds)
    if aligned:  # compare layer by layer in the pruned model's (permuted) channel basis
        dense = align_to_permuted(dense, record)
    dense_c = _eval_view(dense)
    device = model_device(dense_c)
    pruned_c = _eval_view(pruned, device)
    check_same_architecture(dense_c, pruned_c)
    if mode == "bound":
        _bound_mode_checks(dense_c, pruned_c, precision, rounding_rtol)
    batch = numpy_to_torch(batch, next((p.dtype for p in dense_c.parameters() if p.is_floating_point()), None))
    n = batch_size(batch)
    batch = move_batch(batch, device)
    d_layers, p_layers = linear_layers(dense_c), linear_layers(pruned_c)
    removed_all = {name: removed_component(d_layers[name], p_layers[name]) for name in d_layers}
    if layers is None:
        selected = [name for name, r in removed_all.items() if not r.is_zero]
    else:
        selected = list(layers)
        unknown = [name for name in selected if name not in d_layers]
        if unknown:
            raise CertificateInputError(f"not Linear/Conv layers of the model: {unknown[:5]}")
    notes: list[str] = []
    if aligned:
        notes.append("dense model aligned to the pruned model's channel permutations (same function, permuted basis)")
    elif record is not None:
        notes.append(
            "the permutation record lists permutations but no folds: per-layer R compares different channel "
            "orders; η and the preserved set stay exact in empirical mode"
        )
    other = _changed_other_params(dense_c, pruned_c, list(d_layers))
    if other and layers is None:
        if mode != "empirical":
            raise NotCertifiable(
                f"parameters other than Linear/Conv weights and biases differ ({other[:3]}…): "
                f"the {mode} certificate covers removed Linear/Conv components only; use mode='empirical'"
            )
        notes.append(f"{len(other)} non-Linear/Conv parameters differ (e.g. {other[0]}); η includes them")
    removed = {name: removed_all[name] for name in selected}
    for name in selected if mode == "bound" else ():
        why = own_forward_problem(d_layers[name], name) or tied_problem(dense_c, [name])
        if why is not None:
            raise NotCertifiable(f"bound mode cannot prove a bound here: {why}; use mode='empirical'")
    tied = tied_problem(dense_c, selected) if mode != "bound" else None
    if tied is not None:
        notes.append(f"{tied}; the certified model prunes the tied modules too")
    if layers is None:
        effective = pruned_c  # bound/jacobian refused above if anything but Linear/Conv layers differs
    else:
        effective = copy.deepcopy(dense_c)
        eff_layers = linear_layers(effective)
        for name in selected:
            _copy_layer(eff_layers[name], p_layers[name])

    want_patch = mode != "empirical" and gaussian
    cap = _Capture({k: d_layers[k] for k in selected}, removed, precision, want_patch)
    with batchnorm_input_ndim(dense_c) as bn_ndim:  # which BatchNorm1d see (B, C): the bound may fold those
        z_dense = cap.run(dense_c, batch, n)
    lab = check_labels(labels, n, int(z_dense.shape[1]))
    order = cap.order + [k for k in selected if k not in cap.order]
    never = [k for k in selected if k not in cap.calls]
    if never:
        notes.append(f"layers never called in the forward pass (no effect on T): {never[:3]}")
    multi = [k for k, c in cap.calls.items() if c > 1]
    if multi and mode != "empirical":
        raise NotCertifiable(f"layer '{multi[0]}' runs {cap.calls[multi[0]]} times per forward (shared weights)")

    lipschitz: dict[str, torch.Tensor] = {}
    ops: dict[str, list[str]] = {}
    if mode == "bound":
        low = next(
            (
                t.dtype
                for model in (dense, pruned)
                for t in model.parameters()
                if t.is_floating_point() and torch.finfo(t.dtype).eps > torch.finfo(torch.float32).eps
            ),
            None,
        )
        if low is not None:  # the bound holds up to float32 rounding; half-precision rounding it does not cover
            raise NotCertifiable(
                f"bound mode needs float32 or float64 weights: the model holds {low} tensors, whose rounding the "
                "bound does not cover; certify a float32 copy (model.float()) or use mode='empirical'"
            )
        training = {name: m.training for name, m in dense.named_modules()}
        for name in progress(selected, desc="certify: bound", unit="layer", disable=not show_progress):
            value, ops[name] = sequential_bound(
                dense_c, name, training=lambda nm: training.get(nm, False), bn_input_ndim=bn_ndim
            )
            lipschitz[name] = torch.full((n,), value, dtype=torch.float64, device=device)

    def jac(model: nn.Module, name: str) -> torch.Tensor:
        module, rem = linear_layers(model)[name], removed[name]

        def outputs_at(x: torch.Tensor, out: torch.Tensor, theta: float) -> torch.Tensor:
            return out - (1.0 - theta) * apply_removed(module, x, rem, out.dtype)

        return jacobian_estimate(model, module, lambda: forward_logits(model, batch, n), outputs_at)

    rpsi, patch = dict(cap.rpsi), dict(cap.patch)
    eta_layer: dict[str, torch.Tensor] = {}
    context = "dense network"
    if sequential and selected:
        context = "after pruning the previous layers (sequential)"
        work = copy.deepcopy(dense_c)
        w_layers = linear_layers(work)
        zs = []
        for name in progress(order, desc=f"certify: {mode} (sequential)", unit="layer", disable=not show_progress):
            step = _Capture({name: w_layers[name]}, removed, precision, want_patch)
            zs.append(step.run(work, batch, n))
            rpsi[name] = step.rpsi.get(name, torch.zeros(n, dtype=precision, device=device))
            if name in step.patch:
                patch[name] = step.patch[name]
            if mode == "jacobian":
                lipschitz[name] = jac(work, name)
            _copy_layer(w_layers[name], p_layers[name])
        with torch.no_grad():
            zs.append(forward_logits(work, batch, n))
            # the reported pruned logits are the pruned model's own (work only carries its Linear/Conv weights)
            z_pruned = forward_logits(effective, batch, n)
        if mode == "empirical":
            for j, name in enumerate(order):
                eta_layer[name] = (zs[j].double() - zs[j + 1].double()).abs().amax(1)
    else:
        with torch.no_grad():
            z_pruned = forward_logits(effective, batch, n)
        if mode == "jacobian":
            for name in progress(order, desc="certify: jacobian", unit="layer", disable=not show_progress):
                lipschitz[name] = jac(dense_c, name)
    for name in order:
        if name in lipschitz:
            eta_layer[name] = lipschitz[name] * rpsi.get(name, torch.zeros(n, dtype=torch.float64, device=device))

    if mode == "empirical" and not sequential:
        eta = (z_dense.double() - z_pruned.double()).abs().amax(1)
        eta_kind, budget_kind = EXACT, LOWER
    else:
        eta = torch.zeros(n, dtype=torch.float64, device=device)
        for name in order:
            eta = eta + eta_layer[name].double()
        if mode == "empirical":
            eta_kind, budget_kind = EXACT, LOWER
            notes.append("sequential empirical: η_s sums the measured per-layer shifts (≥ the direct shift)")
        elif mode == "jacobian":
            eta_kind = budget_kind = ESTIMATE
        elif len(order) > 1 and not sequential:
            eta_kind = budget_kind = ESTIMATE
            notes.append(
                "bound mode, several layers, sequential=False: each layer is bounded in the dense network and the "
                "sum is not a rigorous bound for the joint pruning; pass sequential=True for a rigorous certificate"
            )
        else:
            eta_kind = budget_kind = RIGOROUS
    if mode == "jacobian":
        notes.append("jacobian mode: L_s is a local estimate at θ ∈ {0, ½, 1}, estimated, not certified")

    pred, margin_pred, margin_true = _margins(z_dense.double(), lab)
    eta = eta.to(margin_pred.device)
    preserved = margin_pred > 2 * eta
    pred_pruned = z_pruned.argmax(1)
    if mode == "bound":  # proven in exact arithmetic, with a rounding allowance and the computed predictions agreeing
        preserved = bound_preserved(margin_pred, eta, z_dense, z_pruned, pred, pred_pruned, rounding_rtol, notes)
    changed = pred != pred_pruned
    measured: dict = {"agreement": float((~changed).double().mean()), "kind": MEASURED}
    if lab is not None:
        lab_d = lab.to(device)
        ce_d = float(F.cross_entropy(z_dense.double(), lab_d))
        ce_p = float(F.cross_entropy(z_pruned.double(), lab_d))
        measured.update(
            accuracy_dense=float((pred == lab_d).double().mean()),
            accuracy_pruned=float((pred_pruned == lab_d).double().mean()),
            ce_dense=ce_d,
            ce_pruned=ce_p,
            ce_change=ce_p - ce_d,
        )
    budget = float(2 * eta.mean())

    layer_certs: list[LayerCertificate] = []
    pen_total = 0.0
    gauss_total: float | None = 0.0 if want_patch else None
    for name in order:
        rem = removed[name]
        norms = rem.norms()
        r_eta = eta_layer.get(name)
        b_j = None if r_eta is None else float(2 * r_eta.mean())
        en = None
        if lam is not None:
            penalty = lam[1] * norms["l2_drop"] + lam[0] * norms["l1_drop"]
            pen_total += penalty
            en = {"penalty": penalty, "budget": b_j, "certified": None if b_j is None else b_j < penalty}
        gauss = None
        if want_patch and name in lipschitz:
            norms_s, rows = patch.get(name, (torch.zeros(n, dtype=torch.float64), 1))
            gauss = gaussian_mp_budget(rem.weight, norms_s, rows, lipschitz[name], delta)
            gauss_total = None if gauss["value"] is None or gauss_total is None else gauss_total + gauss["value"]
        lip = lipschitz.get(name)
        layer_certs.append(
            LayerCertificate(
                name=name,
                shape=(int(rem.weight.shape[0]), int(rem.weight[0].numel())),
                norms=norms,
                rpsi_inf=rpsi.get(name, torch.zeros(n)).double().cpu().numpy(),
                lipschitz=None if lip is None else lip.double().cpu().numpy(),
                lipschitz_kind=None if lip is None else (RIGOROUS if mode == "bound" else ESTIMATE),
                eta=None if r_eta is None else r_eta.double().cpu().numpy(),
                eta_kind=None if r_eta is None else (EXACT if mode == "empirical" else eta_kind),
                budget=b_j,
                elastic_net=en,
                gaussian=gauss,
                ops=ops.get(name, []),
                context=context,
            )
        )

    elastic = None
    if lam is not None:
        elastic = {"budget": budget, "penalty": pen_total, "budget_kind": budget_kind}
        if mode == "empirical":
            refuted = budget >= pen_total
            elastic["certified"] = None
            elastic["verdict"] = (
                "refuted: B̂ (a lower bound on every valid B_T) ≥ penalty"
                if refuted
                else "not refuted: B̂ < penalty, but B̂ is only a lower bound"
            )
        else:
            elastic["certified"] = budget < pen_total
            elastic["verdict"] = f"{'certified' if budget < pen_total else 'not certified'} [{budget_kind}]"
        if lab is not None:
            change = measured["ce_change"] - pen_total
            elastic["objective_change"] = change
            elastic["objective_decreased"] = change < 0
            elastic["objective_kind"] = MEASURED
    gaussian = None
    if want_patch:
        gaussian = {
            "value": gauss_total,
            "delta": delta,
            "kind": layer_certs[0].gaussian["kind"] if layer_certs else "",
        }
        if not layer_certs:
            gaussian["value"] = 0.0

    return Certificate(
        mode=mode,
        sequential=bool(sequential),
        eta=eta.cpu().numpy(),
        eta_kind=eta_kind,
        margin_pred=margin_pred.cpu().numpy(),
        margin_true=None if margin_true is None else margin_true.cpu().numpy(),
        preserved=preserved.cpu().numpy(),
        pred_dense=pred.cpu().numpy(),
        pred_pruned=pred_pruned.cpu().numpy(),
        labels=None if lab is None else lab.cpu().numpy(),
        budget=budget,
        budget_kind=budget_kind,
        accuracy_change_bound=None if margin_true is None else float((margin_true.abs() <= 2 * eta).double().mean()),
        measured=measured,
        violations=int((preserved & changed.to(preserved.device)).sum()),
        elastic_net=elastic,
        gaussian=gaussian,
        layers=layer_certs,
        lambdas=lam,
        notes=notes,
    )
