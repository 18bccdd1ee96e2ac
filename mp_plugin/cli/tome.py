"""``mp-plugin tome``: MACs of a timm ViT dense, with token merging, with k:n Linear layers, and both."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mp_plugin.cli.common import nonneg_int, out_file, positive_int
from mp_plugin.evaluation.models import random_timm_model
from mp_plugin.recover.tome import format_tome_mac_table, tome_mac_table


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``tome`` subcommand."""
    p = sub.add_parser("tome", help="MAC table of a timm ViT with token merging (ToMe) and k:n sparsity")
    p.add_argument("model", nargs="?", default="vit_base_patch16_224", help="timm ViT name (default: %(default)s)")
    p.add_argument("--r", type=nonneg_int, default=8, help="tokens merged per block (default: %(default)s)")
    p.add_argument("--pattern", default="2:4", help="k:n pattern of the Linear layers (default: %(default)s)")
    p.add_argument(
        "--image-size",
        "--img-size",
        dest="img_size",
        type=positive_int,
        default=224,
        help="input side (default: %(default)s)",
    )
    p.add_argument("--json", dest="json_out", type=out_file, help="also write the table as JSON here")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``tome``: print the MAC table (random weights: MACs do not depend on values)."""
    print(f"{args.model}: MACs only; they do not depend on the weights, so the architecture is built with random ones")
    model = random_timm_model(args.model, args.img_size)
    table = tome_mac_table(model, r=args.r, pattern=args.pattern, img_size=args.img_size)
    print(format_tome_mac_table(table))
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1))
        print(f"wrote {path}")
    return 0
