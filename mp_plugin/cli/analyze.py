"""``mp-plugin analyze``: fit MP to every layer, plan budgets, print the table, write plan.json and plots."""

from __future__ import annotations

import argparse
from pathlib import Path

from mp_plugin.cli.common import add_model_args, add_plan_args, model_from_args, nonneg_int, out_dir, plan_from_args
from mp_plugin.integrations.plotting import plot_plan


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``analyze`` subcommand."""
    p = sub.add_parser("analyze", help="fit MP spectra and plan per-layer budgets (no pruning)")
    add_model_args(p)
    add_plan_args(p)
    p.add_argument(
        "--out", type=out_dir, default="mp-plugin-out/analyze", help="output directory (default: %(default)s)"
    )
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.add_argument("--max-rows", type=nonneg_int, default=None, help="print at most this many table rows")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run ``analyze``."""
    model = model_from_args(args)
    result = plan_from_args(args, model)
    print(result.to_table(max_rows=args.max_rows))
    out = Path(args.out)
    path = result.save(out / "plan.json")
    print(f"wrote {path}")
    if not args.no_plots:
        for fig in plot_plan(result, out):
            print(f"wrote {fig}")
    return 0
