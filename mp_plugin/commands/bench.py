"""``mp-plugin bench``: dense vs 2:4 semi-structured speed on CUDA, MACs only on CPU."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..bench import BACKENDS, run_benchmark


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = sub.add_parser("bench", help="time dense vs 2:4 sparse (CUDA) or count MACs (CPU)")
    p.add_argument("--model", default="vit_base_patch16_224", help="timm model name (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--dtype", nargs="+", choices=("fp16", "bf16"), default=["fp16", "bf16"])
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--iters", type=int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--no-linear", action="store_true", help="skip the per-GEMM measurements")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the whole-model measurements")
    p.add_argument("--out", help="write the JSON here (default: print it)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``bench``."""
    result = run_benchmark(
        args.model,
        args.batch,
        tuple(args.dtype),
        tuple(args.backend),
        linear=not args.no_linear,
        end_to_end=not args.no_end_to_end,
        warmup=args.warmup,
        iters=args.iters,
    )
    if result["timings"] is None:
        print(result["note"])
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0
