"""Arguments and helpers shared by several subcommands.

Every command takes the model as its first positional argument (a built-in name or
a timm name), ``--checkpoint FILE`` and ``--num-classes N`` wherever weights are read,
``--random-init`` to use random weights on purpose, and ``--threads``. Weights are
never silently random: see :func:`mp_plugin.evaluation.model_source.load_named_model`.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from pathlib import Path

import torch
from torch import nn

from mp_plugin.budget.mix import CALIBRATED_MIX_RULES, DEFAULT_MIX_RULE, mix_rules
from mp_plugin.budget.rules import BUDGET_METHODS, DEFAULT_BUDGET, DEFAULT_RESTORE_BUDGET, default_budget
from mp_plugin.errors import MPPluginError
from mp_plugin.evaluation.model_source import load_named_model, weights_description

MODEL_HELP = "built-in name (efficientnet_lite0, minilm, fmnist_cnn, …) or a timm model name"


def add_model_arg(parser: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
    """Add the positional ``model`` (optional when ``default`` is not None)."""
    if default is None:
        parser.add_argument("model", help=MODEL_HELP)
    else:
        parser.add_argument("model", nargs="?", default=default, help=f"{MODEL_HELP} (default: %(default)s)")


def add_weights_args(
    parser: argparse.ArgumentParser,
    checkpoint_help: str = "weights: a state_dict (.pt/.pth/.safetensors) or a torch.save'd module",
    random_init: bool = True,
) -> None:
    """Add ``--checkpoint``, ``--num-classes`` and (optionally) ``--random-init``."""
    parser.add_argument("--checkpoint", help=checkpoint_help)
    parser.add_argument("--num-classes", type=positive_int, default=None, help="classifier size for timm models")
    if random_init:
        parser.add_argument(
            "--random-init",
            action="store_true",
            help="timm names: use random weights on purpose (default: timm's pretrained weights, else an error)",
        )


def _number(kind: type, low: float, inclusive: bool, what: str):  # noqa: ANN202 - an argparse type
    def parse(text: str):  # noqa: ANN202
        try:
            value = kind(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from exc
        if not math.isfinite(value) or (value < low if inclusive else value <= low):  # NaN and ±inf refused
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value

    return parse


positive_int = _number(int, 1, True, "an integer ≥ 1")
nonneg_int = _number(int, 0, True, "an integer ≥ 0")
positive_float = _number(float, 0.0, False, "a number > 0")
nonneg_float = _number(float, 0.0, True, "a number ≥ 0")


def strict_json(value: object) -> object:
    """``value`` with every NaN/±Inf float (e.g. the loss of a run that took no step) as None: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def _writable_parent(path: Path, text: str) -> None:
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise argparse.ArgumentTypeError(f"{text}: {parent} is a file, not a directory")
            if not os.access(parent, os.W_OK):
                raise argparse.ArgumentTypeError(f"{text}: {parent} is not writable")
            return


def _output(text: str, want_dir: bool) -> str:
    path = Path(text)
    wrong = path.exists() and path.is_dir() != want_dir
    if wrong:
        raise argparse.ArgumentTypeError(
            f"{text} is an existing file, not a directory" if want_dir else f"{text} is a directory: give a file name"
        )
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"{text} is not writable")
    _writable_parent(path, text)
    return text


def out_file(text: str) -> str:
    """An argparse type for a file to write: not a directory, under a writable directory (checked before any work)."""
    return _output(text, want_dir=False)


def out_dir(text: str) -> str:
    """An argparse type for an output directory: not an existing file, creatable and writable."""
    return _output(text, want_dir=True)


def device_name(text: str) -> str:
    """An argparse type for a torch device: ``cpu``, ``cuda``, ``cuda:N`` or ``mps``."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", text):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or mps, got {text!r}")
    return text


def add_input_size_arg(parser: argparse.ArgumentParser) -> None:
    """``--image-size``/``--input-size`` (``args.input_size``, pixels): None keeps the model's own input side."""
    parser.add_argument(
        "--image-size",
        "--input-size",
        dest="input_size",
        type=positive_int,
        default=None,
        help="input side (default: the model's)",
    )


