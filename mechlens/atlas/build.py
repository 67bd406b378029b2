"""Build the feature atlas: a static site (no server, no CDN, works from ``file://``) that
publishes every feature of an SAE with its statistics, exemplars, visualization, attribution
and concept alignment.

Everything that scales with the number of features is batched: one forward pass per batch of
exemplar images serves every feature that has them among its top-k (the SAE encodes all
positions once), histograms come from one encoded sample of store rows, logit effects from one
class-by-channel gradient matrix times the decoder, the overview map from one embedding of the
decoder directions; causal effects from one intervened forward per feature and batch (every class
read from it); pages are rendered from templates and images written with PIL. A circuit found
with :func:`mechlens.interventions.feature_circuit` is published beside the features
(``circuit.html``), drawn with the atlas's own images.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from activation_store.jsonutil import dumps as json_dumps
from mechlens.atlas.circuit import write_circuit_page
from mechlens.atlas.features import FeatureSet, sae_features
from mechlens.atlas.panels import (
    AtlasContext,
    AttributeFn,
    AttributionPanel,
    CausalEffectsPanel,
    ConceptsPanel,
    ExemplarsPanel,
    FeatvisPanel,
    HistogramPanel,
    LogitEffectsPanel,
    MapPanel,
    QuantilesPanel,
    SimilarPanel,
    Panel,
    VisualizeFn,
)
from mechlens.atlas.compute import _device, _map_svg, logit_effects
from mechlens.engine import eval_mode, unwrap_with_preprocessing
from mechlens.models.loading import LoadedModel, Preprocessing

if TYPE_CHECKING:
    from mechlens.interventions import Circuit

__all__ = ["AtlasResult", "build_atlas", "logit_effects"]


@dataclass
class AtlasResult:
    """Where the atlas was written and what it holds."""

    out: Path
    index: Path
    features: list[int]
    seconds: float
    map_method: str
    data: dict[str, Any] = field(repr=False, default_factory=dict)
    circuit: Path | None = None  # circuit.html, when a circuit was published


def _relative_model(name: str, out: Path) -> str:
    """The store's model name (``SPEC@FINGERPRINT``) with a local path in it made relative."""
    spec, at, fingerprint = name.rpartition("@") if "@" in name else (name, "", "")
    return (os.path.relpath(spec, out) if os.path.isabs(spec) else spec) + at + fingerprint


