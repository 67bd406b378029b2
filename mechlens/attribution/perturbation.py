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

from mechlens.engine import unwrap
from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    feature_values,
    make_generator,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import has_hooks, inference_model, optimizing, prefer_channels_last
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
    internal_batch_size: int | None = 64,
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
    model cannot be split, e.g. it does not trace with ``torch.fx``). ``internal_batch_size``:
    rows per forward pass (windows x images; the local path runs windows of one image at a
    time). 64 was the fastest of 8-256 for resnet18 at 224 px on one CPU thread, at 0.6x the
    peak memory of Captum's fastest setting."""
    model = unwrap(model)
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
        if local and optimizing() and not own_hooks and inputs.dim() == 4 and (win[1] < shape[1] or win[2] < shape[2]):
            split = local_split(model, inputs, (win[1], win[2]), keep=target.layers)
        if split is None:
            f_x = feature_values(model, inputs, target)
            for start, stop in chunk_ranges(offsets.shape[0], per_chunk):
                masks = _window_masks(offsets[start:stop], win, shape)  # [n, C, H, W]
                n = masks.shape[0]
                occluded = torch.where(masks.unsqueeze(1), base.unsqueeze(0), inputs.unsqueeze(0))  # [n, B, C, H, W]
                values, _ = target.repeat(n).forward(model, occluded.reshape(n * batch, *shape), grads=False)
                _accumulate(total, coverage, f_x, values.view(n, batch), masks)
        else:
            windows = offsets.shape[0] if internal_batch_size is None else max(1, internal_batch_size)
            f_x = _local_occlusion(split, inputs, base.expand_as(inputs), target, offsets, win, shape, windows, total, coverage)
    attributions = total / coverage.clamp_min(1)
    return Attribution(
        map=attributions, method="occlusion", features=target.names, values=f_x,
        kind="input", input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"window": list(win), "strides": list(stride), "n_windows": int(offsets.shape[0]),
                "local_recompute": None if split is None else {"cuts": split.cuts, "saved_fraction": round(split.saved_fraction, 4)}},
    )


def _accumulate(total: torch.Tensor, coverage: torch.Tensor | None, f_x: torch.Tensor, values: torch.Tensor, masks: torch.Tensor) -> None:
    """Credit ``f(x) - f(occluded)`` (``values``: ``[n, B]``) to the ``n`` windows' elements
    (and count the windows per element into ``coverage`` unless it is None)."""
    maskf = masks.to(total.dtype)
    total += torch.einsum("nb,nchw->bchw", f_x.unsqueeze(0) - values, maskf)
    if coverage is not None:
        coverage += maskf.sum(dim=0)


