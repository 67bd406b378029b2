"""``mechlens tcav``: TCAV scores with random-counterpart t-tests for concepts given as image folders."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tcav`` sub-command."""
    parser = subparsers.add_parser(
        "tcav",
        help="TCAV: does a human concept drive a prediction or a feature? (with p-values)",
        description=(
            "Train CAVs for each --concept against random counterpart sets at each --layer, score the "
            "directional derivative of each --target on the --examples, and test whether the concept "
            "scores like one more random set (--test exchangeable, calibrated; Bonferroni-corrected over "
            "concepts x layers x targets; significant only when most of its CAVs beat chance). Writes "
            "tcav.csv, tcav.json, tcav.png and the CAVs to the directory --out."
        ),
    )
    options.add_model_options(parser)
    options.LAYERS.add(parser, required=True)
    parser.add_argument("--concept", nargs="+", required=True, metavar="NAME=DIR", help="concept image folders")
    parser.add_argument("--random", nargs="+", required=True, metavar="DIR",
                        help="one folder to draw --num-random random sets from, or >= 3 folders used as the sets")
    parser.add_argument("--examples", required=True, metavar="DIR", help="folder of examples the target is scored on")
    parser.add_argument("--target", nargs="+", default=["class:0"],
                        help="feature specs: class:K, channel:LAYER:C, sae:PATH:I, cav:PATH (default class:0)")
    parser.add_argument("--num-random", type=int, default=20,
                        help="N random counterpart sets (default 20: the power on a planted concept is 0.6 "
                             "with 10 and 1.0 with 20, benchmarks/tcav_calibration.py)")
    parser.add_argument("--test", choices=("exchangeable", "rank", "ttest"), default="exchangeable",
                        help="significance test: exchangeable (default, calibrated), rank (exact, "
                             "p >= 1/(N+1)) or ttest (tensorflow/tcav's, anti-conservative; for comparison)")
    parser.add_argument("--set-size", type=int, default=50, help="examples per random set drawn from one folder")
    parser.add_argument("--pooling", choices=("mean", "max", "flatten"), default="mean")
    parser.add_argument("--classifier", choices=("logistic", "linear_svm", "sgd"), default="logistic")
    parser.add_argument("--score", choices=("sign", "magnitude"), default="sign")
    parser.add_argument("--alpha", type=float, default=0.05, help="significance level after Bonferroni")
    parser.add_argument("--min-accuracy", type=float, default=0.7, help="flag CAVs below this held-out accuracy")
    options.SEED.add(parser)
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def _concept_arg(text: str) -> tuple[str, str]:
    from activation_store.manifest import check_name

    name, sep, folder = text.partition("=")
    if not sep or not name or not folder:
        raise ValueError(f"--concept expects NAME=DIR, got {text!r}")
    try:  # the name becomes part of the CAV file names under --out
        check_name(name, "concept")
    except ValueError as error:
        raise ValueError(f"--concept {name}=...: {error}") from None
    return name, folder


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens tcav``; returns the exit code."""
    from activation_store.manifest import check_name
    from mechlens.features import as_features
    from mechlens.probes import ConceptSet, cav_file_stem, random_concept_sets, run_tcav, save_cavs

    out = out or sys.stdout
    # names that become file names are checked before any work (the model is not even loaded)
    concept_args = [_concept_arg(text) for text in args.concept]
    for layer in args.layer:
        check_name(layer, "layer")
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    size = loaded.preprocessing.image_size
    concepts = [ConceptSet.from_folder(name, folder, image_size=size) for name, folder in concept_args]
    if len(args.random) == 1:
        for name, folder in concept_args:
            if Path(folder).resolve() == Path(args.random[0]).resolve():
                raise ValueError(f"concept {name!r} uses the random folder {folder}; a concept must differ from it")
        pool = ConceptSet.from_folder("random", args.random[0], image_size=size)
        randoms = random_concept_sets(pool.dataset, args.num_random, min(args.set_size, len(pool)), seed=args.seed)
    else:
        randoms = [ConceptSet.from_folder(f"random{i}", folder, image_size=size) for i, folder in enumerate(args.random)]
    examples = ConceptSet.from_folder("examples", args.examples, image_size=size)
    targets = as_features(args.target)
    report = run_tcav(loaded, layers=args.layer, concepts=concepts, random_sets=randoms, examples=examples,
                      targets=targets, pooling=args.pooling, classifier=args.classifier, alpha=args.alpha,
                      score=args.score, min_accuracy=args.min_accuracy, seed=args.seed, test=args.test,
                      progress=options.wants_progress(args))
    target_dir = Path(args.out)
    names = {c.name for c in concepts}
    cavs = [cav for cav in report.cavs if cav.concept in names]
    for cav in cavs:  # every CAV file name is checked before anything is written
        cav_file_stem(cav)
    target_dir.mkdir(parents=True, exist_ok=True)
    report.to_csv(target_dir / "tcav.csv")
    report.to_json(target_dir / "tcav.json")
    report.plot(target_dir / "tcav.png")
    save_cavs(cavs, target_dir / "cavs")
    if args.json:
        files = [str(target_dir / name) for name in ("tcav.csv", "tcav.json", "tcav.png", "cavs")]
        options.print_json({"out": str(target_dir), "files": files, "results": report.rows()}, out)
        return 0
    for row in report.rows():
        mark = "significant" if row["significant"] else "not significant"
        print(f"{row['concept']:>16} @ {row['layer']:<12} {row['target']:<14} TCAV {row['tcav_mean']:.3f} ± "
              f"{row['tcav_std']:.3f} (random {row['random_mean']:.3f}), p={row['p_value']:.2g}, "
              f"Bonferroni p={row['p_adjusted']:.2g}: {mark}"
              + (f" [{row['flagged_cavs']} CAVs below accuracy {args.min_accuracy}]" if row["flagged_cavs"] else "")
              + (f" [{row['cavs_at_chance']} of {row['n_random']} CAVs at chance]" if row["cavs_at_chance"] else ""),
              file=out)
    print(f"wrote {target_dir}/tcav.csv, tcav.json, tcav.png, cavs/", file=out)
    return 0
