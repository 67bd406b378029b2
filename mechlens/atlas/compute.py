"""The atlas's computations and drawings: logit effects (of added directions and of ablations),
histograms, the overview map's embedding, overlays and PNGs (shared by
:mod:`mechlens.atlas.panels` and the page builder)."""
from __future__ import annotations

import html
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from mechlens.engine import capture, eval_mode, unwrap_with_preprocessing
from mechlens.features.layout import as_position_rows, infer_layouts
from mechlens.models.loading import LoadedModel, Preprocessing

__all__ = ["ablation_disagrees", "class_gradients", "linear_ablation_effects", "logit_effects"]


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


def _per_class(net: nn.Module, layer: str, x: torch.Tensor,
               reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``[classes, ...]``: ``reduce(rows, gradient_rows)`` for each class logit, both ``[B, P, C]``
    (the layer's activation and the gradient of the class logit summed over the batch): one
    forward, one backward per class, nothing per class kept but what ``reduce`` returns."""
    layout = infer_layouts(net, [layer], x)[layer].layout
    with capture(net, layer, grads=True) as cap:
        logits = net(x)
    activation = cap[layer]
    rows, _ = as_position_rows(activation.detach(), layout)
    out = []
    for cls in range(logits.shape[1]):
        (g,) = torch.autograd.grad(logits[:, cls].sum(), activation, retain_graph=cls + 1 < logits.shape[1])
        out.append(reduce(rows, as_position_rows(g, layout)[0]).detach())
    return torch.stack(out)


def class_gradients(model: LoadedModel | nn.Module, layer: str, images: torch.Tensor) -> torch.Tensor:
    """``[num_classes, C]``: the gradient of each class logit (mean over ``images``) with respect to
    a vector added at every position of ``layer``; :func:`logit_effects` of directions ``D`` is
    ``class_gradients @ D.T``, so one call serves every feature of an atlas, chunk by chunk."""
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    with eval_mode(net):
        x = _prepare(images, preprocessing, device)
        # broadcast over positions, mean over images
        return _per_class(net, layer, x, lambda rows, g: g.sum(dim=1).mean(dim=0)).detach()


def logit_effects(model: LoadedModel | nn.Module, layer: str, images: torch.Tensor, directions: torch.Tensor) -> np.ndarray:
    """``[num_classes, F]``: the first-order change of each class logit (mean over ``images``)
    when ``directions`` ``[F, C]`` are added at every position of ``layer``."""
    gradient = class_gradients(model, layer, images)  # [classes, C]
    return (gradient @ directions.to(gradient).T).detach().cpu().numpy()


def linear_ablation_effects(model: LoadedModel | nn.Module, features: Any, images: torch.Tensor,
                            ids: Sequence[int] | None = None, *, batch_size: int = 64) -> np.ndarray:
    """``[num_classes, F]``: the first-order estimate of each class logit's change (mean over
    ``images``) when each feature of ``ids`` (a :class:`~mechlens.atlas.FeatureSet`; default all)
    is ablated to 0 at every position, as :func:`mechlens.interventions.ablate` does it.

    Ablating feature ``f`` changes the layer's row at position ``p`` by ``-v_f(p) w_f`` (``v_f``
    its value, ``w_f`` :meth:`~mechlens.atlas.FeatureSet.write_directions`: an SAE latent's
    decoder direction with the error term kept, a channel's basis vector, a unit direction
    projected out), so the estimate is ``-sum_p grad(logit)(p) . w_f v_f(p)``. For SAE latents
    this is attribution patching's zero-ablation estimate, for every class at once.
    """
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    chosen = list(range(features.width)) if ids is None else [int(i) for i in ids]
    columns = torch.as_tensor(chosen, dtype=torch.long, device=device)
    write = features.write_directions(chosen).detach().to(device)  # [F, C]
    total: torch.Tensor | None = None
    with eval_mode(net):
        for start in range(0, len(images), batch_size):
            x = _prepare(images[start:start + batch_size], preprocessing, device)

            def removed(rows: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
                b, p, c = rows.shape
                with torch.no_grad():
                    values = features.encode(rows.reshape(b * p, c))[:, columns].to(g.dtype)  # [B*P, F]
                # sum_p (g . w_f) v_f = sum_c w_f[c] (sum_p g[c] v_f): a [C, F] product, not [B, P, F]
                return -(write.to(g.dtype).T * (g.reshape(b * p, c).T @ values)).sum(dim=0)

            part = _per_class(net, features.layer, x, removed).double()
            total = part if total is None else total + part
    if total is None:
        raise ValueError("no images to estimate the ablation effects on")
    return (total / len(images)).cpu().numpy()


def ablation_disagrees(linear: np.ndarray, effect: np.ndarray, low: np.ndarray, high: np.ndarray, *,
                       tolerance: float = 0.5, floor: float = 0.05) -> np.ndarray:
    """Per class (arrays over one feature's classes), whether the linear estimate of an ablation
    and its measured effect disagree. Effects smaller than ``floor`` times the feature's largest
    (linear or measured, any class), plus 1e-6, count as noise. They disagree on a class when

    * **opposite signs**: the interval ``[low, high]`` excludes 0 on the other side of a
      non-negligible linear estimate, or
    * **far apart**: the linear estimate lies outside the interval by more than ``tolerance``
      times the larger of the two magnitudes (plus the noise level) -- a CI that merely misses
      the estimate is not enough, the estimate must be off by a clear margin (within a factor of
      about 2 agrees at the default 0.5).
    """
    linear, effect, low, high = (np.asarray(a, dtype=float) for a in (linear, effect, low, high))
    noise = floor * max(float(np.abs(linear).max(initial=0.0)), float(np.abs(effect).max(initial=0.0))) + 1e-6
    opposite = (np.abs(linear) > noise) & (((linear > 0) & (high < 0)) | ((linear < 0) & (low > 0)))
    miss = np.maximum(low - linear, linear - high)  # > 0: the estimate lies outside the interval
    far = miss > tolerance * np.maximum(np.abs(linear), np.abs(effect)) + noise
    return opposite | far


def _sample_rows(view: Any, max_rows: int) -> list[np.ndarray]:
    """The store rows the histograms are drawn from: a seeded shuffle of at least ``max_rows``
    (whole batches of up to 4096), the same rows on every rank and every run."""
    batches, seen = [], 0
    for batch in view.iter_batches(min(4096, max_rows), shuffle=True, seed=0):
        batches.append(np.asarray(batch, dtype=np.float32))
        seen += len(batch)
        if seen >= max_rows:
            break
    return batches


def _histograms(sae: Any, view: Any, latents: np.ndarray, max_rows: int, bins: int, device: torch.device,
                rows: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-latent histograms of positive activations over a sample of store rows: counts
    ``[F, bins]`` and the upper edge per latent ``[F]`` (the bins span ``[0, max]``).

    Two passes over the sampled rows (``rows``, default :func:`_sample_rows`), the maxima then the
    counts, so memory holds one batch of values, not ``[rows, F]``: a 32k-latent SAE fits."""
    chosen = torch.as_tensor(np.asarray(latents, dtype=np.int64), device=device)
    rows = _sample_rows(view, max_rows) if rows is None else rows
    if len(chosen) == 0 or not rows:
        return np.zeros((len(chosen), bins)), np.full(len(chosen), 1e-12)

    def values() -> Any:
        for batch in rows:
            with torch.no_grad():
                yield sae.encode(torch.as_tensor(batch, device=device))[:, chosen].float()

    top = torch.stack([z.amax(dim=0) for z in values()]).amax(dim=0).clamp_min(1e-12)
    counts = torch.zeros(len(chosen), bins, device=device)
    for z in values():
        scaled = (z / top * bins).long().clamp_(0, bins - 1)
        counts.scatter_add_(1, scaled.T.contiguous(), (z > 0).float().T.contiguous())
    return counts.cpu().numpy(), top.cpu().numpy()


def _histogram_svg(counts: np.ndarray, top: float, width: int = 300, height: int = 130) -> str:
    """Bars of log10(1 + count) over the activation range, with both axes labelled."""
    if counts.sum() == 0:
        return "<p>never active in the sampled rows</p>"
    left, bottom, plot_h = 34, 28, height - 40
    plot_w = width - left - 6
    logs = np.log10(1 + counts.astype(float))
    peak = max(float(logs.max()), 1e-12)
    bw = plot_w / len(counts)
    edges = np.linspace(0, top, len(counts) + 1)
    bars = []
    for i, (c, v) in enumerate(zip(counts, logs)):
        h = plot_h * v / peak
        bars.append(f'<rect class="bar" x="{left + i * bw:.1f}" y="{height - bottom - h:.1f}" width="{max(bw - 1, 0.5):.1f}" '
                    f'height="{h:.1f}"><title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)} rows</title></rect>')
    decades = [d for d in range(0, int(np.floor(peak)) + 1)]
    ticks = "".join(f'<text x="{left - 4}" y="{height - bottom - plot_h * d / peak + 4:.1f}" text-anchor="end">'
                    f'{10 ** d:g}</text>' for d in decades)
    axis = (f'<line x1="{left}" y1="{height - bottom}" x2="{width - 6}" y2="{height - bottom}" stroke="#555"/>'
            f'<line x1="{left}" y1="{height - bottom}" x2="{left}" y2="{height - bottom - plot_h}" stroke="#555"/>')
    labels = (f'<text x="{left}" y="{height - bottom + 12}">0</text>'
              f'<text x="{width - 6}" y="{height - bottom + 12}" text-anchor="end">{top:.3g}</text>'
              f'<text x="{left + plot_w / 2:.0f}" y="{height - 3}" text-anchor="middle">activation</text>'
              f'<text x="9" y="{height - bottom - plot_h / 2:.0f}" transform="rotate(-90 9 {height - bottom - plot_h / 2:.0f})" '
              'text-anchor="middle">rows (log)</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" xmlns="http://www.w3.org/2000/svg" font-size="10">'
            f'{axis}{"".join(bars)}{ticks}{labels}</svg>')


DENSITY = ("#440154", "#3b528b", "#21918c", "#5ec962", "#fde725")  # viridis, rare to frequent
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f")


def _map_svg(coords: np.ndarray, ids: Sequence[int], frequency: np.ndarray, size: int = 520,
             groups: Sequence[str] | None = None) -> str:
    """The overview map: one dot per feature (area: frequency), coloured by ``groups`` (its top
    class) with a legend, each dot a link to its page."""
    lo, hi = coords.min(axis=0), coords.max(axis=0)
    span = np.where(hi - lo > 0, hi - lo, 1)
    xy = (coords - lo) / span * (size - 20) + 10
    radius = 2.5 + 5 * np.sqrt(frequency / max(frequency.max(), 1e-12))
    names = list(dict.fromkeys(groups)) if groups is not None else []
    colour = {name: PALETTE[k % len(PALETTE)] for k, name in enumerate(names)}
    # the other colouring (the index's selector switches): density, the firing frequency's quantile
    ranks = np.argsort(np.argsort(frequency)) / max(len(frequency) - 1, 1)
    density = [DENSITY[min(int(q * len(DENSITY)), len(DENSITY) - 1)] for q in ranks]
    dots = []
    for k, (i, (x, y), r) in enumerate(zip(ids, xy, radius)):
        group = groups[k] if groups is not None else None
        # style, not the fill attribute: the atlas stylesheet's default fill would win over an attribute
        fill = (f' style="fill:{colour[group]};fill-opacity:0.75" data-class-fill="{colour[group]}" '
                f'data-density-fill="{density[k]}"') if group is not None else ""
        label = f"feature {i}" + (f" ({html.escape(str(group))})" if group is not None else "")
        dots.append(f'<a href="features/{i}.html"><circle cx="{x:.1f}" cy="{y:.1f}" r="{r:.1f}"{fill}><title>{label}</title>'
                    "</circle></a>")
    legend = "".join(f'<circle cx="{size + 12}" cy="{16 + 18 * k}" r="5" style="fill:{colour[name]}"/>'
                     f'<text x="{size + 22}" y="{20 + 18 * k}" font-size="11">{html.escape(str(name))}</text>'
                     for k, name in enumerate(names))
    width = size + (120 if names else 0)
    return (f'<svg class="map" width="{width}" height="{size}" xmlns="http://www.w3.org/2000/svg" '
            f'style="background:#fff;border:1px solid #ddd">{"".join(dots)}{legend}</svg>')


def _embed_method(count: int) -> str:
    """How :func:`_embed` lays out ``count`` features (t-SNE up to 3000, PCA beyond)."""
    return "index" if count < 3 else "t-SNE (cosine)" if count <= 3000 else "PCA"


def _embed(directions: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    from sklearn.decomposition import PCA

    unit = directions / np.maximum(np.linalg.norm(directions, axis=1, keepdims=True), 1e-12)
    method = _embed_method(len(unit))
    if method == "index":
        return np.c_[np.arange(len(unit)), np.zeros(len(unit))].astype(float), method
    if method.startswith("t-SNE"):
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(unit) - 1) // 3)))
        coords = TSNE(2, perplexity=perplexity, init="pca", random_state=seed, metric="cosine").fit_transform(unit)
        return coords, method
    return PCA(2, random_state=seed).fit_transform(unit), method


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
    """Write ``array`` as a PNG at ``path`` atomically (a temp file renamed over it): a killed build
    never leaves a truncated image that a resumed one would take for finished."""
    from PIL import Image

    image = Image.fromarray(array)
    if scale > 1:
        image = image.resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    image.save(tmp, format="PNG", compress_level=1)  # speed over size: thousands of small images
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (a temp file renamed over it)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)
