"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse

import torch

from ..models import load_model


def add_model_args(parser: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
    """Add ``model`` (positional, optional), ``--checkpoint``, ``--num-classes``, ``--threads``."""
    parser.add_argument(
        "model",
        nargs="?",
        default=default,
        help="built-in name (efficientnet_lite0, minilm) or a timm model name (default: %(default)s)",
    )
    parser.add_argument("--checkpoint", help="state_dict (.pt/.pth/.safetensors) or a torch.save'd module")
    parser.add_argument("--num-classes", type=int, default=None, help="classifier size for timm models")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def model_from_args(args: argparse.Namespace):
    """Load the model named by :func:`add_model_args` arguments."""
    if args.threads:
        torch.set_num_threads(args.threads)
    return load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--sparsity``, ``--pattern``, ``--method`` and layer-selection flags."""
    parser.add_argument("--sparsity", type=float, default=0.5, help="global fraction of weights to remove")
    parser.add_argument("--pattern", default="unstructured", help="unstructured | auto | k:n such as 2:4")
    parser.add_argument("--method", default="seb", help="seb | seb-hill | magnitude | uniform")
    parser.add_argument("--include-head", action="store_true", help="also prune the classifier head")
    parser.add_argument("--include-stem", action="store_true", help="also prune the stem conv (C_in=3)")


def plan_config_from_args(args: argparse.Namespace):
    """A :class:`PlanConfig` from :func:`add_plan_args` arguments."""
    from ..layers import LayerSelection
    from ..planning import PlanConfig

    sel = LayerSelection(exclude_head=not args.include_head, exclude_stem=not args.include_stem)
    return PlanConfig(selection=sel)


def plan_from_args(args: argparse.Namespace, model):
    """``mp_plugin.plan`` for ``model`` with the :func:`add_plan_args` settings, with a progress bar."""
    from ..planning import plan

    return plan(
        model,
        sparsity=args.sparsity,
        pattern=args.pattern,
        method=args.method,
        config=plan_config_from_args(args),
        model_name=args.model or str(args.checkpoint),
        show_progress=True,
    )
