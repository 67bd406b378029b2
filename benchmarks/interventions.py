"""Attribution patching vs exhaustive ablation: the time to rank every latent of an SAE by its
ablation effect on a class logit, and how well the fast estimate agrees with the exact effects.

Setup (full run): the reference SmallCNN trained on SyntheticShapes (the ruler planted on the
squares, ``ShapesRecipe()``), a 4096-wide TopK SAE (k=8) trained on ``stage2`` (two conv blocks
before the logits, so the logit is not linear in the latents), 1000 images of the training
distribution, target: the ``square`` logit, ablation: zero.

* ``attribution``: :func:`mechlens.interventions.attribution_patching` (one forward + one backward
  per batch, every latent at once); ``integrated``: the same with 4 integration steps;
* ``exhaustive``: :func:`mechlens.interventions.ablation_effects` over every latent (one intervened
  forward per latent per batch, on the images where the latent fires: zeroing it elsewhere changes
  nothing, exactly).

Reported: both times, the speed-up, Spearman's rho between estimate and exact effects over the
100 latents the estimate ranks highest, and the exact top-10 recall. ``--quick``: a random-weight
model, a 128-wide SAE on 64 images (a smoke run; its figures mean nothing). The last line is JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mechlens.capture import capture_to_store  # noqa: E402
from mechlens.data import build_dataset  # noqa: E402
from mechlens.interventions import ablation_effects, attribution_patching, rank_agreement  # noqa: E402
from mechlens.sae import TopKConfig, TrainConfig, train_sae  # noqa: E402


def setup(args: argparse.Namespace, work: Path) -> tuple:
    if args.quick:
        from mechlens.models import load_model

        loaded, square = load_model("mechlens:small_cnn", num_classes=5, seed=0), 1
        size = loaded.preprocessing.image_size[0] if isinstance(loaded.preprocessing.image_size, (tuple, list)) else loaded.preprocessing.image_size
        spec = f"synthetic:shapes?n={args.images}&size={size}&seed=7&split=capture"
    else:
        from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier

        recipe = ShapesRecipe()
        loaded = load_or_train_shapes_classifier(recipe, cache_dir=Path(args.cache) / "shapes", progress=False).loaded
        data = recipe.train_data
        square = int(data.artefact_class)
        spec = (f"synthetic:shapes?n={args.images}&size={data.image_size}&seed=7&split=capture"
                f"&artefact_class={square}&artefact_p={data.artefact_probability}")
    capture_to_store(loaded, spec, work / "store", layers=[args.layer], spatial="all", dtype="float32", batch_size=128,
                     progress=False)
    result = train_sae(work / "store", args.layer, TopKConfig(width=args.width, k=8),
                       TrainConfig(steps=args.sae_steps, batch_size=1024, seed=0), out=work / "sae", progress=False)
    sae = (result.sae if hasattr(result, "sae") else result.saes[0]).eval()
    dataset = build_dataset(spec)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return loaded, sae, images, square


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run on a random-weight model")
    parser.add_argument("--images", type=int, default=None, help="images (default 1000; quick 64)")
    parser.add_argument("--width", type=int, default=None, help="SAE width (default 4096; quick 128)")
    parser.add_argument("--sae-steps", type=int, default=None, help="SAE training steps (default 2000; quick 100)")
    parser.add_argument("--layer", default="stage2")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--cache", default=str(ROOT / "runs" / "benchmark-cache"))
    parser.add_argument("--work", default=None, help="where the store and SAE go (default: a temporary folder)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    args.images = args.images or (64 if args.quick else 1000)
    args.width = args.width or (128 if args.quick else 4096)
    args.sae_steps = args.sae_steps or (100 if args.quick else 2000)
    torch.set_num_threads(args.threads)
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work) if args.work else Path(scratch)
        t0 = time.perf_counter()
        loaded, sae, images, square = setup(args, work)
        setup_seconds = time.perf_counter() - t0
        target = f"class:{square}"
        estimated = attribution_patching(loaded, sae, images, target, batch_size=args.batch_size)
        integrated = attribution_patching(loaded, sae, images, target, steps=4, batch_size=args.batch_size)
        exact = ablation_effects(loaded, sae, images, target, batch_size=args.batch_size, progress=not args.quick)
    agreement = rank_agreement(estimated, exact, top=min(100, args.width))
    integrated_agreement = rank_agreement(integrated, exact, top=min(100, args.width))
    fired = int((exact.active > 0).sum())
    print(f"model: {'random small_cnn' if args.quick else 'trained shapes SmallCNN'}, layer {args.layer}, "
          f"SAE width {args.width}, {args.images} images, target {target} (setup {setup_seconds:.1f}s)")
    print(f"attribution patching: {estimated.seconds:8.2f}s  ({estimated.forwards} forward+backward)")
    print(f"  integrated (4 steps): {integrated.seconds:6.2f}s  ({integrated.forwards} forward+backward)")
    print(f"exhaustive ablation:  {exact.seconds:8.2f}s  ({exact.forwards} forwards; {fired} latents fire on some image)")
    print(f"speed-up: {exact.seconds / max(estimated.seconds, 1e-9):.0f}x; Spearman over the top {agreement['latents']}: "
          f"{agreement['spearman']:.4f} (integrated {integrated_agreement['spearman']:.4f}); exact top-10 recall "
          f"{agreement['exact_top10_recall']:.2f}")
    print(json.dumps({
        "benchmark": "interventions",
        "figures": {"quick": args.quick, "width": args.width, "images": args.images, "layer": args.layer,
                    "attribution_seconds": estimated.seconds, "integrated_seconds": integrated.seconds,
                    "exhaustive_seconds": exact.seconds, "exhaustive_forwards": exact.forwards, "latents_firing": fired,
                    "spearman_top100": agreement["spearman"], "integrated_spearman_top100": integrated_agreement["spearman"],
                    "pearson_top100": agreement["pearson"], "exact_top10_recall": agreement["exact_top10_recall"]},
        "ratios": {"exhaustive_over_attribution": exact.seconds / max(estimated.seconds, 1e-9),
                   "exhaustive_over_integrated": exact.seconds / max(integrated.seconds, 1e-9)},
    }))


if __name__ == "__main__":
    main()
