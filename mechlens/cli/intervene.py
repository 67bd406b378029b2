"""``mechlens intervene``: the measured effect of ablating, clamping, scaling or steering features."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``intervene`` sub-command."""
    parser = subparsers.add_parser(
        "intervene",
        help="measure what features do: ablate / clamp / scale / steer them, effect on targets with CIs",
        description=(
            "Run each intervention over the images of --data (or the images behind --store) and measure its effect on each --target "
            "(the mean change of its value, with a percentile-bootstrap interval, and accuracy per class). "
            "Each --ablate/--clamp/--scale/--steer is one named intervention. Writes effects.csv, "
            "effects.json and effects.png to --out."
        ),
    )
    options.add_model_options(parser)
    options.add_data_options(parser)
    options.STORE.add(parser)  # the images its capture recorded, instead of --data
    parser.add_argument("--ablate", nargs="+", default=[], metavar="FEATURE", help="set FEATURE to 0 (e.g. channel:stage2:3)")
    parser.add_argument("--resample", nargs="+", default=[], metavar="FEATURE",
                        help="resampling ablation: FEATURE takes its value on another image of the batch (seeded by --seed)")
    parser.add_argument("--clamp", nargs="+", default=[], metavar="FEATURE=VALUE", help="hold FEATURE at VALUE")
    parser.add_argument("--scale", nargs="+", default=[], metavar="FEATURE=FACTOR", help="multiply FEATURE by FACTOR")
    parser.add_argument("--steer", nargs="+", default=[], metavar="FEATURE=ALPHA", help="add ALPHA to FEATURE")
    parser.add_argument("--target", nargs="+", default=["class:0"],
                        help="target feature specs: class:K, class:K:softmax, channel:LAYER:C, sae:PATH:I (default class:0)")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N images of --data")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples of the images (default 2000)")
    parser.add_argument("--confidence", type=float, default=0.95, help="interval level (default 0.95)")
    options.SEED.add(parser)
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def _valued(text: str, flag: str) -> tuple[str, float]:
    feature, sep, value = text.rpartition("=")
    if not sep or not feature:
        raise ValueError(f"{flag} expects FEATURE=NUMBER, got {text!r}")
    try:
        return feature, float(value)
    except ValueError:
        raise ValueError(f"{flag} {text!r}: {value!r} is not a number") from None


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens intervene``; returns the exit code."""
    import torch

    from mechlens.data import build_dataset
    from mechlens.interventions import ablate, clamp, intervention_effects, scale, steer

    out = out or sys.stdout
    if (args.data is None) == (args.store is None):
        raise ValueError("give the images as --data SPEC or --store STORE (the images its capture recorded), one of the two")
    chosen = {f"ablate {f}": ablate(f) for f in args.ablate}
    chosen.update({f"resample {f}": ablate(f, "resample", seed=args.seed) for f in args.resample})
    for flag, make, items in (("--clamp", clamp, args.clamp), ("--scale", scale, args.scale), ("--steer", steer, args.steer)):
        for text in items:
            feature, value = _valued(text, flag)
            chosen[f"{flag[2:]} {feature}={value:g}"] = make(feature, value)
    if not chosen:
        raise ValueError("give at least one intervention: --ablate, --resample, --clamp, --scale or --steer")
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    if args.store:
        from mechlens.capture import captured_dataset

        dataset = captured_dataset(args.store, image_size=loaded.preprocessing.image_size)
    else:
        dataset = build_dataset(args.data, image_size=loaded.preprocessing.image_size, **options.dataset_options(args))
    if args.max_images is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(args.max_images, len(dataset))))
    torch.manual_seed(args.seed)
    bar = options.progress_bar(args, total=len(chosen), desc="interventions", unit="run")
    table = intervention_effects(loaded, dataset, chosen, args.target, batch_size=args.batch_size,
                                 bootstrap=args.bootstrap, confidence=args.confidence, seed=args.seed)
    bar.update(len(chosen))
    bar.close()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "effects.csv")
    (folder / "effects.json").write_text(table.to_json())
    table.plot().savefig(folder / "effects.png", dpi=120)
    if args.json:
        options.print_json({"out": str(folder), "effects": table.rows, "accuracy": table.accuracy}, out)
    else:
        for row in table.rows:
            print(f"{row['intervention']:<28} -> {row['target']:<18} {row['mean_effect']:+.4g} "
                  f"[{row['ci_low']:+.4g}, {row['ci_high']:+.4g}]", file=out)
        print(f"wrote {folder / 'effects.csv'}, effects.json, effects.png", file=out)
    return 0
