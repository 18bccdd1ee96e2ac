"""Sparsity inspection of ONNX files: where each weight landed and whether it kept its k:n pattern.

* :func:`find_weight_initializers` — the constant weight operands of MatMul, Gemm and Conv,
  with the axis along which k:n groups run in the stored array.
* :func:`nm_violations` / :func:`check_onnx_nm` — count groups with more than k non-zeros.
* :func:`match_layers` — map torch layers to initializers (same name, else equal up to a
  per-row scale, which is what BatchNorm folding does).
* :func:`onnx_parity` — onnxruntime (CPU) against a torch reference.

:func:`mp_plugin.integrations.onnx.export_onnx` uses all four; the layouts are described there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from mp_plugin.layers.layout import kn_eligible
from mp_plugin.layers.patterns import Pattern
from mp_plugin.masks.select import kn_group_counts

__all__ = [
    "InitializerCheck",
    "WeightUse",
    "check_onnx_nm",
    "find_weight_initializers",
    "match_layers",
    "nm_violations",
    "onnx_parity",
]


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


# ------------------------------------------------------------- torch layers ↔ initializers
def _torch_layout(arr: np.ndarray, use: WeightUse) -> np.ndarray:
    mat = arr.reshape(arr.shape[0], -1) if arr.ndim != 2 else arr
    return mat.T if use.transpose else mat


def _row_normalised(mat: np.ndarray) -> np.ndarray:
    a = np.abs(mat.astype(np.float64))
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return a / np.where(norms > 0, norms, 1.0)


def match_layers(
    proto: onnx.ModelProto, layers: dict[str, tuple[nn.Module, Pattern]]
) -> tuple[dict[str, tuple[str, WeightUse]], list[str]]:
    """Map torch layers to initializers: same name first, else equal up to a per-row scale.

    Args:
        proto: the exported model.
        layers: {layer name: (module, pattern)}; the module's weight is compared.

    Returns:
        ({layer name: (initializer name, its use)}, [layer names not found]).
    """
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


def onnx_parity(path: str | Path, inputs: np.ndarray, reference: np.ndarray | list[np.ndarray]) -> float:
    """Max |onnxruntime(path)(inputs) − reference| on the CPU execution provider (float64 diff).

    ``reference`` may list every output of the model: each is compared with the file's
    output at the same position (a different number of outputs counts as ∞).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: inputs})
    refs = [reference] if isinstance(reference, np.ndarray) else list(reference)
    if isinstance(reference, np.ndarray):
        outs = outs[:1]
    if len(outs) != len(refs):
        return float("inf")
    return max((_max_diff(o, r) for o, r in zip(outs, refs)), default=0.0)


def _max_diff(out: np.ndarray, ref: np.ndarray) -> float:
    """max |out − ref|; inf where only one side is NaN/±inf or the shapes differ (a NaN must not hide)."""
    if out.shape != ref.shape:
        return float("inf")
    if not ref.size:
        return 0.0
    o, r = out.astype(np.float64), ref.astype(np.float64)
    same = (o == r) | (np.isnan(o) & np.isnan(r))  # equal infinities and NaN on both sides agree
    d = np.where(same, 0.0, np.abs(o - r))
    return float("inf") if not bool(np.isfinite(d).all()) else float(d.max())
