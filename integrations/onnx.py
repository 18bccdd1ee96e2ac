"""ONNX export of k:n-pruned models, with a check that the pattern reached the file.

:func:`export_onnx` refuses models whose masks are still torch parametrizations
(unless ``fold=True``) or whose target layers are not k:n, exports with
``torch.onnx.export`` (the dynamo exporter, falling back to the TorchScript one),
runs the ONNX checker, checks every initializer that should carry the pattern on
its reduction axis, and compares onnxruntime (CPU) with torch.

Where a weight lands in ONNX (torch 2.14, dynamo exporter, checked by the tests):

* ``nn.Linear`` inside a block → ``MatMul(X, B)`` with B = Wᵀ of shape (in, out):
  the k:n groups run along **axis 0** of B. The initializer is renamed (``val_N``).
* a classifier ``nn.Linear`` on a 2-D input → ``Gemm(transB=1)`` with B = W (out, in):
  groups along **axis 1**.
* ``nn.Conv2d`` → ``Conv`` W (out, in/groups, kh, kw); groups run along the input
  channels at each kernel position (TensorRT's conv layout, ``mp_plugin.layers.layout``).
  Eval-mode BatchNorm is folded into W (each output row
  is rescaled, so zeros stay zeros and the pattern survives).

Initializers are matched to torch layers by name, else by value up to a per-row
scale (which is what BN folding does); the inspection of the file (where each
weight landed, the k:n counts, onnxruntime parity) is in
:mod:`mp_plugin.integrations.onnx_check`, whose names are re-exported here.
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from mp_plugin.integrations.onnx_check import (
    InitializerCheck,
    WeightUse,
    check_onnx_nm,
    find_weight_initializers,
    match_layers,
    nm_violations,
    onnx_parity,
)
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection, find_target_layers
from mp_plugin.layers.patterns import Pattern
from mp_plugin.layers.wrappers import unwrap_model
from mp_plugin.masks.select import check_nm, fold_parametrizations
from mp_plugin.planning.plan import PrunePlan
from mp_plugin.progress import progress

__all__ = [
    "ExportError",
    "ExportReport",
    "InitializerCheck",
    "WeightUse",
    "check_onnx_nm",
    "export_onnx",
    "find_weight_initializers",
    "match_layers",
    "nm_violations",
    "onnx_parity",
    "rewrite_matmul_to_gemm",
]

_FP32_TOL = 1e-4


class ExportError(MPPluginError):
    """The model cannot be exported as asked, or the exported file failed verification."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and verified.

    Attributes:
        path: the ONNX file. dtype: ``"fp32"``/``"fp16"``. opset: default-domain opset.
        exporter: ``"dynamo"`` or ``"torchscript"``. export_seconds: wall time of the export.
        checks: one :class:`InitializerCheck` per initializer expected to be k:n.
        missing_layers: target layers whose weight was not found among the initializers.
        max_abs_diff: max |onnxruntime − torch| over the output (None when not run).
        parity_tol: the tolerance it was held to. gemm_rewrites: MatMul+Add pairs turned into Gemm.
    """

    path: Path
    dtype: str
    opset: int
    exporter: str
    export_seconds: float
    checks: list[InitializerCheck] = field(default_factory=list)
    missing_layers: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None
    parity_tol: float | None = None
    gemm_rewrites: int = 0

    @property
    def pattern_ok(self) -> bool:
        """Every expected initializer is still k:n and none is missing."""
        return not self.missing_layers and all(c.ok for c in self.checks)

    @property
    def parity_ok(self) -> bool | None:
        """Whether onnxruntime matched torch within ``parity_tol`` (None when not run)."""
        if self.max_abs_diff is None or self.parity_tol is None:
            return None
        return self.max_abs_diff <= self.parity_tol

    @property
    def expected(self) -> dict[str, str]:
        """{initializer name: pattern} — the argument :func:`check_onnx_nm` takes to re-check the file."""
        return {c.name: c.pattern for c in self.checks}

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "dtype": self.dtype,
            "opset": self.opset,
            "exporter": self.exporter,
            "export_seconds": self.export_seconds,
            "pattern_ok": self.pattern_ok,
            "parity_ok": self.parity_ok,
            "max_abs_diff": self.max_abs_diff,
            "parity_tol": self.parity_tol,
            "gemm_rewrites": self.gemm_rewrites,
            "missing_layers": self.missing_layers,
            "checks": [{**c.__dict__, "shape": list(c.shape), "ok": c.ok} for c in self.checks],
        }

    def to_text(self, max_rows: int | None = 20) -> str:
        """A fixed-width table of the per-initializer checks plus the parity line."""
        rows = [f"{'layer':<36} {'initializer':<28} {'op':<6} {'axis':>4} {'pattern':>7} {'bad/groups':>14}"]
        shown = self.checks if max_rows is None else self.checks[:max_rows]
        for c in shown:
            layer = c.layer if len(c.layer) <= 36 else "…" + c.layer[-35:]
            name = c.name if len(c.name) <= 28 else "…" + c.name[-27:]
            rows.append(f"{layer:<36} {name:<28} {c.op:<6} {c.axis:>4} {c.pattern:>7} {c.bad_groups:>6}/{c.groups:<7}")
        if len(shown) < len(self.checks):
            rows.append(f"… {len(self.checks) - len(shown)} more initializers")
        n_ok = sum(c.ok for c in self.checks)
        rows.append(
            f"k:n check: {n_ok}/{len(self.checks)} initializers keep their pattern"
            + (
                f"; {len(self.missing_layers)} layers not found: {self.missing_layers[:5]}"
                if self.missing_layers
                else ""
            )
        )
        if self.max_abs_diff is not None:
            verdict = "ok" if self.parity_ok else "FAILED"
            rows.append(
                f"onnxruntime parity ({self.dtype}): max |Δ| = {self.max_abs_diff:.3g} (tol {self.parity_tol:.3g}) {verdict}"
            )
        if self.gemm_rewrites:
            rows.append(f"MatMul+Add → Gemm rewrites: {self.gemm_rewrites}")
        return "\n".join(rows)


# ------------------------------------------------------------- torch-side checks
def _parametrized_modules(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if parametrize.is_parametrized(m)]


def _expected_layers(
    model: nn.Module, pattern: str | None, plan: PrunePlan | None, selection: LayerSelection | None
) -> dict[str, tuple[nn.Module, Pattern]]:
    """{layer name: (module, k:n pattern)} for every target layer meant to be k:n.

    With a plan, its own layer selection is used unless ``selection`` is given (a plan made
    with the head or stem included names those layers).
    """
    if selection is None and plan is not None:
        selection = plan.config.selection
    targets, _ = find_target_layers(model, selection)
    out: dict[str, tuple[nn.Module, Pattern]] = {}
    if plan is not None:
        by_name = {t.name: t for t in targets}
        for lp in plan.layers:
            pat = Pattern.parse(lp.pattern)
            if pat.is_kn:
                if lp.name not in by_name:
                    raise ExportError(f"plan layer {lp.name!r} is not a target layer of this model")
                out[lp.name] = (by_name[lp.name].module, pat)
        return out
    if pattern is None:
        return out
    pat = Pattern.parse(pattern)
    if not pat.is_kn:
        return out
    for t in targets:
        if pat.eligible(tuple(t.weight.shape)):
            out[t.name] = (t.module, pat)
    return out


# ------------------------------------------------------------------- rewriting
def rewrite_matmul_to_gemm(model: onnx.ModelProto) -> int:
    """Turn ``Add(MatMul(X, B), bias)`` with constant 2-D B and 1-D bias into ``Gemm`` in place.

    The new weight is stored as (out, in) with ``transB=1`` (TensorRT's fully-connected
    layout, k:n along axis 1). Inputs of rank > 2 are reshaped to (−1, in) and back.
    The MatMul output must feed only that Add. Returns the number of rewrites.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weight_uses = {name: len(consumers.get(name, [])) for name in inits}
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
    new_nodes: list[onnx.NodeProto] = []
    drop: set[int] = set()
    replace_at: dict[int, list[onnx.NodeProto]] = {}
    count = 0
    for idx, node in enumerate(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or len(inits[node.input[1]].dims) != 2:
            continue
        after = consumers.get(node.output[0], [])
        if len(after) != 1 or after[0].op_type != "Add" or node.output[0] in [o.name for o in graph.output]:
            continue
        add = after[0]
        bias = add.input[1] if add.input[0] == node.output[0] else add.input[0]
        k_in, n_out = inits[node.input[1]].dims
        if bias not in inits or tuple(inits[bias].dims) not in ((n_out,), (1, n_out)) or opset < 15:
            continue
        count += 1
        tag = f"mp_gemm_{count}"
        w = numpy_helper.to_array(inits[node.input[1]])
        if weight_uses[node.input[1]] > 1:
            w_name = f"{tag}_weight"
        else:
            w_name = node.input[1]
            graph.initializer.remove(inits[node.input[1]])
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), w_name))
        shape_2d = numpy_helper.from_array(np.array([-1, k_in], dtype=np.int64), f"{tag}_shape2d")
        last = numpy_helper.from_array(np.array([n_out], dtype=np.int64), f"{tag}_nout")
        graph.initializer.extend([shape_2d, last])
        x, y = node.input[0], add.output[0]
        nodes = [
            helper.make_node("Reshape", [x, shape_2d.name], [f"{tag}_x2d"], name=f"{tag}_flatten"),
            helper.make_node("Gemm", [f"{tag}_x2d", w_name, bias], [f"{tag}_y2d"], name=f"{tag}_gemm", transB=1),
            helper.make_node("Shape", [x], [f"{tag}_xshape"], name=f"{tag}_shape", end=-1),
            helper.make_node("Concat", [f"{tag}_xshape", last.name], [f"{tag}_yshape"], name=f"{tag}_concat", axis=0),
            helper.make_node("Reshape", [f"{tag}_y2d", f"{tag}_yshape"], [y], name=f"{tag}_unflatten"),
        ]
        replace_at[idx] = nodes
        drop.add(id(add))
    if not count:
        return 0
    for idx, node in enumerate(graph.node):
        if idx in replace_at:
            new_nodes.extend(replace_at[idx])
        elif id(node) not in drop:
            new_nodes.append(node)
    del graph.node[:]
    graph.node.extend(new_nodes)
    return count


