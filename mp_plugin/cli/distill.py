"""``mp-plugin distill``: distil the dense teacher into a pruned checkpoint, masks kept exact.

Reads the pruned weights (``--checkpoint``, e.g. ``model.safetensors`` from
``mp-plugin prune``) and its ``--plan``, builds train/val loaders from an
ImageFolder/ImageNet-layout ``--data`` directory with timm's transforms, and runs
:func:`mp_plugin.recover.distill.distill`. The teacher is the dense model: the named
model's shipped or timm pretrained weights, or ``--teacher-checkpoint``; never random. With ``--nproc N > 1`` the
command re-launches itself under ``torchrun`` (DDP; NCCL on GPUs, gloo on CPU).
Writes ``OUT/model.safetensors``, ``OUT/plan.json``, ``OUT/last.pt`` (resumable)
and ``OUT/distill.json`` (history and validation metrics) from rank 0.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from mp_plugin.cli.common import (
    add_input_size_arg,
    device_name,
    nonneg_float,
    nonneg_int,
    out_dir,
    positive_float,
    positive_int,
    strict_json,
)
from mp_plugin.errors import MPPluginError

_PASS_THROUGH = (
    "checkpoint",
    "plan",
    "data",
    "num_classes",
    "teacher_checkpoint",
    "family",
    "epochs",
    "max_steps",
    "lr",
    "batch_size",
    "optimizer",
    "weight_decay",
    "warmup_steps",
    "alpha",
    "tau",
    "label_smoothing",
    "grad_clip",
    "tome_r",
    "input_size",
    "workers",
    "threads",
    "device",
    "out",
    "resume",
    "seed",
    "log_every",
    "checkpoint_every",
)
_FLAGS = ("bf16", "no_aug", "no_progress", "tome_teacher")


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``distill`` subcommand."""
    p = sub.add_parser("distill", help="distil the dense teacher into a pruned model (masks kept exact)")
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        help="architecture: built-in or timm name (omit when the checkpoint is a saved module)",
    )
    p.add_argument("--checkpoint", required=True, help="pruned weights (.safetensors/.pt) from `mp-plugin prune`")
    p.add_argument("--plan", help="plan.json of the pruned checkpoint (masks are read from its layers)")
    p.add_argument("--data", required=True, help="ImageFolder dir: DIR/train + DIR/val, or DIR/<class>/*")
    p.add_argument("--num-classes", type=positive_int, default=None, help="classifier size for timm models")
    p.add_argument(
        "--teacher-checkpoint",
        help="dense teacher weights (default: the built-in's shipped or timm's pretrained weights; never random)",
    )
    p.add_argument("--teacher-pretrained", action="store_true", help=argparse.SUPPRESS)  # the default now
    p.add_argument("--family", choices=("vit", "convnext", "resnet"), help="recipe defaults from the spec table")
    p.add_argument("--epochs", type=positive_int, default=None, help="epochs (default 3)")
    p.add_argument("--max-steps", type=positive_int, default=None, help="stop after this many optimiser steps")
    p.add_argument("--lr", type=positive_float, default=None, help="peak learning rate")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per step per process")
    p.add_argument("--optimizer", choices=("adamw", "sgd"), default=None)
    p.add_argument("--weight-decay", type=nonneg_float, default=None)
    p.add_argument("--warmup-steps", type=nonneg_int, default=None)
    p.add_argument("--alpha", type=float, default=None, help="KD weight α (default 0.5; 1 = labels unused)")
    p.add_argument("--tau", type=positive_float, default=None, help="temperature τ (default 2)")
    p.add_argument("--label-smoothing", type=float, default=None, help="ε (default 0.1)")
    p.add_argument("--grad-clip", type=positive_float, default=None)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast")
    p.add_argument(
        "--tome-r",
        type=nonneg_int,
        default=0,
        help="ToMe: the student merges r tokens per block (timm ViTs; 0 = off); the teacher stays unmerged",
    )
    p.add_argument(
        "--tome-teacher",
        action="store_true",
        help="with --tome-r: the teacher merges tokens too (faster; the target is then the merged teacher)",
    )
    add_input_size_arg(p)
    p.add_argument("--no-aug", action="store_true", help="no RandAugment/RandomErasing/flip")
    p.add_argument("--workers", type=nonneg_int, default=0, help="DataLoader workers")
    p.add_argument("--nproc", type=positive_int, default=1, help="processes (GPUs); > 1 re-launches under torchrun")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads per process")
    p.add_argument(
        "--device", type=device_name, default=None, help="cpu | cuda | cuda:N (default: cuda when available)"
    )
    p.add_argument("--resume", help="resume from a checkpoint (last.pt) of the same plan")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=positive_int, default=None)
    p.add_argument(
        "--checkpoint-every",
        type=nonneg_int,
        default=None,
        help="also write OUT/last.pt every this many steps, so a crashed run can --resume (default: at the end only)",
    )
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    p.add_argument(
        "--out", type=out_dir, default="mp-plugin-out/distill", help="output directory (default: %(default)s)"
    )
    p.set_defaults(func=run)


