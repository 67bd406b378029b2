"""Model-agnostic perturbation methods: occlusion (sliding windows), LIME and KernelSHAP on SLIC
superpixels.

All of them evaluate the feature on many perturbed copies of each input; the copies are built
on the fly and run ``internal_batch_size`` rows per forward pass (never one window or one
coalition at a time). The maps repeat a window's / superpixel's score over every element it
covers (Captum's convention), so :meth:`Attribution.heatmap` averages channels
(``channel_reduce="mean"``); LIME / KernelSHAP also return the per-superpixel
``coefficients`` and the ``segments`` in ``extras``.

The linear surrogates are solved in closed form, batched over samples, in float64 (weighted
least squares with an unpenalised intercept: the same estimator as scikit-learn's
``Ridge(alpha).fit(Z, y, sample_weight=w)``, which the tests check).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from mechlens.attribution.base import (
    Attribution,
    Target,
    _finite_or_raise,
    check_images,
    chunk_ranges,
    feature_values,
    make_generator,
    register_method,
    resolve_target,
    unwrap_model,
)
from mechlens.attribution.execution import has_hooks, inference_model, prefer_channels_last
from mechlens.attribution.local import LocalSplit, local_split
from mechlens.attribution.baselines import make_baseline

__all__ = ["SurrogateFit", "kernel_shap", "lime", "occlusion", "slic_segments", "weighted_ridge"]


# ---------------------------------------------------------------------------- occlusion
def _triple(value: int | Sequence[int], channels: int, what: str) -> tuple[int, int, int]:
    if isinstance(value, int):
        return (channels, value, value)
    value = tuple(int(v) for v in value)
    if len(value) == 2:
        return (channels, *value)
    if len(value) == 3:
        return value  # type: ignore[return-value]
    raise ValueError(f"{what} must be an int, (h, w) or (c, h, w), got {value!r}")


def _window_masks(offsets: torch.Tensor, window: tuple[int, int, int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Boolean masks ``[n, C, H, W]`` of the windows starting at ``offsets`` ``[n, 3]``."""
    parts = []
    for dim in range(3):
        coords = torch.arange(shape[dim], device=offsets.device)
        start = offsets[:, dim : dim + 1]
        parts.append((coords >= start) & (coords < start + window[dim]))
    mc, mh, mw = parts
    return mc[:, :, None, None] & mh[:, None, :, None] & mw[:, None, None, :]


@register_method("occlusion", kind="input", family="perturbation", multiplies_batch=True)
def occlusion(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    window: int | Sequence[int] = 8,
    strides: int | Sequence[int] | None = None,
    baseline: Any = 0.0,
    internal_batch_size: int | None = 256,
    mean: Any = None,
    blur_sigma: float | None = None,
    seed: int | None = 0,
    local: bool = True,
) -> Attribution:
    """Occlusion (Zeiler & Fergus; Captum's estimator): slide a ``window`` (``int``, ``(h, w)``
    over all channels, or ``(c, h, w)``) with ``strides`` (default: the window, i.e. no
    overlap), replace it by the baseline, and credit ``f(x) - f(x_occluded)`` to every element it
    covers, averaged over the windows covering each element. Windows per position follow Captum:
    ``ceil((size - window) / stride) + 1`` offsets per dimension, the last one clipped at the
    border.

    ``local=True`` recomputes the network's early, local layers only on a crop around each
    window and runs the rest in full (:mod:`mechlens.attribution.local`): the same values up to
    float rounding with less work; ``extras["local_recompute"]`` names the cut (None when the
    model cannot be split, e.g. it does not trace with ``torch.fx``)."""
    model = unwrap_model(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    shape = tuple(int(s) for s in inputs.shape[1:])
    win = _triple(window, shape[0], "window")
    stride = win if strides is None else _triple(strides, win[0], "strides")
    for dim in range(3):
        if not 1 <= win[dim] <= shape[dim]:
            raise ValueError(f"occlusion window {win} does not fit the input {shape}")
        if stride[dim] < 1 or (stride[dim] > win[dim] and win[dim] < shape[dim]):
            raise ValueError(f"strides {stride} must be positive and no larger than the window {win} (else pixels are skipped)")
    counts = [math.ceil((shape[d] - win[d]) / stride[d]) + 1 for d in range(3)]
    grids = torch.meshgrid(*[torch.arange(c, device=inputs.device) * s for c, s in zip(counts, stride)], indexing="ij")
    offsets = torch.stack([g.reshape(-1) for g in grids], dim=1)  # [n_windows, 3], Captum's order differs; sums do not
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma,
                         generator=make_generator(inputs.device, seed, None)).detach()
    total = torch.zeros_like(inputs)
    coverage = torch.zeros(shape, device=inputs.device, dtype=inputs.dtype)
    per_chunk = offsets.shape[0] if internal_batch_size is None else max(1, internal_batch_size // batch)
    split = None
    own_hooks = has_hooks(model)  # they would fire on crops: no local recompute then
    with inference_model(model, keep=target.layers, gradients=False) as model, torch.no_grad():
        f_x = feature_values(model, inputs, target)
        if local and not own_hooks and inputs.dim() == 4 and (win[1] < shape[1] or win[2] < shape[2]):
            split = local_split(model, inputs, (win[1], win[2]), keep=target.layers)
        if split is None:
            for start, stop in chunk_ranges(offsets.shape[0], per_chunk):
                masks = _window_masks(offsets[start:stop], win, shape)  # [n, C, H, W]
                n = masks.shape[0]
                occluded = torch.where(masks.unsqueeze(1), base.unsqueeze(0), inputs.unsqueeze(0))  # [n, B, C, H, W]
                values, _ = target.repeat(n).forward(model, occluded.reshape(n * batch, *shape), grads=False)
                _accumulate(total, coverage, f_x, values.view(n, batch), masks)
        else:
            _local_occlusion(split, inputs, base.expand_as(inputs), target, offsets, win, shape, per_chunk, f_x, total, coverage)
    attributions = total / coverage.clamp_min(1)
    return Attribution(
        map=_finite_or_raise(attributions, "occlusion"), method="occlusion", features=target.names, values=f_x,
        kind="input", input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"window": list(win), "strides": list(stride), "n_windows": int(offsets.shape[0]),
                "local_recompute": None if split is None else {"cuts": split.cuts, "saved_fraction": round(split.saved_fraction, 4)}},
    )


