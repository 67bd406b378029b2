"""SAE training: mechlens TopK vs overcomplete's TopKSAE on the same stored activations.

One run: a SmallCNN (random init with ``--quick``, one quick epoch of training otherwise) on
SyntheticShapes; the per-position rows of ``stage2`` (64 channels) are captured into a store
(train split) and into a second store (held-out split). Then, with the same width, k, steps,
batch size, learning rate and batch order:

* mechlens ``train_sae`` streaming shuffled batches from the store (its recipe: normalisation,
  geometric-median b_dec, W_enc = W_dec^T, unit-norm decoder with parallel-gradient removal,
  AuxK against dead latents, LR warm-up and decay);
* the same mechlens training on the layer held in memory as a tensor (the cost of streaming);
* mechlens with the Multi-TopK term (``multi_k = 4k``, Gao et al.'s k and 4k objective), off
  by default: more gradient per step for the same number of steps;
* overcomplete ``TopKSAE`` trained by its own ``train_sae`` loop with its AuxK loss
  (``top_k_auxiliary_loss``), and once more with plain MSE (its fastest configuration).

Every SAE is scored by the same code (``mechlens.sae.evaluate``) on the held-out rows: FVU, mean
L0 and the fraction of latents that never fire on them.

The learning rate is not part of "the same settings": each recipe has its own best one (the
encoder of overcomplete's TopKSAE is Linear + BatchNorm, which rescales its steps). So, besides
the comparison at one shared ``--lr``, each of mechlens and overcomplete (with AuxK) is trained at
every rate of ``--lr-sweep``; each side's rate is chosen by FVU on a *validation* split (its own
images, captured like the others), and the chosen SAEs are compared on the held-out test rows
(``fvu_vs_overcomplete_tuned_lr``, the figure the FVU target uses). Training throughput is rows per second
of the training loop alone, the median of ``--repeats`` interleaved runs (so a burst of load
from elsewhere on the machine hits every system alike). Prints a table and ends with one JSON line.

    python benchmarks/sae_vs_peers.py            # 2000 images, 2000 steps x 2 repeats (~5 min on 2 idle cores)
    python benchmarks/sae_vs_peers.py --threads 1   # steadier timings on a shared machine
    python benchmarks/sae_vs_peers.py --quick    # small and short, for the test suite
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

# overcomplete 0.3 calls matplotlib.cm.get_cmap, removed in matplotlib 3.9: restore the alias
# before importing it (only its plotting helpers use it; the SAE code does not).
import matplotlib  # noqa: E402
import matplotlib.cm as cm  # noqa: E402

if not hasattr(cm, "get_cmap"):
    cm.get_cmap = matplotlib.colormaps.get_cmap

from activation_store import ActivationStore, LayerSpec, StoreWriter  # noqa: E402
from mechlens.capture import capture  # noqa: E402
from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig  # noqa: E402
from mechlens.features.layout import as_position_rows  # noqa: E402
from mechlens.models import small_cnn, train_classifier  # noqa: E402
from mechlens.sae import (  # noqa: E402
    Normalizer, SAETrainer, TensorSource, TopKConfig, TrainConfig, evaluate, train_sae,
)

LAYER = "stage2"
SYSTEMS = ("mechlens", "mechlens_in_memory", "mechlens_multik", "overcomplete", "overcomplete_mse")


def capture_rows(path: Path, model: torch.nn.Module, dataset: SyntheticShapes, *, batch_size: int = 200,
                 dtype: str = "float16") -> ActivationStore:
    """Per-position rows of ``LAYER`` for every image into a new store (sample id, position, label)."""
    model.eval()
    writer = None
    try:
        for start in range(0, len(dataset), batch_size):
            ids = np.arange(start, min(start + batch_size, len(dataset)))
            images = dataset.render(ids)
            with torch.no_grad(), capture(model, [LAYER]) as cap:
                model(images)
            rows, spatial = as_position_rows(cap[LAYER], "nchw")  # a conv stage of the shapes CNN
            b, p, c = rows.shape
            if writer is None:
                meta = {"spatial": "all", "layout": "nchw", "spatial_shape": list(spatial)}
                writer = StoreWriter(path, model="mechlens:small_cnn", layers={LAYER: LayerSpec(c, dtype, meta=meta)})
            writer.write({LAYER: rows.reshape(b * p, c).numpy().astype(dtype)}, sample_ids=np.repeat(ids, p),
                         positions=np.tile(np.arange(p), b), labels=np.repeat(dataset.labels[ids], p))
    finally:
        if writer is not None:
            writer.close()
    return ActivationStore(path)


class OvercompleteAdapter:
    """``encode`` / ``decode`` over an overcomplete SAE (whose ``encode`` returns (pre, codes))."""

    def __init__(self, model):
        self.model = model.eval()

    def encode(self, x):
        return self.model.encode(x)[1]

    def decode(self, z):
        return self.model.decode(z)


def train_overcomplete(batches: list[torch.Tensor], d: int, width: int, k: int, lr: float, *, auxk: bool,
                       seed: int) -> tuple[OvercompleteAdapter, float]:
    from overcomplete.sae import TopKSAE, train_sae as oc_train_sae
    from overcomplete.sae.losses import mse_l1, top_k_auxiliary_loss

    torch.manual_seed(seed)  # overcomplete initialises from the global RNG
    model = TopKSAE(d, width, top_k=k)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    criterion = top_k_auxiliary_loss if auxk else (lambda *a: mse_l1(*a, penalty=0.0))
    start = time.perf_counter()
    oc_train_sae(model, batches, criterion, optimizer, nb_epochs=1, clip_grad=1.0, monitoring=0)
    return OvercompleteAdapter(model), time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short (for the test suite)")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=2e-3, help="the shared rate of the timed runs")
    parser.add_argument("--lr-sweep", type=float, nargs="+", default=[1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2],
                        help="rates each side is tuned over (chosen on the validation split)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2, help="interleaved timing repetitions (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.images, args.steps, args.width, args.k, args.batch_size, args.repeats = 250, 100, 256, 8, 512, 1
        args.lr_sweep = [2e-3, 8e-3]
    if args.threads:
        torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp(prefix="sae-bench-", dir=args.dir))
    try:
        print(f"data: {args.images} SyntheticShapes images 64x64, layer {LAYER} of small_cnn", flush=True)
        train_images = SyntheticShapes(SyntheticShapesConfig(num_samples=args.images, image_size=64, split="train"))
        test_images = SyntheticShapes(SyntheticShapesConfig(num_samples=max(100, args.images // 4), image_size=64,
                                                            split="test"))
        val_images = SyntheticShapes(test_images.config.replace(split="validation"))
        model = small_cnn(num_classes=5, seed=0)
        if not args.quick:
            start = time.perf_counter()
            train_classifier(model, train_images, epochs=1, batch_size=64, progress=False)
            print(f"  trained the CNN for one epoch in {time.perf_counter() - start:.0f} s", flush=True)
        store = capture_rows(scratch / "train", model, train_images)
        held_out = capture_rows(scratch / "test", model, test_images)
        validation = capture_rows(scratch / "validation", model, val_images)
        view = store[LAYER]
        d = view.dim
        print(f"  store: {view.num_rows:,} rows of width {d} ({view.spec.dtype}); held out: "
              f"{held_out[LAYER].num_rows:,} rows", flush=True)
        train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, device=args.device,
                            log_every=max(1, args.steps // 5), dead_window=max(4 * args.batch_size, view.num_rows // 2),
                            lr_warmup_steps=min(100, args.steps // 10))
        config = TopKConfig(width=args.width, k=args.k)

        memory = torch.from_numpy(view[:]).float().to(args.device)
        normalizer = Normalizer.from_statistics(store.statistics(LAYER), center=train.center)
        # the peer sees the same rows in the same (in-memory, shuffled) batch order
        batches = [b.data.cpu() for _, b in zip(range(args.steps), TensorSource(memory.cpu(), args.batch_size,
                                                                                  seed=train.seed).iterate(0))]
        models: dict[str, object] = {}
        rates: dict[str, list[float]] = {name: [] for name in SYSTEMS}
        for repeat in range(args.repeats):  # interleaved, so a burst of load elsewhere hits every system
            print(f"repeat {repeat + 1}/{args.repeats}", flush=True)
            ours = train_sae(store, LAYER, config, train, progress=False)
            models.setdefault("mechlens", ours.sae)
            rates["mechlens"].append(ours.rows_per_second)
            source = TensorSource(memory, args.batch_size, seed=train.seed)
            in_memory = SAETrainer(config.replace(d_in=d, layer=LAYER), train).fit(source, progress=False,
                                                                                   normalizer=normalizer)
            models.setdefault("mechlens_in_memory", in_memory.sae)
            rates["mechlens_in_memory"].append(in_memory.rows_per_second)
            multik = train_sae(store, LAYER, config.replace(multi_k=4 * args.k), train, progress=False)
            models.setdefault("mechlens_multik", multik.sae)
            rates["mechlens_multik"].append(multik.rows_per_second)
            for name, auxk in (("overcomplete", True), ("overcomplete_mse", False)):
                adapter, seconds = train_overcomplete(batches, d, args.width, args.k, args.lr, auxk=auxk,
                                                      seed=train.seed)
                models.setdefault(name, adapter)
                rates[name].append(args.steps * args.batch_size / seconds)
            print("  " + ", ".join(f"{name} {rates[name][-1]:,.0f} rows/s" for name in SYSTEMS), flush=True)
        held_rows = list(held_out[LAYER].iter_batches(4096, shuffle=False))
        results = {name: (evaluate(models[name], held_rows, device="cpu"), statistics.median(rates[name]))
                   for name in SYSTEMS}
        # learning-rate sweep: each side at the rate its validation FVU prefers
        val_rows = list(validation[LAYER].iter_batches(4096, shuffle=False))
        sweep: dict[str, dict[float, tuple[object, float]]] = {"mechlens": {}, "overcomplete": {}}
        for lr in args.lr_sweep:
            if lr == args.lr:
                ours_sae, peer_sae = models["mechlens"], models["overcomplete"]
            else:
                ours_sae = train_sae(store, LAYER, config, train.replace(lr=lr), progress=False).sae
                peer_sae, _ = train_overcomplete(batches, d, args.width, args.k, lr, auxk=True, seed=train.seed)
            for name, sae in (("mechlens", ours_sae), ("overcomplete", peer_sae)):
                sweep[name][lr] = (sae, evaluate(sae, val_rows, device="cpu").fvu)
            print(f"  lr {lr:g}: validation FVU mechlens {sweep['mechlens'][lr][1]:.4f}, "
                  f"overcomplete {sweep['overcomplete'][lr][1]:.4f}", flush=True)
        tuned = {}
        for name, by_lr in sweep.items():
            best_lr = min(by_lr, key=lambda lr: by_lr[lr][1])
            tuned[name] = (best_lr, evaluate(by_lr[best_lr][0], held_rows, device="cpu"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print(f"\n{'system':<20} {'FVU':>8} {'L0':>7} {'dead %':>7} {'rows/s':>10}")
    for name, (metrics, rows_per_s) in results.items():
        print(f"{name:<20} {metrics.fvu:>8.4f} {metrics.l0:>7.2f} {100 * metrics.dead_fraction:>7.1f} {rows_per_s:>10,.0f}")
    ours_m, ours_rate = results["mechlens"]
    multik_m, multik_rate = results["mechlens_multik"]
    peer_m, peer_rate = results["overcomplete"]
    mse_m, mse_rate = results["overcomplete_mse"]
    mem_rate = results["mechlens_in_memory"][1]
    figures = {"rows": int(view.num_rows), "held_out_rows": int(ours_m.rows), "d_in": int(d), "width": args.width,
               "k": args.k, "steps": args.steps, "batch_size": args.batch_size, "device": args.device,
               "repeats": args.repeats, "threads": torch.get_num_threads()}
    for name, (metrics, rate) in results.items():
        figures[f"{name}_fvu"] = round(metrics.fvu, 5)
        figures[f"{name}_l0"] = round(metrics.l0, 3)
        figures[f"{name}_dead_pct"] = round(100 * metrics.dead_fraction, 2)
        figures[f"{name}_rows_per_s"] = round(rate, 1)
    ratios = {
        "fvu_vs_overcomplete": round(ours_m.fvu / max(peer_m.fvu, 1e-12), 4),
        "fvu_vs_overcomplete_mse": round(ours_m.fvu / max(mse_m.fvu, 1e-12), 4),
        "dead_pct_minus_overcomplete": round(100 * (ours_m.dead_fraction - peer_m.dead_fraction), 2),
        "rows_per_s_vs_overcomplete": round(ours_rate / peer_rate, 3),
        "rows_per_s_vs_overcomplete_mse": round(ours_rate / mse_rate, 3),
        "multik_fvu_vs_overcomplete": round(multik_m.fvu / max(peer_m.fvu, 1e-12), 4),
        "multik_rows_per_s_vs_overcomplete": round(multik_rate / peer_rate, 3),
        "store_step_time_vs_in_memory": round(mem_rate / ours_rate, 3),
    }
    for name, (best_lr, metrics) in tuned.items():
        figures[f"{name}_tuned_lr"] = best_lr
        figures[f"{name}_tuned_fvu"] = round(metrics.fvu, 5)
        figures[f"{name}_tuned_l0"] = round(metrics.l0, 3)
        figures[f"{name}_tuned_dead_pct"] = round(100 * metrics.dead_fraction, 2)
    figures["lr_sweep"] = list(args.lr_sweep)
    ours_t, peer_t = tuned["mechlens"][1], tuned["overcomplete"][1]
    ratios["fvu_vs_overcomplete_tuned_lr"] = round(ours_t.fvu / max(peer_t.fvu, 1e-12), 4)
    ratios["tuned_dead_pct_minus_overcomplete"] = round(100 * (ours_t.dead_fraction - peer_t.dead_fraction), 2)
    print(f"\nFVU ratio (mechlens / overcomplete), each at its validation-chosen rate "
          f"(mechlens {tuned['mechlens'][0]:g}, overcomplete {tuned['overcomplete'][0]:g}): "
          f"{ratios['fvu_vs_overcomplete_tuned_lr']:.3f} (target <= 1.0); dead % "
          f"{100 * ours_t.dead_fraction:.1f} vs {100 * peer_t.dead_fraction:.1f}")
    print(f"FVU ratio at the shared rate {args.lr:g}: {ratios['fvu_vs_overcomplete']:.3f}; with "
          f"Multi-TopK (k and 4k): {ratios['multik_fvu_vs_overcomplete']:.3f}")
    print(f"dead %: mechlens {100 * ours_m.dead_fraction:.1f} vs overcomplete {100 * peer_m.dead_fraction:.1f} "
          "(target: no more than the peer)")
    print(f"rows/s ratio: {ratios['rows_per_s_vs_overcomplete']:.2f}x vs overcomplete with AuxK, "
          f"{ratios['rows_per_s_vs_overcomplete_mse']:.2f}x vs plain MSE (target >= 1.0)")
    print(f"store streaming step time / in-memory step time: {ratios['store_step_time_vs_in_memory']:.2f} (target <= 1.1)")
    print(json.dumps({"benchmark": "sae_vs_peers", "figures": figures, "ratios": ratios}))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
