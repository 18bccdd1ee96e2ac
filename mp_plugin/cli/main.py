"""The ``mp-plugin`` command line.

Each subcommand lives in ``mp_plugin/cli/<name>.py`` and exposes
``register(subparsers)`` that adds its parser and sets ``func``. This file only
collects them, so commands stay small and independent. Every command module is
imported: one that fails to import is an error, not a missing command.

Every failure ends with one line on stderr (``mp-plugin <cmd>: error: …``) and a
non-zero exit code: 2 for errors mp_plugin raises on purpose (bad input, missing
file, unknown model, …) and for a path the operating system refuses, 1 for anything
else, 130 on Ctrl-C. ``--debug`` (anywhere on the command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from importlib import import_module

from mp_plugin.errors import MPPluginError

COMMAND_MODULES = ("analyze", "prune", "certify", "export", "bench", "distill", "demo", "tome")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="mp-plugin",
        description="Marchenko–Pastur pruning for PyTorch models",
        epilog="Every command takes the model as its first argument. --debug (anywhere) shows tracebacks.",
    )
    parser.add_argument("--debug", action="store_true", help="show the Python traceback of an error")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        import_module(f"mp_plugin.cli.{name}").register(sub)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mp-plugin`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"mp-plugin {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line unless --debug
        if debug:
            traceback.print_exc()
        if isinstance(exc, MPPluginError):
            print(f"mp-plugin {args.command}: error: {_one_line(exc)}", file=sys.stderr)
            return 2
        if isinstance(exc, OSError) and exc.filename is not None:  # a path the user gave cannot be used
            print(f"mp-plugin {args.command}: error: cannot use {exc.filename}: {exc.strerror}", file=sys.stderr)
            return 2
        hint = "" if debug else " (run with --debug for the traceback)"
        print(f"mp-plugin {args.command}: error: {type(exc).__name__}: {_one_line(exc)}{hint}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