def _accumulate(total: torch.Tensor, coverage: torch.Tensor, f_x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor) -> None:
    """Credit ``f(x) - f(occluded)`` (``values``: ``[n, B]``) to the ``n`` windows' elements."""
    maskf = masks.to(total.dtype)
    total += torch.einsum("nb,nchw->bchw", f_x.unsqueeze(0) - values, maskf)
    coverage += maskf.sum(dim=0)


def _local_occlusion(
    split: LocalSplit, inputs: torch.Tensor, base: torch.Tensor, target: Target, offsets: torch.Tensor,
    win: tuple[int, int, int], shape: tuple[int, ...], per_chunk: int, f_x: torch.Tensor,
    total: torch.Tensor, coverage: torch.Tensor,
) -> None:
    """Occlusion through a :class:`LocalSplit`: each segment runs on a crop around the window's
    changed region, which is pasted into the clean image's activation at the segment's end; the
    suffix runs in full. Windows are grouped by crop sizes so each forward is one stacked batch."""
    batch = inputs.shape[0]
    clean = []
    current = inputs = prefer_channels_last(inputs)
    for segment in split.segments:
        current = segment.module(current)
        clean.append(current)
    plans = [split.plan(((oy, oy + win[1]), (ox, ox + win[2]))) for _, oy, ox in offsets.tolist()]
    groups: dict[tuple, list[int]] = {}
    for index, plan in enumerate(plans):
        key = tuple((cy[1] - cy[0], cx[1] - cx[0]) for (cy, cx), _ in plan)
        groups.setdefault(key, []).append(index)
    last = len(split.segments) - 1
    for indices in groups.values():
        for start, stop in chunk_ranges(len(indices), per_chunk):
            chunk = indices[start:stop]
            n = len(chunk)
            masks = _window_masks(offsets[chunk], win, shape)  # [n, C, H, W]
            local_out = None
            for level, segment in enumerate(split.segments):
                crops = []
                for j, index in enumerate(chunk):
                    (y0, y1), (x0, x1) = plans[index][level][0]
                    if level == 0:  # the occluded image, cropped
                        crops.append(torch.where(masks[j, :, y0:y1, x0:x1], base[:, :, y0:y1, x0:x1], inputs[:, :, y0:y1, x0:x1]))
                        continue
                    # the clean activation on this crop, with the previous segment's changed region pasted in
                    crop = clean[level - 1][:, :, y0:y1, x0:x1].clone()
                    _paste(crop, (y0, x0), local_out, j, batch, plans[index][level - 1], split.segments[level - 1].out_stride)
                    crops.append(crop)
                local_out = segment.module(prefer_channels_last(torch.cat(crops)))  # [n * B, K, h', w']
                del crops
            pasted = torch.cat([clean[last]] * n)  # the full cut activation of every window, then its changed region
            for j, index in enumerate(chunk):
                rows = pasted[j * batch : (j + 1) * batch]
                _paste(rows, (0, 0), local_out, j, batch, plans[index][last], split.segments[last].out_stride)
            del local_out
            values, _ = target.repeat(n).forward(split.suffix, pasted, grads=False)
            _accumulate(total, coverage, f_x, values.view(n, batch), masks)


