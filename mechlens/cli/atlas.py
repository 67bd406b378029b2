"""``mechlens atlas``: publish every feature of an SAE as a browsable static site."""
from __future__ import annotations

import argparse
import os
import sys
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``atlas`` sub-command."""
    parser = subparsers.add_parser(
        "atlas",
        help="build the feature atlas (static site) of an SAE, a layer's channels or CAV directions",
        description=(
            "Write a static site to OUT: an index with a sortable, filterable table of every feature "
            "that fires and a 2-D map of the decoder directions, and one page per feature with its "
            "exemplars (activation map marked), histogram, logit effect, concept alignment and, "
            "optionally, its feature visualization. Open OUT/index.html in a browser (file:// works). "
            "The exemplar images come from --data, or (default) from the dataset the capture recorded in "
            "--store, with the capture's own --resize / --on-unreadable."
        ),
    )
    published = parser.add_mutually_exclusive_group(required=True)
    published.add_argument("--sae", help="publish an SAE's latents: its directory (SAE.save / mechlens sae train)")
    published.add_argument("--channels", metavar="LAYER[:I,J,...]",
                           help="publish channels of a layer of the store (all, or the listed ones)")
    published.add_argument("--directions", nargs="+", metavar="CAV", help="publish CAV directions (CAV files of one layer)")
    options.STORE.add(parser, required=True)
    options.add_model_options(parser)
    options.add_data_options(parser)
    parser.add_argument("--cav", nargs="*", default=[], metavar="PATH", help="CAVs of the same layer for concept alignment")
    parser.add_argument("--max-features", type=int, default=None, help="publish only the N most frequent features")
    parser.add_argument("--exemplars", type=int, default=8, help="top exemplars per feature (default 8)")
    parser.add_argument("--visualize", action="store_true", help="add a feature visualization per feature (batched)")
    parser.add_argument("--vis-steps", type=int, default=64, help="optimization steps of --visualize (default 64)")
    parser.add_argument("--vis-batch", type=int, default=32,
                        help="features optimized together by --visualize (default 32)")
    parser.add_argument("--chunk", type=int, default=256,
                        help="features per chunk: the unit of batching, of the split across torchrun ranks and of "
                             "resuming (default 256)")
    parser.add_argument("--no-resume", action="store_true",
                        help="re-render every page (default: a rerun keeps the finished pages of the same settings)")
    parser.add_argument("--on-change", choices=("rebuild", "refuse"), default="rebuild",
                        help="pages of an earlier build made with other settings: rebuild them with a warning "
                             "(default) or refuse")
    parser.add_argument("--attribution", action="store_true", help="add a Grad-CAM overlay on each feature's top exemplar")
    parser.add_argument("--no-causal", action="store_true",
                        help="skip the measured ablation effects per class (one intervened forward per feature)")
    parser.add_argument("--causal-images", type=int, default=64, help="images the ablation effects are measured on (default 64)")
    parser.add_argument("--circuit", metavar="CIRCUIT.json", default=None,
                        help="publish a circuit (mechlens circuit's circuit.json) as the atlas's circuit page")
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens atlas``; returns the exit code."""
    from mechlens.atlas import build_atlas
    from mechlens.data import build_dataset
    from mechlens.interventions import Circuit
    from mechlens.probes import CAV

    out = out or sys.stdout
    if not args.data and (args.resize or args.on_unreadable):
        raise ValueError("--resize / --on-unreadable apply to --data; without it the atlas rebuilds the dataset "
                         "the capture recorded, with the capture's own policies")
    loaded = options.load_model_from_args(args, device=options.resolved_device(args))
    dataset = None
    if args.data:
        dataset = build_dataset(args.data, image_size=loaded.preprocessing.image_size, **options.dataset_options(args))
    published = _feature_set(args)
    visualize = attribute = None
    if args.visualize or args.attribution:
        from mechlens.atlas import feature_attributor, feature_visualizer
        from mechlens.sae import SAE

        feature_set = SAE.load(args.sae, device=loaded.device) if args.sae else published
        visualize = (feature_visualizer(loaded, feature_set, steps=args.vis_steps, batch=args.vis_batch)
                     if args.visualize else None)
        attribute = feature_attributor(loaded, feature_set) if args.attribution else None
    result = build_atlas(published, args.store, loaded, args.out, dataset=dataset, cavs=[CAV.load(p) for p in args.cav],
                         visualize=visualize, attribute=attribute, max_features=args.max_features, exemplars=args.exemplars,
                         causal=not args.no_causal, causal_images=args.causal_images,
                         circuit=Circuit.load(args.circuit) if args.circuit else None, progress=options.wants_progress(args),
                         chunk=args.chunk, resume=not args.no_resume, on_change=args.on_change)
    if result.ranks > 1 and int(os.environ.get("RANK", "0")) != 0:  # under torchrun rank 0 reports the build
        return 0
    if args.json:
        options.print_json({"out": str(args.out), "index": str(result.index), "features": len(result.features),
                            "rendered": len(result.rendered), "reused": result.reused, "ranks": result.ranks,
                            "seconds": round(result.seconds, 3)}, out)
    else:
        print(f"atlas of {len(result.features)} features written in {result.seconds:.1f}s ({len(result.rendered)} pages "
              f"rendered, {result.reused} kept from an earlier build, {result.ranks} rank(s)): open {result.index}",
              file=out)
    return 0


def _feature_set(args: argparse.Namespace):
    """What ``--sae`` / ``--channels`` / ``--directions`` ask to publish."""
    from activation_store import ActivationStore
    from mechlens.atlas import channel_features, direction_features
    from mechlens.probes import CAV

    if args.sae:
        return args.sae
    if args.channels:
        layer, _, listed = args.channels.partition(":")
        store = ActivationStore(args.store)
        if layer not in store.layers:
            raise ValueError(f"--channels: layer {layer!r} is not in the store (layers: {', '.join(store.layers)})")
        try:
            channels = [int(c) for c in listed.split(",")] if listed else None
        except ValueError:
            raise ValueError(f"--channels {args.channels!r}: expected LAYER or LAYER:I,J,... with integer channels") from None
        return channel_features(layer, store[layer].dim, channels)
    cavs = [CAV.load(path) for path in args.directions]
    return direction_features(cavs[0].layer, cavs, names=[f"cav:{path}" for path in args.directions])
