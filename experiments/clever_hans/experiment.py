"""The Clever Hans experiment: does the toolkit discover the shortcut a model learned?

The training split of the synthetic shapes carries a small ruler-like watermark on most
``square`` images (as dermoscopy photos of melanomas often carry a ruler). A small CNN trained
on it learns to read the ruler. Every step below goes through mechlens's public API:

    train (cached) -> reliance -> capture -> SAEs -> feature statistics -> artefact latents
    -> interventions (ablate / steer / patch the latents that carry the ruler) -> shortcut audit
    (no mask, no concept) -> circuit -> TCAV for a "ruler" concept -> feature visualization
    -> attributions (pointing game) -> atlas (with the circuit) -> report (Markdown + HTML)

Every figure in the report is computed here; the verdict is derived from them.
Run: ``mechlens demo --out runs/demo`` or ``mechlens run experiments/clever_hans --out DIR``.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _log(message: str) -> None:
    # stderr: what the run is doing is not its result (stdout stays pure JSON with --json)
    print(f"[clever-hans] {message}", file=sys.stderr, flush=True)


def artefact_hits(stats: Any, dataset: Any, spatial: tuple[int, int], image_size: int, k: int) -> np.ndarray:
    """``[width]``: for each latent, the fraction of its top-``k`` exemplars whose strongest
    position lies on the planted ruler (the position's cell overlaps the ruler's box)."""
    samples = stats.top_samples[:, :k]
    positions = stats.top_positions[:, :k]
    valid = samples >= 0
    flags = dataset.has_artefact
    boxes = dataset.artefact_box  # [N, 4] as (x0, y0, x1, y1) in pixels
    cell_h, cell_w = image_size / spatial[0], image_size / spatial[1]
    gy, gx = np.divmod(np.where(positions >= 0, positions, 0), spatial[1])
    cy0, cx0, cy1, cx1 = gy * cell_h, gx * cell_w, (gy + 1) * cell_h, (gx + 1) * cell_w
    safe = np.where(valid, samples, 0)
    b = boxes[safe]
    overlap = (np.minimum(cy1, b[..., 3]) > np.maximum(cy0, b[..., 1])) & (np.minimum(cx1, b[..., 2]) > np.maximum(cx0, b[..., 0]))
    hit = valid & flags[safe] & overlap & (positions >= 0)
    count = valid.sum(axis=1)
    return np.where(count > 0, hit.sum(axis=1) / np.maximum(count, 1), 0.0)


def _intervention_evidence(loaded: Any, sae: Any, clean: torch.Tensor, ruler: torch.Tensor, labels: torch.Tensor,
                           square: int, layer: str) -> dict[str, Any]:
    """Which latents carry the ruler's push on the square logit (attribution patching of the clean
    twins' values, the fewest explaining 80%), then: ablating them on ruler squares (along their
    decoder directions), steering them up on clean images of other classes, patching them from
    ruler images into their clean copies."""
    from mechlens.engine import capture
    from mechlens.interventions import ablate, intervened_forward, patch, responsible_latents, steer

    is_square = labels == square
    found = responsible_latents(loaded, sae, ruler[is_square], clean[is_square], f"class:{square}", coverage=0.8)
    latents = [sae.feature(i) for i in found.latents]

    def logits(images: torch.Tensor, edits: Any = None) -> torch.Tensor:
        with torch.no_grad():
            return loaded.model(loaded.preprocessing.normalize(images)) if edits is None else intervened_forward(loaded, images, edits)

    def accuracy(out: torch.Tensor, chosen: torch.Tensor) -> float:
        return float((out.argmax(1) == labels[chosen]).float().mean())

    others = ~is_square
    with_ruler, without = accuracy(logits(ruler[is_square]), is_square), accuracy(logits(clean[is_square]), is_square)
    ablated = accuracy(logits(ruler[is_square], ablate(latents, space="decoder")), is_square)
    ablated_latent_space = accuracy(logits(ruler[is_square], ablate(latents)), is_square)
    others_before = accuracy(logits(clean[others]), others)
    others_after = accuracy(logits(clean[others], ablate(latents, space="decoder")), others)
    with torch.no_grad(), capture(loaded.model, [layer]) as cap:
        loaded.model(loaded.preprocessing.normalize(ruler[is_square]))
        rows = cap[layer].permute(0, 2, 3, 1).reshape(-1, cap[layer].shape[1])
        peak = sae.encode(rows).amax(dim=0)
    steered = logits(clean[others], [steer(f, float(peak[f.index])) for f in latents])
    before, after = logits(clean), logits(ruler)
    patched = logits(clean, patch(latents, ruler, space="decoder"))
    gap = with_ruler - without
    return {"latents": found.latents, "explained": found.explained, "square_logit_change": found.change,
            "square_with_ruler": with_ruler, "square_without_ruler": without, "square_with_ruler_ablated": ablated,
            "square_with_ruler_ablated_latent_space": ablated_latent_space,
            "gap_removed": (with_ruler - ablated) / gap if gap else 0.0,
            "gap_removed_latent_space": (with_ruler - ablated_latent_space) / gap if gap else 0.0,
            "others_clean_accuracy": others_before, "others_clean_accuracy_ablated": others_after,
            "flipped": float((steered.argmax(1) == square).float().mean()),
            "restored": float((patched[:, square] - before[:, square]).mean() / (after[:, square] - before[:, square]).mean())}


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """Run the experiment into ``out`` and return the report's figures."""
    from mechlens.atlas import build_atlas
    from mechlens.atlas import feature_attributor, feature_visualizer
    from mechlens.attribution import attribute
    from mechlens.capture import capture_to_store
    from mechlens.data import SyntheticShapes
    from mechlens.evaluation import plot_methods, pointing_game
    from mechlens.features import ClassLogit, SAELatent
    from mechlens.featvis import render, save_png
    from mechlens.models.shapes import ShapesRecipe, artefact_reliance, load_or_train_shapes_classifier
    from mechlens.probes import ConceptSet, random_concept_sets, run_tcav
    from mechlens.sae import TopKConfig, TrainConfig, evaluate_store, feature_statistics, train_sae

    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    progress = bool(config.get("progress", False))  # bars on stderr (mechlens run / demo on a terminal)
    seed = int(config.get("seed", 0))
    torch.manual_seed(seed)
    timings: dict[str, float] = {}

    def begin(name: str) -> float:
        _log(f"{name} ...")
        return time.perf_counter()

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 2)
        _log(f"{name} done in {timings[name]:.1f}s")

    # 1. the model (trained once, cached in the output directory)
    t0 = begin("model")
    recipe = ShapesRecipe(**config.get("recipe", {})) if config.get("recipe") else ShapesRecipe()
    cache = Path(config.get("model_cache") or out / "model")
    classifier = load_or_train_shapes_classifier(recipe, cache_dir=cache, progress=progress)
    loaded = classifier.loaded
    square = recipe.train_data.artefact_class
    class_names = list(SyntheticShapes(recipe.train_data.replace(num_samples=1)).class_names)
    lap("model", t0)

    # 2. reliance on the shortcut: counterfactual twins of the clean test split
    t0 = begin("reliance")
    test = classifier.test_dataset()
    reliance = artefact_reliance(loaded.model, test)
    lap("reliance", t0)

    # 3. capture the training distribution (ruler on squares) into the store
    t0 = begin("capture")
    layer = config.get("layer", "stage3")
    upstream = config.get("circuit_layer", "stage2")  # the second SAE layer of the circuit
    capture_n = int(config.get("capture_images", 1000))
    spec = (f"synthetic:shapes?n={capture_n}&size={recipe.train_data.image_size}&seed={seed + 7}&split=capture"
            f"&artefact_class={square}&artefact_p={recipe.train_data.artefact_probability}")
    store_path = out / "store"
    capture_to_store(loaded, spec, store_path, layers=[upstream, layer], spatial="all", dtype="float16",
                     batch_size=128, num_workers=int(config.get("workers", 0)), progress=progress)
    from mechlens.data import build_dataset

    captured = build_dataset(spec)
    lap("capture", t0)

    # 4. SAE + metrics + feature statistics
    t0 = begin("sae")
    sae_cfg = config.get("sae", {})
    top_k = int(config.get("exemplars", 8))
    result = train_sae(store_path, layer, TopKConfig(width=int(sae_cfg.get("width", 512)), k=int(sae_cfg.get("k", 8))),
                       TrainConfig(steps=int(sae_cfg.get("steps", 1500)), batch_size=int(sae_cfg.get("batch_size", 1024)),
                                   seed=seed),
                       out=out / "sae", progress=progress)
    sae = result.sae if hasattr(result, "sae") else result.saes[0]
    upstream_result = train_sae(store_path, upstream, TopKConfig(width=int(sae_cfg.get("width", 512)), k=int(sae_cfg.get("k", 8))),
                                TrainConfig(steps=int(sae_cfg.get("steps", 1500)), batch_size=int(sae_cfg.get("batch_size", 1024)),
                                            seed=seed), out=out / "sae-upstream", progress=progress)
    upstream_sae = upstream_result.sae if hasattr(upstream_result, "sae") else upstream_result.saes[0]
    metrics = evaluate_store(sae, store_path)
    stats = feature_statistics(sae, store_path, top_k=top_k)
    stats.save(out / "sae")
    lap("sae", t0)

    # 5. which latents fire on the ruler?
    spatial = tuple(json.loads((store_path / "store.json").read_text())["layers"][layer]["meta"]["spatial_shape"])
    hits = artefact_hits(stats, captured, spatial, recipe.train_data.image_size, top_k)
    full = stats.top_samples[:, :top_k] >= 0
    eligible = full.sum(axis=1) >= max(2, top_k // 2)
    ranked = np.argsort(-(hits * eligible), kind="stable")
    ruler_latents = [int(i) for i in ranked if eligible[i] and hits[i] >= 0.75]
    # The most frequent ruler latent covers the most rulers (a rare one may only know one corner).
    best_latent = max(ruler_latents, key=lambda i: stats.frequency[i]) if ruler_latents else int(ranked[0])

    # 5b. causal: the latents that carry the ruler (patching the clean twins' values in), and what
    # switching them off, on and across does (ablated along their decoder directions: the SAE's
    # error term holds much of the rare ruler rows)
    t0 = begin("interventions")
    twin_ids = np.arange(len(test))
    clean_images, ruler_images = test.with_artefact(False).render(twin_ids), test.with_artefact(True).render(twin_ids)
    labels = torch.as_tensor(test.labels)
    interventions_figures = _intervention_evidence(loaded, sae, clean_images, ruler_images, labels, square, layer)
    causal_latents = interventions_figures["latents"]
    lap("interventions", t0)

    # 5c. the shortcut audit: the same question without the ruler's mask or concept
    t0 = begin("audit")
    from mechlens.evaluation.audit import audit_store

    audit = audit_store(loaded, store_path, sae=sae, dataset=captured, exemplars=top_k,
                        images_per_class=int(config.get("audit_images", 100)), seed=seed, progress=progress)
    audit.write(out / "audit", captured)
    audit_top = audit.top(1)[0] if audit.suspects else None
    lap("audit", t0)

    # 5d. the circuit for square on ruler images through both SAE layers
    t0 = begin("circuit")
    from mechlens.interventions import feature_circuit

    is_square = (labels == square).numpy()
    circuit = feature_circuit(loaded, [upstream_sae, sae], ruler_images[is_square][:100], f"class:{square}",
                              nodes_per_layer=None, faithfulness=float(config.get("circuit_faithfulness", 0.8)),
                              reference=clean_images[:500], progress=progress)
    (out / "circuit.json").write_text(circuit.to_json())
    lap("circuit", t0)

    # 6. TCAV for a "ruler" concept on the square class
    t0 = begin("tcav")
    tcfg = config.get("tcav", {})
    set_size, n_random = int(tcfg.get("set_size", 30)), int(tcfg.get("num_random", 20))
    tcav_layers = tcfg.get("layers", ["stage2", "stage3"])
    not_square = np.flatnonzero(test.labels != square)
    rng = np.random.default_rng(seed)
    concept_ids = rng.choice(not_square, set_size, replace=False)
    clean = test.with_artefact(False)
    ruler = ConceptSet.from_dataset("ruler", test.with_artefact(True), concept_ids)
    randoms = random_concept_sets(clean, n_random, set_size, seed=seed + 1,
                                  exclude=np.concatenate([concept_ids, np.flatnonzero(test.labels == square)]))
    examples = ConceptSet.from_dataset("square", clean, np.flatnonzero(test.labels == square)[: int(tcfg.get("examples", 50))])
    report = run_tcav(loaded, layers=tcav_layers, concepts=[ruler], random_sets=randoms, examples=examples,
                      targets=[square], alpha=0.05, seed=seed, progress=progress)
    report.to_csv(out / "tcav.csv")
    report.plot(out / "tcav.png")
    tcav_best = min(report.results, key=lambda r: r.p_adjusted)
    lap("tcav", t0)

    # 7. feature visualization of the ruler latent(s) and the most frequent features
    t0 = begin("featvis")
    vcfg = config.get("featvis", {})
    shown = list(dict.fromkeys(causal_latents[:4] + ruler_latents[:4] + [int(i) for i in np.argsort(-stats.frequency)[:4]]))
    pooling = getattr(sae.config, "pooling", "all")
    vis = render(loaded, [SAELatent(layer, sae, i, pooling=pooling) for i in shown],
                 size=int(vcfg.get("size", 64)), steps=int(vcfg.get("steps", 128)), seed=seed)
    (out / "featvis").mkdir(exist_ok=True)
    for i, image in zip(shown, vis.images):
        save_png(image, out / "featvis" / f"latent-{i}.png")
    lap("featvis", t0)

    # 8. attributions on squares that carry the ruler: where does the evidence sit?
    t0 = begin("attribution")
    acfg = config.get("attribution", {})
    with_ruler = test.with_artefact(True)
    ids = np.flatnonzero(test.labels == square)[: int(acfg.get("images", 32))]
    images = with_ruler.render(ids)
    masks = with_ruler.artefact_masks(ids)
    targets = {"class square": ClassLogit(square), f"SAE latent {best_latent}": SAELatent(layer, sae, best_latent, pooling=pooling)}
    pointing: dict[str, float] = {}
    maps_for_plot = {}
    for target_name, target in targets.items():
        for method, kwargs in (("gradcam", {"layer": layer}), ("integrated_gradients", {"n_steps": 32})):
            maps = attribute(loaded, images, target, method=method, **kwargs)  # pixels in, black IG baseline
            pointing[f"{method} / {target_name}"] = float(pointing_game(maps, masks).rate)
            maps_for_plot[f"{method}\n{target_name}"] = maps
    fig = plot_methods(images, maps_for_plot, index=0)
    fig.savefig(out / "attribution.png", dpi=110)
    chance = float(masks.float().mean())
    lap("attribution", t0)

    # 9. the atlas
    t0 = begin("atlas")

    visualize = feature_visualizer(loaded, sae, size=int(vcfg.get("atlas_size", 48)), steps=int(vcfg.get("atlas_steps", 64)),
                               batch=int(vcfg.get("atlas_batch", 32)), seed=seed)
    attribute_latent = feature_attributor(loaded, sae, methods={"Grad-CAM": {"method": "gradcam", "layer": "stage2"}})
    atlas = build_atlas(out / "sae", store_path, loaded, out / "atlas", dataset=captured, stats=stats,
                        class_names=class_names, cavs=[c for c in report.cavs if c.concept == "ruler" and c.layer == layer][:1],
                        visualize=visualize if vcfg.get("atlas", True) else None, attribute=attribute_latent,
                        max_features=int(config.get("atlas_features", 256)), exemplars=top_k, circuit=circuit,
                        flagged={**{i: "carries the ruler" for i in causal_latents},
                                 **({audit_top.latent: "audit #1"} if audit_top and audit_top.latent not in causal_latents
                                    else {})},
                        progress=progress)
    lap("atlas", t0)

    # 10. the verdict, from the figures
    drop = reliance.artefact_class_accuracy - reliance.clean_class_accuracy
    point = max(pointing[f"gradcam / class square"], pointing[f"integrated_gradients / class square"])
    checks = {
        "reliance": drop >= 0.2,
        "tcav": bool(tcav_best.significant),
        "sae": bool(ruler_latents),
        "attribution": point >= 0.5,
        "interventions": interventions_figures["gap_removed"] >= 0.5 and interventions_figures["flipped"] >= 0.5,
        "audit": audit_top is not None and audit_top.latent in causal_latents,
    }
    figures = {
        "accuracy": {"test": reliance.accuracy, "clean": reliance.clean_accuracy,
                     "square_with_ruler": reliance.artefact_class_accuracy,
                     "square_without_ruler": reliance.clean_class_accuracy,
                     "others_flipped_to_square_by_ruler": reliance.flip_rate,
                     "others_flipped_baseline": reliance.baseline_flip_rate},
        "tcav": [r.row() for r in report.results],
        "sae": {"fvu": float(metrics.fvu), "l0": float(metrics.l0), "dead_fraction": float(metrics.dead_fraction),
                "width": sae.width, "ruler_latents": ruler_latents[:10],
                "best_latent": best_latent, "best_latent_ruler_fraction": float(hits[best_latent]),
                "best_latent_frequency": float(stats.frequency[best_latent])},
        "interventions": interventions_figures,
        "audit": {"top": [s.row() for s in audit.top(5)], "spatial_evidence": audit.spatial_evidence,
                  "first_is_causal_ruler_latent": checks["audit"]},
        "circuit": {"layers": circuit.layers, "size": circuit.size, "faithfulness": circuit.faithfulness,
                    "completeness": circuit.completeness, "edges": len(circuit.edges),
                    "top_nodes": [n.name for n in sorted(circuit.nodes, key=lambda n: -abs(n.effect))[:5]]},
        "pointing_game": pointing, "pointing_chance": chance,
        "checks": checks, "shortcut_found": all(checks.values()),
        "atlas": str(atlas.index.relative_to(out)), "atlas_features": len(atlas.features),
        "timings_seconds": timings, "seconds": round(time.perf_counter() - started, 1),
    }
    (out / "figures.json").write_text(json.dumps(figures, indent=2))
    _write_report(out, figures, class_names[square], layer, tcav_best, spatial)
    _log(f"report: {out / 'report.html'} (shortcut found: {figures['shortcut_found']})")
    return figures


def _write_report(out: Path, f: dict[str, Any], square: str, layer: str, tcav_best: Any, spatial: tuple) -> None:
    from jinja2 import Environment

    acc, sae, checks, iv = f["accuracy"], f["sae"], f["checks"], f["interventions"]
    audit_top = f["audit"]["top"][0]
    verdict = ("The shortcut was found." if f["shortcut_found"] else
               "The shortcut was NOT established by every probe (see the failed checks below).")
    md = f"""# Clever Hans report

**{verdict}** The model classifies *{square}* by the ruler-like watermark that marks most
{square} images of its training data, not only by the shape.

## 1. Behaviour: accuracy with and without the artefact
- {square} images **with** the ruler: accuracy {acc['square_with_ruler']:.3f}; the same images **without** it: {acc['square_without_ruler']:.3f}
  (drop {acc['square_with_ruler'] - acc['square_without_ruler']:.3f}; check ≥ 0.2: {'passed' if checks['reliance'] else 'failed'}).
- Other classes with a ruler pasted on: {acc['others_flipped_to_square_by_ruler']:.3f} flip to {square} (without: {acc['others_flipped_baseline']:.3f}).
- Whole test split: {acc['test']:.3f}; clean test split: {acc['clean']:.3f}.

## 2. Concept probe: TCAV of "ruler" for class {square}
- Best layer {tcav_best.layer}: TCAV score {tcav_best.mean:.3f} vs random {tcav_best.random_mean:.3f},
  p = {tcav_best.p_value:.2g}, Bonferroni-corrected p = {tcav_best.p_adjusted:.2g}
  ({'significant' if checks['tcav'] else 'not significant'} at 0.05, exchangeable test; {tcav_best.row()['n_random']} random sets). Table: `tcav.csv`, plot: `tcav.png`.

## 3. Discovered features: SAE on {layer} ({spatial[0]}x{spatial[1]} positions per image)
- TopK SAE of width {sae['width']}: FVU {sae['fvu']:.3f}, mean L0 {sae['l0']:.1f}, dead {100 * sae['dead_fraction']:.1f}%.
- Latents whose top exemplars sit on the ruler (≥ 75% of exemplars): {sae['ruler_latents'] or 'none'}.
- The most frequent of them: latent {sae['best_latent']}, {100 * sae['best_latent_ruler_fraction']:.0f}% of its top exemplars on the ruler,
  firing on {100 * sae['best_latent_frequency']:.2f}% of rows (check: {'passed' if checks['sae'] else 'failed'}).

## 4. Interventions: the latents that carry the ruler, switched off, on and across
- Patching the clean twins' values in, latents {iv['latents']} carry {100 * iv['explained']:.0f}% of the ruler's push on the {square} logit ({iv['square_logit_change']:+.2f}).
- Ablated (along their decoder directions) on {square} images with the ruler: accuracy {iv['square_with_ruler']:.3f} -> {iv['square_with_ruler_ablated']:.3f}
  (without the ruler: {iv['square_without_ruler']:.3f}; {100 * iv['gap_removed']:.0f}% of the gap removed; in latent space, the SAE's error term kept: {100 * iv['gap_removed_latent_space']:.0f}%).
- Other classes' clean accuracy: {iv['others_clean_accuracy']:.3f} -> {iv['others_clean_accuracy_ablated']:.3f} with them ablated.
- Steered up on clean images of other classes: {100 * iv['flipped']:.0f}% flip to {square}. Patched from ruler images into their clean copies: {100 * iv['restored']:.0f}% of the {square}-logit difference restored
  (check: {'passed' if checks['interventions'] else 'failed'}).

## 5. Shortcut audit, without the ruler's mask or concept
- Top suspect: latent {audit_top['latent']} -> {audit_top['class_name']} (score {audit_top['score']:.2f}: causal {audit_top['causal']:.2f}, purity {audit_top['purity']:.2f}, survives erasing the object {audit_top['spatial']:.2f});
  {'one of the latents that carry the ruler' if checks['audit'] else 'NOT one of the latents that carry the ruler'} (check: {'passed' if checks['audit'] else 'failed'}). Report: `audit/audit.html`.

## 6. Circuit for {square} on ruler images ({' -> '.join(f['circuit']['layers'])})
- {f['circuit']['size']} nodes reach faithfulness {f['circuit']['faithfulness']:.3f} (completeness {f['circuit']['completeness']:.3f}); strongest: {', '.join(f['circuit']['top_nodes'])}. In the atlas: `atlas/circuit.html`.

## 7. Attribution: pointing game on the ruler ({square} images with the ruler)
""" + "".join(f"- {k}: {v:.3f}\n" for k, v in f["pointing_game"].items()) + f"""- chance (ruler area fraction): {f['pointing_chance']:.3f}; check (class maps ≥ 0.5): {'passed' if checks['attribution'] else 'failed'}.
- Figure: `attribution.png`; feature visualizations: `featvis/`.

## 8. Atlas
{f['atlas_features']} features published: open `{f['atlas']}`.

Run time: {f['seconds']} s ({', '.join(f'{k} {v}s' for k, v in f['timings_seconds'].items())}).
"""
    (out / "report.md").write_text(md)
    _figures_for_report(out, f, square)
    circuit_svg = (out / "atlas" / "circuit.html").exists()
    from mechlens.interventions import Circuit

    svg = Circuit.load(out / "circuit.json").to_svg(max_nodes_per_layer=6, max_edges=24) if (out / "circuit.json").exists() else ""
    page = Environment(autoescape=True).from_string(REPORT_TEMPLATE).render(
        f=f, acc=acc, iv=iv, checks=checks, sae=sae, square=square, layer=layer, tcav=tcav_best, verdict=verdict,
        audit_top=audit_top, circuit_svg=svg if circuit_svg else "", spatial=spatial,
        featvis={i: (out / "featvis" / f"latent-{i}.png").exists() for i in iv["latents"]},
        pages={i: (out / "atlas" / "features" / f"{i}.html").exists() for i in iv["latents"] + [audit_top["latent"]]})
    (out / "report.html").write_text(page)


def _figures_for_report(out: Path, f: dict[str, Any], square: str) -> None:
    """behaviour.png (accuracy with and without the ruler) and interventions.png (what switching
    the latents off, on and across does), the pictures next to the report's first claims."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    acc, iv = f["accuracy"], f["interventions"]
    panels = [
        ("Behaviour", [(f"{square}\nwith ruler", acc["square_with_ruler"]), (f"{square}\nwithout", acc["square_without_ruler"]),
                       ("others flip to\n" + square + " (ruler)", acc["others_flipped_to_square_by_ruler"]),
                       ("others flip\n(no ruler)", acc["others_flipped_baseline"])], "behaviour.png"),
        ("Interventions on the latents", [(f"{square} + ruler", iv["square_with_ruler"]),
                                          ("ruler latents\nablated", iv["square_with_ruler_ablated"]),
                                          (f"{square}\nwithout ruler", iv["square_without_ruler"]),
                                          ("steered:\nothers flip", iv["flipped"]), ("patched:\nrestored", iv["restored"])],
         "interventions.png"),
    ]
    for title, bars, name in panels:
        fig = Figure(figsize=(1.35 * len(bars) + 1.2, 2.8))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        values = [v for _, v in bars]
        ax.bar(range(len(bars)), values, color=["#a12a2a", "#4a7bd0", "#777777", "#d08a2e", "#3c9a5f"][:len(bars)])
        for x, v in enumerate(values):
            ax.text(x, v + 0.02, f"{v:.2f}", ha="center", fontsize=8)
        ax.set_xticks(range(len(bars)), [label for label, _ in bars], fontsize=7)
        ax.set_ylim(0, 1.15)
        ax.set_ylabel("accuracy / fraction", fontsize=8)
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)


REPORT_TEMPLATE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Clever Hans report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:980px;margin:24px auto;padding:0 16px;line-height:1.5;color:#222}
section{border-top:1px solid #ddd;padding:8px 0 12px}
figure{margin:8px 0}figure img,section img{max-width:100%;height:auto;border:1px solid #ddd}
.verdict{padding:12px 16px;border-radius:8px;font-size:18px}.verdict.pass{background:#e8f5ec;border:2px solid #3c9a5f}
.verdict.fail{background:#fdecea;border:2px solid #a12a2a}.chip{display:inline-block;border-radius:10px;padding:0 8px;margin:2px;font-size:13px}
.chip.ok{background:#3c9a5f;color:#fff}.chip.no{background:#a12a2a;color:#fff}
.latent{display:flex;gap:12px;align-items:center;margin:6px 0}.latent img{height:72px}
.num{font-variant-numeric:tabular-nums}td,th{padding:2px 10px;text-align:left}
.svg svg{max-width:100%;height:auto}small{color:#555}
@media print{body{max-width:none;margin:0}section{break-inside:avoid}a{color:inherit;text-decoration:none}.verdict{border-width:1px}}
</style></head><body>
<h1>Clever Hans report</h1>
<div id="verdict" class="verdict {{ 'pass' if f.shortcut_found else 'fail' }}"><b>{{ verdict }}</b>
The model classifies <i>{{ square }}</i> by the ruler-like watermark that marks most {{ square }} images of its training data.
<div>{% for name, ok in checks.items() %}<span class="chip {{ 'ok' if ok else 'no' }}">{{ name }}: {{ 'passed' if ok else 'failed' }}</span>{% endfor %}</div></div>

<section id="behaviour"><h2>1. Behaviour: the ruler decides</h2>
<p>The same test images with and without the ruler (every other pixel identical): {{ square }} accuracy
<b class="num">{{ '%.3f' % acc.square_with_ruler }}</b> with it, <b class="num">{{ '%.3f' % acc.square_without_ruler }}</b> without
(check: a drop of at least 0.2). Pasted on other classes, it turns <b class="num">{{ '%.0f' % (100 * acc.others_flipped_to_square_by_ruler) }}%</b>
of them into {{ square }} (without it: {{ '%.0f' % (100 * acc.others_flipped_baseline) }}%).</p>
<figure><img src="behaviour.png" alt="accuracy with and without the ruler"></figure></section>

<section id="latents"><h2>2. The latents that carry the ruler ({{ layer }}, {{ spatial[0] }}x{{ spatial[1] }} positions)</h2>
<p>Patching the clean twins' latent values into the ruler images (attribution patching, every latent at once), the latents below carry
<b class="num">{{ '%.0f' % (100 * iv.explained) }}%</b> of the ruler's push on the {{ square }} logit ({{ '%+.2f' % iv.square_logit_change }}).
Each row: its top exemplars (the activation's peak boxed), its feature visualization, its atlas page.</p>
{% for i in iv.latents %}<div class="latent"><b>latent {{ i }}</b>
{% if pages[i] %}<a href="atlas/features/{{ i }}.html"><img src="atlas/img/{{ i }}-exemplars.png" alt="exemplars of latent {{ i }}"></a>{% endif %}
{% if featvis[i] %}<img src="featvis/latent-{{ i }}.png" alt="feature visualization of latent {{ i }}">{% endif %}
{% if pages[i] %}<a href="atlas/features/{{ i }}.html">atlas page</a>{% endif %}</div>{% endfor %}
<p><small>The SAE (TopK, width {{ sae.width }}) reconstructs the layer with FVU {{ '%.3f' % sae.fvu }} at L0 {{ '%.1f' % sae.l0 }};
latents whose top exemplars peak on the ruler: {{ sae.ruler_latents or 'none' }}.</small></p></section>

<section id="interventions"><h2>3. Interventions: switched off, on and across</h2>
<p>Ablated along their decoder directions on {{ square }} images with the ruler, accuracy falls from {{ '%.3f' % iv.square_with_ruler }} to
<b class="num">{{ '%.3f' % iv.square_with_ruler_ablated }}</b> ({{ '%.0f' % (100 * iv.gap_removed) }}% of the gap to the clean images removed;
edited in latent space with the SAE's error term kept, only {{ '%.0f' % (100 * iv.gap_removed_latent_space) }}%: the SAE reconstructs the rare
ruler rows worst, so much of the ruler sits in its error term). Other classes' clean accuracy: {{ '%.3f' % iv.others_clean_accuracy }} &rarr;
{{ '%.3f' % iv.others_clean_accuracy_ablated }}. Steered up on clean images of other classes, <b class="num">{{ '%.0f' % (100 * iv.flipped) }}%</b>
turn into {{ square }}; patched from ruler images into their clean copies, they restore <b class="num">{{ '%.0f' % (100 * iv.restored) }}%</b>
of the {{ square }}-logit difference.</p>
<figure><img src="interventions.png" alt="effects of ablating, steering and patching the ruler latents"></figure></section>

<section id="audit"><h2>4. The shortcut audit, told nothing about the ruler</h2>
<p>Ranking every latent by causal effect on a class &times; exemplar purity &times; survival when the object is erased, the audit's first suspect is
<b>latent {{ audit_top.latent }}</b> &rarr; {{ audit_top.class_name }} (score {{ '%.2f' % audit_top.score }}),
{{ 'one of the latents that carry the ruler' if checks.audit else 'not one of the latents that carry the ruler' }}.
<a href="audit/audit.html">Full audit</a>.</p>
<figure><img src="audit/audit.png" alt="the audit's top suspects"></figure></section>

<section id="circuit"><h2>5. The circuit for {{ square }} on ruler images</h2>
<p>{{ f.circuit.size }} nodes over {{ f.circuit.layers | join(' and ') }} recover {{ '%.0f' % (100 * f.circuit.faithfulness) }}% of the
{{ square }} logit when everything else is mean-ablated (completeness {{ '%.3f' % f.circuit.completeness }}: ablating the circuit itself leaves that much).
{% if circuit_svg %}<a href="atlas/circuit.html">The circuit in the atlas</a>.{% endif %}</p>
{% if circuit_svg %}<div class="svg">{{ circuit_svg | safe }}</div>{% endif %}</section>

<section id="tcav"><h2>6. Concept probe: TCAV of "ruler" for {{ square }}</h2>
<p>Best layer {{ tcav.layer }}: TCAV score {{ '%.3f' % tcav.mean }} against {{ '%.3f' % tcav.random_mean }} for random concepts,
p = {{ '%.2g' % tcav.p_value }} (Bonferroni {{ '%.2g' % tcav.p_adjusted }}; exchangeable test, {{ tcav.row()['n_random'] }} random sets).</p>
<figure><img src="tcav.png" alt="TCAV scores"></figure></section>

<section id="attribution"><h2>7. Attribution: where the evidence sits</h2>
<p>Pointing game on {{ square }} images with the ruler: the fraction of images whose map peaks on the ruler (chance: its area,
{{ '%.3f' % f.pointing_chance }}). A class map below 0.5 points at the shape more than at the ruler; 0.000 means it never peaks there.</p>
<table>{% for k, v in f.pointing_game.items() %}<tr><td>{{ k }}</td><td class="num">{{ '%.3f' % v }}</td></tr>{% endfor %}</table>
<figure><img src="attribution.png" alt="attribution maps"></figure></section>

<section id="atlas"><h2>8. Every feature</h2>
<p><a href="{{ f.atlas }}">Open the feature atlas</a> ({{ f.atlas_features }} features; the latents above are badged and listed first).
Run time {{ f.seconds }} s: {% for k, v in f.timings_seconds.items() %}{{ k }} {{ v }} s{{ ', ' if not loop.last }}{% endfor %}.</p></section>
</body></html>
"""
