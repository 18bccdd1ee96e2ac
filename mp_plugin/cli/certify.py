"""``mp-plugin certify``: certify a pruned checkpoint against its dense model on real data.

The certificate says which images keep their prediction, labelled by what it
claims: *proven* (``--mode bound``: a rigorous bound), *estimated*
(``--mode jacobian``) or *measured* (``--mode empirical``: the realised logit
shift on the same images). The default ``--mode auto`` tries the bound and, where
it cannot run (LayerNorm, GELU, softmax, attention, residual code), says so in one
line and falls back to the measured certificate.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn

from mp_plugin.cli.common import add_model_arg, add_threads_arg, nonneg_float, out_file, positive_int, set_threads
from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.model_source import load_named_model
from mp_plugin.integrations.plotting import plot_certificate
from mp_plugin.planning.plan import PrunePlan


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``certify`` subcommand."""
    p = sub.add_parser("certify", help="which predictions a pruned checkpoint kept: proven, estimated or measured")
    add_model_arg(p, default=None)
    p.add_argument(
        "--checkpoint", "--pruned", dest="checkpoint", required=True, help="pruned weights (.safetensors/.pt)"
    )
    p.add_argument(
        "--dense-checkpoint", help="dense reference weights (default: the built-in's or timm's pretrained weights)"
    )
    p.add_argument(
        "--plan",
        help="plan.json that pruned the checkpoint; its channel permutation aligns the dense model "
        "(default: plan.json beside the checkpoint, when there is one)",
    )
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size for timm models")
    p.add_argument(
        "--data", default="builtin-photos", help="an ImageFolder directory, or builtin-photos (default: %(default)s)"
    )
    p.add_argument(
        "--n-eval",
        "--n-images",
        dest="n_images",
        type=positive_int,
        default=32,
        help="images in the set T (default: %(default)s)",
    )
    p.add_argument("--image-size", type=positive_int, default=224, help="input resolution (default: %(default)s)")
    p.add_argument(
        "--mode",
        choices=("auto", "bound", "jacobian", "empirical"),
        default="auto",
        help="auto: the rigorous bound where it can run, else measured (default: %(default)s)",
    )
    p.add_argument("--sequential", action="store_true", help="prune layers one at a time (bound mode always does)")
    p.add_argument("--lambdas", type=nonneg_float, nargs=2, metavar=("L1", "L2"), help="elastic-net λ₁ λ₂")
    p.add_argument(
        "--out", type=out_file, default="mp-plugin-out/certificate.json", help="report path (default: %(default)s)"
    )
    p.add_argument("--plot", type=out_file, help="also write the margin vs 2η scatter to this PNG")
    add_threads_arg(p)
    p.set_defaults(func=run)


def _data(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor | None]:
    from mp_plugin.evaluation.photos import builtin_photo_crops, image_folder_batch

    if args.data == "builtin-photos":
        return builtin_photo_crops(args.n_images, size=args.image_size), None
    if not Path(args.data).is_dir():
        raise MPPluginError(f"--data must be an image directory or builtin-photos, got {args.data!r}")
    return image_folder_batch(args.data, n=args.n_images, size=args.image_size)


def _check_image_model(model: nn.Module, name: str, x: torch.Tensor) -> None:
    """Refuse, in one line, a model that does not map images to logits (e.g. a text encoder)."""
    try:
        with torch.no_grad():
            out = model(x[:1])
    except Exception as exc:  # noqa: BLE001 - any failure here means "not an image classifier"
        msg = " ".join(str(exc).split())[:160]
        raise MPPluginError(
            f"certify needs an image classifier taking (N, 3, {x.shape[-2]}, {x.shape[-1]}) images; "
            f"{name} failed on one ({type(exc).__name__}: {msg})"
        ) from exc
    if not isinstance(out, torch.Tensor) or out.ndim != 2:
        raise MPPluginError(f"certify needs (N, classes) logits; {name} returned {type(out).__name__}")


def _plan(args: argparse.Namespace) -> PrunePlan | None:
    """The plan given by ``--plan``, else ``plan.json`` beside the checkpoint, else None.

    Raises:
        MPPluginError: the checkpoint was saved with a plan (its safetensors metadata says so) and none is
            found: a permuted model certified against an unaligned dense model would bound another model.
    """
    if args.plan:
        return PrunePlan.load(args.plan)
    beside = Path(args.checkpoint).parent / "plan.json"
    if beside.is_file():
        return PrunePlan.load(beside)
    if _saved_with_plan(Path(args.checkpoint)):
        raise MPPluginError(
            f"{args.checkpoint} was saved with a plan.json that is not beside it: give it with --plan "
            "(a channel-permuted model needs its permutation record to align the dense model)"
        )
    return None


def _saved_with_plan(path: Path) -> bool:
    if path.suffix != ".safetensors":
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            return "mp_plugin_plan" in (f.metadata() or {})
    except Exception:  # noqa: BLE001 - an unreadable file is reported when it is loaded
        return False


def run(args: argparse.Namespace) -> int:
    """Run ``certify``: load both models and the data, certify, print the summary, write JSON."""
    from mp_plugin.certificate import certify_auto

    set_threads(args)
    print(f"[1/3] loading the dense reference and the pruned checkpoint of {args.model}", flush=True)
    if Path(args.checkpoint).is_dir():
        raise MPPluginError(f"checkpoint {args.checkpoint} is a directory: give the file, e.g. model.safetensors")
    if not Path(args.checkpoint).is_file():
        raise MPPluginError(f"checkpoint {args.checkpoint} does not exist")
    dense = load_named_model(args.model, args.dense_checkpoint, args.num_classes, checkpoint_flag="--dense-checkpoint")
    x, labels = _data(args)
    _check_image_model(dense, args.model, x)
    pruned = load_named_model(args.model, args.checkpoint, args.num_classes)
    plan = _plan(args)
    if plan is not None:
        plan.check_model(pruned)  # PlanMismatchError: a plan of another model
    print(f"[2/3] certifying on {len(x)} images (mode {args.mode})", flush=True)
    cert = certify_auto(
        dense,
        pruned,
        x,
        labels,
        mode=args.mode,
        sequential=args.sequential,
        lambdas=args.lambdas,
        show_progress=True,
        plan=plan,
    )
    print("[3/3] result")
    print(cert.summary())
    path = cert.save_json(args.out)
    print(f"wrote {path}")
    if args.plot:
        print(f"wrote {plot_certificate(cert, args.plot)}")
    return 0
