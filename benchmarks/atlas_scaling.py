"""The feature atlas at scale: seconds per feature against the number of features published,
one feature at a time vs batched, in one run.

Both sides build the same atlas (every default panel: exemplars, quantile bands, histogram,
logit and causal effects, the map, similar features, concepts, a feature visualization and a
Grad-CAM overlay per feature) of the N most frequent latents of a random ReLU SAE on ``stage2`` of
the tiny SmallCNN (``small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0)``, the
registry's ``mechlens:small_cnn_tiny``, at 32 px) over 64 synthetic shapes:

* **one at a time**: ``chunk=1`` (every panel computed for one feature, as a per-feature loop
  would) and a visualizer that optimizes one image per feature (``batch=1``);
* **batched**: ``chunk=256`` and a visualizer that optimizes 64 features per optimization, the
  attributions a batch of exemplars per call.

For N in 64, 256, 1024 (``--quick``: 8 and 16) each side's build is timed end to end (statistics
are computed once, beforehand; the fixed costs of a build -- the map's t-SNE, the class
gradients, the index -- are included). The feature visualization alone (``visualize(ids)``) is
timed too, since it is what dominates on a real model. Figures: seconds per feature per side and
N; ratios: the speed-up of batching per N (one-at-a-time / batched seconds per feature), and per
side how the cost per feature changes from the smallest N to the largest (1.0: the total grows
linearly with N; below 1: the fixed costs are spread over more features).

    python benchmarks/atlas_scaling.py              # 64, 256, 1024 features, a few minutes on 2 cores
    python benchmarks/atlas_scaling.py --quick      # 8 and 16 features, for the test suite

The last line printed is one JSON object: ``{"benchmark": "atlas_scaling", "figures": ..., "ratios": ...}``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mechlens.atlas.build import build_atlas
from mechlens.atlas.callbacks import feature_attributor, feature_visualizer
from mechlens.capture import capture_to_store
from mechlens.models import load_model
from mechlens.sae import ReLUConfig, build_sae, feature_statistics

SIDES = {"one_at_a_time": {"chunk": 1, "vis_batch": 1}, "batched": {"chunk": 256, "vis_batch": 64}}


def setup(root: Path, width: int, images: int, size: int):
    """The tiny model, a store of its ``stage2`` over synthetic shapes, a random ReLU SAE whose
    latents all fire (``b_enc = 0``), and its statistics."""
    loaded = load_model("mechlens:small_cnn_tiny", input_size=size)  # small_cnn(5, width=8, depth=3, blocks_per_stage=1, seed=0)
    spec = f"synthetic:shapes?n={images}&size={size}"
    capture_to_store(loaded, spec, root / "store", layers="stage2", num_workers=0, progress=False)
    from activation_store import ActivationStore

    dim = ActivationStore(root / "store")["stage2"].dim
    sae = build_sae(ReLUConfig(width=width, d_in=dim, layer="stage2", layout="nchw"), seed=0).eval()
    stats = feature_statistics(sae, root / "store", top_k=4)
    alive = int((stats.frequency > 0).sum())
    return loaded, sae, stats, alive


def build(root: Path, loaded, sae, stats, n: int, side: str, steps: int, size: int) -> float:
    """Seconds for one full atlas of the ``n`` most frequent latents."""
    config = SIDES[side]
    out = root / f"site-{side}-{n}"
    visualize = feature_visualizer(loaded, sae, size=size, steps=steps, batch=config["vis_batch"])
    attribute = feature_attributor(loaded, sae)
    start = time.perf_counter()
    result = build_atlas(sae, root / "store", loaded, out, stats=stats, visualize=visualize, attribute=attribute,
                         max_features=n, exemplars=4, histogram_rows=2000, effect_images=16, causal_images=16,
                         chunk=config["chunk"], batch_size=64, progress=False)
    seconds = time.perf_counter() - start
    if len(result.features) != n or len(result.rendered) != n:
        raise RuntimeError(f"the {side} build published {len(result.features)} features, not {n}")
    shutil.rmtree(out)
    return seconds


def featvis_only(loaded, sae, ids: list[int], side: str, steps: int, size: int) -> float:
    visualize = feature_visualizer(loaded, sae, size=size, steps=steps, batch=SIDES[side]["vis_batch"])
    start = time.perf_counter()
    images = visualize(ids)
    if len(images) != len(ids):
        raise RuntimeError(f"{side}: {len(images)} visualizations for {len(ids)} features")
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 and 16 features (the test suite's run)")
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="numbers of features (default 64 256 1024)")
    parser.add_argument("--steps", type=int, default=None, help="feature-visualization steps (default 8; --quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machines are shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sizes = args.sizes or ([8, 16] if args.quick else [64, 256, 1024])
    steps = args.steps if args.steps is not None else (2 if args.quick else 8)
    size, images = (16, 24) if args.quick else (24, 64)
    root = Path(tempfile.mkdtemp(prefix="atlas-scaling-"))
    try:
        loaded, sae, stats, alive = setup(root, width=max(sizes) + max(sizes) // 4 + 8, images=images, size=32)
        if alive < max(sizes):
            raise RuntimeError(f"only {alive} latents fire; the benchmark needs {max(sizes)}")
        # warm-up: first-call costs (imports, t-SNE's compilation, allocator) belong to no side
        build(root, loaded, sae, stats, min(sizes), "batched", steps, size)
        figures: dict = {"sizes": sizes, "featvis_steps": steps, "featvis_size": size, "threads": args.threads,
                         "seconds_per_feature": {}, "featvis_seconds_per_feature": {}, "build_seconds": {}}
        for side in SIDES:
            figures["seconds_per_feature"][side], figures["featvis_seconds_per_feature"][side] = {}, {}
            figures["build_seconds"][side] = {}
        order = [int(i) for i in (-torch.as_tensor(stats.frequency)).argsort(stable=True)]
        for n in sizes:
            for side in SIDES:  # side by side, per N
                seconds = build(root, loaded, sae, stats, n, side, steps, size)
                figures["build_seconds"][side][str(n)] = round(seconds, 3)
                figures["seconds_per_feature"][side][str(n)] = round(seconds / n, 5)
                vis = featvis_only(loaded, sae, order[:n], side, steps, size)
                figures["featvis_seconds_per_feature"][side][str(n)] = round(vis / n, 5)
                print(f"{side:>14} N={n:5d}: {seconds:8.2f} s build, {seconds / n * 1000:8.2f} ms/feature "
                      f"(feature visualization alone {vis / n * 1000:7.2f} ms/feature)", flush=True)
        ratios: dict = {"batching_speedup": {}, "featvis_batching_speedup": {}, "per_feature_cost_growth": {}}
        for n in sizes:
            per = figures["seconds_per_feature"]
            ratios["batching_speedup"][str(n)] = round(per["one_at_a_time"][str(n)] / per["batched"][str(n)], 3)
            vis = figures["featvis_seconds_per_feature"]
            ratios["featvis_batching_speedup"][str(n)] = round(vis["one_at_a_time"][str(n)] / vis["batched"][str(n)], 3)
        low, high = str(min(sizes)), str(max(sizes))
        for side in SIDES:
            per = figures["seconds_per_feature"][side]
            ratios["per_feature_cost_growth"][side] = round(per[high] / per[low], 3)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps({"benchmark": "atlas_scaling", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
