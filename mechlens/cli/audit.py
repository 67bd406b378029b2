"""``mechlens audit``: rank features by the evidence that they are a shortcut, without being told the artefact."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TextIO

from mechlens.cli import options

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``audit`` sub-command."""
    parser = subparsers.add_parser(
        "audit",
        help="shortcut audit: rank SAE latents or channels by evidence that they are a shortcut (no mask or concept needed)",
        description=(
            "Rank the latents of --sae (or the channels of --channels LAYER) by score = causal x purity x spatial: "
            "how much a class's logit drops when the feature is zeroed (attribution patching for all, ablation for "
            "the top candidates), how purely its top exemplars show that class, and whether it survives erasing the "
            "object from its exemplars (when the data knows object boxes) or else peaks in a few fixed places. The "
            "images are the dataset the capture recorded in --store (or --data). Writes audit.csv, audit.json, "
            "audit.png and audit.html to --out."
        ),
    )
    audited = parser.add_mutually_exclusive_group(required=True)
    audited.add_argument("--sae", help="audit an SAE's latents: its directory (SAE.save / mechlens sae train)")
    audited.add_argument("--channels", metavar="LAYER", help="audit the channels of a layer of the store")
    options.STORE.add(parser, required=True)
    options.add_model_options(parser)
    options.add_data_options(parser)
    parser.add_argument("--object-boxes", metavar="FILE.npy", default=None,
                        help="[N, 4] object boxes (x0, y0, x1, y1) in pixels, one per image of the data (default: the "
                             "dataset's own, e.g. synthetic shapes; otherwise location concentration is used)")
    parser.add_argument("--images-per-class", type=int, default=100, help="images per class for the causal effects")
    parser.add_argument("--verify", type=int, default=20, help="top candidates whose effect is measured by ablation")
    parser.add_argument("--tcav", type=int, default=0, metavar="N", help="TCAV evidence for the top N suspects (slow)")
    parser.add_argument("--exemplars", type=int, default=8, help="top exemplars per feature (default 8)")
    parser.add_argument("--top", type=int, default=10, help="suspects shown in the report (default 10)")
    parser.add_argument("--batch-size", type=int, default=64)
    options.SEED.add(parser)
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens audit``; returns the exit code."""
    import numpy as np

    from mechlens.capture import captured_dataset
    from mechlens.data import build_dataset
    from mechlens.evaluation.audit import audit_store
    from mechlens.sae import SAE

    out = out or sys.stdout
    for name in ("images_per_class", "verify", "exemplars", "top"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    device = options.resolved_device(args)
    loaded = options.load_model_from_args(args, device=device)
    image_size = loaded.preprocessing.image_size
    dataset = (build_dataset(args.data, image_size=image_size, **options.dataset_options(args)) if args.data
               else captured_dataset(args.store, image_size=image_size))
    boxes = None
    if args.object_boxes:
        boxes = np.load(args.object_boxes)
        if boxes.ndim != 2 or boxes.shape[1] != 4 or len(boxes) != len(dataset):
            raise ValueError(f"--object-boxes holds {boxes.shape}; expected [{len(dataset)}, 4] (x0, y0, x1, y1) per image")
    audit = audit_store(loaded, args.store, sae=SAE.load(args.sae, device=device).eval() if args.sae else None,
                        channels=args.channels, dataset=dataset, exemplars=args.exemplars, object_boxes=boxes,
                        images_per_class=args.images_per_class, verify=args.verify, tcav=args.tcav,
                        batch_size=args.batch_size, seed=args.seed, progress=options.wants_progress(args))
    folder = Path(args.out)
    page = audit.write(folder, dataset, n=args.top)
    if args.json:
        options.print_json({"out": str(folder), "layer": audit.layer, "spatial_evidence": audit.spatial_evidence,
                            "suspects": [s.row() for s in audit.top(args.top)]}, out)
    else:
        kind = "channel" if args.channels else "latent"
        print(f"shortcut audit of {audit.layer} ({audit.spatial_evidence} as spatial evidence): top suspects", file=out)
        for s in audit.top(args.top):
            print(f"  #{s.rank:<3} {kind} {s.latent:<6} -> {s.class_name:<12} score {s.score:.3f}  causal {s.causal:.2f}  "
                  f"purity {s.purity:.2f}  spatial {s.spatial:.2f}", file=out)
        print(f"wrote {page} (and audit.csv, audit.json, audit.png)", file=out)
    return 0
