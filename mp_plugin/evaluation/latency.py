"""PyTorch-native 2:4 speed measurements (dense vs semi-structured sparse), with MACs.

On a CUDA GPU, :func:`run_benchmark` times

* ViT-B/16's Linear GEMMs — x (197·batch, in) @ Wᵀ for (in, out) = (768, 2304) qkv,
  (768, 768) proj, (768, 3072) fc1, (3072, 768) fc2 — dense vs
  ``torch.sparse.to_sparse_semi_structured`` with the cuSPARSELt and CUTLASS backends;
* the whole forward of the model it is given — a pruned model (e.g. a checkpoint from
  ``mp-plugin prune`` with its plan: its 2:4 Linear layers are swapped for semi-structured
  tensors, its weights are not changed), or, given only a timm name, a synthetic
  reference (random weights, magnitude 2:4, labelled as such) — at batch 256, dense vs
  2:4, and 2:4 plus a token-merging patch when one is supplied;

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

from mp_plugin.masks.macs import count_macs
from mp_plugin.masks.select import check_nm, magnitude_kn_, nm_mask
from mp_plugin.progress import progress

__all__ = [
    "VIT_B16_LINEAR_SHAPES",
    "bench_linear_shapes",
    "bench_model",
    "environment_info",
    "prune_24_",
    "run_benchmark",
    "sparse_24_linears",
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
    return magnitude_kn_(model, 2, 4)


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


def sparse_24_linears(model: nn.Module, names: list[str] | None = None) -> list[str]:
    """The ``nn.Linear`` layers of ``model`` whose weights are exactly 2:4 (of ``names``, if given)."""
    modules = dict(model.named_modules())
    chosen = names if names is not None else [n for n, m in modules.items() if isinstance(m, nn.Linear)]
    out = []
    for name in chosen:
        mod = modules.get(name)
        if isinstance(mod, nn.Linear) and mod.weight.shape[1] % 4 == 0 and check_nm(mod.weight.detach(), 2, 4):
            out.append(name)
    return out


def _resolve_model(
    model: str | nn.Module, model_kwargs: dict | None, sparse_layers: list[str] | None
) -> tuple[nn.Module, list[str], str, str]:
    """``(module, its 2:4 Linear layers, name, weights description)`` for :func:`bench_model`."""
    if isinstance(model, nn.Module):
        names = sparse_24_linears(model, sparse_layers)
        return model, names, type(model).__name__, "the given model's weights (not modified)"
    import timm

    base = timm.create_model(model, **(model_kwargs or {})).eval()
    names = prune_24_(base)
    return base, names, model, "synthetic: random init, magnitude 2:4 on every eligible target"


def bench_model(
    model: str | nn.Module = "vit_base_patch16_224",
    batch: int = 256,
    dtype: str = "fp16",
    backend: str = "cusparselt",
    tome: Callable[[nn.Module], nn.Module] | None = None,
    warmup: int = 5,
    iters: int = 30,
    model_kwargs: dict | None = None,
    sparse_layers: list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
) -> dict[str, Any]:
    """End-to-end forward latency: dense, 2:4 semi-structured, and 2:4 + ``tome``.

    Args:
        model: an ``nn.Module`` (timed as given: its exactly-2:4 ``nn.Linear`` layers, of
            ``sparse_layers`` when given, become semi-structured tensors), or a timm name
            (a synthetic reference: random weights, magnitude 2:4; labelled in the result).
        batch / dtype / backend / warmup / iters: the measurement.
        tome: optional token-merging patch applied to the sparse copy.
        model_kwargs: ``timm.create_model`` kwargs for a name.
        sparse_layers: layer names to make semi-structured (e.g. the plan's 2:4 layers).
        input_size: (C, H, W); default the timm config's, else (3, 224, 224).

    The dense run uses the same dense-with-zeros weights, so it is the exact reference
    for the sparse output (``max_rel_err``).
    """
    if not torch.cuda.is_available():
        raise RuntimeError("bench_model needs a CUDA GPU")
    import copy

    dt = _DTYPES[dtype]
    base, names, label, weights = _resolve_model(model, model_kwargs, sparse_layers)
    size = input_size or _input_size(base, model_kwargs)
    base = copy.deepcopy(base).to("cuda", dt) if isinstance(model, nn.Module) else base.to("cuda", dt)
    x = torch.randn(batch, *size, device="cuda", dtype=dt)
    result: dict[str, Any] = {
        "model": label,
        "weights": weights,
        "batch": batch,
        "dtype": dtype,
        "backend": backend,
        "sparse_candidates": len(names),
    }
    with torch.no_grad():
        ref = base(x)
        result["dense"] = time_cuda(lambda: base(x), warmup, iters)
        sparse = copy.deepcopy(base)
        try:
            result["sparse_layers"] = sparsify_semi_structured_(sparse, names, backend)
            if not result["sparse_layers"]:
                raise ValueError("no nn.Linear layer of this model is exactly 2:4 (prune it to 2:4 first)")
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
    c, h, w = (getattr(model, "default_cfg", None) or {}).get("input_size", (3, 224, 224))
    img = (model_kwargs or {}).get("img_size")
    if img is not None:
        h, w = (img, img) if isinstance(img, int) else tuple(img)
    return c, h, w


def _macs_only(
    model: str | nn.Module, batch: int, model_kwargs: dict | None, input_size: tuple[int, int, int] | None = None
) -> dict[str, Any]:
    if isinstance(model, nn.Module):
        name, pattern = type(model).__name__, "auto"  # each layer at the sparsest pattern its weights satisfy
    else:
        import timm

        name, pattern = model, "2:4"
        model = timm.create_model(name, **(model_kwargs or {})).eval()
        prune_24_(model)
    size = input_size or _input_size(model, model_kwargs)
    mc = count_macs(model, (1, *size), pattern)
    return {
        "model": name,
        "batch": batch,
        "counted_at_batch": 1,
        "dense_macs": mc.dense * batch,
        "sparse_24_macs": mc.sparse * batch,
        "attention_macs": mc.attention * batch,
        "ratio": mc.sparse / mc.dense,
    }


def run_benchmark(
    model: str | nn.Module = "vit_base_patch16_224",
    batch: int = 256,
    dtypes: tuple[str, ...] = ("fp16", "bf16"),
    backends: tuple[str, ...] = BACKENDS,
    linear: bool = True,
    end_to_end: bool = True,
    tome: Callable[[nn.Module], nn.Module] | None = None,
    warmup: int = 10,
    iters: int = 50,
    model_kwargs: dict | None = None,
    sparse_layers: list[str] | None = None,
    input_size: tuple[int, int, int] | None = None,
    show_progress: bool = False,
) -> dict[str, Any]:
    """All measurements in one JSON-ready dict (see the module docstring).

    ``model`` is the module to time (``sparse_layers``: the names to run as 2:4, e.g. the
    plan's), or a timm name for the synthetic reference. Without CUDA the result has
    ``"timings": None``, a ``"note"`` saying so, and the model's MACs only.
    """
    result: dict[str, Any] = {"environment": environment_info()}
    result["macs"] = _macs_only(model, batch, model_kwargs, input_size)
    if not torch.cuda.is_available():
        result["timings"] = None
        result["note"] = "no CUDA device: 2:4 semi-structured kernels are CUDA-only, so only MACs are reported"
        return result
    timings: dict[str, Any] = {"linear": [], "end_to_end": []}
    steps = len(dtypes) * (int(linear) + (len(backends) if end_to_end else 0))
    bar = progress(total=steps, desc="bench", unit="run", disable=not show_progress)
    for dtype in dtypes:
        if linear:
            timings["linear"] += bench_linear_shapes(batch, 197, dtype, backends, warmup=warmup, iters=iters)
            bar.update(1)
        if end_to_end:
            for backend in backends:
                timings["end_to_end"].append(
                    bench_model(
                        model,
                        batch,
                        dtype,
                        backend,
                        tome,
                        max(2, warmup // 2),
                        iters,
                        model_kwargs,
                        sparse_layers=sparse_layers,
                        input_size=input_size,
                    )
                )
                bar.update(1)
    bar.close()
    result["timings"] = timings
    return result
