"""``mp-plugin bench``: time the given model dense vs 2:4 semi-structured on CUDA; MACs only on CPU.

``mp-plugin bench MODEL --checkpoint model.safetensors --plan plan.json`` times the
pruned checkpoint from ``mp-plugin prune``: its plan's 2:4 Linear layers run as
semi-structured tensors (the weights are not changed). ``--synthetic`` instead times
a randomly initialised timm architecture magnitude-pruned to 2:4 (a kernel-speed
reference, labelled as such in the JSON).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mp_plugin.cli.common import (
    add_input_size_arg,
    add_model_arg,
    add_threads_arg,
    add_weights_args,
    model_from_args,
    nonneg_int,
    out_file,
    positive_int,
    set_threads,
)
from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.latency import BACKENDS, run_benchmark


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``bench`` subcommand."""
    p = sub.add_parser("bench", help="time the given model dense vs 2:4 sparse (CUDA) or count its MACs (CPU)")
    add_model_arg(p, default="vit_base_patch16_224")
    add_weights_args(p, checkpoint_help="the (pruned) weights to time, e.g. model.safetensors from `mp-plugin prune`")
    p.add_argument("--plan", help="plan.json of the checkpoint: its 2:4 layers run semi-structured")
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="time a random-init timm architecture magnitude-pruned to 2:4 (kernel reference) instead",
    )
    add_input_size_arg(p)
    p.add_argument("--batch", type=positive_int, default=256)
    p.add_argument("--dtype", nargs="+", choices=("fp16", "bf16"), default=["fp16", "bf16"])
    p.add_argument("--backend", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--iters", type=positive_int, default=50, help="timed runs per measurement (median reported)")
    p.add_argument("--warmup", type=nonneg_int, default=10)
    p.add_argument("--no-linear", action="store_true", help="skip the per-GEMM (ViT-B/16 shapes) measurements")
    p.add_argument("--no-end-to-end", action="store_true", help="skip the whole-model measurements")
    p.add_argument("--out", type=out_file, help="write the JSON here (default: print it)")
    add_threads_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``bench``."""
    sparse_layers = None
    if args.synthetic:
        if args.checkpoint or args.plan:
            raise MPPluginError("--synthetic times random weights: drop --checkpoint/--plan, or drop --synthetic")
        set_threads(args)
        model = args.model
        print(f"timing {args.model}: SYNTHETIC (random init, magnitude 2:4)")
    else:
        model = model_from_args(args)
        if args.plan:
            from mp_plugin.planning.build import PrunePlan

            the_plan = PrunePlan.load(args.plan)
            the_plan.check_model(model)
            sparse_layers = [lp.name for lp in the_plan.layers if lp.pattern == "2:4"]
            print(f"{len(sparse_layers)} layers of {args.plan} are 2:4")
    size = (3, args.input_size, args.input_size) if args.input_size else None
    result = run_benchmark(
        model,
        args.batch,
        tuple(args.dtype),
        tuple(args.backend),
        linear=not args.no_linear,
        end_to_end=not args.no_end_to_end,
        warmup=args.warmup,
        iters=args.iters,
        sparse_layers=sparse_layers,
        input_size=size,
        show_progress=True,
    )
    result["model"] = {
        "name": args.model,
        "checkpoint": args.checkpoint,
        "plan": args.plan,
        "synthetic": args.synthetic,
    }
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