def _argv(args: argparse.Namespace) -> list[str]:
    """The command line of ``args`` (without ``--nproc``), for the torchrun re-launch."""
    out = ["distill", *([args.model] if args.model else [])]
    for key in _PASS_THROUGH:
        value = getattr(args, key, None)
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    out += [f"--{key.replace('_', '-')}" for key in _FLAGS if getattr(args, key, False)]
    return out


def _relaunch(args: argparse.Namespace) -> int:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(args.nproc),
        "-m",
        "mp_plugin.cli.main",
        *_argv(args),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(args.threads or 1))
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd, env=env)


def _config(args: argparse.Namespace):
    from mp_plugin.recover.distill import DistillConfig

    fields = {
        "epochs": args.epochs,
        "max_steps": args.max_steps,
        "lr": args.lr,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "weight_decay": args.weight_decay,
        "warmup_steps": args.warmup_steps,
        "alpha": args.alpha,
        "tau": args.tau,
        "label_smoothing": args.label_smoothing,
        "grad_clip": args.grad_clip,
        "log_every": args.log_every,
        "checkpoint_every": args.checkpoint_every,
    }
    given = {k: v for k, v in fields.items() if v is not None}
    given.update(bf16=args.bf16, seed=args.seed, num_workers=args.workers)
    return DistillConfig.for_family(args.family, **given) if args.family else DistillConfig(**given)


def _patch_tome(model: torch.nn.Module, r: int) -> None:
    from mp_plugin.recover.tome import apply_patch

    apply_patch(model, r=r)


def run(args: argparse.Namespace) -> int:
    """Run ``distill`` (or re-launch it under torchrun when ``--nproc`` > 1)."""
    if args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        return _relaunch(args)
    from mp_plugin.evaluation.model_source import load_named_model
    from mp_plugin.evaluation.models import load_model, save_pruned_checkpoint
    from mp_plugin.integrations.timm import make_loaders
    from mp_plugin.planning.build import PrunePlan
    from mp_plugin.recover.distill import DataConfig, distill, init_distributed

    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(device=args.device)
    try:
        if not Path(args.checkpoint).exists():
            raise MPPluginError(f"checkpoint {args.checkpoint} does not exist")
        student = load_model(args.model, checkpoint=args.checkpoint, num_classes=args.num_classes)
        if not args.teacher_checkpoint and not args.model:
            raise MPPluginError("give the model name (its pretrained weights are the teacher) or --teacher-checkpoint")
        teacher = load_named_model(
            args.model, args.teacher_checkpoint, args.num_classes, checkpoint_flag="--teacher-checkpoint"
        )
        pruning_plan = PrunePlan.load(args.plan) if args.plan else None
        if args.tome_teacher and not args.tome_r:
            raise MPPluginError("--tome-teacher needs --tome-r (tokens merged per block)")
        if args.tome_r:
            _patch_tome(student, args.tome_r)
            if args.tome_teacher:
                _patch_tome(teacher, args.tome_r)
        config = _config(args)
        size = (3, args.input_size, args.input_size) if args.input_size else None
        loaders = make_loaders(
            args.data,
            student,
            config.batch_size,
            DataConfig(input_size=size, no_aug=args.no_aug, num_workers=args.workers),
            dist=ctx,
        )
        out = Path(args.out)
        result = distill(
            student,
            teacher,
            loaders.train,
            config,
            val_loader=loaders.val,
            plan=pruning_plan,
            checkpoint_dir=out,
            resume=args.resume,
            dist=ctx,
            device=ctx.device,
            show_progress=not args.no_progress,
            log=print,
        )
        if ctx.is_main:
            save_pruned_checkpoint(student, out, result.plan)
            summary = {
                "steps": result.steps,
                "first_loss": result.first_loss,
                "last_loss": result.last_loss,
                "sparsity_before": result.sparsity_before,
                "sparsity_after": result.sparsity_after,
                "val": result.val,
                "world_size": ctx.world_size,
                "config": config.to_dict(),
                "history": result.history,
            }
            (out / "distill.json").write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False))
            print(
                f"distilled {result.steps} steps on {ctx.world_size} process(es): loss {result.first_loss:.4f} → "
                f"{result.last_loss:.4f}, sparsity {result.sparsity_after:.4f} (unchanged); wrote {out}"
            )
    finally:
        if ctx.enabled:
            torch.distributed.destroy_process_group()
    return 0
