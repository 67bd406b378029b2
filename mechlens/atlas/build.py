"""Build the feature atlas: a static site (no server, no CDN, works from ``file://``) that
publishes every feature of an SAE with its statistics, exemplars, visualization, attribution
and concept alignment.

Everything that scales with the number of features is batched: one forward pass per batch of
exemplar images serves every feature that has them among its top-k (the SAE encodes all
positions once), histograms come from one encoded sample of store rows, logit effects from one
class-by-channel gradient matrix times the decoder, the overview map from one embedding of the
decoder directions; pages are rendered from templates and images written with PIL.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from activation_store.jsonutil import dumps as json_dumps
from mechlens.engine import capture, eval_mode, unwrap_with_preprocessing
from mechlens.features.layout import as_position_rows, infer_layouts
from mechlens.models.loading import LoadedModel, Preprocessing

__all__ = ["AtlasResult", "build_atlas", "logit_effects"]

VisualizeFn = Callable[[Sequence[int]], torch.Tensor]  # latent ids -> images [F, 3, h, w] in [0, 1]
AttributeFn = Callable[[int, torch.Tensor], dict[str, torch.Tensor]]  # latent, images -> {method: maps [B,H,W]}


@dataclass
class AtlasResult:
    """Where the atlas was written and what it holds."""

    out: Path
    index: Path
    features: list[int]
    seconds: float
    map_method: str
    data: dict[str, Any] = field(repr=False, default_factory=dict)


def _device(net: nn.Module) -> torch.device:
    param = next(net.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def _images(dataset: Any, ids: Sequence[int]) -> torch.Tensor:
    render = getattr(dataset, "render", None)
    if render is not None:
        return render(list(ids))
    items = [dataset[int(i)] for i in ids]
    return torch.stack([it[0] if isinstance(it, (tuple, list)) else it for it in items])


def _prepare(images: torch.Tensor, preprocessing: Preprocessing | None, device: torch.device) -> torch.Tensor:
    x = images.to(device)
    if preprocessing is not None:
        if tuple(x.shape[-2:]) != preprocessing.image_size:
            x = torch.nn.functional.interpolate(x, size=preprocessing.image_size, mode="bilinear", antialias=True,
                                                align_corners=False)
        x = preprocessing.normalize(x)
    return x


def logit_effects(model: LoadedModel | nn.Module, layer: str, images: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """``[num_classes, F]``: the first-order change of each class logit (mean over ``images``)
    when ``directions`` ``[F, C]`` are added at every position of ``layer``."""
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    with eval_mode(net):
        x = _prepare(images, preprocessing, device)
        layout = infer_layouts(net, [layer], x)[layer].layout
        with capture(net, layer, grads=True) as cap:
            logits = net(x)
        activation = cap[layer]
        grads = []
        for cls in range(logits.shape[1]):
            (g,) = torch.autograd.grad(logits[:, cls].sum(), activation, retain_graph=cls + 1 < logits.shape[1])
            rows, _ = as_position_rows(g, layout)
            grads.append(rows.sum(dim=1).mean(dim=0))  # broadcast over positions, mean over images
        gradient = torch.stack(grads)  # [classes, C]
    return (gradient @ directions.to(gradient).T).detach().cpu().numpy()


def _histograms(sae: Any, view: Any, latents: np.ndarray, max_rows: int, bins: int, device: torch.device
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent histograms of positive activations over a sample of store rows: counts
    ``[F, bins]`` and the upper edge per latent ``[F]`` (the bins span ``[0, max]``)."""
    chosen = torch.as_tensor(latents, device=device)
    encoded = []
    seen = 0
    for batch in view.iter_batches(min(4096, max_rows), shuffle=True, seed=0):
        with torch.no_grad():
            z = sae.encode(torch.as_tensor(np.asarray(batch, dtype=np.float32), device=device))
        encoded.append(z[:, chosen].float())
        seen += len(batch)
        if seen >= max_rows:
            break
    z = torch.cat(encoded)  # [N, F]
    top = z.amax(dim=0).clamp_min(1e-12)
    scaled = (z / top * bins).long().clamp_(0, bins - 1)
    counts = torch.zeros(len(latents), bins, device=device)
    active = (z > 0).float()
    counts.scatter_add_(1, scaled.T.contiguous(), active.T.contiguous())
    return counts.cpu().numpy(), top.cpu().numpy()


