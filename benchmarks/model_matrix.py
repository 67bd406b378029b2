"""The model-family matrix (issue 17, item 3) as a table: family x stage, ok or what failed, with timings.

Runs the same harness as ``tests/mechlens/test_model_matrix.py`` (``tests/mechlens/_matrix.py``):
for each family a random-weight model at a small input size goes through ``mechlens layers``,
capture (all / random / mean / cls), a TopK SAE, Grad-CAM / Integrated Gradients / occlusion
for a class and an SAE latent, feature visualization of one channel and TCAV, each checked
against a direct forward with a plain hook. Cells say ``ok``, ``expected ERROR ...`` (an
unsupported combination refused as the family's table says) or ``ERROR`` / ``FAIL`` /
``SKIPPED`` with the first line of what went wrong.

    python benchmarks/model_matrix.py                          # every family, one thread
    python benchmarks/model_matrix.py --families timm_swin_tiny tv_resnet18 --per-check
    python benchmarks/model_matrix.py --list

Prints the markdown table, the seconds per family and stage, and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).absolute().parents[1]))  # tests.mechlens._matrix

from tests.mechlens import _matrix as matrix  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", metavar="ID", help="family ids (default: all; see --list)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the families marked slow")
    parser.add_argument("--per-check", action="store_true", help="one column per check instead of per stage")
    parser.add_argument("--workdir", help="keep the stores and SAEs here (default: a temporary folder)")
    parser.add_argument("--list", action="store_true", help="list the families and exit")
    parser.add_argument("--quick", action="store_true", help="three small families (a conv net, a ViT, a tuple output)")
    args = parser.parse_args()

    if args.list:
        for f in matrix.FAMILIES:
            extra = f"  [{f.note}]" if f.note else ""
            print(f"{f.id:28s} {f.spec} layer={f.layer} ({f.layout}){' slow' if f.slow else ''}{extra}")
        return 0
    unknown = [i for i in args.families or [] if i not in matrix.FAMILY]
    if unknown:
        parser.error(f"unknown family id(s) {', '.join(unknown)}; see --list")
    families = [matrix.FAMILY[i] for i in args.families] if args.families else list(matrix.FAMILIES)
    if args.quick and not args.families:
        families = [matrix.FAMILY[i] for i in ("timm_convnext_atto", "timm_vit_reg4", "tuple_output")]
    if args.skip_slow:
        families = [f for f in families if not f.slow]

    import torch

    torch.set_num_threads(1)
    results = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="model-matrix-") as tmp:
        root = Path(args.workdir or tmp)
        for family in families:
            result = matrix.run_family(family, root / family.id)
            results.append(result)
            bad = sum(1 for _ in result.problems())
            print(f"{family.id}: {result.total_seconds:.1f} s, {bad} unexpected outcome(s)", file=sys.stderr, flush=True)
    total = time.perf_counter() - start

    print(matrix.markdown_table(results, per_check=args.per_check))
    print()
    stages = list(matrix.STAGES)
    print("| family | build | " + " | ".join(stages) + " | total |")
    print("|---" * (len(stages) + 3) + "|")
    for r in results:
        cells = [f"{r.stage_seconds.get(s, 0.0):.1f}" for s in stages]
        print(f"| {r.family.id} | {r.build_seconds:.1f} | " + " | ".join(cells) + f" | {r.total_seconds:.1f} |")
    print(f"\n{len(results)} families in {total:.1f} s (one thread)")
    problems = [p for r in results for p in r.problems()]
    ok = sum(1 for r in results for o in r.outcomes.values() if o.status == "ok")
    print(json.dumps({
        "benchmark": "model_matrix",
        "figures": {
            "families": len(results), "seconds": round(total, 2), "unexpected": len(problems),
            "checks_ok": ok, "checks": sum(len(r.outcomes) for r in results),
            "per_family": {r.family.id: {"seconds": round(r.total_seconds, 2),
                                         "stages": {s: round(v, 2) for s, v in r.stage_seconds.items()},
                                         "outcomes": {c: o.cell() for c, o in r.outcomes.items()}}
                           for r in results},
        },
        # each family's time relative to the fastest: where the matrix's budget goes
        "ratios": {r.family.id: round(r.total_seconds / max(min(x.total_seconds for x in results), 1e-9), 2)
                   for r in results},
    }))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
