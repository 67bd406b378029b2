"""SAE sweep: fidelity (FVU) against sparsity (L0) for several k and widths, trained in one
pass over the same stored activations. Writes ``sweep.csv``, ``sweep.json`` and
``fvu_vs_l0.png``; every SAE is saved under ``saes/``.

Run: ``mechlens run experiments/sae_sweep --out DIR`` (``--quick`` for a reduced run).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    from mechlens.capture import capture_to_store
    from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier
    from mechlens.sae import TopKConfig, TrainConfig, evaluate_store, plot_fvu_vs_l0, train_sae

    out.mkdir(parents=True, exist_ok=True)
    seed = int(config.get("seed", 0))
    progress = bool(config.get("progress", False))  # bars on stderr (mechlens run on a terminal)
    classifier = load_or_train_shapes_classifier(ShapesRecipe(), cache_dir=Path(config.get("model_cache") or out / "model"),
                                                 progress=progress)
    layer = config.get("layer", "stage3")
    store = out / "store"
    if not (store / "store.json").exists():
        capture_to_store(classifier.loaded, f"synthetic:shapes?n={int(config.get('capture_images', 1000))}&seed={seed + 3}",
                         store, layers=[layer], num_workers=0, progress=progress)
    configs = [TopKConfig(width=int(w), k=int(k)) for w in config.get("widths", [256, 512]) for k in config.get("ks", [4, 8, 16, 32])]
    train = TrainConfig(steps=int(config.get("steps", 1500)), batch_size=int(config.get("batch_size", 1024)), seed=seed)
    result = train_sae(store, layer, configs, train, out=out / "saes", progress=progress)
    rows = []
    points = []
    for sae, cfg in zip(result.saes, result.configs):
        metrics = evaluate_store(sae, store)
        label = f"w={cfg.width} k={cfg.k}"
        points.append((label, metrics))
        rows.append({"width": cfg.width, "k": cfg.k, "fvu": float(metrics.fvu), "l0": float(metrics.l0),
                     "mse": float(metrics.mse), "dead_fraction": float(metrics.dead_fraction),
                     "dense_fraction": float(metrics.dense_fraction)})
    plot_fvu_vs_l0(points, out / "fvu_vs_l0.png", title=f"TopK SAEs on {layer}: FVU vs L0")
    with open(out / "sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"layer": layer, "rows": result.rows, "steps": result.steps, "seconds": round(result.seconds, 1),
               "sweep": rows}
    (out / "sweep.json").write_text(json.dumps(summary, indent=2))
    return summary