def _histogram_svg(counts: np.ndarray, top: float, width: int = 260, height: int = 90) -> str:
    if counts.sum() == 0:
        return "<p>never active in the sampled rows</p>"
    bars = []
    peak = counts.max()
    bw = width / len(counts)
    for i, c in enumerate(counts):
        h = 0 if peak == 0 else (height - 14) * (c / peak)
        bars.append(f'<rect class="bar" x="{i * bw:.1f}" y="{height - 14 - h:.1f}" width="{bw - 1:.1f}" height="{h:.1f}">'
                    f"<title>{int(c)} rows</title></rect>")
    return (f'<svg class="hist" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg">{"".join(bars)}'
            f'<text x="0" y="{height - 2}">0</text><text x="{width - 40}" y="{height - 2}">{top:.3g}</text></svg>')


def _map_svg(coords: np.ndarray, ids: Sequence[int], frequency: np.ndarray, size: int = 520) -> str:
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1)
    xy = (coords - lo) / span * (size - 20) + 10
    radius = 2.5 + 5 * np.sqrt(frequency / max(frequency.max(), 1e-12))
    dots = [f'<a href="features/{i}.html"><circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}"><title>feature {i}</title></circle></a>'
            for i, (x, y), r in zip(ids, xy, radius)]
    return f'<svg class="map" width="{size}" height="{size}" xmlns="http://www.w3.org/2000/svg" style="background:#fff;border:1px solid #ddd">{"".join(dots)}</svg>'


def _embed(directions: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA

    unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    if len(unit) < 3:
        return np.c_[np.arange(len(unit)), np.zeros(len(unit))].astype(float), "index"
    if len(unit) <= 3000:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(unit) - 1) // 3)))
        coords = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(unit)
        return coords, "t-SNE (cosine)"
    return PCA(2, random_state=seed).fit_transform(unit), "PCA"


def _overlay(images: np.ndarray, maps: np.ndarray, boxes: list[tuple[int, int, int, int] | None]) -> np.ndarray:
    """uint8 ``[B, H, W, 3]`` images with ``maps`` ``[B, H, W]`` in ``[0, 1]`` blended in red."""
    alpha = (0.65 * maps)[..., None]
    red = np.zeros_like(images)
    red[..., 0] = 1.0
    out = images * (1 - alpha) + red * alpha
    out = (out * 255).round().clip(0, 255).astype(np.uint8)
    for image, box in zip(out, boxes):
        if box is None:
            continue
        y0, x0, y1, x1 = box
        image[y0:y1, [x0, max(x0, x1 - 1)]] = (255, 255, 0)
        image[[y0, max(y0, y1 - 1)], x0:x1] = (255, 255, 0)
    return out


