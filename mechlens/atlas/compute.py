"""The atlas's computations and drawings: logit effects, histograms, the overview map's
embedding, overlays and PNGs (shared by :mod:`mechlens.atlas.panels` and the page builder)."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mechlens.engine import capture, eval_mode, unwrap_with_preprocessing
from mechlens.features.layout import as_position_rows, infer_layouts
from mechlens.models.loading import LoadedModel, Preprocessing

__all__ = ["logit_effects"]


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


