"""``mp-plugin prune``: plan, prune, and write the pruned checkpoint with its plan.

Writes ``OUT/model.safetensors`` (the dense-with-zeros state_dict, loadable with
``load_model(NAME, checkpoint=...)``) and ``OUT/plan.json`` (the plan with what
``apply`` did), and prints the sparsity report.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from mp_plugin.budget.mix import CALIBRATED_MIX_RULES
from mp_plugin.cli.common import (
    add_model_args,
    add_plan_args,
    model_from_args,
    nonneg_float,
    nonneg_int,
    out_dir,
    plan_from_args,
    positive_int,
)
from mp_plugin.errors import ConfigError, MPPluginError
from mp_plugin.evaluation.models import save_pruned_checkpoint
from mp_plugin.evaluation.photos import image_folder_batch
from mp_plugin.planning.build import PrunePlan, uses_mix
from mp_plugin.pruning.apply_plan import MASK_METHODS, apply, default_projection, sparsity_report
from mp_plugin.restore import RestoreConfig


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``prune`` subcommand."""
    p = sub.add_parser("prune", help="prune a model to a plan and write safetensors + plan.json")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument(
        "--projection",
        choices=MASK_METHODS,
        default=None,
        help="k:n projection (default: cast-obs with --restore, else magnitude)",
    )
    p.add_argument("--prior-alpha", type=nonneg_float, default=0.0, help="CAST Hamming prior weight α (default: 0)")
    p.add_argument("--permute", choices=("none", "swap", "interleave"), default="none", help="k:n channel permutation")
    p.add_argument(
        "--data",
        "--calib-images",
        dest="data",
        help="calibration images: an image folder (ImageNet normalisation) or builtin-photos",
    )
    p.add_argument(
        "--n-calib",
        "--calib-count",
        dest="n_calib",
        type=positive_int,
        default=16,
        help="calibration images (default: 16)",
    )
    p.add_argument(
        "--image-size", type=positive_int, default=224, help="calibration image side in pixels (default: 224)"
    )
    p.add_argument("--out", type=out_dir, default="mp-plugin-out/prune", help="output directory (default: %(default)s)")
    p.add_argument("--max-rows", type=nonneg_int, default=40, help="print at most this many report rows")
    p.add_argument(
        "--restore",
        action="store_true",
        help="re-solve the kept weights on the calibration data after masking (prune–restore; needs --data)",
    )
    p.add_argument(
        "--restore-sequential",
        action="store_true",
        help="restore block by block, each block's inputs from the model already pruned and restored",
    )
    p.add_argument(
        "--restore-damp", type=nonneg_float, default=0.01, help="restore damping, × mean diag H (default: 0.01)"
    )
    # projection-stage options go above this line
    p.set_defaults(func=run)


def calibration_from_args(args: argparse.Namespace) -> torch.Tensor | None:
    """The calibration batch of ``--data`` (None without it), ``--n-calib`` images at ``--image-size``."""
    if not args.data:
        return None
    if args.data == "builtin-photos":
        from mp_plugin.evaluation.photos import builtin_photo_crops

        return builtin_photo_crops(args.n_calib, size=args.image_size)
    if not Path(args.data).is_dir():
        raise MPPluginError(f"--data must be an image folder or builtin-photos, got {args.data!r}")
    return image_folder_batch(args.data, args.n_calib, args.image_size)[0]


def mix_summary(plan: PrunePlan) -> str | None:
    """One line on the dense/2:4 mix: how many layers took 2:4 and which rule chose them (None: no mix)."""
    if not uses_mix(plan.pattern, plan.config, plan.sparsity):
        return None
    patterns = [lp.pattern for lp in plan.layers]
    removed = sum(lp.sparsity * lp.numel for lp in plan.layers) / max(1, sum(lp.numel for lp in plan.layers))
    rule = plan.config.mix_rule
    how = " (each layer's 2:4 damage measured on the calibration images)" if rule in CALIBRATED_MIX_RULES else ""
    return (
        f"dense/2:4 mix: {patterns.count('2:4')} of {len(patterns)} layers take 2:4 ({removed:.1%} of the target "
        f"weights removed), chosen by mix rule {rule!r}{how}"
    )


def run(args: argparse.Namespace) -> int:
    """Run ``prune``."""
    for name in ("model.safetensors", "plan.json"):  # before the work, not after it
        if (Path(args.out) / name).is_dir():
            raise ConfigError(f"--out {args.out}: {name} there is a directory")
    model = model_from_args(args)
    calibration = calibration_from_args(args)
    restore = None
    if args.restore or args.restore_sequential:
        if calibration is None:
            raise MPPluginError("--restore needs calibration images: --data DIR or --data builtin-photos")
        restore = RestoreConfig(damp=args.restore_damp, sequential=args.restore_sequential)
    projection = args.projection or default_projection(restore)
    if calibration is None and projection != "magnitude":
        raise MPPluginError(f"--projection {projection} needs calibration images: --data DIR or --data builtin-photos")
    if args.prior_alpha and projection != "cast":
        raise MPPluginError(f"--prior-alpha is CAST's Hamming prior: it needs --projection cast (got {projection})")
    result = plan_from_args(args, model, calibration)
    apply(
        model,
        result,
        calibration=calibration,
        projection=projection,
        prior_alpha=args.prior_alpha,
        show_progress=True,
        permute=args.permute,
        restore=restore,
    )
    out = Path(args.out)
    save_pruned_checkpoint(model, out, result)
    print(sparsity_report(model, result).to_table(max_rows=args.max_rows))
    if restore is not None:
        print(result.restore_table(max_rows=args.max_rows))
    summary = mix_summary(result)
    if summary is not None:
        print(summary)
    print(f"wrote {out / 'model.safetensors'} and {out / 'plan.json'}")
    return 0
