"""``mp-plugin certify``: certify a pruned checkpoint against its dense model on real data."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..errors import MPPluginError
from ..models import load_model


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``certify`` subcommand."""
    p = sub.add_parser("certify", help="certify which predictions a pruned checkpoint provably/measurably kept")
    p.add_argument("--model", required=True, help="built-in or timm model name (the architecture)")
    p.add_argument("--dense-checkpoint", help="dense weights (default: the named model's own weights)")
    p.add_argument("--pruned", required=True, help="pruned state_dict (.safetensors or .pt) or saved module")
    p.add_argument(
        "--data", default="builtin-photos", help="an ImageFolder directory, or builtin-photos (default: %(default)s)"
    )
    p.add_argument("--n-images", type=int, default=32, help="images in the calibration set T (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=224, help="input resolution (default: %(default)s)")
    p.add_argument("--mode", choices=("empirical", "jacobian", "bound"), default="empirical")
    p.add_argument("--sequential", action="store_true", help="prune layers one at a time (multi-layer bound)")
    p.add_argument("--lambdas", type=float, nargs=2, metavar=("L1", "L2"), help="elastic-net λ₁ λ₂")
    p.add_argument("--out", default="mp-plugin-out/certificate.json", help="report path (default: %(default)s)")
    p.add_argument("--plot", help="also write the margin vs 2η scatter to this PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    from ..photos import builtin_photo_crops, image_folder_batch

    if args.data == "builtin-photos":
        return builtin_photo_crops(args.n_images, size=args.image_size), None
    if not Path(args.data).is_dir():
        raise MPPluginError(f"--data must be an image directory or builtin-photos, got {args.data!r}")
    return image_folder_batch(args.data, n=args.n_images, size=args.image_size)


def run(args: argparse.Namespace) -> int:
    """Run ``certify``: load both models and the data, certify, print the summary, write JSON."""
    from ..certificate import certify

    if args.threads:
        torch.set_num_threads(args.threads)
    dense = load_model(args.model, checkpoint=args.dense_checkpoint)
    pruned = load_model(args.model, checkpoint=args.pruned)
    x, labels = _data(args)
    cert = certify(dense, pruned, x, labels, mode=args.mode, sequential=args.sequential, lambdas=args.lambdas)
    print(cert.summary())
    path = cert.save_json(args.out)
    print(f"wrote {path}")
    if args.plot:
        print(f"wrote {cert.plot(args.plot)}")
    return 0
