"""The ``mechlens`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; adding a command is one line in ``_COMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

_COMMAND_MODULES: tuple[str, ...] = (
    "mechlens.cli.store",
    "mechlens.cli.layers",
    "mechlens.cli.attribute",
    "mechlens.cli.sae",
    "mechlens.cli.capture",
    "mechlens.cli.tcav",
    "mechlens.cli.atlas",
    "mechlens.cli.visualize",
    "mechlens.cli.dream",
    "mechlens.cli.run",
)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="mechlens",
        description="Mechanistic-interpretability toolkit for vision models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechlens`` console script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns errors into one readable line
        if getattr(args, "debug", False):
            raise
        print(f"mechlens {args.command}: error: {error}", file=sys.stderr)
        return 2
