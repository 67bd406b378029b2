"""Figures for attribution maps (matplotlib, object-oriented API on the Agg canvas: no pyplot
state, safe on headless machines and in threads).

* :func:`plot_overlay`: a heatmap over its image with a colour bar;
* :func:`plot_methods`: several methods' maps for one image side by side;
* :func:`plot_randomization`: the randomization cascade (maps per randomized layer and the
  similarity curves);
* :func:`plot_curves`: deletion / insertion curves of several maps.

Maps are normalised as Captum's ``visualize_image_attr`` does (:mod:`mechlens.attribution.display`:
the top 2% of the mass clipped, ``sign`` modes); signed maps use a diverging colour map centred
on zero, non-negative maps a sequential one; a degenerate map is flagged, not drawn blank.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from mechlens.attribution.base import Attribution
from mechlens.attribution.display import as_rgb as display_image
from mechlens.attribution.display import draw_map, figure

__all__ = ["display_image", "plot_curves", "plot_methods", "plot_overlay", "plot_randomization", "save_figure"]


def _heat(saliency: Attribution | torch.Tensor, index: int, size: tuple[int, int]) -> np.ndarray:
    if isinstance(saliency, Attribution):
        return saliency.heatmap(size)[index].float().cpu().numpy()
    heat = torch.as_tensor(saliency).detach().float().cpu()
    if heat.dim() == 3:
        heat = heat[index]
    if heat.dim() != 2:
        raise ValueError(f"expected a [H, W] map or [B, H, W] maps, got {tuple(heat.shape)}")
    if tuple(heat.shape) != tuple(size):
        heat = torch.nn.functional.interpolate(heat[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    return heat.numpy()


def _draw(ax: Any, fig: Any, image: np.ndarray | None, heat: np.ndarray, *, alpha: float, cmap: str | None, colorbar: bool,
          title: str | None, sign: str = "auto", outlier_percent: float = 2.0) -> None:
    draw_map(ax, fig, heat, image, sign=sign, outlier_percent=outlier_percent, alpha=alpha, cmap=cmap, colorbar=colorbar,
             title=title)


def plot_overlay(
    image: Any,
    saliency: Attribution | torch.Tensor,
    *,
    index: int = 0,
    title: str | None = None,
    alpha: float = 0.5,
    cmap: str | None = None,
    colorbar: bool = True,
    preprocessing: Any = None,
    sign: str = "auto",
    outlier_percent: float = 2.0,
):
    """Heatmap of sample ``index`` over ``image`` with a colour bar (normalised as
    :func:`~mechlens.attribution.display.normalize_map`: ``sign``, ``outlier_percent``); returns the Figure."""
    shown = display_image(image, preprocessing)
    heat = _heat(saliency, index, shown.shape[:2])
    if title is None and isinstance(saliency, Attribution):
        feature = saliency.features[index]
        title = f"{saliency.method} · {feature}"
    fig = figure(4.2, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    _draw(ax, fig, shown, heat, alpha=alpha, cmap=cmap, colorbar=colorbar, title=title, sign=sign,
          outlier_percent=outlier_percent)
    fig.tight_layout()
    return fig


def plot_methods(
    image: Any,
    maps: Mapping[str, Attribution | torch.Tensor],
    *,
    index: int = 0,
    alpha: float = 0.5,
    ncols: int | None = None,
    preprocessing: Any = None,
    title: str | None = None,
    sign: str = "auto",
    outlier_percent: float = 2.0,
):
    """The image and each method's map (overlaid, each with its colour bar, normalised alike) in one figure."""
    if not maps:
        raise ValueError("plot_methods needs at least one map")
    shown = display_image(image, preprocessing)
    panels = len(maps) + 1
    ncols = ncols or min(panels, 4)
    nrows = (panels + ncols - 1) // ncols
    fig = figure(3.4 * ncols, 3.0 * nrows)
    ax = fig.add_subplot(nrows, ncols, 1)
    ax.imshow(shown)
    ax.set_title("input", fontsize=9)
    ax.set_axis_off()
    for k, (name, saliency) in enumerate(maps.items(), start=2):
        ax = fig.add_subplot(nrows, ncols, k)
        _draw(ax, fig, shown, _heat(saliency, index, shown.shape[:2]), alpha=alpha, cmap=None, colorbar=True, title=name,
              sign=sign, outlier_percent=outlier_percent)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_randomization(result: Any, *, image: Any = None, index: int = 0, preprocessing: Any = None):
    """The randomization cascade of a :class:`~mechlens.evaluation.RandomizationResult`: the
    original map and the map after each step (when the result kept its maps), and the mean
    Spearman / SSIM per step."""
    steps = len(result.layers)
    has_maps = result.maps is not None
    cols = steps + 1 if has_maps else 1
    fig = figure(max(6.0, 1.9 * cols), 4.4 if has_maps else 3.2)
    grid = fig.add_gridspec(2 if has_maps else 1, cols)
    shown = display_image(image, preprocessing) if image is not None else None
    if has_maps:
        panels = [("trained", result.original[index])] + [
            (f"+{name}" if result.mode == "cascading" else name, result.maps[k, index]) for k, name in enumerate(result.layers)
        ]
        for k, (name, heat) in enumerate(panels):
            ax = fig.add_subplot(grid[0, k])
            _draw(ax, fig, shown, heat.numpy(), alpha=0.6, cmap=None, colorbar=False, title=name)
    ax = fig.add_subplot(grid[-1, :])
    xs = np.arange(steps)
    ax.plot(xs, result.mean_spearman().numpy(), marker="o", label="Spearman")
    ax.plot(xs, result.mean_ssim().numpy(), marker="s", label="SSIM")
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(xs)
    ax.set_xticklabels(result.layers, rotation=30, ha="right", fontsize=7)
    ax.set_ylim(-0.2, 1.05)
    ax.set_ylabel("similarity to trained map")
    ax.set_title(f"{result.method}: {result.mode} randomization", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_curves(curves: Mapping[str, Any], *, title: str | None = None):
    """Mean deletion / insertion curves (:class:`~mechlens.evaluation.PerturbationCurve`) of
    several maps, with their mean AUC in the legend."""
    fig = figure(4.6, 3.4)
    ax = fig.add_subplot(1, 1, 1)
    for name, curve in curves.items():
        ax.plot(curve.fractions.numpy(), curve.scores.mean(dim=0).numpy(), label=f"{name} (AUC {curve.mean_auc:.3g})")
    modes = {curve.mode for curve in curves.values()}
    ax.set_xlabel("fraction of pixels " + ("removed" if modes == {"deletion"} else "changed"))
    ax.set_ylabel("feature value")
    ax.set_title(title or " / ".join(sorted(modes)), fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, path: str | Path, *, dpi: int = 100) -> Path:
    """Write ``fig`` to ``path`` (parents created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path
