"""Speed of the MP analysis: all 50 target layers of ViT-B/16, mp-plugin vs WeightWatcher.

Run: ``.venv/bin/python benchmarks/analysis_speed.py [--threads 2] [--repeats 3]``.
Writes ``benchmarks/results/analysis_speed.json``.

Both tools analyse the same timm ``vit_base_patch16_224`` (random init: no
pretrained weights can be downloaded here; the cost of a fit does not depend on
the values). The 50 targets are 12 × {qkv, proj, fc1, fc2} + patch_embed + head.
Accuracy: our σ per layer against BEMA on singular values from a float64 SVD, and
the default float32 path (float32 Gram, float64 re-check where the estimated σ̂ error
exceeds 1e-6) against the float64 path.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from mp_plugin import LayerSelection, find_target_layers  # noqa: E402
from mp_plugin.spectrum import fit_from_eigenvalues, fit_many  # noqa: E402


def _targets(model: torch.nn.Module) -> list:
    sel = LayerSelection(exclude_head=False, exclude_stem=False)
    return find_target_layers(model, sel)[0]


def time_ours(weights: list[torch.Tensor], gram_dtype: torch.dtype, repeats: int) -> tuple[float, list]:
    times, fits = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fits = fit_many(weights, gram_dtype=gram_dtype)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), fits


def svd_reference(weights: list[torch.Tensor]) -> list[float]:
    out = []
    for w in weights:
        m = w.detach().reshape(w.shape[0], -1).double()
        s = torch.linalg.svdvals(m).numpy()
        out.append(fit_from_eigenvalues(s**2, tuple(m.shape)).sigma)
    return out


def time_weightwatcher(model: torch.nn.Module) -> tuple[float | None, str]:
    try:
        import weightwatcher as ww
    except ImportError:
        return None, "weightwatcher not installed"
    import logging

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    watcher = ww.WeightWatcher(model=model)
    t0 = time.perf_counter()
    details = watcher.analyze(mp_fit=True, plot=False, randomize=False)
    elapsed = time.perf_counter() - t0
    return elapsed, f"{len(details)} layers analysed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-weightwatcher", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    targets = _targets(model)
    weights = [t.weight for t in targets]
    fit_many(weights[:2])  # warm caches (TW quantile, imports)
    t64, fits64 = time_ours(weights, torch.float64, args.repeats)
    t32, fits32 = time_ours(weights, torch.float32, args.repeats)
    ref = svd_reference(weights)
    err64 = [abs(f.sigma / r - 1) for f, r in zip(fits64, ref)]
    err32 = [abs(f.sigma / r - 1) for f, r in zip(fits32, ref)]
    err32_64 = [abs(a.sigma / b.sigma - 1) for a, b in zip(fits32, fits64)]
    ww_time, ww_note = (None, "skipped") if args.skip_weightwatcher else time_weightwatcher(model)
    result = {
        "model": "vit_base_patch16_224 (random init)",
        "n_layers": len(targets),
        "threads": args.threads,
        "ours_float64_s": t64,
        "ours_float32_s": t32,
        "default_gram_dtype": "float32 (float64 re-check where the estimated sigma error exceeds 1e-6)",
        "float64_refits_in_float32_run": sum(f.gram_dtype == "float64" for f in fits32),
        "weightwatcher_s": ww_time,
        "weightwatcher_note": ww_note,
        "speedup_float64_vs_ww": (ww_time / t64) if ww_time else None,
        "speedup_float32_vs_ww": (ww_time / t32) if ww_time else None,
        "sigma_rel_err_vs_svd_float64": {"max": max(err64), "mean": float(np.mean(err64))},
        "sigma_rel_err_vs_svd_float32": {"max": max(err32), "mean": float(np.mean(err32))},
        "sigma_rel_err_float32_vs_float64": {"max": max(err32_64), "mean": float(np.mean(err32_64))},
        "targets": {
            "speedup_vs_ww": 10.0,
            "speedup_default_vs_ww_issue_13": 25.0,
            "seconds": 3.0,
            "sigma_rel_err": 0.005,
            "sigma_rel_err_float32_vs_float64": 1e-6,
        },
    }
    path = write_result("analysis_speed", result, packages=("weightwatcher", "timm"))
    for k, v in result.items():
        print(f"{k}: {v}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
