"""Restore speed and memory per layer for ViT-B/16 shapes (issue 12), CPU (and CUDA where present).

For each weight shape (out × in) of ViT-B/16 — 768×768 (attention proj), 3072×768
(fc1), 768×3072 (fc2) — a 2:4 mask is restored against calibration rows with
realistic correlation (X = Z·A, 4096 rows). Each solver runs in a fresh
subprocess so its peak RSS is its own; reported: seconds for the Gram product,
the solve, and the peak RSS above the process's RSS before the layer was built,
against the layer's own weight bytes (float32) and d×d float64 matrix bytes.

Usage::

    python benchmarks/restore_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

SHAPES = ((768, 768), (3072, 768), (768, 3072))
SOLVERS = ("direct", "cg", "obs", "sparsegpt-select")


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def one(rows: int, d: int, solver: str, device: str, threads: int) -> dict:
    """Measure one (shape, solver) in this process."""
    import torch

    from mp_plugin.masks.select import nm_mask
    from mp_plugin.restore.solve import damped, obs_sweep, relative_error, restore_cg, restore_direct

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    base = _rss_kib()
    x = (torch.randn(4096, d, generator=g) @ (torch.randn(d, d, generator=g) / d**0.5)).to(device)
    w = (torch.randn(rows, d, generator=g) * 0.02).to(device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    h0 = (x.T @ x).double()
    sync()
    t_gram = time.perf_counter() - t0
    del x
    w64 = w.double()
    h, _ = damped(h0, 0.01)
    mask = nm_mask(w64, 2, 4)
    t0 = time.perf_counter()
    if solver == "direct":
        out = restore_direct(w64, mask, h)
    elif solver == "cg":
        out = restore_cg(w64, mask, h, tol=1e-3)[0]
    elif solver == "obs":
        out = obs_sweep(w64, h, mask=mask)[0]
    else:
        out, mask = obs_sweep(w64, h, select=(2, 4))
    sync()
    t_solve = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB
    return {
        "shape": [rows, d],
        "solver": solver,
        "device": device,
        "gram_seconds": t_gram,
        "solve_seconds": t_solve,
        "rel_error_after": relative_error(w64, out, h0),
        "rel_error_masked": relative_error(w64, w64 * mask, h0),
        "peak_rss_above_start_mib": (peak - base) / 1024,
        "weights_mib": rows * d * 4 / 2**20,
        "dxd_float64_mib": d * d * 8 / 2**20,
        "calibration_rows_mib": 4096 * d * 4 / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    """Run every shape × solver in its own subprocess and write benchmarks/results/restore_speed.json."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=4, metavar=("ROWS", "D", "SOLVER", "DEVICE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(one(int(args.one[0]), int(args.one[1]), args.one[2], args.one[3], args.threads)))
        return
    import torch

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    results = []
    for device in devices:
        for rows, d in SHAPES:
            for solver in SOLVERS:
                load = os.getloadavg()[0]
                cmd = [
                    sys.executable,
                    __file__,
                    "--threads",
                    str(args.threads),
                    "--one",
                    str(rows),
                    str(d),
                    solver,
                    device,
                ]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                rec = json.loads(out.stdout.strip().splitlines()[-1])
                rec["loadavg_1min_before"] = load
                results.append(rec)
                print(
                    f"{device} {rows}×{d} {solver:<16} gram {rec['gram_seconds']:.2f}s solve {rec['solve_seconds']:.2f}s "
                    f"err {rec['rel_error_masked']:.4f}→{rec['rel_error_after']:.4f} "
                    f"peak +{rec['peak_rss_above_start_mib']:.0f} MiB (load {load:.1f})",
                    flush=True,
                )
    path = write_result(
        "restore_speed",
        {
            "threads": args.threads,
            "calibration_rows": 4096,
            "pattern": "2:4",
            "rows": results,
            "loadavg_end": list(os.getloadavg()),
            "note": "CPU only on this machine (no GPU lent); peak RSS includes the 4096-row calibration matrix",
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
