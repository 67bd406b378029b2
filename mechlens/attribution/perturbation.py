"""Model-agnostic perturbation methods: occlusion (sliding windows), LIME and KernelSHAP on SLIC
superpixels, RISE (random smooth masks), feature ablation and Shapley value sampling over
integer group masks.

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

__all__ = ["SurrogateFit", "feature_ablation", "kernel_shap", "lime", "occlusion", "rise", "rise_masks",
           "shapley_value_sampling", "slic_segments", "weighted_ridge"]


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


# ---------------------------------------------------------------------------- RISE
def _grid_cells(grid_size: int | Sequence[int], image_hw: tuple[int, int]) -> tuple[int, int]:
    """``(rows, columns)`` of RISE's coarse grid, checked against the image."""
    if isinstance(grid_size, bool):
        cells = None
    elif isinstance(grid_size, int):
        cells = (grid_size, grid_size)
    else:
        try:
            cells = tuple(int(v) for v in grid_size)
        except (TypeError, ValueError):
            cells = None
    if cells is None or len(cells) != 2 or not (1 <= cells[0] <= image_hw[0] and 1 <= cells[1] <= image_hw[1]):
        raise ValueError(
            f"grid_size must be an int or (rows, columns) of cells, each between 1 and the image size "
            f"{image_hw[0]}x{image_hw[1]}, got {grid_size!r}"
        )
    return cells  # type: ignore[return-value]


