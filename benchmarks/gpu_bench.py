"""Every GPU measurement of issue 7 in one call; JSON under $OUT (or --out-dir).

    python benchmarks/gpu_bench.py [--out-dir DIR] [--batch 256] [--iters 50]

Runs the ViT-B/16 Linear GEMMs and the end-to-end vit_base_patch16_224 forward, dense vs
2:4 semi-structured (cuSPARSELt and CUTLASS), fp16 and bf16, plus 2:4 + ToMe r=8 when
``mp_plugin.recover.tome.apply_patch`` exists. On a machine without CUDA it prints why and exits 0
without writing timings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path


def _tome_patch():
    try:
        from mp_plugin.recover.tome import apply_patch  # provided by the token-merging issue, when present
    except ImportError:
        return None
    return lambda model: apply_patch(model, r=8)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write ``gpu-<name>-<date>.json``."""
    import torch

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out-dir", default=os.environ.get("OUT", "benchmarks/results"))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_bench: no CUDA device here; 2:4 semi-structured kernels are CUDA-only, nothing was timed.")
        print("           run `mp-plugin bench` for the CPU MAC counts.")
        return 0
    from mp_plugin.evaluation.latency import run_benchmark

    tome = _tome_patch()
    result = run_benchmark(batch=args.batch, tome=tome, warmup=args.warmup, iters=args.iters)
    result["tome"] = (
        "r=8 via mp_plugin.recover.tome.apply_patch"
        if tome
        else "not measured: mp_plugin.recover.tome.apply_patch not found"
    )
    result["date"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    gpu = re.sub(r"[^A-Za-z0-9]+", "-", result["environment"]["gpu"] or "gpu").strip("-").lower()
    out = Path(args.out_dir) / f"gpu-{gpu}-{result['date'][:10]}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
