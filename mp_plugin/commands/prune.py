"""``mp-plugin prune``: plan, prune, and write the pruned checkpoint with its plan.

Writes ``OUT/model.safetensors`` (the dense-with-zeros state_dict, loadable with
``load_model(NAME, checkpoint=...)``) and ``OUT/plan.json`` (the plan with what
``apply`` did), and prints the sparsity report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import MPPluginError
from ..models import save_pruned_checkpoint
from ..photos import image_folder_batch
from ..pruning import MASK_METHODS, apply, sparsity_report
from .common import add_model_args, add_plan_args, model_from_args, plan_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` subcommand."""
    p = sub.add_parser("prune", help="prune a model to a plan and write safetensors + plan.json")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument(
        "--projection", choices=MASK_METHODS, default="magnitude", help="k:n projection (default: magnitude)"
    )
    p.add_argument("--prior-alpha", type=float, default=0.0, help="CAST Hamming prior weight α (default: 0)")
    p.add_argument("--permute", choices=("none", "swap", "interleave"), default="none", help="k:n channel permutation")
    p.add_argument("--calib-images", help="folder of images for CAST calibration (ImageNet normalisation)")
    p.add_argument("--calib-count", type=int, default=16, help="number of calibration images (default: 16)")
    p.add_argument("--image-size", type=int, default=224, help="calibration image side in pixels (default: 224)")
    p.add_argument("--out", default="mp-plugin-out/prune", help="output directory (default: %(default)s)")
    p.add_argument("--max-rows", type=int, default=40, help="print at most this many report rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``prune``."""
    model = model_from_args(args)
    calibration = None
    if args.calib_images:
        calibration, _ = image_folder_batch(args.calib_images, args.calib_count, args.image_size)
    elif args.projection == "cast":
        raise MPPluginError("--projection cast needs --calib-images DIR")
    result = plan_from_args(args, model)
    apply(
        model,
        result,
        calibration=calibration,
        method=args.projection,
        prior_alpha=args.prior_alpha,
        show_progress=True,
        permute=args.permute,
    )
    out = Path(args.out)
    save_pruned_checkpoint(model, out, result)
    print(sparsity_report(model, result).to_table(max_rows=args.max_rows))
    print(f"wrote {out / 'model.safetensors'} and {out / 'plan.json'}")
    return 0
