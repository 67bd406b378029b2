"""How attribution maps are shown: Captum's ``visualize_image_attr`` normalisation (outliers
clipped by a cumulative-sum threshold, signed / positive / negative / absolute modes), colour
bars with their meaning, and a warning instead of a blank panel when a map is degenerate.

matplotlib's object-oriented API on the Agg canvas: no pyplot state, safe on headless machines.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch

__all__ = ["SIGNS", "DegenerateMapWarning", "as_rgb", "draw_map", "figure", "normalize_map", "png_bytes"]

SIGNS = ("auto", "all", "positive", "negative", "absolute")


class DegenerateMapWarning(UserWarning):
    """A map with nothing to show (all zero, or all one value)."""


def _threshold(values: np.ndarray, percentile: float) -> float:
    """The value where the sorted values' cumulative sum reaches ``percentile`` % of the total (Captum's rule)."""
    ordered = np.sort(values.reshape(-1))
    sums = np.cumsum(ordered)
    return float(ordered[np.flatnonzero(sums >= sums[-1] * 0.01 * percentile)[0]])


def resolve_sign(heat: np.ndarray, sign: str) -> str:
    """``"auto"``: ``"all"`` for a map with both signs, ``"positive"`` / ``"negative"`` otherwise."""
    if sign not in SIGNS:
        raise ValueError(f"sign={sign!r}; expected one of {', '.join(SIGNS)}")
    if sign != "auto":
        return sign
    if float(heat.min()) < 0 < float(heat.max()):
        return "all"
    return "negative" if float(heat.max()) <= 0 and float(heat.min()) < 0 else "positive"


def normalize_map(heat: np.ndarray, sign: str = "auto", outlier_percent: float = 2.0) -> tuple[np.ndarray, float, str]:
    """``(normalized, threshold, problem)``: ``heat`` ``[H, W]`` kept to ``sign`` and divided by the
    value below which ``100 - outlier_percent`` % of its absolute mass lies, clipped to [-1, 1] —
    the normalisation of Captum's ``visualize_image_attr``, so the top outliers no longer make
    everything else invisible. ``problem`` is ``""``, or says why the map shows nothing (or
    what it hides: NaN / infinite values, as kept with ``allow_nonfinite``, are drawn as 0)."""
    if not 0 <= outlier_percent < 100:
        raise ValueError(f"outlier_percent must be in [0, 100), got {outlier_percent}")
    heat = np.asarray(heat, dtype=np.float64)
    bad = ~np.isfinite(heat)
    if bad.all():
        return np.zeros_like(heat), 0.0, "not finite"
    if bad.any():  # kept results of a NaN model (allow_nonfinite): drawn as 0 and said so
        heat = np.where(bad, 0.0, heat)
    sign = resolve_sign(heat, sign)
    kept = {"all": heat, "positive": np.maximum(heat, 0), "negative": np.minimum(heat, 0), "absolute": np.abs(heat)}[sign]
    magnitude = np.abs(kept)
    if not magnitude.any():
        what = "all zero" if not np.abs(heat).any() else f"zero once kept to sign={sign!r}"
        return np.zeros_like(kept), 0.0, what
    threshold = _threshold(magnitude, 100.0 - outlier_percent)
    if threshold <= 0:
        threshold = float(magnitude.max())
    problem = "constant" if float(heat.max()) == float(heat.min()) else ""
    if bad.any():
        problem = f"{int(bad.sum())} non-finite values shown as 0"
    scaled = kept / (-threshold if sign == "negative" else threshold)
    return np.clip(scaled, -1.0, 1.0), threshold, problem


def as_rgb(image: Any, preprocessing: Any = None) -> np.ndarray:
    """An image ``[C, H, W]`` (tensor or array; ``[H, W, C]`` arrays too) as ``[H, W, 3]`` floats
    in [0, 1]: undo ``preprocessing`` (a :class:`~mechlens.models.Preprocessing`) if given, then
    clip, or min-max scale when the values are not in [0, 1]."""
    tensor = torch.as_tensor(image).detach().float().cpu()
    if tensor.dim() == 4:
        tensor = tensor[0]
    if tensor.dim() == 3 and tensor.shape[0] not in (1, 3) and tensor.shape[-1] in (1, 3):
        tensor = tensor.permute(2, 0, 1)
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if preprocessing is not None:
        tensor = preprocessing.denormalize(tensor)
    lo, hi = float(tensor.min()), float(tensor.max())
    if lo < -1e-3 or hi > 1 + 1e-3:
        tensor = (tensor - lo) / (hi - lo) if hi > lo else torch.zeros_like(tensor)
    tensor = tensor.clamp(0, 1)
    if tensor.shape[0] == 1:
        tensor = tensor.expand(3, -1, -1)
    return tensor.permute(1, 2, 0).numpy()


def figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def png_bytes(fig: Any, dpi: int = 90) -> bytes:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def quiet_png(plot: Any) -> bytes:
    """``png_bytes(plot())`` without :class:`DegenerateMapWarning`: a notebook's rich display of a
    figure of many maps, where the figure itself already marks a degenerate map."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DegenerateMapWarning)
        return png_bytes(plot())


def draw_map(ax: Any, fig: Any, heat: np.ndarray, image: np.ndarray | None = None, *, sign: str = "auto",
             outlier_percent: float = 2.0, alpha: float = 0.5, cmap: str | None = None, colorbar: bool = True,
             title: str | None = None) -> str:
    """Draw ``heat`` (over ``image`` ``[H, W, 3]`` when given) normalised by :func:`normalize_map`,
    with a colour bar saying what the colours mean; returns the problem found ('' if none) and
    warns (:class:`DegenerateMapWarning`) when the map shows nothing."""
    normalized, threshold, problem = normalize_map(heat, sign, outlier_percent)
    sign = resolve_sign(np.asarray(heat, dtype=np.float64), sign)
    if sign == "all":
        kwargs = {"cmap": cmap or "RdBu_r", "vmin": -1.0, "vmax": 1.0}
        label = "signed, ±1 = clip"
    elif sign == "negative":
        kwargs = {"cmap": cmap or "Blues", "vmin": 0.0, "vmax": 1.0}
        normalized = np.abs(normalized)
        label = "negative part, 1 = clip"
    else:
        kwargs = {"cmap": cmap or ("inferno" if image is None else "jet"), "vmin": 0.0, "vmax": 1.0}
        label = f"{'|map|' if sign == 'absolute' else 'positive part'}, 1 = clip"
    if image is not None:
        ax.imshow(image)
        im = ax.imshow(normalized, alpha=alpha, **kwargs)
    else:
        im = ax.imshow(normalized, **kwargs)
    if colorbar:
        bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        bar.set_label(f"{label} at {threshold:.3g}" if threshold else label, fontsize=7)
        bar.ax.tick_params(labelsize=7)
    if problem:
        warnings.warn(f"{title or 'map'}: the map is {problem}" + ("" if "non-finite" in problem else
                      "; nothing to show (check the target and the layer: Grad-CAM is all zero when no gradient of "
                      "the target is positive)"), DegenerateMapWarning, stacklevel=3)
    shown = f"{title}\n({problem})" if title and problem else (title or (f"({problem})" if problem else None))
    if shown:
        ax.set_title(shown, fontsize=9, color="#b00020" if problem else "black")
    ax.set_axis_off()
    return problem
