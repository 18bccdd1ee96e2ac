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
scale (which is what BN folding does).
"""

from __future__ import annotations

import contextlib
import copy
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from torch.nn.utils import parametrize

from mp_plugin.errors import MPPluginError
from mp_plugin.layers.discovery import LayerSelection, find_target_layers
from mp_plugin.layers.layout import kn_eligible
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import check_nm, fold_parametrizations, kn_group_counts
from mp_plugin.planning.build import PrunePlan
from mp_plugin.progress import progress

__all__ = [
    "ExportError",
    "ExportReport",
    "InitializerCheck",
    "WeightUse",
    "check_onnx_nm",
    "export_onnx",
    "find_weight_initializers",
    "nm_violations",
    "onnx_parity",
    "rewrite_matmul_to_gemm",
]

_FP32_TOL = 1e-4


class ExportError(MPPluginError):
    """The model cannot be exported as asked, or the exported file failed verification."""


@dataclass(frozen=True)
class WeightUse:
    """One constant weight operand of a MatMul, Gemm or Conv node.

    Attributes:
        name: initializer name.
        op: ``"MatMul"``, ``"Gemm"`` or ``"Conv"``.
        node: the consuming node's name.
        transpose: True when the stored array is (in, out) and must be transposed to
            the torch (out, in) layout (MatMul B, Gemm B with transB=0).
        axis: axis of the stored array along which k:n groups run (the reduction axis).
    """

    name: str
    op: str
    node: str
    transpose: bool
    axis: int


@dataclass
class InitializerCheck:
    """The k:n verdict for one initializer.

    Attributes:
        name: initializer name; layer: the torch layer it came from ("" if unknown).
        op, node, axis: where it is used and along which stored axis groups run.
        shape: stored shape; pattern: the k:n pattern expected.
        groups: number of n-groups; bad_groups: groups with more than k non-zeros.
    """

    name: str
    layer: str
    op: str
    node: str
    axis: int
    shape: tuple[int, ...]
    pattern: str
    groups: int
    bad_groups: int

    @property
    def ok(self) -> bool:
        """True when every group has at most k non-zeros."""
        return self.bad_groups == 0 and self.groups > 0


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


# --------------------------------------------------------------------- k:n checks
def nm_violations(array: np.ndarray, k: int, n: int, axis: int) -> tuple[int, int]:
    """Count n-groups along ``axis`` holding more than k non-zeros.

    Args:
        array: any-rank array; for rank > 2 with axis=1 (a Conv weight) groups run
            along the input channels at each kernel position (the k:n layout of
            ``mp_plugin.layers.layout``: the array is read as (out, kh·kw·in)).
        k, n: the pattern. axis: 0 or 1, the reduction axis of the stored matrix.

    Returns:
        (bad_groups, groups). groups is 0 when the axis length is not a multiple of n.
    """
    nonzero = torch.from_numpy(np.ascontiguousarray(array != 0))
    if axis == 0:
        nonzero = nonzero.movedim(0, 1)  # MatMul B is (in, out): put the output axis first
    if nonzero.numel() == 0 or not kn_eligible(nonzero.shape, n):
        return 0, 0
    counts = kn_group_counts(nonzero, n)
    return int((counts > k).sum()), int(counts.numel())


def find_weight_initializers(model: onnx.ModelProto) -> list[WeightUse]:
    """Every constant weight operand (input 1) of MatMul, Gemm and Conv nodes, in node order."""
    inits = {i.name: i for i in model.graph.initializer}
    uses: list[WeightUse] = []
    for node in model.graph.node:
        if node.op_type not in ("MatMul", "Gemm", "Conv") or len(node.input) < 2 or node.input[1] not in inits:
            continue
        dims = tuple(inits[node.input[1]].dims)
        if node.op_type == "Conv":
            uses.append(WeightUse(node.input[1], "Conv", node.name, False, 1))
        elif len(dims) == 2:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0) if node.op_type == "Gemm" else 0
            uses.append(WeightUse(node.input[1], node.op_type, node.name, not trans_b, 1 if trans_b else 0))
    return uses


def _load(model: onnx.ModelProto | str | Path) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))


def check_onnx_nm(
    model: onnx.ModelProto | str | Path, expected: dict[str, str] | None = None, pattern: str = "2:4"
) -> list[InitializerCheck]:
    """Check k:n on the reduction axis of weight initializers.

    Args:
        model: an ONNX model or a path.
        expected: {initializer name: "k:n"} to check (e.g. ``ExportReport.expected``);
            a name that is no longer a MatMul/Gemm/Conv weight gives a check with 0 groups
            (not ok). When None, every weight initializer whose axis fits ``pattern`` is checked.
        pattern: the pattern used when ``expected`` is None.
    """
    proto = _load(model)
    inits = {i.name: i for i in proto.graph.initializer}
    uses = {u.name: u for u in reversed(find_weight_initializers(proto))}  # first use wins
    todo = expected if expected is not None else {name: pattern for name in uses}
    checks = []
    for name, pat_text in todo.items():
        pat = Pattern.parse(pat_text)
        use = uses.get(name)
        if use is None or name not in inits:
            checks.append(InitializerCheck(name, "", "?", "", -1, (), str(pat), 0, 0))
            continue
        arr = numpy_helper.to_array(inits[name])
        bad, groups = nm_violations(arr, pat.k, pat.n, use.axis)
        if expected is None and groups == 0:
            continue
        checks.append(InitializerCheck(name, "", use.op, use.node, use.axis, tuple(arr.shape), str(pat), groups, bad))
    return checks


# ------------------------------------------------------------- torch-side checks
def _parametrized_modules(model: nn.Module) -> list[str]:
    return [name or "<root>" for name, m in model.named_modules() if parametrize.is_parametrized(m)]


def _expected_layers(
    model: nn.Module, pattern: str | None, plan: PrunePlan | None, selection: LayerSelection | None
) -> dict[str, tuple[nn.Module, Pattern]]:
    """{layer name: (module, k:n pattern)} for every target layer meant to be k:n."""
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


def _torch_layout(arr: np.ndarray, use: WeightUse) -> np.ndarray:
    mat = arr.reshape(arr.shape[0], -1) if arr.ndim != 2 else arr
    return mat.T if use.transpose else mat


def _row_normalised(mat: np.ndarray) -> np.ndarray:
    a = np.abs(mat.astype(np.float64))
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms > 0, norms, 1.0)


def _match_layers(
    proto: onnx.ModelProto, layers: dict[str, tuple[nn.Module, Pattern]]
) -> tuple[dict[str, tuple[str, WeightUse]], list[str]]:
    """Map torch layers to initializers: same name first, else equal up to a per-row scale."""
    inits = {i.name: i for i in proto.graph.initializer}
    uses: dict[str, WeightUse] = {}
    for u in find_weight_initializers(proto):
        uses.setdefault(u.name, u)
    by_shape: dict[tuple[int, int], list[str]] = {}
    shapes: dict[str, tuple[int, int]] = {}
    for name, u in uses.items():
        dims = tuple(inits[name].dims)
        rows, cols = dims[0], int(np.prod(dims[1:]))
        shapes[name] = (cols, rows) if u.transpose else (rows, cols)
        by_shape.setdefault(shapes[name], []).append(name)
    cache: dict[str, np.ndarray] = {}
    used: set[str] = set()
    matched: dict[str, tuple[str, WeightUse]] = {}
    missing: list[str] = []
    for lname, (module, _) in layers.items():
        w = module.weight.detach().float().cpu().numpy()
        w2 = w.reshape(w.shape[0], -1)
        own = f"{lname}.weight"
        if own in uses and own not in used and shapes[own] == w2.shape:
            matched[lname] = (own, uses[own])
            used.add(own)
            continue
        ref = _row_normalised(w2)
        found = None
        for cand in by_shape.get(w2.shape, []):
            if cand in used:
                continue
            if cand not in cache:
                cache[cand] = _row_normalised(_torch_layout(numpy_helper.to_array(inits[cand]), uses[cand]))
            if np.abs(cache[cand][:4] - ref[:4]).max() < 1e-2 and np.abs(cache[cand] - ref).max() < 1e-2:
                found = cand
                break
        if found is None:
            missing.append(lname)
        else:
            matched[lname] = (found, uses[found])
            used.add(found)
    return matched, missing


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


# ---------------------------------------------------------------------- parity
def onnx_parity(path: str | Path, inputs: np.ndarray, reference: np.ndarray) -> float:
    """Max |onnxruntime(path)(inputs) − reference| on the CPU execution provider (float64 diff)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: inputs})[0]
    return float(np.abs(out.astype(np.float64) - reference.astype(np.float64)).max())