# ---------------------------------------------------------------------- export
def _output_arrays(out: Any) -> list[np.ndarray]:
    """Every tensor of a model output (a tensor, or tuples/lists/dicts of them) as float32 arrays, in order."""
    if isinstance(out, torch.Tensor):
        return [out.detach().float().numpy()]
    if isinstance(out, dict):
        return [a for v in out.values() for a in _output_arrays(v)]
    if isinstance(out, (tuple, list)):
        return [a for v in out for a in _output_arrays(v)]
    return []


def _written_opset(path: Path) -> int:
    """The default-domain opset of the ONNX file at ``path`` (-1 when it declares none)."""
    proto = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)


def _torch_export(
    model: nn.Module, example: torch.Tensor, path: Path, opset: int | None, dynamic_batch: bool = False
) -> str:
    """Export with the dynamo exporter, else TorchScript; the file must carry ``opset`` when one is asked for.

    The dynamo exporter writes opset 18 or later and converts down only where onnxscript can (it
    prints a traceback and keeps 18 otherwise): a file in another opset than the one asked for
    counts as that exporter failing. Both exporters' console output is captured.
    """
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    kwargs: dict[str, Any] = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset}
    if dynamic_batch:  # the first axis of the input and the output is named, not fixed
        kwargs["dynamic_axes"] = {"input": {0: "batch"}, "output": {0: "batch"}}
    errors = []
    wrong_file = False  # an exporter wrote a file in another opset than asked: not left at ``path``
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for name, extra in (("dynamo", {"dynamo": True, "external_data": big}), ("torchscript", {"dynamo": False})):
            try:
                torch.onnx.export(model, (example,), str(path), **extra, **kwargs)
            except Exception as exc:  # noqa: BLE001 - try the other exporter
                errors.append(f"{name}: {type(exc).__name__}: {str(exc)[:300]}")
                continue
            written = _written_opset(path)
            if opset is None or written == opset:
                return name
            errors.append(f"{name}: wrote opset {written}, asked for {opset}")
            wrong_file = True
    where = f"; the file in the wrong opset was moved to {_set_aside(path)}" if wrong_file else ""
    raise ExportError("torch.onnx.export failed with both exporters:\n  " + "\n  ".join(errors) + where)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    dtype: str = "fp32",
    pattern: str | None = "2:4",
    plan: PrunePlan | None = None,
    opset: int | None = None,
    gemm_rewrite: bool = False,
    verify: bool = True,
    fold: bool = False,
    selection: LayerSelection | None = None,
    parity_tol: float | None = None,
    show_progress: bool = False,
    dynamic_batch: bool = False,
) -> ExportReport:
    """Export a k:n-pruned model to ONNX and verify the pattern and the numerics.

    Args:
        model: the pruned model (not modified; a copy is exported). A wrapped model
            (``torch.compile``, DDP, …) is exported as the model inside it, so plan layer
            names match. A channel permutation is folded into the weights and needs nothing
            here: the pattern holds in the stored (permuted) basis.
        path: the ``.onnx`` file to write (weights inside the file up to 1.8 GB).
        input_shape: example input shape, e.g. (1, 3, 224, 224).
        dtype: ``"fp32"`` or ``"fp16"`` (the whole model and its input are cast).
        pattern: the k:n pattern every eligible target layer should carry; ignored
            when ``plan`` is given (its per-layer patterns are used); None = no k:n check.
        plan: a :class:`PrunePlan` naming the pattern of each layer.
        opset: ONNX opset (exporter default when None).
        gemm_rewrite: rewrite MatMul+bias into Gemm(transB=1) (see :func:`rewrite_matmul_to_gemm`).
        verify: run the k:n check and onnxruntime parity; raise :class:`ExportError` on failure.
        fold: bake torch parametrizations (e.g. ``torch.ao.pruning`` masks) into the weights
            instead of refusing the model.
        selection: which layers are targets (default :class:`LayerSelection`).
        parity_tol: max |ORT − torch| allowed; default 1e-4 for fp32 and
            0.02·max(1, max|y|) for fp16 (compared with the fp32 torch output).
        show_progress: a tqdm bar over the stages (export, k:n check, onnxruntime parity).
        dynamic_batch: leave the batch axis of the input and output free (named ``batch``);
            parity is then also checked at another batch size. Default: the batch of
            ``input_shape`` is fixed (a TensorRT engine built from it needs no profile).

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: parametrized model without ``fold``, target layers that are not k:n,
            export failure, or (``verify``) a broken pattern or parity.
    """
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
    model = unwrap_model(model)
    param_mods = _parametrized_modules(model)
    if param_mods and not fold:
        raise ExportError(
            f"{len(param_mods)} modules still carry torch parametrizations (masks not folded), e.g. {param_mods[:5]}; "
            "call your sparsifier's squash_mask() first, or pass fold=True to bake them into the weights"
        )
    model = fold_parametrizations(model) if param_mods else copy.deepcopy(model)
    model = model.float().eval()
    layers = _expected_layers(model, pattern, plan, selection)
    not_kn = [f"{name} ({pat})" for name, (mod, pat) in layers.items() if not check_nm(mod.weight, pat.k, pat.n)]
    if not_kn:
        raise ExportError(
            f"{len(not_kn)} target layers are not k:n in torch — masks were never applied (or a plan/pattern "
            f"does not match this model): {not_kn[:10]}{' …' if len(not_kn) > 10 else ''}. Prune them first, pass "
            "the plan that was applied, or pattern=None to export without the k:n check"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    x32 = torch.randn(tuple(int(s) for s in input_shape), generator=gen)
    with torch.no_grad():
        reference = model(x32)
    reference = _output_arrays(reference)
    # fp16: a half copy is exported; the caller's model (and the fp32 references) stay float32
    export_model, x = (copy.deepcopy(model).half(), x32.half()) if dtype == "fp16" else (model, x32)
    bar = progress(total=3 if verify else 2, desc="ONNX export", unit="stage", disable=not show_progress)
    t0 = time.perf_counter()
    exporter = _torch_export(export_model, x, path, opset, dynamic_batch)
    seconds = time.perf_counter() - t0
    bar.update(1)
    try:
        return _check_export(
            path, model, export_model, x, reference, layers, dtype, exporter, seconds, gemm_rewrite, verify,
            parity_tol, dynamic_batch, bar,
        )  # fmt: skip
    except ExportError:
        raise
    except Exception as exc:  # the checker or onnxruntime itself failed: the file is not a verified export
        bar.close()
        raise ExportError(
            f"checking the exported file failed ({type(exc).__name__}: {str(exc)[:300]}); the file was moved to "
            f"{_set_aside(path)}"
        ) from exc


def _check_export(
    path: Path,
    model: nn.Module,
    export_model: nn.Module,
    x: torch.Tensor,
    reference: list[np.ndarray],
    layers: dict,
    dtype: str,
    exporter: str,
    seconds: float,
    gemm_rewrite: bool,
    verify: bool,
    parity_tol: float | None,
    dynamic_batch: bool,
    bar: Any,
) -> ExportReport:
    """The k:n check and onnxruntime parity of a freshly exported file (see :func:`export_onnx`)."""
    bar.set_description("ONNX k:n check")
    onnx.checker.check_model(str(path))
    proto = onnx.load(str(path))
    rewrites = 0
    if gemm_rewrite:
        rewrites = rewrite_matmul_to_gemm(proto)
        if rewrites:
            onnx.checker.check_model(proto)
            onnx.save(proto, str(path))
    opset_used = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), -1)
    report = ExportReport(path, dtype, opset_used, exporter, seconds, gemm_rewrites=rewrites)
    matched, report.missing_layers = match_layers(proto, {n: v for n, v in layers.items()})
    checks = check_onnx_nm(proto, {init: str(layers[lname][1]) for lname, (init, _) in matched.items()})
    names = {init: lname for lname, (init, _) in matched.items()}
    for c in checks:
        c.layer = names.get(c.name, "")
    report.checks = checks
    bar.update(1)
    if not verify:
        bar.close()
        return report
    bar.set_description("onnxruntime parity")
    if parity_tol is None:
        peak = max(float(np.abs(r).max()) if r.size else 0.0 for r in reference)
        parity_tol = _FP32_TOL if dtype == "fp32" else 0.02 * max(1.0, peak)
    report.parity_tol = parity_tol
    report.max_abs_diff = onnx_parity(path, x.numpy(), reference)
    if dynamic_batch:  # the free batch axis must work at another size too
        x_other = torch.cat([x, x[:1]], 0)
        with torch.no_grad():
            ref_other = _output_arrays(model(x_other.float()))
        report.max_abs_diff = max(report.max_abs_diff, onnx_parity(path, x_other.numpy(), ref_other))
    bar.update(1)
    bar.close()
    if not report.pattern_ok:
        bad = [c.layer or c.name for c in checks if not c.ok]
        raise ExportError(
            f"the exported file lost the k:n pattern: {len(bad)} initializers broken {bad[:10]}, "
            f"{len(report.missing_layers)} layers not found {report.missing_layers[:10]}; the file was moved to "
            f"{_set_aside(path)}\n{report.to_text()}"
        )
    if not report.parity_ok:
        raise ExportError(
            f"onnxruntime output differs from torch by {report.max_abs_diff:.3g} > {parity_tol:.3g}; the file "
            f"was moved to {_set_aside(path)}"
        )
    return report


def _set_aside(path: Path) -> Path:
    """Rename a file that failed verification to ``<name>.unverified.onnx`` (kept for inspection)."""
    target = path.with_name(path.stem + ".unverified.onnx")
    path.replace(target)
    return target
