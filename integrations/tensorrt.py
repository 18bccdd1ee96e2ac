"""TensorRT sparse engines from an exported ONNX file, and what actually ran sparse.

* :func:`build_engine` — ONNX → engine with ``BuilderFlag.SPARSE_WEIGHTS`` through the
  TensorRT Python API (strongly typed network where the TensorRT version has it, so
  an fp16 ONNX gives fp16 kernels; the FP16 flag otherwise). Needs ``tensorrt`` and a GPU.
* :func:`trtexec_command` — the equivalent ``trtexec`` line.
* :func:`parse_build_log` / :func:`parse_layer_info` / :func:`engine_sparsity_report` — read the
  builder log's ``(Sparsity)`` lines and the engine inspector's per-layer JSON into one
  row per layer: eligible for sparse math, ran a sparse kernel, and why not.
* :func:`compare_dense_sparse` — build both engines and time them.

Only 2:4 has sparse tensor-core kernels. A sparse engine for any other k:n pattern
(4:8, 6:12, 8:16, 12:16) is refused: those are accuracy-only patterns.

The log and layer-info formats followed here are those shown in TensorRT's public
GitHub issues (NVIDIA/TensorRT #1403, #2169, #4020, #4054): the builder logs
``(Sparsity) Layers eligible for sparse math: A, B + C`` and ``(Sparsity) TRT inference
plan picked sparse implementation for layers: …``; the inspector's JSON has
``{"Layers": [{"Name", "LayerType", "TacticName", "HasSparseWeights", "Metadata"}]}``.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mp_plugin.errors import MPPluginError, PatternError
from mp_plugin.layers.patterns import Pattern

__all__ = [
    "EngineBuild",
    "EngineLayerSparsity",
    "EngineSparsityReport",
    "TensorRTError",
    "TensorRTNotInstalled",
    "build_engine",
    "check_engine_pattern",
    "compare_dense_sparse",
    "parse_build_log",
    "parse_layer_info",
    "engine_sparsity_report",
    "io_buffer",
    "onnx_is_fp16",
    "time_engine",
    "trtexec_command",
]

_ELIGIBLE = re.compile(r"\(Sparsity\)\s*Layers eligible for sparse math:(?P<names>.*)$")
_PICKED = re.compile(r"\(Sparsity\)\s*TRT inference plan picked sparse implementation for layers:(?P<names>.*)$")
_ONNX_LAYER = re.compile(r"\[ONNX Layer: ([^\]]+)\]")


class TensorRTError(MPPluginError):
    """TensorRT cannot do what was asked (unsupported pattern, parse or build failure)."""


class TensorRTNotInstalled(TensorRTError, ImportError):
    """The ``tensorrt`` Python package is not importable."""


def _require_tensorrt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise TensorRTNotInstalled(
            "TensorRT is not installed: building an engine needs the NVIDIA `tensorrt` Python package and a CUDA GPU "
            "(pip install 'mp-plugin[tensorrt]' on a machine with the TensorRT libraries). The ONNX export and "
            "`trtexec_command()` work without it."
        ) from exc
    return trt


def check_engine_pattern(pattern: str | Pattern, sparse: bool = True) -> Pattern:
    """Refuse a sparse engine for a pattern TensorRT cannot run; returns the parsed pattern.

    Raises:
        PatternError: ``sparse`` is True and the pattern is a k:n other than 2:4.
    """
    pat = Pattern.parse(pattern)
    if sparse and pat.is_kn and not pat.hardware:
        raise PatternError(
            f"TensorRT cannot run {pat} sparsity: its sparse tensor-core kernels only take 2:4 "
            f"(two non-zeros in every four inputs). {pat} is an accuracy-only pattern; build a dense engine "
            "(sparse=False) or prune with pattern '2:4'"
        )
    if sparse and not pat.is_kn:
        raise PatternError(f"a sparse TensorRT engine needs a 2:4 pattern, got {pat}")
    return pat


def trtexec_command(
    onnx_path: str | Path,
    sparse: bool = True,
    fp16: bool = True,
    engine_path: str | Path | None = None,
    layer_info_path: str | Path | None = None,
) -> str:
    """The ``trtexec`` line that builds the same engine as :func:`build_engine`.

    ``--sparsity=enable`` uses the weights' own 2:4 zeros. ``--sparsity=force`` would
    overwrite weights with a 2:4 pattern of TensorRT's choosing, so its timing is only
    an upper bound on what the pruned model can reach, not a measurement of it.
    ``--stronglyTyped`` takes precision from the ONNX (export fp16 for fp16 kernels);
    for TensorRT versions without it, replace it by ``--fp16``. Sparse tensor-core kernels
    run in fp16/bf16/int8, so an fp32 ONNX (``fp16=False``) will not show sparse layers.
    """
    onnx_path = Path(onnx_path)
    engine = Path(engine_path) if engine_path else onnx_path.with_suffix(".sparse.plan" if sparse else ".dense.plan")
    info = Path(layer_info_path) if layer_info_path else engine.with_suffix(".layers.json")
    parts = ["trtexec", f"--onnx={onnx_path}", f"--saveEngine={engine}"]
    if fp16:
        parts.append("--stronglyTyped")
    if sparse:
        parts.append("--sparsity=enable")
    parts += ["--profilingVerbosity=detailed", f"--exportLayerInfo={info}", "--verbose"]
    return " ".join(shlex.quote(p) for p in parts)


# ------------------------------------------------------------------ parsing
def _split_names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def parse_build_log(text: str) -> tuple[list[str], list[str]]:
    """(eligible, picked) TensorRT layer names from a builder log (trtexec or Python logger).

    A fused layer keeps its full name (``"Conv_3 + Relu_4"``). When the log holds
    several builds, the names of all of them are returned in order, without repeats.
    """
    eligible: list[str] = []
    picked: list[str] = []
    for line in text.splitlines():
        for regex, bucket in ((_ELIGIBLE, eligible), (_PICKED, picked)):
            m = regex.search(line)
            if m:
                bucket.extend(n for n in _split_names(m.group("names")) if n not in bucket)
    return eligible, picked


def parse_layer_info(info: str | dict) -> list[dict[str, Any]]:
    """The layers of an engine-inspector / ``--exportLayerInfo`` JSON.

    Returns one dict per layer with ``name``, ``layer_type``, ``tactic``,
    ``has_sparse_weights`` (bool or None when the field is absent), ``sparse_tactic``
    (the kernel name contains "sparse") and ``onnx_nodes`` (from ``Metadata``, else the
    fused name split on " + "). With ``ProfilingVerbosity.LAYER_NAMES_ONLY`` the JSON
    is a list of names; those come back with the other fields empty.
    """
    data = json.loads(info) if isinstance(info, str) else info
    layers = data.get("Layers", []) if isinstance(data, dict) else data
    out = []
    for layer in layers:
        if isinstance(layer, str):
            layer = {"Name": layer}
        name = str(layer.get("Name", ""))
        tactic = str(layer.get("TacticName", ""))
        nodes = _ONNX_LAYER.findall(str(layer.get("Metadata", "")))
        nodes = [n.strip() for chunk in nodes for n in re.split(r"[\x1e\x1f|]", chunk) if n.strip()]
        has_sparse = layer.get("HasSparseWeights")
        out.append(
            {
                "name": name,
                "layer_type": str(layer.get("LayerType", "")),
                "tactic": tactic,
                "has_sparse_weights": None if has_sparse is None else bool(int(has_sparse)),
                "sparse_tactic": "sparse" in tactic.lower(),
                "onnx_nodes": nodes or [p.strip() for p in name.split(" + ") if p.strip()],
            }
        )
    return out


@dataclass
class EngineLayerSparsity:
    """One TensorRT layer's sparsity outcome.

    Attributes:
        name: TensorRT layer name (fused layers read ``"A + B"``).
        eligible: the builder listed it as eligible for sparse math.
        ran_sparse: the builder picked a sparse implementation (or its tactic is sparse).
        tactic: kernel name from the layer info ("" when not known).
        why_not: for a layer that did not run sparse, the likely reason.
    """

    name: str
    eligible: bool
    ran_sparse: bool
    tactic: str = ""
    why_not: str = ""


@dataclass
class EngineSparsityReport:
    """Per-layer sparse/dense outcome of one engine build.

    Attributes:
        layers: one :class:`EngineLayerSparsity` per eligible or compute layer.
        log_found: the build log carried the ``(Sparsity)`` lines (needs INFO-level logging
            and a sparse build).
    """

    layers: list[EngineLayerSparsity] = field(default_factory=list)
    log_found: bool = False

    @property
    def n_eligible(self) -> int:
        """Layers TensorRT found eligible for sparse math."""
        return sum(r.eligible for r in self.layers)

    @property
    def n_sparse(self) -> int:
        """Layers that ran a sparse kernel."""
        return sum(r.ran_sparse for r in self.layers)

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {
            "log_found": self.log_found,
            "n_eligible": self.n_eligible,
            "n_sparse": self.n_sparse,
            "layers": [r.__dict__ for r in self.layers],
        }

    def to_text(self) -> str:
        """A fixed-width table: layer, eligible, ran sparse, why not."""
        rows = [f"{'TensorRT layer':<48} {'eligible':>8} {'sparse':>6}  why not"]
        for r in self.layers:
            name = r.name if len(r.name) <= 48 else "…" + r.name[-47:]
            rows.append(
                f"{name:<48} {'yes' if r.eligible else 'no':>8} {'yes' if r.ran_sparse else 'no':>6}  {r.why_not}"
            )
        rows.append(f"{self.n_sparse} of {self.n_eligible} eligible layers ran sparse kernels")
        if not self.log_found:
            rows.append("note: no '(Sparsity)' lines in the build log (was SPARSE_WEIGHTS set and INFO logging on?)")
        return "\n".join(rows)


_COMPUTE_TYPES = ("conv", "gemm", "matrixmultiply", "matmul", "fullyconnected")

_WHY_NOT_ELIGIBLE = (
    "not eligible: weights not 2:4 along the reduction axis, or a layer type/shape TensorRT has no sparse kernel for "
    "(channels should be multiples of 16/32; MatMul needs a constant 2-D weight)"
)
_WHY_DENSE = "eligible, but a dense kernel timed faster (TensorRT keeps the fastest tactic; small or thin layers)"


def engine_sparsity_report(log_text: str = "", layer_info: str | dict | None = None) -> EngineSparsityReport:
    """Merge the build log and the layer info into one "eligible / ran sparse / why not" row per layer.

    Args:
        log_text: the builder's log (INFO level or more verbose).
        layer_info: the engine inspector's JSON (``LayerInformationFormat.JSON``) or
            trtexec's ``--exportLayerInfo`` file contents.

    Layers come from the eligible list, then from the compute layers (convolution and
    GEMM types) of the layer info. A layer "ran sparse" when the log says TensorRT picked
    a sparse implementation for it, or when its tactic name is a sparse kernel.
    """
    eligible, picked = parse_build_log(log_text)
    info = parse_layer_info(layer_info) if layer_info is not None else []
    by_name = {entry["name"]: entry for entry in info}
    rows: dict[str, EngineLayerSparsity] = {}
    for name in eligible:
        rows[name] = EngineLayerSparsity(name, eligible=True, ran_sparse=name in picked)
    for name in picked:
        rows.setdefault(name, EngineLayerSparsity(name, eligible=True, ran_sparse=True))
    for entry in info:
        compute = any(t in entry["layer_type"].lower() for t in _COMPUTE_TYPES) or entry["has_sparse_weights"]
        if compute and entry["name"] not in rows:
            rows[entry["name"]] = EngineLayerSparsity(
                entry["name"], eligible=bool(entry["has_sparse_weights"]), ran_sparse=False
            )
    for row in rows.values():
        entry = by_name.get(row.name)
        if entry is not None:
            row.tactic = entry["tactic"]
            row.ran_sparse = row.ran_sparse or entry["sparse_tactic"]
            row.eligible = row.eligible or row.ran_sparse
        if not row.ran_sparse:
            row.why_not = _WHY_DENSE if row.eligible else _WHY_NOT_ELIGIBLE
    return EngineSparsityReport(list(rows.values()), log_found="(Sparsity)" in log_text)


# ---------------------------------------------------------- building (needs TensorRT)
@dataclass
class EngineBuild:
    """A built engine and what the builder said.

    Attributes:
        engine_path: the serialized engine file. sparse / fp16: the build settings.
        build_seconds: wall time of the build. log: the captured builder log.
        layer_info: the engine inspector's JSON. report: the merged :class:`EngineSparsityReport`.
    """

    engine_path: Path
    sparse: bool
    fp16: bool
    build_seconds: float
    log: str
    layer_info: str
    report: EngineSparsityReport


def _capturing_logger(trt: Any) -> tuple[Any, list[str]]:
    lines: list[str] = []

    class _Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity: Any, msg: str) -> None:
            lines.append(f"[{severity.name}] {msg}")

    return _Logger(), lines


def build_engine(
    onnx_path: str | Path,
    engine_path: str | Path | None = None,
    sparse: bool = True,
    fp16: bool = True,
    pattern: str = "2:4",
    workspace_gib: float = 4.0,
) -> EngineBuild:
    """Build a TensorRT engine from ``onnx_path`` and report which layers ran sparse.

    Args:
        onnx_path: an ONNX file (fp16 for fp16 kernels under strong typing).
        engine_path: where to write the engine (default next to the ONNX).
        sparse: set ``BuilderFlag.SPARSE_WEIGHTS``. fp16: allow fp16 kernels (FP16 flag
            on TensorRT versions without strongly typed networks).
        pattern: the pattern the weights carry; a sparse build refuses anything but 2:4.
        workspace_gib: builder workspace limit in GiB.

    Raises:
        PatternError: sparse engine for a non-2:4 pattern.
        TensorRTNotInstalled: ``tensorrt`` missing. TensorRTError: parse or build failure.
    """
    if sparse:
        check_engine_pattern(pattern)
    trt = _require_tensorrt()
    onnx_path = Path(onnx_path)
    engine_path = (
        Path(engine_path) if engine_path else onnx_path.with_suffix(".sparse.plan" if sparse else ".dense.plan")
    )
    logger, lines = _capturing_logger(trt)
    builder = trt.Builder(logger)
    strongly_typed = hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    if not strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH"):
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise TensorRTError(f"TensorRT could not parse {onnx_path}: {errors[:5]}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    if sparse:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if fp16 and not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    if fp16 and strongly_typed and not onnx_is_fp16(onnx_path):
        # a strongly typed network runs in the ONNX file's own types: the FP16 flag would be ignored and
        # an fp32 engine (without the fp16 sparse kernels) reported as fp16
        raise TensorRTError(
            f"{onnx_path} holds float32 inputs and this TensorRT builds strongly typed networks in the file's own "
            "types: export the model with dtype='fp16' for an fp16 engine, or build with fp16=False"
        )
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - t0
    if serialized is None:
        raise TensorRTError("TensorRT engine build failed:\n" + "\n".join(lines[-20:]))
    engine_path.write_bytes(bytes(serialized))
    engine = trt.Runtime(logger).deserialize_cuda_engine(serialized)
    info = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    log = "\n".join(lines)
    return EngineBuild(engine_path, sparse, fp16, seconds, log, info, engine_sparsity_report(log, info))


_TORCH_DTYPES = {
    "FLOAT": "float32",
    "HALF": "float16",
    "BF16": "bfloat16",
    "INT8": "int8",
    "INT32": "int32",
    "INT64": "int64",
    "BOOL": "bool",
    "UINT8": "uint8",
}


def io_buffer(shape: tuple[int, ...], trt_dtype: str, device: str = "cuda") -> Any:
    """An engine I/O buffer of the tensor's own type (``trt.DataType`` name): random floats, zero integers.

    Integer inputs are often indices (token ids), so they get 0, a valid index; an unknown type is refused
    instead of a float32 buffer of the wrong size.
    """
    import torch

    name = _TORCH_DTYPES.get(trt_dtype)
    if name is None:
        raise TensorRTError(f"no I/O buffer for TensorRT type {trt_dtype}")
    dtype = getattr(torch, name)
    if dtype.is_floating_point:
        return torch.randn(shape, device=device).to(dtype)
    return torch.zeros(shape, device=device, dtype=dtype)


def onnx_is_fp16(onnx_path: str | Path) -> bool:
    """Whether the ONNX file's floating-point graph inputs are float16 (the external weights are not loaded)."""
    import onnx

    proto = onnx.load(str(onnx_path), load_external_data=False)
    floats = [
        i.type.tensor_type.elem_type
        for i in proto.graph.input
        if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    ]
    return bool(floats) and all(t == onnx.TensorProto.FLOAT16 for t in floats)