def _paste(into: torch.Tensor, origin: tuple[int, int], local_out: torch.Tensor, j: int, batch: int, step: tuple, stride: int) -> None:
    """Copy window ``j``'s changed region from a segment's output on its crop (``local_out``) into
    ``into``, a region of the same activation starting at ``origin``."""
    ((y0, _), (x0, _)), ((cy0, cy1), (cx0, cx1)) = step
    oy, ox = y0 // stride, x0 // stride
    into[:, :, cy0 - origin[0] : cy1 - origin[0], cx0 - origin[1] : cx1 - origin[1]] = (
        local_out[j * batch : (j + 1) * batch, :, cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
    )


# ---------------------------------------------------------------------------- superpixels
def slic_segments(
    inputs: torch.Tensor,
    *,
    n_segments: int = 50,
    compactness: float = 10.0,
    sigma: float = 1.0,
    **slic_kwargs: Any,
) -> torch.Tensor:
    """SLIC superpixels (:func:`skimage.segmentation.slic`) of each image, ``[B, H, W]`` long
    labels ``0..S_b-1``. Each image is min-max scaled to [0, 1] first (the model's normalisation
    does not matter); 3-channel images are segmented in Lab space. Runs per image on the CPU."""
    from skimage.segmentation import slic

    images = check_images(inputs).detach().float().cpu()
    out = []
    for image in images:
        lo, hi = image.min(), image.max()
        scaled = ((image - lo) / (hi - lo) if hi > lo else torch.zeros_like(image)).permute(1, 2, 0).numpy()
        if scaled.shape[2] == 1:
            labels = slic(scaled[..., 0], n_segments=n_segments, compactness=compactness, sigma=sigma,
                          channel_axis=None, start_label=0, **slic_kwargs)
        else:
            labels = slic(scaled, n_segments=n_segments, compactness=compactness, sigma=sigma,
                          channel_axis=-1, start_label=0, convert2lab=scaled.shape[2] == 3, **slic_kwargs)
        _, dense = np.unique(labels, return_inverse=True)
        out.append(torch.from_numpy(dense.reshape(labels.shape).astype(np.int64)))
    return torch.stack(out).to(inputs.device)


def _check_segments(segments: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    segments = torch.as_tensor(segments)
    if segments.dim() == 2:
        segments = segments.unsqueeze(0).expand(inputs.shape[0], -1, -1)
    if segments.shape != (inputs.shape[0], *inputs.shape[2:]):
        raise ValueError(f"segments must be [B, H, W] = {[inputs.shape[0], *inputs.shape[2:]]}, got {tuple(segments.shape)}")
    if segments.is_floating_point() or int(segments.min()) < 0:
        raise ValueError("segments must hold non-negative integer labels")
    return segments.to(device=inputs.device, dtype=torch.long)


class SurrogateFit:
    """Weighted linear fit per sample: ``coefficients`` ``[B, S]``, ``intercept`` ``[B]``,
    weighted ``r2`` ``[B]``."""

    def __init__(self, coefficients: torch.Tensor, intercept: torch.Tensor, r2: torch.Tensor) -> None:
        self.coefficients = coefficients
        self.intercept = intercept
        self.r2 = r2


def weighted_ridge(
    z: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, *, alpha: float, active: torch.Tensor | None = None,
) -> SurrogateFit:
    """Minimise ``sum_i w_i (y_i - c - z_i . beta)^2 + alpha |beta|^2`` for each sample (batched
    normal equations in float64; the intercept ``c`` is not penalised). ``active`` ``[B, S]``
    marks real columns; padded ones get coefficient 0."""
    z64, y64, w64 = z.double(), y.double(), weights.double()
    batch, n, s = z64.shape
    design = torch.cat([z64, torch.ones(batch, n, 1, dtype=torch.float64, device=z.device)], dim=2)
    weighted = design.transpose(1, 2) * w64.unsqueeze(1)
    gram = weighted @ design
    rhs = weighted @ y64.unsqueeze(2)
    if active is None:
        active = torch.ones(batch, s, dtype=torch.bool, device=z.device)
    penalty = torch.where(active, torch.full_like(active, alpha, dtype=torch.float64), torch.ones_like(active, dtype=torch.float64))
    diag = torch.cat([penalty, torch.zeros(batch, 1, dtype=torch.float64, device=z.device)], dim=1)
    scale = gram.diagonal(dim1=1, dim2=2).abs().amax(dim=1).clamp_min(1.0)
    diag = diag + 1e-12 * scale.unsqueeze(1)  # keeps the solve well posed when alpha = 0
    beta = torch.linalg.solve(gram + torch.diag_embed(diag), rhs).squeeze(2)
    beta[:, :s] = torch.where(active, beta[:, :s], torch.zeros_like(beta[:, :s]))
    pred = (design @ beta.unsqueeze(2)).squeeze(2)
    wsum = w64.sum(dim=1, keepdim=True)
    ybar = (w64 * y64).sum(dim=1, keepdim=True) / wsum
    ss_res = (w64 * (y64 - pred) ** 2).sum(dim=1)
    ss_tot = (w64 * (y64 - ybar) ** 2).sum(dim=1)
    r2 = 1 - ss_res / ss_tot.clamp_min(1e-300)
    return SurrogateFit(beta[:, :s], beta[:, s], r2)


def _coalition_values(
    model: torch.nn.Module, inputs: torch.Tensor, base: torch.Tensor, segments: torch.Tensor, z: torch.Tensor,
    target: Target, internal_batch_size: int | None,
) -> torch.Tensor:
    """Feature values ``[B, n]`` of the inputs with superpixel ``s`` kept where ``z[b, i, s]`` is
    1 and replaced by the baseline where it is 0."""
    batch, n, _ = z.shape
    flat_segments = segments.flatten(1)
    out = torch.empty(batch * n, device=inputs.device, dtype=inputs.dtype)
    with torch.no_grad():
        for start, stop in chunk_ranges(batch * n, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            b, i = rows // n, rows % n
            keep = z[b, i].to(inputs.dtype).gather(1, flat_segments[b]).view(-1, 1, *inputs.shape[2:])
            perturbed = base[b] + (inputs[b] - base[b]) * keep
            values, _ = target.select(b.cpu()).forward(model, perturbed, grads=False)
            out[start:stop] = values
    return out.view(batch, n)


def _superpixel_setup(
    inputs: torch.Tensor, segments: torch.Tensor | None, n_segments: int, compactness: float, slic_kwargs: dict | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if segments is None:
        segments = slic_segments(inputs, n_segments=n_segments, compactness=compactness, **(slic_kwargs or {}))
    segments = _check_segments(segments, inputs)
    n_per_sample = segments.flatten(1).amax(dim=1) + 1  # [B]
    s_max = int(n_per_sample.max())
    active = torch.arange(s_max, device=inputs.device).unsqueeze(0) < n_per_sample.unsqueeze(1)
    return segments, n_per_sample, active


def _superpixel_result(
    name: str, fit: SurrogateFit, segments: torch.Tensor, inputs: torch.Tensor, target: Target, values: torch.Tensor, **extras: Any,
) -> Attribution:
    coefficients = fit.coefficients.to(inputs.dtype)
    per_pixel = coefficients.gather(1, segments.flatten(1)).view(inputs.shape[0], 1, *inputs.shape[2:])
    amap = per_pixel.expand_as(inputs).contiguous()
    return Attribution(
        map=_finite_or_raise(amap, name), method=name, features=target.names, values=values, kind="input",
        input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"coefficients": coefficients, "intercept": fit.intercept.to(inputs.dtype), "r2": fit.r2.to(inputs.dtype),
                "segments": segments, **extras},
    )


@register_method("lime", kind="input", family="perturbation", multiplies_batch=True)
def lime(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    n_samples: int = 256,
    segments: torch.Tensor | None = None,
    n_segments: int = 50,
    compactness: float = 10.0,
    baseline: Any = "zeros",
    kernel_width: float = 0.25,
    alpha: float = 1.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = 256,
    slic_kwargs: dict | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
) -> Attribution:
    """LIME (Ribeiro et al.) on SLIC superpixels: ``n_samples`` random on/off patterns of the
    superpixels (the first keeps all), perturbed superpixels replaced by ``baseline``, a ridge
    regression (``alpha``) of the feature value on the patterns, weighted by LIME's image kernel
    ``sqrt(exp(-d^2 / kernel_width^2))`` of the cosine distance ``d`` to the unperturbed
    pattern. ``segments`` ``[B, H, W]`` overrides SLIC."""
    model = unwrap_model(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    gen = make_generator(inputs.device, seed, generator)
    segments, n_per_sample, active = _superpixel_setup(inputs, segments, n_segments, compactness, slic_kwargs)
    batch, s_max = active.shape
    z = torch.rand((batch, n_samples, s_max), generator=gen, device=gen.device).to(inputs.device) < 0.5
    z[:, 0] = True
    z &= active.unsqueeze(1)
    on = z.sum(dim=2).double()
    cosine = torch.where(on > 0, on.sqrt() / n_per_sample.double().sqrt().unsqueeze(1), torch.zeros_like(on))
    distance = 1 - cosine
    weights = torch.exp(-(distance**2) / kernel_width**2).sqrt()
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, generator=gen).detach()
    with inference_model(model, keep=target.layers, gradients=False) as model:
        y = _coalition_values(model, inputs, base, segments, z, target, internal_batch_size)
    fit = weighted_ridge(z, y, weights, alpha=alpha, active=active)
    return _superpixel_result("lime", fit, segments, inputs, target, y[:, 0].detach(),
                              n_samples=n_samples, n_segments=n_per_sample)


@register_method("kernel_shap", kind="input", family="perturbation", multiplies_batch=True, aliases=("kernelshap",))
def kernel_shap(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    n_samples: int = 256,
    segments: torch.Tensor | None = None,
    n_segments: int = 50,
    compactness: float = 10.0,
    baseline: Any = "zeros",
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = 256,
    slic_kwargs: dict | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
) -> Attribution:
    """KernelSHAP (Lundberg & Lee) on SLIC superpixels: coalition sizes ``k`` drawn with
    probability proportional to the Shapley kernel ``(S - 1) / (k (S - k))``, members uniform,
    plus the full and the empty coalitions with a large weight (they pin the intercept to
    ``f(baseline)`` and the sum to ``f(x)``); the per-superpixel Shapley values are the
    coefficients of the weighted least-squares fit. ``extras["completeness_error"]`` is the
    efficiency error ``|sum(phi) - (f(x) - f(baseline))| / |f(x) - f(baseline)|``."""
    model = unwrap_model(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    if n_samples < 3:
        raise ValueError("kernel_shap needs n_samples >= 3 (the full and empty coalitions plus samples)")
    gen = make_generator(inputs.device, seed, generator)
    segments, n_per_sample, active = _superpixel_setup(inputs, segments, n_segments, compactness, slic_kwargs)
    batch, s_max = active.shape
    sizes = torch.arange(1, max(s_max, 2), device=inputs.device, dtype=torch.float64)  # k = 1..S_max-1
    s_col = n_per_sample.double().unsqueeze(1)
    kernel = torch.where(sizes.unsqueeze(0) < s_col, (s_col - 1) / (sizes * (s_col - sizes)).clamp_min(1e-12),
                         torch.zeros(1, dtype=torch.float64, device=inputs.device))
    kernel[(n_per_sample < 2), 0] = 1.0  # one superpixel: only the full coalition exists
    draws = n_samples - 2
    k = torch.multinomial(kernel.float().to(gen.device), draws, replacement=True, generator=gen).to(inputs.device) + 1
    u = torch.rand((batch, draws, s_max), generator=gen, device=gen.device).to(inputs.device)
    u = torch.where(active.unsqueeze(1), u, torch.full_like(u, 2.0))
    ranks = u.argsort(dim=2).argsort(dim=2)
    sampled = ranks < k.unsqueeze(2)
    full = active.unsqueeze(1)
    empty = torch.zeros_like(full)
    z = torch.cat([full, empty, sampled], dim=1)
    weights = torch.ones(batch, n_samples, dtype=torch.float64, device=inputs.device)
    weights[:, :2] = 1e6
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, generator=gen).detach()
    with inference_model(model, keep=target.layers, gradients=False) as model:
        y = _coalition_values(model, inputs, base, segments, z, target, internal_batch_size)
    fit = weighted_ridge(z, y, weights, alpha=0.0, active=active)
    f_x, f_0 = y[:, 0], y[:, 1]
    delta = fit.coefficients.sum(dim=1).to(inputs.dtype) - (f_x - f_0)
    error = delta.abs() / (f_x - f_0).abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    return _superpixel_result("kernel_shap", fit, segments, inputs, target, f_x.detach(), n_samples=n_samples,
                              n_segments=n_per_sample, convergence_delta=delta, completeness_error=error,
                              baseline_values=f_0)
