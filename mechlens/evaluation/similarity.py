"""Per-sample similarity of two batches of maps: Spearman rank correlation (scipy) and SSIM
(scikit-image), the two measures of Adebayo et al.'s sanity checks."""
from __future__ import annotations

import warnings

import numpy as np
import torch

__all__ = ["normalize_maps", "spearman", "ssim"]


def _as_batch(maps: torch.Tensor) -> np.ndarray:
    array = torch.as_tensor(maps).detach().float().cpu().numpy()
    if array.ndim == 2:
        array = array[None]
    return array


def normalize_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max scale each map of ``[B, ...]`` to [0, 1] (constant maps become 0)."""
    flat = maps.flatten(1).float()
    lo = flat.amin(dim=1, keepdim=True)
    hi = flat.amax(dim=1, keepdim=True)
    scaled = (flat - lo) / torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    return scaled.view_as(maps)


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of each pair of maps ``a[i]``, ``b[i]`` (``[B, ...]``), as a
    float64 tensor ``[B]``; NaN where a map is constant (the correlation is undefined)."""
    from scipy.stats import spearmanr

    x, y = _as_batch(a), _as_batch(b)
    if x.shape != y.shape:
        raise ValueError(f"maps must have the same shape, got {x.shape} and {y.shape}")
    out = np.full(x.shape[0], np.nan)
    for i in range(x.shape[0]):
        u, v = x[i].reshape(-1), y[i].reshape(-1)
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            continue
        out[i] = spearmanr(u, v).statistic
    return torch.from_numpy(out)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity of each pair of 2-d maps after min-max scaling each to [0, 1]
    (``data_range=1``), float64 ``[B]``."""
    from skimage.metrics import structural_similarity

    x = _as_batch(normalize_maps(torch.as_tensor(a)))
    y = _as_batch(normalize_maps(torch.as_tensor(b)))
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"ssim compares batches of 2-d maps [B, H, W] of equal shape, got {x.shape} and {y.shape}")
    side = min(x.shape[1:])
    if side < 3:
        raise ValueError(f"maps of {x.shape[1:]} pixels are too small for SSIM (need at least 3x3)")
    win = min(7, side if side % 2 == 1 else side - 1)
    out = np.empty(x.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i in range(x.shape[0]):
            out[i] = structural_similarity(x[i], y[i], data_range=1.0, win_size=win)
    return torch.from_numpy(out)
