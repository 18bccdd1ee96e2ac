"""PyTorch-native 2:4 speed measurements (dense vs semi-structured sparse), with MACs.

On a CUDA GPU, :func:`run_benchmark` times

* ViT-B/16's Linear GEMMs — x (197·batch, in) @ Wᵀ for (in, out) = (768, 2304) qkv,
  (768, 768) proj, (768, 3072) fc1, (3072, 768) fc2 — dense vs
  ``torch.sparse.to_sparse_semi_structured`` with the cuSPARSELt and CUTLASS backends;
* the whole timm ``vit_base_patch16_224`` forward at batch 256, dense vs 2:4, and 2:4
  plus a token-merging patch when one is supplied;

in fp16 and bf16, with warmup, CUDA events and the median of many runs, and checks each
sparse output against the dense matmul of the same zero-filled weights. The JSON records
the GPU, driver, torch, CUDA and cuSPARSELt versions. Without CUDA it reports MACs only
and says so; no timing is ever invented.
"""

from __future__ import annotations

import platform
import statistics
import subprocess
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .layers import find_target_layers
from .macs import count_macs
from .masks import nm_mask

__all__ = [
    "VIT_B16_LINEAR_SHAPES",
    "bench_linear_shapes",
    "bench_model",
    "environment_info",
    "prune_24_",
    "run_benchmark",
    "sparsify_semi_structured_",
    "time_cuda",
]

VIT_B16_LINEAR_SHAPES: dict[str, tuple[int, int]] = {
    "attn.qkv": (768, 2304),
    "attn.proj": (768, 768),
    "mlp.fc1": (768, 3072),
    "mlp.fc2": (3072, 768),
}
_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
BACKENDS = ("cusparselt", "cutlass")


def environment_info() -> dict[str, Any]:
    """Versions and hardware: torch, CUDA, GPU name, driver, cuSPARSELt (None where absent)."""
    info: dict[str, Any] = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "gpu": None,
        "driver": None,
        "cusparselt": None,
    }
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is not None and cusparselt.is_available():
        info["cusparselt"] = cusparselt.version()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["compute_capability"] = list(torch.cuda.get_device_capability(0))
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def time_cuda(fn: Callable[[], Any], warmup: int = 10, iters: int = 50) -> dict[str, float]:
    """Median/p10/p90 milliseconds of ``fn()`` measured with CUDA events, one event pair per run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return {
        "median_ms": statistics.median(times),
        "p10_ms": times[int(0.1 * (len(times) - 1))],
        "p90_ms": times[int(0.9 * (len(times) - 1))],
        "runs": len(times),
    }


def _set_backend(backend: str) -> None:
    from torch.sparse import SparseSemiStructuredTensor

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    SparseSemiStructuredTensor._FORCE_CUTLASS = backend == "cutlass"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-12))


def bench_linear_shapes(
    batch: int = 256,
    tokens_per_image: int = 197,
    dtype: str = "fp16",
    backends: tuple[str, ...] = BACKENDS,
    shapes: dict[str, tuple[int, int]] | None = None,
    warmup: int = 10,
    iters: int = 50,
) -> list[dict[str, Any]]:
    """Dense vs 2:4 semi-structured ``F.linear`` on ViT GEMM shapes (CUDA only).

    For each (in, out): x (tokens_per_image·batch, in), W (out, in) pruned 2:4 along in.
    Returns one row per shape with dense ms, and per backend sparse ms, speed-up and the
    relative max error of the sparse output vs the dense product with the same zeros
    (or the error message when the backend cannot run it).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_linear_shapes needs a CUDA GPU")
    from torch.sparse import to_sparse_semi_structured

    dt = _DTYPES[dtype]
    rows = []
    m = tokens_per_image * batch
    for name, (k_in, n_out) in (shapes or VIT_B16_LINEAR_SHAPES).items():
        x = torch.randn(m, k_in, device="cuda", dtype=dt)
        w = torch.randn(n_out, k_in, device="cuda", dtype=dt)
        w = w * nm_mask(w, 2, 4)
        with torch.no_grad():
            ref = torch.nn.functional.linear(x, w)
            dense = time_cuda(lambda x=x, w=w: torch.nn.functional.linear(x, w), warmup, iters)
        row: dict[str, Any] = {"layer": name, "M": m, "K": k_in, "N": n_out, "dtype": dtype, "dense": dense}
        for backend in backends:
            try:
                _set_backend(backend)
                ws = to_sparse_semi_structured(w)
                with torch.no_grad():
                    out = torch.nn.functional.linear(x, ws)
                    timing = time_cuda(lambda x=x, ws=ws: torch.nn.functional.linear(x, ws), warmup, iters)
                row[backend] = {
                    **timing,
                    "speedup": dense["median_ms"] / timing["median_ms"],
                    "max_rel_err": _rel_err(out, ref),
                }
            except Exception as exc:  # noqa: BLE001 - a backend missing for this GPU/dtype is a result, not a crash
                row[backend] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            finally:
                _set_backend("cusparselt")
        rows.append(row)
    return rows


def prune_24_(model: nn.Module) -> list[str]:
    """Zero every eligible target layer of ``model`` to 2:4 in place (magnitude); returns their names."""
    targets, _ = find_target_layers(model)
    names = []
    with torch.no_grad():
        for t in targets:
            if t.weight.shape[1] % 4 == 0:
                t.module.weight.mul_(nm_mask(t.module.weight, 2, 4))
                names.append(t.name)
    return names


