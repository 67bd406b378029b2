"""Baselines ("what the input looks like with the evidence removed") shared by Integrated
Gradients, GradientSHAP, occlusion, LIME / KernelSHAP and the deletion / insertion curves.

``"zeros"``   all zeros (in the model's input space: black for [0, 1] inputs, the dataset mean
              for mean/std-normalised inputs)
``"mean"``    a per-channel (or full ``[C, H, W]``) dataset mean passed as ``mean=`` (see
              :func:`dataset_mean`); there is no silent fallback
``"blur"``    the input under a Gaussian blur of ``sigma`` pixels (default ``max(H, W) / 16``)
``"uniform"`` uniform noise in ``noise_range`` (default: the batch's min..max), seeded
a number      that constant everywhere
a tensor      broadcast to the input (``[C]``, ``[C, H, W]``, ``[1|B, C, H, W]``)
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["BASELINES", "constant_baseline_value", "dataset_mean", "gaussian_blur", "make_baseline"]

BASELINES: tuple[str, ...] = ("zeros", "mean", "blur", "uniform")


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` images (replicate padding), batched on any
    device."""
    if sigma <= 0:
        return x.clone()
    radius = max(1, int(math.ceil(3 * sigma)))
    coords = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (coords / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    horizontal = kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1)
    vertical = kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1)
    out = F.conv2d(padded, horizontal, groups=channels)
    return F.conv2d(out, vertical, groups=channels)


def _broadcast(value: torch.Tensor, inputs: torch.Tensor, what: str) -> torch.Tensor:
    value = value.to(device=inputs.device, dtype=inputs.dtype)
    if value.dim() == 1 and value.numel() == inputs.shape[1]:
        value = value.view(1, -1, 1, 1)
    elif value.dim() == 3:
        value = value.unsqueeze(0)
    try:
        return torch.broadcast_to(value, inputs.shape).clone()
    except RuntimeError:
        raise ValueError(
            f"{what} of shape {tuple(value.shape)} does not broadcast to the inputs {tuple(inputs.shape)}; "
            "give [C], [C, H, W] or [1 or B, C, H, W]"
        ) from None


def constant_baseline_value(baseline: Any) -> float | None:
    """The value of a constant baseline (``None`` / ``"zeros"`` / a number), else ``None``: a
    method may then keep it as a broadcast scalar instead of a ``[B, C, H, W]`` tensor."""
    if baseline is None or (isinstance(baseline, str) and baseline in ("zeros", "zero", "black")):
        return 0.0
    if isinstance(baseline, (int, float)) and not isinstance(baseline, bool):
        return float(baseline)
    return None


def make_baseline(
    inputs: torch.Tensor,
    baseline: Any = "zeros",
    *,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The baseline for ``inputs`` (``[B, C, H, W]``), same shape, device and dtype (see the
    module docstring for the accepted values)."""
    constant = constant_baseline_value(baseline)
    if constant is not None:
        return torch.full_like(inputs, constant)
    if isinstance(baseline, torch.Tensor):
        return _broadcast(baseline, inputs, "baseline")
    if isinstance(baseline, str):
        if baseline == "mean":
            if mean is None:
                raise ValueError(
                    "baseline='mean' needs the dataset mean: pass mean=[per-channel values] (in the model's "
                    "input space, e.g. mechlens.attribution.dataset_mean(dataset)); for mean/std-normalised "
                    "inputs the dataset mean is baseline='zeros'"
                )
            return _broadcast(torch.as_tensor(mean, dtype=inputs.dtype), inputs, "mean")
        if baseline == "blur":
            sigma = blur_sigma if blur_sigma is not None else max(inputs.shape[-2:]) / 16
            return gaussian_blur(inputs.detach(), float(sigma))
        if baseline == "uniform":
            lo, hi = noise_range if noise_range is not None else (float(inputs.min()), float(inputs.max()))
            if generator is None:
                raise ValueError("baseline='uniform' needs a seeded generator")
            noise = torch.rand(inputs.shape, generator=generator, device=inputs.device, dtype=inputs.dtype)
            return lo + (hi - lo) * noise
    raise ValueError(
        f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}, a number or a tensor"
    )


def dataset_mean(batches: Iterable[Any], *, max_samples: int | None = None) -> torch.Tensor:
    """Per-channel mean ``[C]`` over images from an iterable of ``[B, C, H, W]`` tensors,
    ``(images, labels)`` pairs, or a dataset of ``(image, label)`` items (``max_samples`` caps
    how many images are read)."""
    total: torch.Tensor | None = None
    images_seen = 0
    pixels = 0
    for item in batches:
        images = item[0] if isinstance(item, (tuple, list)) else item
        images = torch.as_tensor(images)
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if max_samples is not None:
            images = images[: max(0, max_samples - images_seen)]
        if images.shape[0] == 0:
            break
        sums = images.double().sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        images_seen += images.shape[0]
        pixels += images.shape[0] * images.shape[2] * images.shape[3]
        if max_samples is not None and images_seen >= max_samples:
            break
    if total is None or pixels == 0:
        raise ValueError("dataset_mean got no images")
    return (total / pixels).float()


def as_float_pair(values: Sequence[float] | None) -> tuple[float, float] | None:
    if values is None:
        return None
    lo, hi = values
    return float(lo), float(hi)
