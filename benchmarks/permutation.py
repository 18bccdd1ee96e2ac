"""Benchmark: magnitude kept under k:n with no permutation, the interleave and the exact swap search.

Runs on one CPU thread. Reports, for 2:4 and 4:8:

* real pretrained layers: EfficientNet-Lite0's 1×1 convs and MiniLM's Linear
  layers (``mp_plugin.evaluation.models.load_model``);
* a heavy-tailed synthetic 768×3072 matrix (Student-t, 3 degrees of freedom);
* an apex-ASP-style reference search (re-implemented below: exhaustive greedy
  pairwise channel swaps, each pair scored one at a time in Python) on a small
  64×128 matrix, against our swap search on the same matrix.

Writes ``benchmarks/results/permutation.json`` and ``permutation.md``.
Usage: ``python benchmarks/permutation.py [--quick]``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(1)

from mp_plugin.permute import interleave_permutation, kept_magnitude, swap_permutation  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PATTERNS = ((2, 4), (4, 8))


def apex_style_search(weight: np.ndarray, k: int, n: int, max_sweeps: int = 10_000) -> tuple[np.ndarray, int]:
    """Reference: greedy exhaustive pairwise column swaps, each pair evaluated on its own in Python.

    Every sweep scores every pair of columns in different groups by recomputing
    the two affected groups' kept magnitude (top-k per row), applies the single
    best swap, and stops when no swap improves. This is the apex-ASP style of
    search (channel swaps scored by the magnitude kept), written plainly as the
    reference point; it is not apex's code.

    Args:
        weight: (rows, cols) array; cols % n == 0.

    Returns:
        (perm, sweeps): column order (new column s = old column perm[s]) and sweeps run.
    """
    a = np.abs(np.asarray(weight, dtype=np.float64))
    cols = a.shape[1]
    perm = np.arange(cols)

    def group_kept(cols_idx: np.ndarray) -> float:
        block = a[:, cols_idx]
        return float(np.sort(block, axis=1)[:, -k:].sum())

    sweeps = 0
    while sweeps < max_sweeps:
        sweeps += 1
        best_gain, best_pair = 1e-12 * float(a.sum()), None
        for i in range(cols):
            gi = i // n
            for j in range(i + 1, cols):
                gj = j // n
                if gi == gj:
                    continue
                ci = perm[gi * n : gi * n + n].copy()
                cj = perm[gj * n : gj * n + n].copy()
                old = group_kept(ci) + group_kept(cj)
                ci[i - gi * n], cj[j - gj * n] = perm[j], perm[i]
                gain = group_kept(ci) + group_kept(cj) - old
                if gain > best_gain:
                    best_gain, best_pair = gain, (i, j)
        if best_pair is None:
            break
        i, j = best_pair
        perm[i], perm[j] = perm[j], perm[i]
    return perm, sweeps


def _layer_row(name: str, w2d: torch.Tensor, k: int, n: int, seconds: float) -> dict:
    base = kept_magnitude(w2d, k, n)
    t0 = time.perf_counter()
    pi = interleave_permutation(w2d, n)
    t_int = time.perf_counter() - t0
    t0 = time.perf_counter()
    ps = swap_permutation(w2d, k, n, max_seconds=seconds)
    t_swap = time.perf_counter() - t0
    total = float(w2d.abs().double().sum())
    return {
        "layer": name,
        "shape": list(w2d.shape),
        "total_magnitude": total,
        "kept_none": base,
        "kept_interleave": kept_magnitude(w2d, k, n, pi),
        "kept_swap": kept_magnitude(w2d, k, n, ps),
        "seconds_interleave": t_int,
        "seconds_swap": t_swap,
    }


def _summary(rows: list[dict]) -> dict:
    tot = {key: sum(r[key] for r in rows) for key in ("kept_none", "kept_interleave", "kept_swap", "total_magnitude")}
    return {
        "layers": len(rows),
        "kept_fraction_none": tot["kept_none"] / tot["total_magnitude"],
        "kept_fraction_interleave": tot["kept_interleave"] / tot["total_magnitude"],
        "kept_fraction_swap": tot["kept_swap"] / tot["total_magnitude"],
        "gain_interleave_vs_none": tot["kept_interleave"] / tot["kept_none"] - 1,
        "gain_swap_vs_none": tot["kept_swap"] / tot["kept_none"] - 1,
        "swap_ge_none_all_layers": all(r["kept_swap"] >= r["kept_none"] for r in rows),
        "swap_ge_interleave_layers": sum(r["kept_swap"] >= r["kept_interleave"] for r in rows),
        "mean_seconds_swap": float(np.mean([r["seconds_swap"] for r in rows])),
        "max_seconds_swap": float(np.max([r["seconds_swap"] for r in rows])),
        "mean_seconds_interleave": float(np.mean([r["seconds_interleave"] for r in rows])),
    }


def real_layers(quick: bool) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """2-D weights of EfficientNet-Lite0's 1×1 convs and MiniLM's Linear layers."""
    from mp_plugin.evaluation.models import load_model
    from mp_plugin.layers.discovery import find_target_layers

    out: dict[str, list[tuple[str, torch.Tensor]]] = {}
    eff = load_model("efficientnet_lite0")
    targets, _ = find_target_layers(eff)
    out["efficientnet_lite0_1x1"] = [
        (t.name, t.weight.detach().reshape(t.shape))
        for t in targets
        if t.kind == "conv2d" and t.weight[0, 0].numel() == 1
    ]
    mini = load_model("minilm")
    targets, _ = find_target_layers(mini)
    layers = [(t.name, t.weight.detach()) for t in targets if t.kind == "linear"]
    keep = (".layer.0.",) if quick else (".layer.0.", ".layer.5.")
    out["minilm_linear"] = [(nm, w) for nm, w in layers if any(s in nm for s in keep)]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer MiniLM layers, shorter searches")
    parser.add_argument("--swap-seconds", type=float, default=None, help="time bound per real layer")
    args = parser.parse_args()
    layer_seconds = args.swap_seconds or (0.5 if args.quick else 1.0)
    synth_seconds = 5.0 if args.quick else 10.0
    start = time.perf_counter()
    import timm
    import transformers

    meta = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "numpy": np.__version__,
        "timm": timm.__version__,
        "transformers": transformers.__version__,
        "loadavg_start": list(os.getloadavg()),
        "swap_max_seconds_real_layer": layer_seconds,
        "swap_max_seconds_synthetic": synth_seconds,
    }
    result: dict = {"meta": meta, "real": {}, "synthetic": {}, "apex_reference": {}}

    # ---- apex-style reference on a small matrix ------------------------------------------
    torch.manual_seed(0)
    small = torch.distributions.StudentT(torch.tensor(3.0)).sample((64, 128))
    for k, n in PATTERNS:
        t0 = time.perf_counter()
        perm_ref, sweeps = apex_style_search(small.numpy(), k, n)
        t_ref = time.perf_counter() - t0
        t0 = time.perf_counter()
        perm_ours = swap_permutation(small, k, n, window_groups=64)
        t_ours = time.perf_counter() - t0
        kept_ref = kept_magnitude(small, k, n, torch.from_numpy(perm_ref))
        kept_ours = kept_magnitude(small, k, n, perm_ours)
        result["apex_reference"][f"{k}:{n}"] = {
            "shape": list(small.shape),
            "kept_none": kept_magnitude(small, k, n),
            "kept_interleave": kept_magnitude(small, k, n, interleave_permutation(small, n)),
            "kept_apex_style": kept_ref,
            "kept_swap": kept_ours,
            "apex_sweeps": sweeps,
            "seconds_apex_style": t_ref,
            "seconds_swap": t_ours,
            "kept_ratio_ours_over_apex": kept_ours / kept_ref,
            "speedup_apex_time_over_ours": t_ref / t_ours,
        }
        print(f"apex-style {k}:{n}: kept ours/apex = {kept_ours / kept_ref:.5f}, speed-up {t_ref / t_ours:.1f}×")

    # ---- heavy-tailed synthetic 768×3072 ------------------------------------------------------
    torch.manual_seed(1)
    big = torch.distributions.StudentT(torch.tensor(3.0)).sample((768, 3072))
    for k, n in PATTERNS:
        row = _layer_row("student_t_df3_768x3072", big, k, n, synth_seconds)
        result["synthetic"][f"{k}:{n}"] = row
        print(
            f"synthetic {k}:{n}: none {row['kept_none']:.6g} interleave {row['kept_interleave']:.6g} "
            f"swap {row['kept_swap']:.6g} ({row['seconds_swap']:.1f} s)"
        )

    # ---- real pretrained layers ----------------------------------------------------------------
    for family, layers in real_layers(args.quick).items():
        result["real"][family] = {}
        for k, n in PATTERNS:
            rows = [_layer_row(nm, w, k, n, layer_seconds) for nm, w in layers if w.shape[1] % n == 0]
            result["real"][family][f"{k}:{n}"] = {"summary": _summary(rows), "layers": rows}
            s = _summary(rows)
            print(
                f"{family} {k}:{n}: {s['layers']} layers, kept none {s['kept_fraction_none']:.4f} "
                f"interleave {s['kept_fraction_interleave']:.4f} swap {s['kept_fraction_swap']:.4f}, "
                f"swap {s['mean_seconds_swap']:.2f} s/layer"
            )

    meta["loadavg_end"] = list(os.getloadavg())
    meta["total_seconds"] = time.perf_counter() - start
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "permutation.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "permutation.md").write_text(markdown(result))
    print(f"done in {meta['total_seconds']:.0f} s")


def markdown(result: dict) -> str:
    """README-style tables from a results dict."""
    m = result["meta"]
    lines = [
        "# Channel permutation benchmark",
        "",
        f"{m['date']} · {m['machine']} · torch {m['torch']} · 1 thread · load avg {m['loadavg_start'][0]:.2f}"
        f"→{m['loadavg_end'][0]:.2f} · written by `benchmarks/permutation.py`",
        "",
        "Magnitude kept under the magnitude k:n mask, as a fraction of the layer's total Σ|w| "
        "(real layers: summed over layers).",
        "",
        "| weights | pattern | layers | none | interleave | swap | swap s/layer |",
        "|---|---|---|---|---|---|---|",
    ]
    for family, per in result["real"].items():
        for pat, block in per.items():
            s = block["summary"]
            lines.append(
                f"| {family} | {pat} | {s['layers']} | {s['kept_fraction_none']:.4f} | "
                f"{s['kept_fraction_interleave']:.4f} | {s['kept_fraction_swap']:.4f} | {s['mean_seconds_swap']:.2f} |"
            )
    for pat, r in result["synthetic"].items():
        t = r["total_magnitude"]
        lines.append(
            f"| Student-t 768×3072 | {pat} | 1 | {r['kept_none'] / t:.4f} | {r['kept_interleave'] / t:.4f} | "
            f"{r['kept_swap'] / t:.4f} | {r['seconds_swap']:.2f} |"
        )
    lines += [
        "",
        f"Swap search time-bounded at {m['swap_max_seconds_real_layer']} s per real layer and "
        f"{m['swap_max_seconds_synthetic']} s for the synthetic matrix; layers that hit the bound would keep more "
        "with more time.",
        "",
        "Apex-style reference (exhaustive greedy pairwise swaps, Python loops) on a 64×128 Student-t matrix; "
        "ours is `swap_permutation(window_groups=64)` (one window, no restarts):",
        "",
        "| pattern | kept none | apex-style | ours (swap) | ours/apex kept | apex time | our time | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for pat, r in result["apex_reference"].items():
        lines.append(
            f"| {pat} | {r['kept_none']:.2f} | {r['kept_apex_style']:.2f} | {r['kept_swap']:.2f} | "
            f"{r['kept_ratio_ours_over_apex']:.5f} | {r['seconds_apex_style']:.2f} s | {r['seconds_swap']:.3f} s | "
            f"{r['speedup_apex_time_over_ours']:.0f}× |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