def _relative_spec(spec: str, out: Path) -> str:
    """``spec`` with an absolute path in it (``sae:/abs/sae:17``, ``cav:/abs/x.cav``) made relative
    to the atlas folder: a published site names no machine's absolute paths."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        return spec
    path, colon, index = rest.rpartition(":") if kind == "sae" else (rest, "", "")
    if not os.path.isabs(path):
        return spec
    return f"{kind}:{os.path.relpath(path, out)}{colon}{index}"


def build_atlas(
    sae: Any,
    store: Any,
    model: LoadedModel | nn.Module,
    out: str | os.PathLike,
    *,
    dataset: Any = None,
    stats: Any = None,
    class_names: Sequence[str] | None = None,
    cavs: Sequence[Any] = (),
    visualize: VisualizeFn | None = None,
    attribute: AttributeFn | None = None,
    panels: Sequence[Panel] | None = None,
    max_features: int | None = None,
    exemplars: int = 8,
    histogram_rows: int = 20000,
    effect_images: int = 64,
    causal: bool = True,
    causal_images: int = 64,
    circuit: Circuit | None = None,
    flagged: Mapping[int, str] | None = None,
    title: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> AtlasResult:
    """Write the atlas of a feature set to ``out``: one page per feature that fires, made of panels.

    ``sae``: what to publish — an :class:`mechlens.sae.SAE` or its directory (its latents), or any
    :class:`~mechlens.atlas.FeatureSet` (:func:`~mechlens.atlas.channel_features` for the
    channels of a layer, :func:`~mechlens.atlas.direction_features` for CAV directions).
    ``store``: the activation store (path or :class:`ActivationStore`) holding the feature set's
    layer; ``dataset``: the images behind the store's sample ids (default: rebuilt from the spec
    the capture job recorded); ``stats``: :class:`mechlens.sae.FeatureStatistics` (loaded from the
    SAE directory or computed). ``panels``: the page's panels (default: exemplars, histogram,
    logit effects, causal effects unless ``causal=False``, the overview map, concept alignment with
    ``cavs``, feature visualizations with ``visualize(ids) -> images`` and attribution overlays with
    ``attribute(id, images) -> {method: maps}`` when given). Features that never fire are left out.

    ``effect_images`` / ``causal_images``: how many of the dataset's first images the logit
    effects / the ablations (:class:`~mechlens.atlas.CausalEffectsPanel`: one forward per feature
    over them) are measured on. ``circuit``: a :class:`mechlens.interventions.Circuit` to publish as
    ``circuit.html`` (linked from the index), its nodes that are latents of this atlas drawn with
    their exemplar or visualization and linked to their pages. ``flagged``: feature id -> a badge
    (``{17: "ruler"}``): published first whatever ``max_features`` leaves out, badged on the index
    and on their pages (what a report points at).
    """
    from jinja2 import Environment
    from markupsafe import Markup

    from activation_store import ActivationStore
    from mechlens.atlas import templates
    from mechlens.capture import captured_dataset
    from mechlens.sae import SAE, FeatureStatistics, feature_statistics

    started = time.perf_counter()
    if circuit is not None and not (hasattr(circuit, "to_svg") and hasattr(circuit, "nodes")):
        raise TypeError(f"circuit must be a mechlens.interventions.Circuit, got {type(circuit).__name__}")
    source_dir = None
    if not isinstance(sae, nn.Module):
        source_dir = Path(sae)
        sae = SAE.load(source_dir)
    features = sae if isinstance(sae, FeatureSet) else sae_features(sae, str(source_dir or ""))
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layer = features.layer or (stats.layer if stats is not None else None)
    if layer is None or layer not in store.layers:
        raise ValueError(f"the features' layer {layer!r} is not in the store (layers: {', '.join(store.layers)})")
    view = store[layer]
    if view.dim != features.d_in:
        raise ValueError(f"layer {layer!r} has rows of width {view.dim}, but the features read {features.d_in}")
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    features = features.to(device).eval()
    if stats is None:
        if source_dir is not None and (source_dir / "feature_stats.json").exists():
            stats = FeatureStatistics.load(source_dir)
        else:
            stats = feature_statistics(features, store, layer=layer, top_k=exemplars, progress=progress)
    if dataset is None:
        # the capture's own spec and policies, so the rebuilt dataset has the same files under the same ids
        dataset = captured_dataset(store, image_size=preprocessing.image_size if preprocessing is not None else None)
    if class_names is None:
        class_names = list(getattr(dataset, "class_names", []) or [])
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "atlas.json").exists():
        raise FileExistsError(f"{out} is a non-empty directory that is not an atlas; choose a new path")
    for sub in ("features", "img", "static"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    alive = np.flatnonzero(stats.frequency > 0)
    order = alive[np.argsort(-stats.frequency[alive], kind="stable")]
    ids = order[:max_features] if max_features else order
    flagged = {int(k): str(v) for k, v in (flagged or {}).items()}
    silent = [i for i in flagged if i not in set(alive.tolist())]
    if silent:
        raise ValueError(f"flagged feature(s) {silent[:5]} never fire on the store's rows: no page can show them")
    # flagged features first (a report points at them), whatever max_features leaves out
    ids = np.asarray([*flagged, *[int(i) for i in ids if int(i) not in flagged]], dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("no feature of this set fires on the store's rows; there is nothing to publish")
    if panels is None:
        panels = [ExemplarsPanel(), QuantilesPanel(), HistogramPanel(histogram_rows), LogitEffectsPanel(effect_images)]
        if causal:
            panels.append(CausalEffectsPanel(causal_images))
        panels += [MapPanel(), SimilarPanel(), ConceptsPanel(cavs)]
        if visualize is not None:
            panels.append(FeatvisPanel(visualize))
        if attribute is not None:
            panels.append(AttributionPanel(attribute))
    ctx = AtlasContext(features=features, ids=ids, stats=stats, model=model, net=net, preprocessing=preprocessing,
                       device=device, view=view, dataset=dataset, class_names=list(class_names), out=out,
                       exemplars=exemplars, batch_size=batch_size, seed=seed, progress=progress)
    pages = [{
        "id": int(i), "spec": _relative_spec(features.spec(int(i)), out), "frequency": float(stats.frequency[i]),
        "mean": float(stats.mean[i]),
        "mean_active": float(stats.mean_active[i]), "max": float(stats.max[i]), "exemplars": [], "top_classes": [],
        "logit_up": [], "logit_down": [], "concepts": [], "concept": None, "concept_cos": None, "has_vis": False,
        "histogram": [], "histogram_max": 0.0, "map": [float(n), 0.0], "attributions": [], "causal": None,
        "flag": flagged.get(int(i)),
    } for n, i in enumerate(ids)]
    with eval_mode(net):
        for panel in panels:
            panel.compute(ctx, pages)

    env = Environment(autoescape=True)
    title = title or (f"Feature atlas: {sae.width}-latent SAE on {layer}" if not isinstance(sae, FeatureSet)
                      else f"Feature atlas: {features.title}")
    frame = env.from_string(templates.FEATURE)
    blocks = [env.from_string(panel.template) for panel in panels if panel.template]
    id_list = [p["id"] for p in pages]
    for n, page in enumerate(pages):
        body = "\n".join(block.render(f=page) for block in blocks)
        html = frame.render(f=page, body=Markup(body), title=title, layer=layer, rows=stats.rows,
                            prev_id=id_list[n - 1] if n else None, next_id=id_list[n + 1] if n + 1 < len(id_list) else None)
        (out / "features" / f"{page['id']}.html").write_text(html)
    published = None
    if circuit is not None:
        published = write_circuit_page(out, circuit, features, pages, env=env, title=title,
                                       class_names=list(class_names))
    else:  # a rebuild without a circuit leaves no stale one behind
        for stale in ("circuit.html", "circuit.json"):
            (out / stale).unlink(missing_ok=True)
    map_method = ctx.shared.get("map_method", "index")
    coords = np.asarray([p["map"] for p in pages], dtype=float)
    summary = [("features", features.title), ("store", os.path.relpath(store.root, out)), ("rows", f"{stats.rows:,}"),
               ("features published", f"{len(pages)} of {features.width} ({features.width - len(alive)} never fire)"),
               ("panels", ", ".join(panel.name for panel in panels))]
    index_html = env.from_string(templates.INDEX).render(
        title=title, subtitle=f"model {_relative_model(str(store.manifest.model), out)}", summary=summary, features=pages,
        map_svg=_map_svg(coords, id_list, np.asarray([p["frequency"] for p in pages]),
                         groups=[p["top_classes"][0]["name"] if p["top_classes"] else "none" for p in pages]),
        map_method=map_method,
        circuit=published)
    (out / "index.html").write_text(index_html)
    (out / "static" / "atlas.css").write_text(templates.CSS)
    (out / "static" / "atlas.js").write_text(templates.SORT_JS)
    data = {"layer": layer, "width": features.width, "rows": stats.rows, "class_names": list(class_names),
            "map_method": map_method, "panels": [panel.name for panel in panels],
            "features": [{k: v for k, v in p.items() if k != "histogram_svg"} for p in pages], "circuit": published}
    (out / "atlas.json").write_text(json_dumps(data))
    return AtlasResult(out=out, index=out / "index.html", features=id_list, seconds=time.perf_counter() - started,
                       map_method=map_method, data=data, circuit=out / "circuit.html" if published else None)
