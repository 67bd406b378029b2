"""Is the method report's "faithful" calibrated? False-positive rate under the null, and power.

``evaluate_methods`` calls a method *faithful* when its insertion - deletion AUC gain over a
random map's, per image, passes a one-sided Wilcoxon signed-rank test at ``FAITHFUL_ALPHA``
(``mechlens.evaluation.report.faithfulness_test``). Before, it compared the two mean gains, which
calls a map no better than random faithful about half the time.

On the reference shapes model (``ShapesRecipe()``, cached), each run draws ``--images`` test
images and two seeds:

* **null**: the "method" is a random map (one seed) against the report's random control (the
  other seed): both are exchangeable, so the test should call it faithful in at most
  ``alpha`` of the runs (the old rule: about half);
* **power**: input x gradient, Grad-CAM and occlusion (the report's maps) against the random
  control on the same images.

The figures: the share of runs called faithful, its 95% Clopper-Pearson upper bound for the
null. Ends with one JSON line.

    python benchmarks/report_calibration.py              # 200 null runs, 30 power runs, 16 images
    python benchmarks/report_calibration.py --quick      # for the test suite
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlens.evaluation import deletion_curve, insertion_curve, random_maps  # noqa: E402
from mechlens.evaluation.report import FAITHFUL_ALPHA, faithfulness_test  # noqa: E402

METHODS = ("input_x_gradient", "gradcam", "occlusion")


def clopper_pearson_upper(k: int, n: int, level: float = 0.95) -> float:
    from scipy.stats import beta

    return 1.0 if k >= n else float(beta.ppf(level, k + 1, n - k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=200, help="null runs")
    parser.add_argument("--power-runs", type=int, default=30)
    parser.add_argument("--images", type=int, default=16, help="test images per run (the report's default)")
    parser.add_argument("--steps", type=int, default=16, help="deletion / insertion steps (the report's default)")
    parser.add_argument("--cache", default=str(ROOT / "runs" / "benchmark-cache" / "shapes"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="20 null runs, 3 power runs, 8 images")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.power_runs, args.images = 20, 3, 8
    torch.set_num_threads(args.threads)

    from mechlens.attribution import attribute
    from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier

    clf = load_or_train_shapes_classifier(ShapesRecipe(), cache_dir=Path(args.cache), progress=False)
    model, test = clf.loaded, clf.test_dataset()
    pool = len(test)

    def curves(images: torch.Tensor, maps, seed: int):
        kw = dict(steps=args.steps, seed=seed)
        return deletion_curve(model, images, None, maps, **kw), insertion_curve(model, images, None, maps, **kw)

    def draw(run: int) -> torch.Tensor:
        picks = torch.randperm(pool, generator=torch.Generator().manual_seed(run))[:args.images].tolist()
        return test.render(picks)

    size = None
    null_new = null_old = 0
    for run in range(args.runs):
        images = draw(run)
        size = (images.shape[0], *images.shape[-2:])
        control = curves(images, random_maps(size, seed=2 * run), seed=run)
        method = curves(images, random_maps(size, seed=2 * run + 1), seed=run)
        faithful, _ = faithfulness_test(*method, *control)
        null_new += faithful is True
        gain = float((method[1].auc - method[0].auc).mean() - (control[1].auc - control[0].auc).mean())
        null_old += gain > 0  # the old rule: the mean gain beats the random map's
    power: dict[str, int] = dict.fromkeys(METHODS, 0)
    for run in range(args.power_runs):
        images = draw(10_000 + run)
        control = curves(images, random_maps((images.shape[0], *images.shape[-2:]), seed=run), seed=run)
        for name in METHODS:
            kwargs = {"window": 8} if name == "occlusion" else {}
            maps = attribute(model, images, None, method=name, **kwargs)
            faithful, _ = faithfulness_test(*curves(images, maps, seed=run), *control)
            power[name] += faithful is True
    fpr, fpr_old = null_new / args.runs, null_old / args.runs
    upper = clopper_pearson_upper(null_new, args.runs)
    print(f"shapes model, {args.images} images per run, {args.steps} steps, alpha {FAITHFUL_ALPHA}")
    print(f"null ({args.runs} runs, a random map against the random control): called faithful "
          f"{fpr:.3f} (95% upper bound {upper:.3f}); the old mean-gain rule {fpr_old:.3f}")
    for name in METHODS:
        print(f"power ({args.power_runs} runs): {name:18s} {power[name] / args.power_runs:.3f}")
    figures = {"runs": args.runs, "power_runs": args.power_runs, "images": args.images, "alpha": FAITHFUL_ALPHA,
               "null_fpr": fpr, "null_fpr_upper95": upper, "null_fpr_old_rule": fpr_old,
               **{f"power/{name}": power[name] / args.power_runs for name in METHODS}}
    print(json.dumps({"benchmark": "report_calibration", "figures": figures,
                      "ratios": {"fpr_over_alpha": fpr / FAITHFUL_ALPHA, "old_rule_fpr_over_alpha": fpr_old / FAITHFUL_ALPHA}}))


if __name__ == "__main__":
    main()
