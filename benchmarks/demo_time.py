"""How long the main job takes: ``mechlens demo`` from a clean output folder (the CNN trained
from scratch unless ``--model-cache`` names a trained one), each stage's seconds, and whether
the findings hold (every check of the report). There is no peer for the whole job; the ratios
are the stages' shares of the total. The last line is JSON.

    python benchmarks/demo_time.py             # the full demo (the README's stage times)
    python benchmarks/demo_time.py --quick     # the reduced configuration CI runs
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlens.experiments import run_experiment  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the demo's reduced configuration")
    parser.add_argument("--model-cache", default=None, help="a folder holding the trained CNN (default: train it)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the README's machine)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    overrides = [f'model_cache="{args.model_cache}"'] if args.model_cache else []
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        figures = run_experiment("clever_hans", Path(scratch) / "demo", quick=args.quick, overrides=overrides)
        wall = time.perf_counter() - started
    stages = figures["timings_seconds"]
    for name, seconds in stages.items():
        print(f"{name:<14} {seconds:7.1f} s")
    print(f"{'total':<14} {wall:7.1f} s wall; checks: {figures['checks']}")
    print(json.dumps({"benchmark": "demo_time",
                      "figures": {"quick": args.quick, "trained_here": args.model_cache is None, "threads": args.threads,
                                  "wall_seconds": round(wall, 1), "stages_seconds": stages,
                                  "shortcut_found": figures["shortcut_found"], "checks": figures["checks"]},
                      "ratios": {f"{name}_share": round(seconds / wall, 3) for name, seconds in stages.items()}}))


if __name__ == "__main__":
    main()
