"""``mp-plugin demo``: the main job on the built-in default (or any model and ImageFolder)."""

from __future__ import annotations

import argparse

from ..pipeline import MainJobConfig, run_main_job


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="analyse, prune with MP and magnitude, evaluate, certify and export (offline default: EfficientNet-Lite0)",
    )
    p.add_argument("model", nargs="?", default="efficientnet_lite0", help="built-in or timm model name")
    p.add_argument("--checkpoint", help="state_dict or torch.save'd module")
    p.add_argument("--data", help="ImageFolder directory (default: built-in real photographs)")
    p.add_argument("--n-eval", type=int, default=96)
    p.add_argument("--n-calib", type=int, default=32)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--out", default="mp-plugin-out")
    p.add_argument("--no-certify", action="store_true")
    p.add_argument("--no-export", action="store_true")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the main job."""
    cfg = MainJobConfig(
        model=args.model,
        checkpoint=args.checkpoint,
        data=args.data,
        n_eval=args.n_eval,
        n_calib=args.n_calib,
        image_size=args.image_size,
        sparsity=args.sparsity,
        out=args.out,
        certify=not args.no_certify,
        export=not args.no_export,
        plots=not args.no_plots,
        threads=args.threads,
    )
    run_main_job(cfg)
    return 0
