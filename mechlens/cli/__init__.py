"""The ``mechlens`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers)``; adding a command is one line in ``_COMMAND_MODULES``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from mechlens.cli.options import DEBUG, DEBUG_HELP

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
    "mechlens.cli.intervene",
    "mechlens.cli.circuit",
    "mechlens.cli.audit",
    "mechlens.cli.evaluate",
    "mechlens.cli.run",
)


def _add_debug(parser: argparse.ArgumentParser) -> None:
    """``--debug`` (:data:`mechlens.cli.options.DEBUG`) on ``parser`` and on every sub-command
    below it that lacks one."""
    if "--debug" not in parser._option_string_actions:
        DEBUG.add(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_debug(sub)


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="mechlens",
        description="Mechanistic-interpretability toolkit for vision models.",
    )
    # its own dest: a sub-command's "--debug" default (False) cannot overwrite it
    parser.add_argument("--debug", dest="debug_all", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in _COMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    for sub in set(subparsers.choices.values()):
        _add_debug(sub)
    return parser


def _text(error: BaseException) -> str:
    """An exception's message on one line (a KeyError's argument, not its repr)."""
    if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
    else:
        text = str(error)
    return " ".join(text.split())


def error_line(error: BaseException) -> str:
    """``error`` as one line: its message, then ``(cause: Type: text)`` for each chained cause
    whose text the message does not already carry."""
    line = _text(error) or type(error).__name__
    seen = {id(error)}
    cause = error.__cause__
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        text = _text(cause)
        if text and text not in line:
            if len(text) > 300:
                text = text[:297] + "..."
            line += f" (cause: {type(cause).__name__}: {text})"
        elif not text:
            line += f" (cause: {type(cause).__name__})"
        cause = cause.__cause__
    return line


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                      line=None) -> None:
    print(f"mechlens: warning: {message}", file=file or sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``mechlens`` console script; returns the exit code. Errors print as one
    line, ``mechlens COMMAND: error: ...``; ``--debug`` (before or after the command) re-raises
    them with the traceback."""
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            # a warning a user should read is one line in words, once; library noise stays quiet
            warnings.simplefilter("once")
            warnings.showwarning = _one_line_warning
            if not (getattr(args, "debug", False) or getattr(args, "debug_all", False)):
                for noisy in (DeprecationWarning, FutureWarning, RuntimeWarning):
                    warnings.filterwarnings("ignore", category=noisy, module=r"(?!mechlens)")
            return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the CLI turns errors into one readable line
        if getattr(args, "debug", False) or getattr(args, "debug_all", False):
            raise
        print(f"mechlens {args.command}: error: {error_line(error)}", file=sys.stderr)
        return 2
