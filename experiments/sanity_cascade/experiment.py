"""The attribution sanity check (Adebayo et al., 2018) on the trained shapes CNN: randomize the
model's layers from the top down (cascading) and measure how much each method's maps change
(Spearman rank correlation and SSIM against the trained model's maps). Methods whose maps
survive randomization (Guided Backprop) do not explain the model.

Writes ``cascade.json`` (per method, per step), ``cascade-<method>.png`` and ``summary.png``.
Run: ``mechlens run experiments/sanity_cascade --out DIR``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from activation_store.manifest import check_name, safe_join
    from mechlens.evaluation import plot_randomization, randomization_check
    from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier

    out.mkdir(parents=True, exist_ok=True)
    # method names become file names (cascade-<method>.png): checked before any work
    methods = config.get("methods", ["saliency", "gradcam", "integrated_gradients", "guided_backprop"])
    figures = {method: safe_join(out, f"cascade-{check_name(method, 'method')}", "figure", suffix=".png") for method in methods}
    from tqdm.auto import tqdm

    progress = bool(config.get("progress", False))  # bars on stderr (mechlens run on a terminal)
    classifier = load_or_train_shapes_classifier(ShapesRecipe(), cache_dir=Path(config.get("model_cache") or out / "model"),
                                                 progress=progress)
    loaded = classifier.loaded
    test = classifier.test_dataset()
    images = test.render(range(int(config.get("images", 8))))
    results = {}
    for method in tqdm(methods, desc="sanity cascade", unit="method", disable=not progress):
        kwargs = dict(config.get("method_kwargs", {}).get(method, {}))
        # pixels in, the loaded model normalizes; the method's own keywords (its seed too) apart
        check = randomization_check(loaded, images, None, method, mode="cascading",
                                    layers=config.get("layers"), seed=int(config.get("seed", 0)), method_kwargs=kwargs)
        results[method] = check.to_dict()
        fig = plot_randomization(check, image=images, index=0)
        fig.savefig(figures[method], dpi=100)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(7, 4))
    for method, data in results.items():
        ax.plot(range(1, len(data["spearman"]) + 1), data["spearman"], marker="o", label=method)
    first = next(iter(results.values()))
    ax.set_xticks(range(1, len(first["layers"]) + 1), first["layers"], rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("Spearman vs trained model")
    ax.set_xlabel("randomized down to (cascading)")
    ax.axhline(0, color="0.5", lw=0.8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=110)
    plt.close(fig)
    (out / "cascade.json").write_text(json.dumps(results, indent=2))
    # the registry's rule (MethodInfo.randomization): a method fails the check when its maps keep a
    # Spearman >= 0.6 with the trained model's at some step of the cascade, passes when < 0.5 throughout
    verdict = {m: "fails" if max(r["spearman"]) >= 0.6 else "passes" if max(r["spearman"]) < 0.5 else "mixed"
               for m, r in results.items()}
    return {"methods": list(results), "final_spearman": {m: r["spearman"][-1] for m, r in results.items()},
            "verdict": verdict}