def _save_png(array: np.ndarray, path: Path, scale: int = 1) -> None:
    from PIL import Image

    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    image.save(path, compress_level=1)  # speed over size: thousands of small images


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
    max_features: int | None = None,
    exemplars: int = 8,
    histogram_rows: int = 20000,
    effect_images: int = 64,
    title: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> AtlasResult:
    """Write the atlas of ``sae`` (an :class:`mechlens.sae.SAE` or its directory) to ``out``.

    ``store``: the activation store (path or :class:`ActivationStore`) the SAE was trained on;
    ``dataset``: the images behind the store's sample ids (default: rebuilt from the spec the
    capture job recorded); ``stats``: :class:`mechlens.sae.FeatureStatistics` (loaded from the
    SAE directory or computed); ``cavs``: CAVs of the same layer for concept alignment;
    ``visualize(latents) -> images`` and ``attribute(latent, images) -> {method: maps}`` add
    feature visualizations and attribution overlays. Features that never fire are left out.
    """
    from jinja2 import Environment
    from tqdm.auto import tqdm

    from activation_store import ActivationStore
    from mechlens.atlas import templates
    from mechlens.data import build_dataset
    from mechlens.sae import SAE, FeatureStatistics, feature_statistics

    started = time.perf_counter()
    sae_dir = None
    if not isinstance(sae, nn.Module):
        sae_dir = Path(sae)
        sae = SAE.load(sae_dir)
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layer = getattr(sae.config, "layer", None) or (stats.layer if stats is not None else None)
    if layer is None or layer not in store.layers:
        raise ValueError(f"the SAE's layer {layer!r} is not in the store (layers: {', '.join(store.layers)})")
    view = store[layer]
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    sae = sae.to(device).eval()
    if stats is None:
        if sae_dir is not None and (sae_dir / "feature_stats.json").exists():
            stats = FeatureStatistics.load(sae_dir)
        else:
            stats = feature_statistics(sae, store, layer=layer, top_k=exemplars, progress=progress)
    if dataset is None:
        recorded = store.manifest.provenance.get("capture", {})
        spec = recorded.get("dataset_spec")
        if not spec:
            raise ValueError("the store does not record the dataset it was captured from; pass dataset=")
        size = preprocessing.image_size if preprocessing is not None else None
        # the capture's own policies, so the rebuilt dataset has the same files under the same ids
        dataset = build_dataset(spec, image_size=size, **recorded.get("dataset_options", {}))
    if class_names is None:
        class_names = list(getattr(dataset, "class_names", []) or [])
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not (out / "atlas.json").exists():
        raise FileExistsError(f"{out} is a non-empty directory that is not an atlas; choose a new path")
    for sub in ("features", "img", "static"):
        (out / sub).mkdir(parents=True, exist_ok=True)

    alive = np.flatnonzero(stats.frequency > 0)
    order = alive[np.argsort(-stats.frequency[alive], kind="stable")]
    latents = order[:max_features] if max_features else order
    if len(latents) == 0:
        raise ValueError("no latent of this SAE fires on the store's rows; there is nothing to publish")
    k = min(exemplars, stats.top_samples.shape[1])

    def name_of(label: int) -> str:
        return class_names[label] if 0 <= label < len(class_names) else str(label)

    # -- exemplar maps: one forward + one encode per batch of distinct sample ids
    samples = stats.top_samples[latents, :k]
    wanted = np.unique(samples[samples >= 0])
    position_of = {int(s): i for i, s in enumerate(wanted)}
    maps: dict[int, np.ndarray] = {}  # sample -> [P, len(latents)] latent values
    spatial: tuple[int, ...] = ()
    latent_index = torch.as_tensor(latents, device=device)
    images_u8: dict[int, np.ndarray] = {}
    bar = tqdm(total=len(wanted), desc="atlas exemplars", unit="img", disable=not progress)
    recorded_layout = (view.spec.meta or {}).get("layout") or "auto"  # what the capture knew
    with capture(net, layer) as cap, torch.no_grad():
        for start in range(0, len(wanted), batch_size):
            ids = wanted[start:start + batch_size]
            images = _images(dataset, ids)
            x = _prepare(images, preprocessing, device)
            if recorded_layout == "auto":
                recorded_layout = infer_layouts(net, [layer], x)[layer].layout
            net(x)
            rows, spatial = as_position_rows(cap[layer].float(), recorded_layout)
            b, p, c = rows.shape
            z = sae.encode(rows.reshape(b * p, c))[:, latent_index].reshape(b, p, -1)
            for sid, zi, img in zip(ids, z.cpu().numpy(), images):
                maps[int(sid)] = zi
                images_u8[int(sid)] = img.permute(1, 2, 0).cpu().numpy()
            bar.update(len(ids))
    bar.close()

    labels = {}
    index = view.read_index(stats.top_rows[latents, :k][samples >= 0]) if (samples >= 0).any() else None
    if index is not None:
        labels = dict(zip(index.sample_id.tolist(), index.label.tolist()))

    counts, tops = _histograms(sae, view, latents, histogram_rows, 16, device)
    effect_ids = np.arange(min(effect_images, len(dataset)))
    decoder = sae.W_dec.detach()[latent_index]
    effects = logit_effects(model, layer, _images(dataset, effect_ids), decoder)  # [classes, F]
    coords, map_method = _embed(decoder.cpu().numpy(), seed)
    concept_cos = None
    foreign = [c for c in cavs if getattr(c, "layer", layer) not in (layer, "")]
    if foreign:
        raise ValueError(f"CAV {foreign[0].concept!r} was trained at layer {foreign[0].layer!r}, not at the SAE's layer {layer!r}")
    if cavs:
        vectors = np.stack([np.asarray(c.vector, dtype=np.float64) for c in cavs])
        dec = decoder.cpu().numpy().astype(np.float64)
        concept_cos = (dec / np.linalg.norm(dec, axis=1, keepdims=True)) @ (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).T

    vis_ok = False
    if visualize is not None:
        vis = visualize([int(i) for i in latents]).detach().cpu().clamp(0, 1)
        for i, image in zip(latents, vis):
            _save_png((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8), out / "img" / f"{i}-vis.png")
        vis_ok = True

    features = []
    h_img = w_img = None
    for column, latent in enumerate(tqdm(latents, desc="atlas pages", unit="feature", disable=not progress)):
        latent = int(latent)
        exemplar_rows = []
        tiles = []
        for j in range(k):
            sid = int(stats.top_samples[latent, j])
            if sid < 0:
                continue
            image = images_u8[sid]
            h_img, w_img = image.shape[:2]
            values = maps[sid][:, column]
            peak = max(float(stats.max[latent]), 1e-12)
            grid = values.reshape(spatial) if len(spatial) == 2 else None
            if grid is not None:
                heat = torch.nn.functional.interpolate(torch.from_numpy(np.clip(grid / peak, 0, 1))[None, None].float(),
                                                       size=(h_img, w_img), mode="bilinear", align_corners=False)[0, 0].numpy()
                pos = int(stats.top_positions[latent, j])
                box = None
                if pos >= 0:
                    gy, gx = divmod(pos, spatial[1])
                    sy, sx = h_img / spatial[0], w_img / spatial[1]
                    box = (int(gy * sy), int(gx * sx), int((gy + 1) * sy), int((gx + 1) * sx))
            else:
                heat, box = np.zeros((h_img, w_img)), None
            tile = _overlay(image[None], heat[None], [box])[0]
            _save_png(tile, out / "img" / f"{latent}-ex{len(tiles)}.png", scale=max(1, 160 // max(w_img, 1)))
            tiles.append(tile)
            label = int(labels.get(sid, -1))
            exemplar_rows.append({"sample": sid, "value": float(stats.top_values[latent, j]), "label": label,
                                  "label_name": name_of(label), "position": int(stats.top_positions[latent, j])})
        if tiles:
            _save_png(np.concatenate(tiles, axis=1), out / "img" / f"{latent}-exemplars.png")
        label_list = [e["label"] for e in exemplar_rows]
        classes, shares = np.unique(label_list, return_counts=True) if label_list else (np.array([]), np.array([]))
        top_classes = [{"name": name_of(int(c)), "share": float(s) / len(label_list)}
                       for c, s in sorted(zip(classes, shares), key=lambda t: -t[1])[:3]]
        effect = effects[:, column]
        up = [{"name": name_of(int(c)), "effect": float(effect[c])} for c in np.argsort(-effect)[:3] if effect[c] > 0]
        down = [{"name": name_of(int(c)), "effect": float(effect[c])} for c in np.argsort(effect)[:3] if effect[c] < 0]
        concepts = []
        if concept_cos is not None:
            ranking = np.argsort(-concept_cos[column])
            concepts = [{"name": cavs[c].concept, "cos": float(concept_cos[column, c])} for c in ranking[:3]]
        attributions = []
        if attribute is not None and tiles:
            first = [e["sample"] for e in exemplar_rows[:1]]
            for method, amap in attribute(latent, _images(dataset, first)).items():
                amap = amap.detach().float().cpu().numpy()[0]
                amap = np.abs(amap) / max(np.abs(amap).max(), 1e-12)
                file = f"{latent}-attr-{''.join(ch for ch in method if ch.isalnum())}.png"
                _save_png(_overlay(images_u8[first[0]][None], amap[None], [None])[0], out / "img" / file,
                          scale=max(1, 160 // max(w_img or 1, 1)))
                attributions.append({"method": method, "file": file})
        features.append({
            "id": latent, "frequency": float(stats.frequency[latent]), "mean": float(stats.mean[latent]),
            "mean_active": float(stats.mean_active[latent]), "max": float(stats.max[latent]),
            "exemplars": exemplar_rows, "top_classes": top_classes, "logit_up": up, "logit_down": down,
            "concepts": concepts, "concept": concepts[0]["name"] if concepts else None,
            "concept_cos": concepts[0]["cos"] if concepts else None, "has_vis": vis_ok,
            "histogram": counts[column].tolist(), "histogram_max": float(tops[column]),
            "map": [float(v) for v in coords[column]], "attributions": attributions,
        })

    env = Environment(autoescape=True)
    title = title or f"Feature atlas: {sae.width}-latent SAE on {layer}"
    feature_page = env.from_string(templates.FEATURE)
    ids = [f["id"] for f in features]
    for n, f in enumerate(features):
        f_view = dict(f, histogram_svg=_histogram_svg(np.asarray(f["histogram"]), f["histogram_max"]))
        page = feature_page.render(f=f_view, title=title, layer=layer, rows=stats.rows,
                                   prev_id=ids[n - 1] if n else None, next_id=ids[n + 1] if n + 1 < len(ids) else None)
        (out / "features" / f"{f['id']}.html").write_text(page)
    summary = [("SAE", f"{type(sae).__name__} width {sae.width}, layer {layer}"), ("store", str(store.root)),
               ("rows", f"{stats.rows:,}"), ("features published", f"{len(features)} of {sae.width} "
                                                                   f"({sae.width - len(alive)} never fire)")]
    index_html = env.from_string(templates.INDEX).render(
        title=title, subtitle=f"model {store.manifest.model}", summary=summary, features=features,
        map_svg=_map_svg(coords, ids, np.asarray([f["frequency"] for f in features])), map_method=map_method)
    (out / "index.html").write_text(index_html)
    (out / "static" / "atlas.css").write_text(templates.CSS)
    (out / "static" / "atlas.js").write_text(templates.SORT_JS)
    data = {"layer": layer, "width": sae.width, "rows": stats.rows, "class_names": list(class_names),
            "map_method": map_method, "features": features}
    (out / "atlas.json").write_text(json_dumps(data))
    return AtlasResult(out=out, index=out / "index.html", features=ids, seconds=time.perf_counter() - started,
                       map_method=map_method, data=data)