def time_engine(engine_path: str | Path, iters: int = 200, warmup: int = 20) -> float:
    """Median latency in milliseconds of one engine run (random inputs, CUDA events).

    Uses torch CUDA tensors for the I/O buffers and ``execute_async_v3``.
    """
    trt = _require_tensorrt()
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("timing a TensorRT engine needs a CUDA GPU")
    logger, _ = _capturing_logger(trt)
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
    context = engine.create_execution_context()
    buffers = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        shape = tuple(context.get_tensor_shape(name))
        buf = io_buffer(shape, engine.get_tensor_dtype(name).name, "cuda")
        context.set_tensor_address(name, buf.data_ptr())
        buffers.append(buf)
    stream = torch.cuda.Stream()
    times = []
    with torch.cuda.stream(stream):
        for i in range(warmup + iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            context.execute_async_v3(stream.cuda_stream)
            end.record(stream)
            end.synchronize()
            if i >= warmup:
                times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def compare_dense_sparse(onnx_path: str | Path, fp16: bool = True, iters: int = 200) -> dict[str, Any]:
    """Build dense and 2:4-sparse engines from one ONNX and time both (median ms, speed-up)."""
    dense = build_engine(onnx_path, sparse=False, fp16=fp16)
    sparse = build_engine(onnx_path, sparse=True, fp16=fp16)
    dense_ms = time_engine(dense.engine_path, iters)
    sparse_ms = time_engine(sparse.engine_path, iters)
    return {
        "onnx": str(onnx_path),
        "dense_ms": dense_ms,
        "sparse_ms": sparse_ms,
        "speedup": dense_ms / sparse_ms,
        "sparsity": sparse.report.to_dict(),
        "trtexec": trtexec_command(onnx_path, sparse=True, fp16=fp16),
    }