# ---------------------------------------------------------------------- export
def _torch_export(model: nn.Module, example: torch.Tensor, path: Path, opset: int | None) -> str:
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    kwargs = {"input_names": ["input"], "output_names": ["output"], "opset_version": opset}
    errors = []
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=True, external_data=big, **kwargs)
            return "dynamo"
        except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript exporter
            errors.append(f"dynamo: {type(exc).__name__}: {str(exc)[:300]}")
        try:
            torch.onnx.export(model, (example,), str(path), dynamo=False, **kwargs)
            return "torchscript"
        except Exception as exc:  # noqa: BLE001
            errors.append(f"torchscript: {type(exc).__name__}: {str(exc)[:300]}")
    raise ExportError("torch.onnx.export failed with both exporters:\n  " + "\n  ".join(errors))


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
) -> ExportReport:
    """Export a k:n-pruned model to ONNX and verify the pattern and the numerics.

    Args:
        model: the pruned model (not modified; a copy is exported).
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

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportError: parametrized model without ``fold``, target layers that are not k:n,
            export failure, or (``verify``) a broken pattern or parity.
    """
    if dtype not in ("fp32", "fp16"):
        raise ExportError(f"dtype must be 'fp32' or 'fp16', got {dtype!r}")
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
    reference = (reference[0] if isinstance(reference, (tuple, list)) else reference).float().numpy()
    export_model, x = (model.half(), x32.half()) if dtype == "fp16" else (model, x32)
    bar = progress(total=3 if verify else 2, desc="ONNX export", unit="stage", disable=not show_progress)
    t0 = time.perf_counter()
    exporter = _torch_export(export_model, x, path, opset)
    seconds = time.perf_counter() - t0
    bar.update(1)
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
    matched, report.missing_layers = _match_layers(proto, {n: v for n, v in layers.items()})
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
        parity_tol = _FP32_TOL if dtype == "fp32" else 0.02 * max(1.0, float(np.abs(reference).max()))
    report.parity_tol = parity_tol
    report.max_abs_diff = onnx_parity(path, x.numpy(), reference)
    bar.update(1)
    bar.close()
    if not report.pattern_ok:
        bad = [c.layer or c.name for c in checks if not c.ok]
        raise ExportError(
            f"the exported file lost the k:n pattern: {len(bad)} initializers broken {bad[:10]}, "
            f"{len(report.missing_layers)} layers not found {report.missing_layers[:10]}\n{report.to_text()}"
        )
    if not report.parity_ok:
        raise ExportError(
            f"onnxruntime output differs from torch by {report.max_abs_diff:.3g} > {parity_tol:.3g} ({path})"
        )
    return report
