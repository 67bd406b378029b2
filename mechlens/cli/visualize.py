"""``mechlens visualize``: render what features want to see (one image per feature, in batches).

    mechlens visualize --model torchvision:resnet18 --feature channel:layer3:17 channel:layer3:18 \\
        --size 128 --steps 256 --out runs/vis

Writes ``OUT/NNN_<feature>.png`` per feature and ``OUT/featvis.json`` (per feature: the final
activation of its target, the loss curve; and the settings).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``visualize`` sub-command."""
    parser = subparsers.add_parser(
        "visualize",
        help="feature visualization: images that maximize features (channel, neuron, SAE latent, class ...)",
        description=(
            "Optimize one image per FEATURE (channel:LAYER:C, neuron:LAYER:C:Y,X, class:K, sae:PATH:I, "
            "cav:PATH, layer:LAYER) and write them as PNG files plus featvis.json to the directory --out. "
            "Features are rendered together, --batch-size at a time."
        ),
    )
    options.add_model_options(parser)
    parser.add_argument("--feature", nargs="+", required=True, metavar="SPEC", help="feature specs, one image each")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels (default 128)")
    parser.add_argument("--steps", type=int, default=256, help="optimization steps (default 256)")
    parser.add_argument("--lr", type=float, default=0.05, help="Adam learning rate (default 0.05)")
    options.SEED.add(parser)
    parser.add_argument("--param", choices=("fft", "pixel"), default="fft", help="image parameterization (default fft)")
    parser.add_argument("--no-decorrelate", action="store_true", help="optimize plain RGB instead of decorrelated colour")
    parser.add_argument("--transforms", choices=("standard", "none"), default="standard",
                        help="transformation robustness: Lucent's standard list or none")
    parser.add_argument("--tv", type=float, default=0.0, help="total-variation penalty weight (default off)")
    parser.add_argument("--l2", type=float, default=0.0, help="L2 penalty weight (default off)")
    parser.add_argument("--blur", type=float, default=0.0, help="blur penalty weight (default off)")
    parser.add_argument("--batch-size", type=int, default=64, help="features rendered per optimization (default 64)")
    options.add_run_options(parser, device="auto", out={"required": True})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens visualize``; returns the exit code."""
    from activation_store.jsonutil import dumps as json_dumps
    from mechlens.features import as_features
    from mechlens.featvis import Objective, Regularizers, render, save_png
    from mechlens.featvis.render import image_filename

    out = out or sys.stdout
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    features = as_features(args.feature)
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    directory = Path(args.out)
    directory.mkdir(parents=True, exist_ok=True)
    regularizers = Regularizers(tv=args.tv, l2=args.l2, blur=args.blur)
    entries = []
    settings = None
    batches = range(0, len(features), args.batch_size)
    with options.progress_bar(args, total=len(batches) * args.steps, desc="visualize", unit="step") as bar:
        for start in batches:
            chunk = features[start:start + args.batch_size]
            result = render(
                loaded, Objective.per_image(chunk), size=args.size, steps=args.steps, lr=args.lr, seed=args.seed + start,
                param=args.param, decorrelate=not args.no_decorrelate, transforms=args.transforms,
                regularizers=regularizers, callback=lambda *_: bar.update(),
            )
            summary = result.to_dict()
            settings = summary["settings"]
            for i, feature in enumerate(chunk):
                index = start + i
                path = save_png(result.images[i], directory / image_filename(index, feature.name))
                entries.append({
                    "feature": feature.name, "spec": args.feature[index], "png": path.name,
                    "activation": float(result.target_values[i]), "objective": float(result.objective[i]),
                    "loss_curve": {"steps": summary["loss_curve"]["steps"], "loss": summary["loss_curve"]["loss"][i]},
                    "seconds": round(result.seconds, 3),
                })
    report = {
        "model": args.model, "weights": args.weights, "pretrained": args.pretrained, "size": args.size,
        "steps": args.steps, "seed": args.seed, "features": entries, "settings": settings,
    }
    json_path = directory / "featvis.json"
    json_path.write_text(json_dumps(report, indent=2))
    if args.json:
        options.print_json({"out": str(directory), "json": str(json_path),
                            "features": [{k: e[k] for k in ("feature", "png", "activation")} for e in entries]}, out)
    else:
        for e in entries:
            print(f"{e['feature']}: activation {e['activation']:.4g} -> {directory / e['png']}", file=out)
        print(f"wrote {len(entries)} images and {json_path}", file=out)
    return 0