def sparsify_semi_structured_(model: nn.Module, names: list[str], backend: str = "cusparselt") -> int:
    """Swap the weights of the named ``nn.Linear`` layers for 2:4 semi-structured tensors (CUDA)."""
    from torch.sparse import to_sparse_semi_structured

    _set_backend(backend)
    modules = dict(model.named_modules())
    count = 0
    for name in names:
        mod = modules[name]
        if isinstance(mod, nn.Linear):
            mod.weight = nn.Parameter(to_sparse_semi_structured(mod.weight.detach()), requires_grad=False)
            count += 1
    return count


def bench_model(
    model_name: str = "vit_base_patch16_224",
    batch: int = 256,
    dtype: str = "fp16",
    backend: str = "cusparselt",
    tome: Callable[[nn.Module], nn.Module] | None = None,
    warmup: int = 5,
    iters: int = 30,
    model_kwargs: dict | None = None,
) -> dict[str, Any]:
    """End-to-end forward latency of a timm model: dense, 2:4 semi-structured, and 2:4 + ``tome``.

    The same randomly initialised, 2:4-pruned weights are used for every variant, so the
    dense run is the exact dense-with-zeros reference for the sparse output.
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_model needs a CUDA GPU")
    import copy

    import timm

    dt = _DTYPES[dtype]
    base = timm.create_model(model_name, **(model_kwargs or {})).eval()
    names = prune_24_(base)
    base = base.to("cuda", dt)
    size = _input_size(base, model_kwargs)
    x = torch.randn(batch, *size, device="cuda", dtype=dt)
    result: dict[str, Any] = {"model": model_name, "batch": batch, "dtype": dtype, "backend": backend}
    with torch.no_grad():
        ref = base(x)
        result["dense"] = time_cuda(lambda: base(x), warmup, iters)
        sparse = copy.deepcopy(base)
        try:
            result["sparse_layers"] = sparsify_semi_structured_(sparse, names, backend)
            out = sparse(x)
            result["sparse_24"] = {**time_cuda(lambda: sparse(x), warmup, iters), "max_rel_err": _rel_err(out, ref)}
            result["sparse_24"]["speedup"] = result["dense"]["median_ms"] / result["sparse_24"]["median_ms"]
            if tome is not None:
                merged = tome(sparse)
                result["sparse_24_tome"] = time_cuda(lambda: merged(x), warmup, iters)
                result["sparse_24_tome"]["speedup"] = (
                    result["dense"]["median_ms"] / result["sparse_24_tome"]["median_ms"]
                )
        except Exception as exc:  # noqa: BLE001 - report the failure in the JSON
            result["sparse_24"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            _set_backend("cusparselt")
    return result


def _input_size(model: nn.Module, model_kwargs: dict | None) -> tuple[int, int, int]:
    """(C, H, W) the timm model expects; an ``img_size`` model kwarg overrides the default config."""
    c, h, w = model.default_cfg.get("input_size", (3, 224, 224))
    img = (model_kwargs or {}).get("img_size")
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
    return c, h, w


def _macs_only(model_name: str, batch: int, model_kwargs: dict | None) -> dict[str, Any]:
    import timm

    model = timm.create_model(model_name, **(model_kwargs or {})).eval()
    size = _input_size(model, model_kwargs)
    prune_24_(model)
    mc = count_macs(model, (1, *size), "2:4")
    return {
        "model": model_name,
        "batch": batch,
        "counted_at_batch": 1,
        "dense_macs": mc.dense * batch,
        "sparse_24_macs": mc.sparse * batch,
        "attention_macs": mc.attention * batch,
        "ratio": mc.sparse / mc.dense,
    }


def run_benchmark(
    model_name: str = "vit_base_patch16_224",
    batch: int = 256,
    dtypes: tuple[str, ...] = ("fp16", "bf16"),
    backends: tuple[str, ...] = BACKENDS,
    linear: bool = True,
    end_to_end: bool = True,
    tome: Callable[[nn.Module], nn.Module] | None = None,
    warmup: int = 10,
    iters: int = 50,
    model_kwargs: dict | None = None,
) -> dict[str, Any]:
    """All measurements in one JSON-ready dict (see the module docstring).

    Without CUDA the result has ``"timings": None``, a ``"note"`` saying so, and MACs only.
    """
    result: dict[str, Any] = {"environment": environment_info()}
    result["macs"] = _macs_only(model_name, batch, model_kwargs)
    if not torch.cuda.is_available():
        result["timings"] = None
        result["note"] = "no CUDA device: 2:4 semi-structured kernels are CUDA-only, so only MACs are reported"
        return result
    timings: dict[str, Any] = {"linear": [], "end_to_end": []}
    for dtype in dtypes:
        if linear:
            timings["linear"] += bench_linear_shapes(batch, 197, dtype, backends, warmup=warmup, iters=iters)
        if end_to_end:
            for backend in backends:
                timings["end_to_end"].append(
                    bench_model(model_name, batch, dtype, backend, tome, max(2, warmup // 2), iters, model_kwargs)
                )
    result["timings"] = timings
    return result
