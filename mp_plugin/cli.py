"""The ``mp-plugin`` command line.

Each subcommand lives in ``mp_plugin/commands/<name>.py`` and exposes
``register(subparsers)`` that adds its parser and sets ``func``. This file only
collects them, so commands stay small and independent.
"""

from __future__ import annotations

import argparse
import sys
from importlib import import_module

from .errors import MPPluginError

COMMAND_MODULES = ("analyze", "prune", "certify", "export", "bench", "distill", "demo", "tome")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every available subcommand."""
    parser = argparse.ArgumentParser(prog="mp-plugin", description="Marchenko–Pastur pruning for PyTorch models")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        try:
            module = import_module(f"mp_plugin.commands.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"mp_plugin.commands.{name}":
                continue  # command not built yet
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mp-plugin`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except MPPluginError as exc:
        print(f"mp-plugin {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
