"""``mechlens dream``: DeepDream a photograph with a layer or a feature.

    mechlens dream --model torchvision:resnet18 --image photo.jpg --layer layer3 --octaves 4 --out dream.png
    mechlens dream --model mechlens:small_cnn --image skimage:astronaut --feature channel:stage3:7 --out d.png

Writes the PNG to OUT and a JSON summary next to it (``OUT`` with ``.json``): the objective on
the photo before and after, the octave sizes, the number of tiles and the settings.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``dream`` sub-command."""
    parser = subparsers.add_parser(
        "dream",
        help="DeepDream: amplify a layer or a feature in a photo (octaves, jitter, tiling)",
        description=(
            "Gradient ascent on IMAGE (a file, or skimage:NAME for a photo bundled with scikit-image, e.g. "
            "skimage:astronaut) toward higher energy of LAYER, or toward FEATURE, over several octaves. "
            "Images larger than the model input are processed in tiles. Writes the PNG file --out and a "
            "JSON summary next to it (--out with .json)."
        ),
    )
    options.add_model_options(parser)
    parser.add_argument("--image", required=True, help="photo file or skimage:NAME")
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--layer", metavar="LAYER", help="layer whose energy (mean squared activation) is maximized")
    target.add_argument("--feature", help="feature spec to maximize instead, e.g. channel:layer3:17")
    parser.add_argument("--octaves", type=int, default=4, help="number of octaves (default 4)")
    parser.add_argument("--octave-scale", type=float, default=1.4, help="size ratio between octaves (default 1.4)")
    parser.add_argument("--steps", type=int, default=10, help="gradient steps per octave (default 10)")
    parser.add_argument("--step-size", type=float, default=0.01, help="step size on the [0,1] image (default 0.01)")
    parser.add_argument("--jitter", type=int, default=32, help="largest random roll in pixels (default 32)")
    parser.add_argument("--tile-size", type=int, default=None,
                        help="tile side (default: the model's input size; 0 = never tile)")
    parser.add_argument("--max-side", type=int, default=None, help="shrink the photo so its longer side is at most this")
    options.SEED.add(parser)
    options.add_run_options(parser, device="auto", out={"required": True, "metavar": "FILE.png"})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens dream``; returns the exit code."""
    from activation_store.jsonutil import dumps as json_dumps
    from mechlens.featvis import deepdream, load_image

    out = out or sys.stdout
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    image = load_image(args.image, max_side=args.max_side)
    tile_size = "auto" if args.tile_size is None else (None if args.tile_size == 0 else args.tile_size)
    with options.progress_bar(args, total=args.octaves * args.steps, desc="dream", unit="step") as bar:
        result = deepdream(
            loaded, image, args.layer if args.layer else args.feature, octaves=args.octaves,
            octave_scale=args.octave_scale, steps=args.steps, step_size=args.step_size, jitter=args.jitter,
            tile_size=tile_size, seed=args.seed, callback=lambda *_: bar.update(),
        )
    path = Path(args.out)
    if not path.suffix:
        path = path.with_suffix(".png")
    result.save(path)
    summary = {"model": args.model, "image": args.image, "objective": args.layer or args.feature, "out": str(path),
               **result.to_dict()}
    json_path = path.with_suffix(".json")
    json_path.write_text(json_dumps(summary, indent=2))
    if args.json:
        options.print_json(summary, out)
    else:
        before, after = float(result.objective_before[0]), float(result.objective_after[0])
        print(f"{summary['objective']}: {before:.4g} -> {after:.4g} over {len(result.octave_sizes)} octaves "
              f"({result.tiles} tile(s) at full size) in {result.seconds:.1f}s -> {path}", file=out)
    return 0
