"""``mechlens atlas``: publish every feature of an SAE as a browsable static site."""
from __future__ import annotations

import argparse
import sys
from typing import TextIO

from mechlens.cli import options

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
            "optionally, its feature visualization. Open OUT/index.html in a browser (file:// works). "
            "The exemplar images come from --data, or (default) from the dataset the capture recorded in "
            "--store, with the capture's own --resize / --on-unreadable."
        ),
    )
    parser.add_argument("--sae", required=True, help="SAE directory (SAE.save / mechlens sae train)")
    options.STORE.add(parser, required=True)
    options.add_model_options(parser)
    options.add_data_options(parser)
    parser.add_argument("--cav", nargs="*", default=[], metavar="PATH", help="CAVs of the same layer for concept alignment")
    parser.add_argument("--max-features", type=int, default=None, help="publish only the N most frequent features")
    parser.add_argument("--exemplars", type=int, default=8, help="top exemplars per feature (default 8)")
    parser.add_argument("--visualize", action="store_true", help="add a feature visualization per feature (batched)")
    parser.add_argument("--vis-steps", type=int, default=64, help="optimization steps of --visualize (default 64)")
    parser.add_argument("--attribution", action="store_true", help="add a Grad-CAM overlay on each feature's top exemplar")
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens atlas``; returns the exit code."""
    from mechlens.atlas import build_atlas
    from mechlens.data import build_dataset
    from mechlens.probes import CAV

    out = out or sys.stdout
    if not args.data and (args.resize or args.on_unreadable):
        raise ValueError("--resize / --on-unreadable apply to --data; without it the atlas rebuilds the dataset "
                         "the capture recorded, with the capture's own policies")
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    dataset = None
    if args.data:
        dataset = build_dataset(args.data, image_size=loaded.preprocessing.image_size, **options.dataset_options(args))
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
    if args.json:
        options.print_json({"out": str(args.out), "index": str(result.index), "features": len(result.features),
                            "seconds": round(result.seconds, 3)}, out)
    else:
        print(f"atlas of {len(result.features)} features written in {result.seconds:.1f}s: open {result.index}",
              file=out)
    return 0
