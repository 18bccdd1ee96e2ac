"""``mp-plugin demo``: the main job on the built-in default (or any model and ImageFolder)."""

from __future__ import annotations

import argparse

from mp_plugin.cli.common import add_model_args, out_dir, positive_int
from mp_plugin.evaluation.pipeline import DEFAULT_VARIANTS, MainJobConfig, run_main_job, select_variants, variant_slug


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``demo`` subcommand."""
    p = sub.add_parser(
        "demo",
        help="analyse, prune with MP and magnitude, evaluate, certify and export (offline default: EfficientNet-Lite0)",
    )
    add_model_args(p)
    p.add_argument("--data", help="ImageFolder directory (default: built-in real photographs)")
    p.add_argument("--n-eval", type=positive_int, default=96, help="evaluation images (default: %(default)s)")
    p.add_argument("--n-calib", type=positive_int, default=32, help="calibration images (default: %(default)s)")
    p.add_argument("--image-size", type=positive_int, default=224, help="input side in pixels (default: %(default)s)")
    p.add_argument("--sparsity", type=float, default=0.5, help="global fraction removed (default: %(default)s)")
    p.add_argument("--out", type=out_dir, default="mp-plugin-out", help="output directory (default: %(default)s)")
    p.add_argument(
        "--variants",
        nargs="+",
        metavar="NAME",
        help="run only these pruned variants: " + ", ".join(variant_slug(v) for v in DEFAULT_VARIANTS),
    )
    p.add_argument("--no-certify", action="store_true", help="skip the certificate")
    p.add_argument("--no-export", action="store_true", help="skip the ONNX export")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the main job."""
    cfg = MainJobConfig(
        model=args.model,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        random_init=args.random_init,
        data=args.data,
        n_eval=args.n_eval,
        n_calib=args.n_calib,
        image_size=args.image_size,
        sparsity=args.sparsity,
        variants=select_variants(args.variants),
        out=args.out,
        certify=not args.no_certify,
        export=not args.no_export,
        plots=not args.no_plots,
        threads=args.threads,
    )
    run_main_job(cfg)
    return 0
