"""``mechlens circuit``: the feature circuit of a target through SAEs at two or more layers."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``circuit`` sub-command."""
    parser = subparsers.add_parser(
        "circuit",
        help="trace a feature circuit: which SAE latents at two or more layers carry a target, and how they connect",
        description=(
            "Rank every latent (and each SAE's error term) of the --sae layers by its mean-ablation effect on "
            "--target over the images of --data (attribution patching), keep the strongest per layer, weigh the "
            "edges between consecutive layers, and measure the circuit's faithfulness and completeness by "
            "ablation. Writes circuit.json, circuit.svg, circuit.png, circuit.dot, circuit_nodes.csv and "
            "circuit_edges.csv to --out."
        ),
    )
    options.add_model_options(parser)
    options.add_data_options(parser, required=True)
    parser.add_argument("--sae", nargs="+", required=True, metavar="PATH",
                        help="saved SAEs, one per layer (two or more; each records its layer)")
    parser.add_argument("--target", required=True, help="target feature spec, e.g. class:1 or class:1:softmax")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--nodes-per-layer", type=int, default=None, metavar="N", help="keep the N strongest nodes per layer")
    size.add_argument("--faithfulness", type=float, default=None, metavar="F",
                      help="keep the fewest nodes per layer whose circuit reaches faithfulness F (default 0.8)")
    parser.add_argument("--reference", default=None, metavar="DATA",
                        help="data spec of the images the ablation means come from (default: --data); use the "
                             "whole distribution when --data holds one class")
    parser.add_argument("--edge-threshold", type=float, default=0.0, help="drop edges weaker than this (target units)")
    parser.add_argument("--max-images", type=int, default=None, help="use only the first N images of --data (and --reference)")
    parser.add_argument("--batch-size", type=int, default=64)
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens circuit``; returns the exit code."""
    import torch

    from mechlens.data import build_dataset
    from mechlens.interventions import feature_circuit
    from mechlens.sae import SAE

    out = out or sys.stdout
    if len(args.sae) < 2:
        raise ValueError("--sae needs SAEs at two or more layers")
    if args.nodes_per_layer is None and args.faithfulness is None:
        args.faithfulness = 0.8
    device = options.resolved_device(args)
    loaded = options.load_model_from_args(args, device=device)
    saes = [SAE.load(path, device=device).eval() for path in args.sae]

    def dataset(spec: str):
        data = build_dataset(spec, image_size=loaded.preprocessing.image_size, **options.dataset_options(args))
        if args.max_images is not None:
            data = torch.utils.data.Subset(data, range(min(args.max_images, len(data))))
        return data

    circuit = feature_circuit(loaded, saes, dataset(args.data), args.target, nodes_per_layer=args.nodes_per_layer,
                              faithfulness=args.faithfulness, edge_threshold=args.edge_threshold,
                              reference=dataset(args.reference) if args.reference else None, batch_size=args.batch_size,
                              progress=options.wants_progress(args))
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "circuit.json").write_text(circuit.to_json())
    circuit.to_svg(folder / "circuit.svg")
    (folder / "circuit.dot").write_text(circuit.to_dot())
    circuit.to_csv(folder / "circuit_nodes.csv", folder / "circuit_edges.csv")
    circuit.plot().savefig(folder / "circuit.png", dpi=120)
    if args.json:
        options.print_json({"out": str(folder), **circuit.to_dict()}, out)
    else:
        print(f"circuit for {circuit.target} through {', '.join(circuit.layers)}: {circuit.size} nodes, "
              f"{len(circuit.edges)} edges; faithfulness {circuit.faithfulness:.3f}, completeness {circuit.completeness:.3f}",
              file=out)
        for node in sorted(circuit.nodes, key=lambda n: -abs(n.effect))[:10]:
            print(f"  {node.name:<20} effect {node.effect:+.4g}", file=out)
        print(f"wrote {folder / 'circuit.json'}, circuit.svg, circuit.png, circuit.dot, circuit_nodes.csv, circuit_edges.csv",
              file=out)
    return 0