def _local_occlusion(
    split: LocalSplit, inputs: torch.Tensor, base: torch.Tensor, target: Target, offsets: torch.Tensor,
    win: tuple[int, int, int], shape: tuple[int, ...], per_chunk: int, total: torch.Tensor, coverage: torch.Tensor,
) -> torch.Tensor:
    """Occlusion through a :class:`LocalSplit`, one image at a time: each segment runs on a crop
    around the window's changed region, which is pasted into the clean image's activation at the
    segment's end; the suffix runs in full, ``per_chunk`` windows per pass. Returns ``f(x)``
    (computed through the same split, so no extra full forward pass of the batch).

    One image at a time, the clean activations kept for pasting are those of one image, and the
    largest activation of the network (the stem's) is never held for the whole batch. Crops and
    pastes are gathers over all windows of a pass at once (every window's crop has the same size,
    :meth:`LocalSplit.uniform_plans`)."""
    batch, device = inputs.shape[0], inputs.device
    plans = split.uniform_plans([((oy, oy + win[1]), (ox, ox + win[2])) for _, oy, ox in offsets.tolist()])
    levels = len(split.segments)
    # per level: crop starts [N, 2], and the changed region of the segment's output [N, 2, 2]
    crop_starts = [torch.tensor([[p[lv][0][0][0], p[lv][0][1][0]] for p in plans], device=device) for lv in range(levels)]
    crop_sizes = [(plans[0][lv][0][0][1] - plans[0][lv][0][0][0], plans[0][lv][0][1][1] - plans[0][lv][0][1][0])
                  for lv in range(levels)]
    changed = [torch.tensor([[list(p[lv][1][0]), list(p[lv][1][1])] for p in plans], device=device) for lv in range(levels)]
    strides = [segment.out_stride for segment in split.segments]
    f_x = torch.empty(batch, device=device, dtype=inputs.dtype)
    for b in range(batch):
        image = prefer_channels_last(inputs[b : b + 1])
        image_target = target.select([b])
        clean = []
        current = image
        for segment in split.segments:
            current = segment.module(current)
            clean.append(current)
        f_x[b : b + 1] = image_target.forward(split.suffix, current, grads=False)[0]
        for start, stop in balanced_ranges(offsets.shape[0], per_chunk):
            rows = torch.arange(start, stop, device=device)
            local_out = None
            for level, segment in enumerate(split.segments):
                ys, xs = _grid(crop_starts[level][rows], crop_sizes[level])  # absolute positions [n, h], [n, w]
                if level == 0:  # the image cropped, the window replaced by the baseline
                    crops = _gather(image, ys, xs)
                    window = offsets[rows]
                    inside = (_between(ys, window[:, 1], window[:, 1] + win[1])[:, None, :, None]
                              & _between(xs, window[:, 2], window[:, 2] + win[2])[:, None, None, :]
                              & _between(torch.arange(shape[0], device=device).expand(len(rows), -1), window[:, 0],
                                         window[:, 0] + win[0])[:, :, None, None])
                    crops = torch.where(inside, _gather(base[b : b + 1], ys, xs), crops)
                else:  # the clean activation, with the previous segment's changed region pasted in
                    crops = _paste_changed(clean[level - 1], local_out, ys, xs, changed[level - 1][rows],
                                           crop_starts[level - 1][rows] // strides[level - 1])
                local_out = segment.module(prefer_channels_last(crops))  # [n, K, h', w']
                del crops
            # the full cut activation of every window: one copy of the clean one, changed regions
            # copied in (a gather would allocate the full size three times)
            # (contiguous: the suffix's small, deep maps run faster that way on CPU than channels-last)
            last = levels - 1
            pasted = clean[last].expand(len(rows), *clean[last].shape[1:]).contiguous()
            for j, index in enumerate(range(start, stop)):
                (cy0, cy1), (cx0, cx1) = plans[index][last][1]
                oy, ox = (plans[index][last][0][0][0] // strides[last], plans[index][last][0][1][0] // strides[last])
                pasted[j, :, cy0:cy1, cx0:cx1] = local_out[j, :, cy0 - oy : cy1 - oy, cx0 - ox : cx1 - ox]
            del local_out
            values, _ = image_target.repeat(len(rows)).forward(split.suffix, pasted, grads=False)
            drops = (f_x[b] - values).tolist()
            for (c0, y0, x0), drop in zip(offsets[start:stop].tolist(), drops):
                total[b, c0 : c0 + win[0], y0 : y0 + win[1], x0 : x0 + win[2]] += drop
            del pasted, values
    for c0, y0, x0 in offsets.tolist():
        coverage[c0 : c0 + win[0], y0 : y0 + win[1], x0 : x0 + win[2]] += 1
    return f_x


def balanced_ranges(total: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(total)`` in as few pieces of at most ``size`` as
    :func:`chunk_ranges`, of equal sizes (the larger first): every pass then allocates the same
    sizes, or a little less, and reuses the memory the previous pass freed."""
    pieces = max(1, math.ceil(total / max(1, size)))
    bounds = [total * i // pieces for i in range(pieces + 1)]
    sizes = sorted((b - a for a, b in zip(bounds, bounds[1:])), reverse=True)
    out, start = [], 0
    for n in sizes:
        out.append((start, start + n))
        start += n
    return out


def _grid(starts: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Absolute row and column positions ``[n, h]``, ``[n, w]`` of crops starting at ``starts`` ``[n, 2]``."""
    ys = starts[:, :1] + torch.arange(size[0], device=starts.device)
    xs = starts[:, 1:] + torch.arange(size[1], device=starts.device)
    return ys, xs


def _between(positions: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """``lo[i] <= positions[i, :] < hi[i]``."""
    return (positions >= lo[:, None]) & (positions < hi[:, None])


def _gather(source: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """Crops ``[n, K, h, w]`` (channels-last strides) of ``source`` (``[1, K, H, W]``, or
    ``[n, K, H, W]`` with ``rows``: one source per crop) at positions ``ys``, ``xs``."""
    hwk = source.permute(0, 2, 3, 1)
    if rows is None:
        return hwk[0][ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
    return hwk[rows[:, None, None], ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)


def _paste_changed(
    clean: torch.Tensor, local_out: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor, changed: torch.Tensor, origin: torch.Tensor,
) -> torch.Tensor:
    """Crops of the ``clean`` activation at ``ys``, ``xs`` with each window's ``changed`` region
    (``[n, 2, 2]``: rows, columns) taken from ``local_out`` (whose element ``(0, 0)`` is
    ``origin`` ``[n, 2]`` of the activation)."""
    inside = (_between(ys, changed[:, 0, 0], changed[:, 0, 1])[:, None, :, None]
              & _between(xs, changed[:, 1, 0], changed[:, 1, 1])[:, None, None, :])
    ly = (ys - origin[:, :1]).clamp(0, local_out.shape[-2] - 1)
    lx = (xs - origin[:, 1:]).clamp(0, local_out.shape[-1] - 1)
    rows = torch.arange(ys.shape[0], device=ys.device)
    return torch.where(inside, _gather(local_out, ly, lx, rows), _gather(clean, ys, xs))


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
        map=amap, method=name, features=target.names, values=values, kind="input",
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
    model = unwrap(model)
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
    model = unwrap(model)
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
