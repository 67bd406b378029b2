"""``mechlens run EXPERIMENT`` and ``mechlens demo``: scripted experiments from ``experiments/``."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run", "run_demo"]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the experiment's reduced configuration (quick.json)")
    parser.add_argument("--config", default=None, help="a config file instead of the experiment's config.json")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override config entries (dotted keys, JSON values), e.g. sae.steps=500")
    options.add_run_options(parser, out={"required": True})


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``run`` and ``demo`` sub-commands."""
    parser = subparsers.add_parser(
        "run", help="run a scripted experiment (a directory with experiment.py)",
        description="Run experiments/NAME (or a directory with experiment.py + config.json); it writes its results "
                    "and config.json (what ran) to the directory --out. Its log lines and progress bars go to stderr.")
    parser.add_argument("experiment", help="experiment directory or name, e.g. experiments/sae_sweep")
    _common(parser)
    parser.set_defaults(handler=run)
    demo = subparsers.add_parser(
        "demo", help="the main job: find the shortcut a model learned (Clever Hans experiment) and build the atlas",
        description="Run experiments/clever_hans: train a small CNN on shapes where squares carry a ruler, then "
                    "capture -> SAEs -> interventions -> shortcut audit -> circuit -> TCAV -> feature visualization -> "
                    "attribution -> atlas -> report, all "
                    "written to the directory --out. Its log lines and progress bars go to stderr.")
    _common(demo)
    demo.set_defaults(handler=run_demo, experiment="clever_hans")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens run``."""
    from activation_store.jsonutil import dumps as json_dumps
    from mechlens.experiments import run_experiment

    result = run_experiment(args.experiment, args.out, config=args.config, quick=args.quick, overrides=args.set,
                            progress=options.wants_progress(args))
    if args.json:
        options.print_json(result, out, default=str)
    elif isinstance(result, dict) and "shortcut_found" in result:
        print(f"shortcut found: {result['shortcut_found']}; report: {args.out}/report.html", file=out or sys.stdout)
    elif isinstance(result, dict) and isinstance(result.get("verdict"), dict):
        for name, said in result["verdict"].items():
            print(f"{name}: {said}", file=out or sys.stdout)
        print(f"outputs in {args.out}", file=out or sys.stdout)
    elif isinstance(result, dict):
        print(json_dumps(result, default=str)[:4000], file=out or sys.stdout)
    return 0


def run_demo(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens demo``."""
    return run(args, out)