def _check_rise_options(n_masks: Any, p: Any, debias: bool) -> None:
    if isinstance(n_masks, bool) or not isinstance(n_masks, int) or n_masks < 1:
        raise ValueError(f"n_masks must be a positive integer (the number of random masks), got {n_masks!r}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
        raise ValueError(f"p (the probability that a grid cell keeps the image) must be in (0, 1], got {p!r}")
    if debias and p == 1:
        raise ValueError("debias=True weights masks by (M - p) / (p (1 - p)), which needs p < 1")


def _interpolation_matrix(out: int, cells: int) -> torch.Tensor:
    """``[out, cells]`` weights of linear interpolation from ``cells`` values to ``out`` samples
    with half-pixel centres and a mirror boundary (float64): what
    ``skimage.transform.resize(order=1, mode="reflect")`` computes, which the reference RISE
    uses to upsample its grids (tested)."""
    position = (torch.arange(out, dtype=torch.float64) + 0.5) * cells / out - 0.5
    low = position.floor()
    frac = position - low
    low = low.long()

    def mirror(k: torch.Tensor) -> torch.Tensor:
        if cells == 1:
            return torch.zeros_like(k)
        k = k.abs()
        return torch.where(k > cells - 1, 2 * (cells - 1) - k, k)

    weights = torch.zeros(out, cells, dtype=torch.float64)
    rows = torch.arange(out)
    weights.index_put_((rows, mirror(low)), 1 - frac, accumulate=True)
    weights.index_put_((rows, mirror(low + 1)), frac, accumulate=True)
    return weights


class _RiseMasks:
    """RISE's masks (Petsiuk et al. 2018, as their reference code draws them): ``n`` binary grids
    of ``rows x columns`` cells, each cell kept with probability ``p``, upsampled bilinearly to
    ``(cells + 1) * ceil(size / cells)`` pixels per side and cropped to the image at a random
    shift below one cell. Only the grids and the shifts are drawn and stored (``n`` x cells);
    :meth:`masks` upsamples any range of them, as two small matrix products per mask, so the
    ``[n, H, W]`` masks exist one chunk at a time and do not depend on the chunking."""

    def __init__(self, n: int, image_hw: tuple[int, int], cells: tuple[int, int], p: float,
                 generator: torch.Generator, device: torch.device) -> None:
        height, width = image_hw
        cell_h, cell_w = math.ceil(height / cells[0]), math.ceil(width / cells[1])
        where = generator.device
        self.grids = (torch.rand((n, *cells), generator=generator, device=where) < p).to(device)
        self.shift_y = torch.randint(0, cell_h, (n,), generator=generator, device=where).to(device)
        self.shift_x = torch.randint(0, cell_w, (n,), generator=generator, device=where).to(device)
        self.up_h = _interpolation_matrix((cells[0] + 1) * cell_h, cells[0]).to(device)
        self.up_w = _interpolation_matrix((cells[1] + 1) * cell_w, cells[1]).to(device)
        self.image_hw = image_hw

    def masks(self, start: int, stop: int, dtype: torch.dtype) -> torch.Tensor:
        """Masks ``start..stop-1``, ``[n, H, W]`` in ``dtype`` (computed in float64, like the reference)."""
        height, width = self.image_hw
        device = self.grids.device
        rows = self.up_h[self.shift_y[start:stop, None] + torch.arange(height, device=device)]  # [n, H, cells_h]
        cols = self.up_w[self.shift_x[start:stop, None] + torch.arange(width, device=device)]  # [n, W, cells_w]
        return (rows @ self.grids[start:stop].double() @ cols.transpose(1, 2)).to(dtype)


def rise_masks(
    n_masks: int,
    image_size: int | Sequence[int],
    *,
    grid_size: int | Sequence[int] = 7,
    p: float = 0.5,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The ``[N, 1, H, W]`` masks that :func:`rise` uses for the same ``seed`` (or a generator in
    the same state), image size, ``grid_size`` and ``p`` on the same device: for plotting them,
    or for checking RISE by hand. All of them at once; :func:`rise` itself makes them a chunk at a
    time."""
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(int(v) for v in image_size)
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
    _check_rise_options(n_masks, p, False)
    cells = _grid_cells(grid_size, size)  # type: ignore[arg-type]
    where = torch.device(device) if device is not None else torch.device("cpu")
    sampler = _RiseMasks(n_masks, size, cells, float(p), make_generator(where, seed, generator), where)  # type: ignore[arg-type]
    return sampler.masks(0, n_masks, dtype).unsqueeze(1)


@register_method("rise", kind="input", family="perturbation", multiplies_batch=True,
                 randomization="passes (rho 0.23-0.33, 3 trained models)")
def rise(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    n_masks: int = 4000,
    grid_size: int | Sequence[int] = 7,
    p: float = 0.5,
    baseline: Any = "zeros",
    debias: bool = False,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = 64,
    mean: Any = None,
    blur_sigma: float | None = None,
) -> Attribution:
    """RISE (Petsiuk et al. 2018): the feature's value on ``n_masks`` randomly masked copies of
    the input, averaged with the masks as weights. The saliency of pixel ``u`` is the paper's
    Monte-Carlo estimate of ``E[f(x . M) | M(u) = 1]``,
    ``S(u) = sum_i f(x . M_i) M_i(u) / (N p)`` (``E[M] = p``; the reference code's ``sal / N / p1``).

    Masks (see :func:`rise_masks`): ``grid_size`` cells per side (int or ``(rows, columns)``),
    each kept with probability ``p``, upsampled bilinearly and cropped at a random shift, as in
    the reference code; drawn once from ``seed`` / ``generator`` and shared by every image of the
    batch. Masked pixels blend towards ``baseline`` (``x M + b (1 - M)``; the paper's ``"zeros"``
    is ``x M``; ``"blur"``, ``"mean"``... as :func:`~mechlens.attribution.baselines.make_baseline`).
    The paper scores softmax probabilities: pass ``ClassLogit(c, normalize="softmax")``
    (``"class:c:softmax"``) for that; any feature works.

    ``debias=True`` weights the masks by ``M - p`` instead (Hatakeyama et al. 2020's debiased
    RISE, xaitk-saliency's ``RISEScoring(p1=p)`` before its max-abs scaling) and divides by
    ``N p (1 - p)``: for binary masks ``E[f | u kept] - E[f | u removed]``, without RISE's
    image-wide offset ``E[f]``. Neither the paper nor its reference code subtracts a mean or a
    blank-image score, so the default does not. ``internal_batch_size``: masked images per
    forward pass (masks x images). ``extras``: ``n_forwards`` (images run through the model:
    ``B (N + 1)``), ``n_forward_passes``, ``mask_mean`` (the drawn masks' mean; ``p`` in
    expectation), ``mean_score`` ``[B]`` (the feature's mean over the masked images: the map's
    image-wide offset; ``debias`` maps are ``(map - mean_score) / (1 - p)``)."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    _check_rise_options(n_masks, p, debias)
    batch = inputs.shape[0]
    image_hw = (int(inputs.shape[2]), int(inputs.shape[3]))
    cells = _grid_cells(grid_size, image_hw)
    target = resolve_target(model, inputs, target)
    gen = make_generator(inputs.device, seed, generator)
    sampler = _RiseMasks(n_masks, image_hw, cells, float(p), gen, inputs.device)
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, generator=gen).detach()
    delta = inputs - base
    per_chunk = n_masks if internal_batch_size is None else max(1, internal_batch_size // batch)
    total = torch.zeros(batch, *image_hw, dtype=torch.float64, device=inputs.device)
    mask_total = 0.0
    score_total = torch.zeros(batch, dtype=torch.float64, device=inputs.device)
    passes = 1
    with inference_model(model, keep=target.layers, gradients=False) as model, torch.no_grad():
        f_x = feature_values(model, inputs, target)
        for start, stop in chunk_ranges(n_masks, per_chunk):
            masks = sampler.masks(start, stop, inputs.dtype)  # [n, H, W]
            n = masks.shape[0]
            masked = base.unsqueeze(0) + delta.unsqueeze(0) * masks[:, None, None]  # [n, B, C, H, W]
            values, _ = target.repeat(n).forward(model, masked.reshape(n * batch, *inputs.shape[1:]), grads=False)
            del masked
            weights = masks.double() - p if debias else masks.double()
            scores = values.view(n, batch).double()
            total += torch.einsum("nb,nhw->bhw", scores, weights)
            score_total += scores.sum(dim=0)
            mask_total += float(masks.double().sum())
            passes += 1
    scale = n_masks * p * ((1 - p) if debias else 1)
    saliency = (total / scale).to(inputs.dtype)
    return Attribution(
        map=saliency.unsqueeze(1).expand_as(inputs).contiguous(), method="rise", features=target.names,
        values=f_x, kind="input", input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"n_masks": n_masks, "grid_size": list(cells), "p": float(p), "debias": bool(debias),
                "n_forwards": batch * (n_masks + 1), "n_forward_passes": passes,
                "mask_mean": mask_total / (n_masks * image_hw[0] * image_hw[1]),
                "mean_score": (score_total / n_masks).to(inputs.dtype)},
    )


# ---------------------------------------------------------------------------- group masks
def _check_feature_mask(feature_mask: Any, inputs: torch.Tensor, method: str) -> torch.Tensor:
    """``feature_mask`` as ``[1 or B, 1 or C, H, W]`` long group ids on the inputs' device (an
    int ``k``: square ``k x k`` patches, ids row-major)."""
    batch, channels, height, width = (int(s) for s in inputs.shape)
    if feature_mask is None:
        raise ValueError(
            f"{method} needs feature_mask=: an integer tensor [B or 1, 1 or C, H, W] of group ids (e.g. "
            "slic_segments(x)[:, None]) or an int k for k x k patches; one group per element (Captum's default) "
            "would cost C*H*W forward passes per image"
        )
    if isinstance(feature_mask, int) and not isinstance(feature_mask, bool):
        if not 1 <= feature_mask <= max(height, width):
            raise ValueError(f"a patch feature_mask must be between 1 and the image size {height}x{width}, got {feature_mask}")
        ys = torch.arange(height, device=inputs.device) // feature_mask
        xs = torch.arange(width, device=inputs.device) // feature_mask
        return (ys[:, None] * math.ceil(width / feature_mask) + xs[None, :]).view(1, 1, height, width)
    if not isinstance(feature_mask, torch.Tensor):
        raise TypeError(f"feature_mask must be an integer tensor [B or 1, 1 or C, H, W] or an int patch size, got {type(feature_mask).__name__}")
    if feature_mask.is_floating_point() or feature_mask.is_complex() or feature_mask.dtype == torch.bool:
        raise ValueError(f"feature_mask must hold integer group ids (e.g. torch.long), got {feature_mask.dtype}")
    mask = feature_mask[None, None] if feature_mask.dim() == 2 else feature_mask
    if (mask.dim() != 4 or mask.shape[0] not in (1, batch) or mask.shape[1] not in (1, channels)
            or tuple(mask.shape[2:]) != (height, width)):
        raise ValueError(
            f"feature_mask must be [B or 1, 1 or C, H, W] = [{batch} or 1, 1 or {channels}, {height}, {width}] "
            f"(or [H, W]), got {tuple(feature_mask.shape)}; for [B, H, W] segments pass segments[:, None]"
        )
    if int(mask.min()) < 0:
        raise ValueError(f"feature_mask must hold non-negative group ids, got {int(mask.min())}")
    return mask.to(device=inputs.device, dtype=torch.long)


def _present_groups(mask: torch.Tensor, groups: int, batch: int) -> torch.Tensor:
    """``[B, groups]``: whether group ``g`` covers any element of sample ``b``."""
    present = torch.zeros(mask.shape[0], groups, dtype=torch.bool, device=mask.device)
    present.scatter_(1, mask.flatten(1), True)
    return present.expand(batch, -1)


def _spread(per_group: torch.Tensor, mask: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``[B, C, H, W]`` map repeating each group's value ``per_group[b, g]`` over its elements."""
    batch = per_group.shape[0]
    ids = mask.expand(batch, -1, -1, -1)
    return per_group.gather(1, ids.flatten(1)).view(ids.shape).expand(shape).contiguous()


def _mask_rows(mask: torch.Tensor, samples: torch.Tensor) -> torch.Tensor:
    """The group ids of each row's sample ``[r, C', H, W]`` (a shared mask is not copied)."""
    return mask[samples] if mask.shape[0] > 1 else mask.expand(samples.shape[0], -1, -1, -1)


@register_method("feature_ablation", kind="input", family="perturbation", multiplies_batch=True, aliases=("ablation",),
                 randomization="passes (rho -0.06-0.31, 8x8 patches, 2 trained models)")
def feature_ablation(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    feature_mask: torch.Tensor | int | None = None,
    baseline: Any = 0.0,
    internal_batch_size: int | None = 64,
    mean: Any = None,
    blur_sigma: float | None = None,
    seed: int | None = 0,
) -> Attribution:
    """Feature ablation (Captum's ``FeatureAblation``): replace one group of ``feature_mask`` at
    a time by the baseline and credit ``f(x) - f(x with the group ablated)`` to every element of
    the group. ``feature_mask``: integer ids ``[B or 1, 1 or C, H, W]`` (or ``[H, W]``; one id map
    for all channels, or per channel; per sample or shared), or an int ``k`` for ``k x k``
    patches. It is required: Captum's default, every element its own group, costs ``C H W``
    forward passes per image; :func:`occlusion` covers sliding windows. Only the groups a sample
    has are evaluated. ``internal_batch_size``: ablated images per forward pass (groups x
    images). ``extras``: ``group_ids``, ``group_attributions`` ``[B, G]`` (0 for a group a sample
    lacks), ``n_forwards``."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    mask = _check_feature_mask(feature_mask, inputs, "feature_ablation")
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    ids, dense = torch.unique(mask, return_inverse=True)  # any ids -> 0..G-1
    groups = int(ids.numel())
    rows = _present_groups(dense, groups, batch).nonzero()  # [R, 2]: (sample, group)
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma,
                         generator=make_generator(inputs.device, seed, None)).detach()
    diffs = torch.zeros(batch, groups, dtype=inputs.dtype, device=inputs.device)
    with inference_model(model, keep=target.layers, gradients=False) as model, torch.no_grad():
        f_x = feature_values(model, inputs, target)
        for start, stop in chunk_ranges(rows.shape[0], internal_batch_size):
            b, g = rows[start:stop].unbind(1)
            ablate = _mask_rows(dense, b) == g.view(-1, 1, 1, 1)
            values, _ = target.select(b.cpu()).forward(model, torch.where(ablate, base[b], inputs[b]), grads=False)
            diffs[b, g] = f_x[b] - values
    return Attribution(
        map=_spread(diffs, dense, inputs.shape), method="feature_ablation", features=target.names, values=f_x,
        kind="input", input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"group_ids": ids, "group_attributions": diffs, "n_groups": groups,
                "n_forwards": int(rows.shape[0]) + batch},
    )


@register_method("shapley_value_sampling", kind="input", family="perturbation", multiplies_batch=True,
                 aliases=("shapley_sampling",), randomization="passes (rho 0.10, 2 trained models)")
def shapley_value_sampling(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    feature_mask: torch.Tensor | int | None = None,
    n_samples: int = 25,
    baseline: Any = 0.0,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = 64,
    mean: Any = None,
    blur_sigma: float | None = None,
) -> Attribution:
    """Shapley value sampling (Castro et al. 2009; Captum's ``ShapleyValueSampling``): for each
    of ``n_samples`` random orders of the groups of ``feature_mask`` (as in
    :func:`feature_ablation`), start from the baseline, switch the groups to the input one at a
    time and credit each group its marginal change of the feature; average over the orders.

    The orders are ``torch.randperm(max id + 1)`` drawn from ``seed`` / ``generator``, the same
    draws as Captum's after ``torch.manual_seed(seed)`` (tested). Steps that add a group a sample
    lacks, and those after the last of its groups (the input itself, ``f(x)``), are not evaluated;
    every other step of every order is, ``internal_batch_size`` images per forward pass. The
    values sum exactly to ``f(x) - f(baseline)`` (telescoping): ``extras`` has
    ``convergence_delta``, ``completeness_error``, ``baseline_values``, the per-group
    ``shapley_values`` ``[B, max id + 1]`` and ``n_forwards``."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer (the number of random orders), got {n_samples!r}")
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    mask = _check_feature_mask(feature_mask, inputs, "shapley_value_sampling")
    target = resolve_target(model, inputs, target)
    batch, device = inputs.shape[0], inputs.device
    groups = int(mask.max()) + 1
    gen = make_generator(device, seed, generator)
    orders = torch.stack([torch.randperm(groups, generator=gen, device=gen.device) for _ in range(n_samples)]).to(device)
    steps = torch.arange(groups, device=device)
    rank = torch.empty_like(orders).scatter_(1, orders, steps.expand(n_samples, -1))  # rank[j, g]: step adding g
    present = _present_groups(mask, groups, batch)  # [B, G]
    last = torch.where(present.unsqueeze(1), rank.unsqueeze(0), -1).amax(dim=2)  # [B, n]: step adding b's last group
    adds_present = present[:, orders]  # [B, n, G]: step k of order j adds a group sample b has
    rows = (adds_present & (steps < last.unsqueeze(2))).nonzero()  # [R, 3]: (sample, order, step)
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, generator=gen).detach()
    # values[b, j, k]: the feature with the first k groups of order j switched to the input
    values = torch.zeros(batch, n_samples, groups + 1, dtype=inputs.dtype, device=device)
    known = torch.zeros(batch, n_samples, groups + 1, dtype=torch.bool, device=device)
    with inference_model(model, keep=target.layers, gradients=False) as model, torch.no_grad():
        f_x = feature_values(model, inputs, target)
        f_0 = feature_values(model, base, target)
        values[:, :, 0] = f_0.unsqueeze(1)
        known[:, :, 0] = True
        complete = (last + 1).unsqueeze(2)  # from here on the input is x itself
        values.scatter_(2, complete, f_x.view(batch, 1, 1).expand(-1, n_samples, 1))
        known.scatter_(2, complete, True)
        for start, stop in chunk_ranges(rows.shape[0], internal_batch_size):
            b, j, k = rows[start:stop].unbind(1)
            ids = _mask_rows(mask, b)
            keep = rank[j].gather(1, ids.flatten(1)).view(ids.shape) <= k.view(-1, 1, 1, 1)
            out, _ = target.select(b.cpu()).forward(model, torch.where(keep, inputs[b], base[b]), grads=False)
            values[b, j, k + 1] = out
            known[b, j, k + 1] = True
    # a step not evaluated left the input as it was: carry the last known value
    carried = torch.where(known, torch.arange(groups + 1, device=device), 0).cummax(dim=2).values
    values = values.gather(2, carried)
    marginal = values[:, :, 1:] - values[:, :, :-1]  # [B, n, G], credited to orders[j, k]
    phi = torch.zeros(batch, groups, dtype=torch.float64, device=device)
    phi.scatter_add_(1, orders.unsqueeze(0).expand(batch, -1, -1).reshape(batch, -1), marginal.reshape(batch, -1).double())
    phi = (phi / n_samples).to(inputs.dtype)
    delta = phi.sum(dim=1) - (f_x - f_0)
    error = delta.abs() / (f_x - f_0).abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    return Attribution(
        map=_spread(phi, mask, inputs.shape), method="shapley_value_sampling", features=target.names, values=f_x,
        kind="input", input_shape=tuple(inputs.shape), channel_reduce="mean",
        extras={"shapley_values": phi, "n_samples": n_samples, "n_forwards": int(rows.shape[0]) + 2 * batch,
                "convergence_delta": delta, "completeness_error": error, "baseline_values": f_0},
    )
