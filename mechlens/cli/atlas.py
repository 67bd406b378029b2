"""``mechlens atlas``: publish every feature of an SAE as a browsable static site."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``atlas`` sub-command."""
    parser = subparsers.add_parser(
        "atlas",
        help="build the feature atlas (static site) of an SAE",
        description=(
            "Write a static site to OUT: an index with a sortable, filterable table of every feature "
            "that fires and a 2-D map of the decoder directions, and one page per feature with its "
            "exemplars (activation map marked), histogram, logit effect, concept alignment and, "
            "optionally, its feature visualization. Open OUT/index.html in a browser (file:// works)."
        ),
    )
    parser.add_argument("--sae", required=True, help="SAE directory (SAE.save / mechlens sae train)")
    parser.add_argument("--store", required=True, help="the activation store the SAE was trained on")
    parser.add_argument("--model", required=True, help="model spec or checkpoint directory")
    parser.add_argument("--weights", metavar="PATH", help="local .safetensors or state-dict file")
    parser.add_argument("--data", default=None, help="dataset spec of the store's images (default: recorded by capture)")
    parser.add_argument("--cav", nargs="*", default=[], metavar="PATH", help="CAVs of the same layer for concept alignment")
    parser.add_argument("--max-features", type=int, default=None, help="publish only the N most frequent features")
    parser.add_argument("--exemplars", type=int, default=8, help="top exemplars per feature (default 8)")
    parser.add_argument("--visualize", action="store_true", help="add a feature visualization per feature (batched)")
    parser.add_argument("--vis-steps", type=int, default=64, help="optimization steps of --visualize (default 64)")
    parser.add_argument("--attribution", action="store_true", help="add a Grad-CAM overlay on each feature's top exemplar")
    parser.add_argument("--device", default=None)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", required=True, help="output directory")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens atlas``; returns the exit code."""
    from mechlens.atlas import build_atlas
    from mechlens.data import build_dataset
    from mechlens.models import load_model
    from mechlens.probes import CAV

    out = out or sys.stdout
    loaded = load_model(args.model, weights=args.weights, device=args.device)
    dataset = None
    if args.data:
        dataset = build_dataset(args.data, image_size=loaded.preprocessing.image_size)
    visualize = attribute = None
    if args.visualize or args.attribution:
        from mechlens.atlas.callbacks import sae_attributor, sae_visualizer
        from mechlens.sae import SAE

        sae = SAE.load(args.sae, device=loaded.device)
        visualize = sae_visualizer(loaded, sae, steps=args.vis_steps) if args.visualize else None
        attribute = sae_attributor(loaded, sae) if args.attribution else None
    result = build_atlas(args.sae, args.store, loaded, args.out, dataset=dataset, cavs=[CAV.load(p) for p in args.cav],
                         visualize=visualize, attribute=attribute, max_features=args.max_features, exemplars=args.exemplars,
                         progress=not args.no_progress)
    print(f"atlas of {len(result.features)} features written in {result.seconds:.1f}s: open {result.index}", file=out)
    return 0