def add_threads_arg(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads``."""
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)"
    )


def add_model_args(parser: argparse.ArgumentParser, default: str | None = "efficientnet_lite0") -> None:
    """Add ``model`` (positional), ``--checkpoint``, ``--num-classes``, ``--random-init``, ``--threads``."""
    add_model_arg(parser, default)
    add_weights_args(parser)
    add_threads_arg(parser)


def set_threads(args: argparse.Namespace) -> None:
    """Apply ``--threads`` when given (a positive integer, else :class:`~mp_plugin.errors.ConfigError`)."""
    threads = getattr(args, "threads", None)
    if threads is None:
        return
    if threads < 1:
        from mp_plugin.errors import ConfigError

        raise ConfigError(f"--threads must be a positive number of CPU threads, got {threads}")
    torch.set_num_threads(threads)


def model_from_args(args: argparse.Namespace, log: bool = True) -> nn.Module:
    """Load the model named by :func:`add_model_args` arguments (never silently random)."""
    set_threads(args)
    random_init = getattr(args, "random_init", False)
    model = load_named_model(args.model, args.checkpoint, args.num_classes, random_init)
    if log:
        print(
            f"loaded {args.model} ({type(model).__name__}): {weights_description(args.model, args.checkpoint, random_init)}"
        )
    return model


def add_plan_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--sparsity``, ``--pattern``, ``--budget`` (old name ``--method``) and layer-selection flags."""
    parser.add_argument("--sparsity", type=float, default=0.5, help="global fraction of weights to remove")
    parser.add_argument("--pattern", default="unstructured", help="unstructured | auto | k:n such as 2:4")
    parser.add_argument(
        "--budget",
        "--method",
        dest="budget",
        default=None,
        help=f"budget method (default {DEFAULT_BUDGET}, or {DEFAULT_RESTORE_BUDGET} with --restore; seb is the "
        "paper's rule; "
        + ", ".join(n for n in BUDGET_METHODS if BUDGET_METHODS[n].needs_calibration)
        + " need --data): "
        + " | ".join(BUDGET_METHODS),
    )
    parser.add_argument(
        "--auto-patterns",
        default=None,
        help="comma-separated candidates of --pattern auto (default dense,12:16,2:4); 'dense,2:4' below "
        "50 %% is the deployable mix: whole layers take 2:4, the rest stay dense",
    )
    parser.add_argument(
        "--mix-rule",
        default=None,
        help=f"how the dense/2:4 mix picks its 2:4 layers (default: measured when prune has --data, else "
        f"{DEFAULT_MIX_RULE}): {' | '.join(mix_rules())}; measured and measured-restore need --data",
    )
    parser.add_argument("--include-head", action="store_true", help="also prune the classifier head")
    parser.add_argument("--include-stem", action="store_true", help="also prune the stem conv (C_in=3)")


def plan_config_from_args(args: argparse.Namespace):
    """A :class:`PlanConfig` from :func:`add_plan_args` arguments."""
    from mp_plugin.layers.discovery import LayerSelection
    from mp_plugin.planning.build import PlanConfig

    sel = LayerSelection(exclude_head=not args.include_head, exclude_stem=not args.include_stem)
    extra = {}
    if getattr(args, "auto_patterns", None) is not None:
        extra["auto_patterns"] = tuple(p.strip() for p in args.auto_patterns.split(",") if p.strip())
    if getattr(args, "mix_rule", None):
        extra["mix_rule"] = args.mix_rule
    return PlanConfig(selection=sel, **extra)


def plan_from_args(args: argparse.Namespace, model, calibration=None):
    """``mp_plugin.plan`` for ``model`` with the :func:`add_plan_args` settings, with a progress bar.

    ``calibration`` (a batch) is what a calibrated mix rule (``--mix-rule measured``) measures on.
    """
    from mp_plugin.planning.build import plan

    budget = args.budget or default_budget(
        getattr(args, "restore", False) or getattr(args, "restore_sequential", False)
    )
    spec = BUDGET_METHODS.get(budget)
    if spec is not None and spec.needs_calibration and calibration is None:
        raise MPPluginError(
            f"--budget {budget} needs calibration images: run 'prune' with --data DIR or --data builtin-photos"
        )
    rule = getattr(args, "mix_rule", None)
    if rule in CALIBRATED_MIX_RULES and calibration is None:
        raise MPPluginError(
            f"--mix-rule {rule} measures each layer on calibration images: "
            "run 'prune' with --data DIR or --data builtin-photos"
        )
    result = plan(
        model,
        sparsity=args.sparsity,
        pattern=args.pattern,
        budget=budget,
        config=plan_config_from_args(args),
        model_name=args.model or str(args.checkpoint),
        show_progress=True,
        calibration=calibration,
    )
    if ":" in str(args.pattern) and all(lp.pattern == "dense" for lp in result.layers):
        widths = sorted({int(lp.shape[1]) for lp in result.layers})
        raise MPPluginError(
            f"no target layer can take {args.pattern}: its groups run along each layer's input, and the input "
            f"widths here ({widths[:6]}{' …' if len(widths) > 6 else ''}) are not multiples of its n"
        )
    return result
