"""Gradient methods with input-shaped maps: saliency, input x gradient, Integrated Gradients,
multi-baseline IG and Expected Gradients, GradientSHAP and Guided Backpropagation.

Conventions follow Captum's (so the parity tests compare like with like): saliency takes the
absolute gradient by default; Integrated Gradients uses Gauss-Legendre quadrature with 50 steps
by default and multiplies by ``inputs - baseline``; GradientSHAP averages
``grad(baseline + alpha (x + noise - baseline)) * (x + noise - baseline)`` over random baselines
and ``alpha ~ U(0, 1)``; multi-baseline IG averages full IG maps over a set of baselines and
Expected Gradients (Erion et al.) estimates the same average with one random baseline and one
random ``alpha`` per draw (GradientSHAP without input noise); Guided Backprop clamps the
gradient flowing back through every ``nn.ReLU`` to be non-negative.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mechlens.engine import HookSet, unwrap
from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    eval_mode,
    feature_values,
    input_gradients,
    make_generator,
    quadrature,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import inference_model
from mechlens.attribution.baselines import constant_baseline_value, gaussian_blur, make_baseline

__all__ = [
    "BASELINE_DISTRIBUTIONS",
    "BaselineSet",
    "baseline_set",
    "expected_gradients",
    "gradient_shap",
    "guided_backprop",
    "guided_relus",
    "input_x_gradient",
    "integrated_gradients",
    "multi_baseline_ig",
    "saliency",
]


def _result(name: str, amap: torch.Tensor, target: Target, values: torch.Tensor, inputs: torch.Tensor, **extras: Any) -> Attribution:
    return Attribution(
        map=amap.detach(), method=name, features=target.names,
        values=values.detach(), kind="input", input_shape=tuple(inputs.shape), extras=extras,
    )


@register_method("saliency", kind="input", family="gradient", aliases=("gradient", "vanilla_gradient"),
                 randomization="fails with abs=True (the default); passes with abs=False")
def saliency(
    model: Any, inputs: torch.Tensor, target: Any = None, *, abs: bool = True, internal_batch_size: int | None = None,
) -> Attribution:
    """Vanilla gradient of the feature w.r.t. the input (Simonyan et al.); ``abs=True`` (Captum's
    default) returns its magnitude."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    with inference_model(model, keep=target.layers) as model:
        grads, values = input_gradients(model, inputs, target, internal_batch_size=internal_batch_size)
    return _result("saliency", grads.abs_() if abs else grads, target, values, inputs, absolute=abs)  # grads is ours


@register_method("input_x_gradient", kind="input", family="gradient")
def input_x_gradient(
    model: Any, inputs: torch.Tensor, target: Any = None, *, internal_batch_size: int | None = None,
) -> Attribution:
    """Input times gradient (IG with a zero baseline and a single step)."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    with inference_model(model, keep=target.layers) as model:
        grads, values = input_gradients(model, inputs, target, internal_batch_size=internal_batch_size)
    return _result("input_x_gradient", grads * inputs, target, values, inputs)


def _ig_path(inputs: torch.Tensor, baseline: Any, n_steps: int, integration: str, *, mean: Any = None,
             blur_sigma: float | None = None, noise_range: tuple[float, float] | None = None, seed: int | None = 0,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integrated Gradients' path ``(x0, step weights [n_steps], alphas [n_steps])``: the baseline
    (a broadcast view for a constant) and the quadrature nodes. Shared with the manipulability
    check, which recomputes the same map differentiably."""
    constant = constant_baseline_value(baseline)
    if constant is not None:  # a broadcast scalar: no [B, C, H, W] baseline buffer
        x0 = inputs.new_full((1,) * inputs.dim(), constant).expand_as(inputs)
    else:
        x0 = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range,
                           generator=make_generator(inputs.device, seed, generator)).detach()
    step_list, alpha_list = quadrature(integration, n_steps)
    steps = torch.tensor(step_list, device=inputs.device, dtype=inputs.dtype)
    alphas = torch.tensor(alpha_list, device=inputs.device, dtype=inputs.dtype)
    return x0, steps, alphas


@register_method("integrated_gradients", kind="input", family="gradient", multiplies_batch=True, aliases=("ig",))
def integrated_gradients(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baseline: Any = "zeros",
    n_steps: int = 50,
    integration: str = "gausslegendre",
    internal_batch_size: int | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Attribution:
    """Integrated Gradients (Sundararajan et al.) from a baseline (``zeros`` | ``mean`` | ``blur`` |
    ``uniform`` | number | tensor, see :mod:`mechlens.attribution.baselines`).

    Every call reports ``extras["convergence_delta"]`` = ``sum(map) - (f(x) - f(baseline))`` and
    ``extras["completeness_error"]`` = ``|delta| / |f(x) - f(baseline)|`` per sample. The
    ``n_steps * B`` interpolated inputs run ``internal_batch_size`` rows at a time.
    """
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    x0, steps, alphas = _ig_path(inputs, baseline, n_steps, integration, mean=mean, blur_sigma=blur_sigma,
                                 noise_range=noise_range, seed=seed, generator=generator)
    batch = inputs.shape[0]
    total = torch.zeros_like(inputs)
    view = (-1,) + (1,) * (inputs.dim() - 1)
    with inference_model(model, keep=target.layers) as model:
        # Rows are step-major: row r is step r // B of sample r % B (Captum's order).
        for start, stop in chunk_ranges(n_steps * batch, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            step, sample = rows // batch, rows % batch
            # x0 + alpha (x - x0), the difference taken per chunk (no [B, ...] buffer kept for it)
            base = x0[sample]
            scaled = torch.addcmul(base, alphas[step].view(view), inputs[sample] - base)
            del base
            grads, _ = input_gradients(model, scaled, target.select(sample.cpu()))
            total.index_add_(0, sample, grads.mul_(steps[step].view(view)))  # grads is ours: scale in place
        ends = feature_values(model, torch.cat([inputs, x0]), target.repeat(2), internal_batch_size=internal_batch_size)
    attributions = (inputs - x0) * total
    f_x, f_0 = ends[:batch], ends[batch:]
    delta = attributions.flatten(1).sum(dim=1) - (f_x - f_0)
    error = delta.abs() / (f_x - f_0).abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    return _result(
        "integrated_gradients", attributions, target, f_x, inputs,
        convergence_delta=delta.detach(), completeness_error=error.detach(), baseline_values=f_0.detach(),
        baseline=baseline if isinstance(baseline, (str, int, float)) or baseline is None else "tensor",
        n_steps=n_steps, integration=integration,
    )


@register_method("gradient_shap", kind="input", family="gradient", multiplies_batch=True, aliases=("gradshap",))
def gradient_shap(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baselines: Any = "zeros",
    n_samples: int = 5,
    stdevs: float = 0.0,
    internal_batch_size: int | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    baseline_index: torch.Tensor | None = None,
    alphas: torch.Tensor | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
) -> Attribution:
    """GradientSHAP (Lundberg & Lee; Captum's estimator): the mean over ``n_samples`` draws of
    ``grad(b + a (x + e - b)) * (x + e - b)`` with ``b`` drawn from ``baselines`` (a tensor
    ``[K, C, H, W]`` of reference images, or a baseline name), ``a ~ U(0, 1)`` and Gaussian input
    noise ``e`` of std ``stdevs``.

    Draws come from ``generator`` (or a generator seeded with ``seed``); ``baseline_index``
    (``[B, n_samples]`` long) and ``alphas`` (``[B, n_samples]``) fix them explicitly.
    ``extras["completeness_error"]`` compares ``sum(map)`` with ``f(x) - E[f(b)]`` (exact only in
    expectation).
    """
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    gen = make_generator(inputs.device, seed, generator)
    if isinstance(baselines, torch.Tensor) and baselines.dim() == inputs.dim():
        references = baselines.to(device=inputs.device, dtype=inputs.dtype).detach()
        if references.shape[1:] != inputs.shape[1:]:
            raise ValueError(f"baselines {tuple(references.shape)} must be [K, {', '.join(map(str, inputs.shape[1:]))}]")
        per_sample = False
    else:
        references = make_baseline(inputs, baselines, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range, generator=gen).detach()
        per_sample = True  # one baseline per sample (zeros / blur of that sample / ...)
    if baseline_index is None:
        if per_sample:
            baseline_index = torch.arange(batch).unsqueeze(1).expand(batch, n_samples)
        else:
            baseline_index = torch.randint(references.shape[0], (batch, n_samples), generator=gen, device=gen.device)
    if alphas is None:
        alphas = torch.rand((batch, n_samples), generator=gen, device=gen.device)
    baseline_index = torch.as_tensor(baseline_index, dtype=torch.long).to(inputs.device)
    alphas = torch.as_tensor(alphas).to(device=inputs.device, dtype=inputs.dtype)
    if baseline_index.shape != (batch, n_samples) or alphas.shape != (batch, n_samples):
        raise ValueError(f"baseline_index and alphas must be [B, n_samples] = [{batch}, {n_samples}]")
    # Rows are sample-major per input (Captum's repeat_interleave order): row r is draw r % n of sample r // n.
    total = torch.zeros_like(inputs)
    view = (-1,) + (1,) * (inputs.dim() - 1)
    with inference_model(model, keep=target.layers) as model:
        for start, stop in chunk_ranges(batch * n_samples, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            sample, draw = rows // n_samples, rows % n_samples
            x = inputs[sample]
            if stdevs:
                x = x + stdevs * torch.randn(x.shape, generator=gen, device=gen.device).to(x)
            ref = references[baseline_index[sample, draw]]
            a = alphas[sample, draw].view(view)
            grads, _ = input_gradients(model, ref + a * (x - ref), target.select(sample.cpu()))
            total.index_add_(0, sample, grads * (x - ref))
        attributions = total / n_samples
        f_x = feature_values(model, inputs, target)
        refs_used = references[baseline_index.reshape(-1)]
        f_refs = feature_values(model, refs_used, target.select(torch.arange(batch).repeat_interleave(n_samples)),
                                internal_batch_size=internal_batch_size)
    expected = f_refs.view(batch, n_samples).mean(dim=1)
    delta = attributions.flatten(1).sum(dim=1) - (f_x - expected)
    error = delta.abs() / (f_x - expected).abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    return _result(
        "gradient_shap", attributions, target, f_x, inputs,
        convergence_delta=delta.detach(), completeness_error=error.detach(), n_samples=n_samples, stdevs=stdevs,
    )


# ---------------------------------------------------------------------------- baseline distributions
BASELINE_DISTRIBUTIONS: tuple[str, ...] = ("uniform", "gaussian", "blur", "mean", "zeros")


class BaselineSet:
    """``M`` baselines for each of ``B`` inputs, drawn once (seeded) and produced on demand by
    :meth:`rows`, so no ``[B, M, C, H, W]`` buffer is kept. ``kind``: ``"shared"`` (the same
    ``M`` reference images for every input: a tensor, uniform noise, the mean, zeros),
    ``"gaussian"`` (``x_b + sigma_b * eps_m``) or ``"blur"`` (``x_b`` blurred at ``sigmas[m]``)."""

    def __init__(self, inputs: torch.Tensor, kind: str, *, refs: torch.Tensor | None = None,
                 sigmas: list[float] | None = None, scale: torch.Tensor | None = None,
                 clamp: tuple[float, float] | None = None, name: str = "tensor") -> None:
        self.inputs = inputs
        self.kind = kind
        self.refs = refs
        self.sigmas = sigmas
        self.scale = scale
        self.clamp = clamp
        self.name = name
        self.count = len(sigmas) if kind == "blur" else int(refs.shape[0])  # type: ignore[union-attr]

    def rows(self, sample: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """Baseline ``index[r]`` of input ``sample[r]`` for every row ``r`` (``[N, C, H, W]``)."""
        if self.kind == "shared":
            return self.refs[index]  # type: ignore[index]
        if self.kind == "gaussian":
            view = (-1,) + (1,) * (self.inputs.dim() - 1)
            out = torch.addcmul(self.inputs[sample], self.scale[sample].view(view), self.refs[index])  # type: ignore[index]
            return out.clamp_(*self.clamp) if self.clamp is not None else out
        out = torch.empty((sample.shape[0], *self.inputs.shape[1:]), device=self.inputs.device, dtype=self.inputs.dtype)
        for m in torch.unique(index).tolist():  # one blur per sigma present in the chunk
            rows = (index == m).nonzero().flatten()
            out[rows] = gaussian_blur(self.inputs[sample[rows]], float(self.sigmas[m]))  # type: ignore[index]
        return out


def _default_blur_sigmas(size: tuple[int, int], count: int) -> list[float]:
    """``count`` sigmas spaced geometrically from ``max(H, W) / 64`` (at least half a pixel) to
    ``max(H, W) / 4``: from barely blurred to nearly flat (the house's single blur baseline uses
    ``max(H, W) / 16``, the middle of this range)."""
    side = max(size)
    lo, hi = max(side / 64, 0.5), max(side / 4, 1.0)
    if count == 1:
        return [side / 16]
    return torch.logspace(math.log10(lo), math.log10(hi), count, dtype=torch.float64).tolist()


def baseline_set(
    inputs: torch.Tensor,
    baselines: Any = "uniform",
    *,
    n_baselines: int = 8,
    mean: Any = None,
    blur_sigmas: Sequence[float] | None = None,
    stdevs: float | None = None,
    noise_range: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> BaselineSet:
    """A distribution of baselines for ``inputs`` ``[B, C, H, W]``:

    * a tensor ``[M, C, H, W]`` of reference images (e.g. training images; Erion et al.),
    * ``"uniform"``: ``n_baselines`` noise images, uniform in ``noise_range`` (default: the
      batch's min..max),
    * ``"gaussian"``: ``n_baselines`` noisy copies of each input, ``x + N(0, s^2)`` with ``s =
      stdevs`` (default ``0.15 * (max(x) - min(x))`` per input, SmoothGrad's spread), clamped to
      ``noise_range`` when given,
    * ``"blur"``: each input blurred at ``blur_sigmas`` (default ``n_baselines`` sigmas from
      ``max(H, W) / 64`` to ``max(H, W) / 4``),
    * ``"mean"`` (``mean=`` per-channel or ``[C, H, W]``, as :func:`make_baseline`) or
      ``"zeros"``: a single baseline (``M = 1``).

    Noise is drawn once from ``generator`` (required for ``uniform`` / ``gaussian``)."""
    check_images(inputs)
    if isinstance(baselines, torch.Tensor):
        refs = baselines.detach().to(device=inputs.device, dtype=inputs.dtype)
        if refs.dim() == 3:  # one reference image
            refs = refs.unsqueeze(0)
        if refs.dim() != 4 or refs.shape[1:] != inputs.shape[1:] or refs.shape[0] < 1:
            raise ValueError(
                f"baselines of shape {tuple(baselines.shape)} do not match the inputs {tuple(inputs.shape)}: pass "
                f"[M, {', '.join(map(str, inputs.shape[1:]))}] reference images (or a name: "
                f"{', '.join(BASELINE_DISTRIBUTIONS)})"
            )
        return BaselineSet(inputs, "shared", refs=refs)
    if not isinstance(baselines, str) or baselines not in BASELINE_DISTRIBUTIONS:
        raise ValueError(
            f"unknown baseline distribution {baselines!r}; pass a tensor [M, C, H, W] of reference images or one of "
            f"{', '.join(BASELINE_DISTRIBUTIONS)}"
        )
    if isinstance(n_baselines, bool) or not isinstance(n_baselines, int) or n_baselines < 1:
        raise ValueError(f"n_baselines must be a positive integer, got {n_baselines!r}")
    shape = (n_baselines, *inputs.shape[1:])
    if baselines in ("mean", "zeros"):
        ref = make_baseline(inputs[:1], baselines, mean=mean)
        return BaselineSet(inputs, "shared", refs=ref, name=baselines)
    if baselines == "blur":
        sigmas = [float(s) for s in blur_sigmas] if blur_sigmas is not None else _default_blur_sigmas(
            tuple(inputs.shape[-2:]), n_baselines)
        if not sigmas or any(not math.isfinite(s) or s <= 0 for s in sigmas):
            raise ValueError(f"blur_sigmas must be positive numbers (pixels), got {blur_sigmas!r}")
        return BaselineSet(inputs, "blur", sigmas=sigmas, name="blur")
    if generator is None:
        raise ValueError(f"baselines={baselines!r} draws noise and needs a seeded generator")
    clamp = (float(noise_range[0]), float(noise_range[1])) if noise_range is not None else None
    if baselines == "uniform":
        lo, hi = clamp if clamp is not None else (float(inputs.min()), float(inputs.max()))
        noise = torch.rand(shape, generator=generator, device=generator.device).to(inputs)
        return BaselineSet(inputs, "shared", refs=noise.mul_(hi - lo).add_(lo), name="uniform")
    # gaussian around each input
    if stdevs is not None:
        if not (stdevs > 0 and math.isfinite(stdevs)):
            raise ValueError(f"stdevs must be a positive number, got {stdevs!r}")
        scale = torch.full((inputs.shape[0],), float(stdevs), device=inputs.device, dtype=inputs.dtype)
    else:
        flat = inputs.detach().flatten(1)
        scale = 0.15 * (flat.amax(dim=1) - flat.amin(dim=1))
    eps = torch.randn(shape, generator=generator, device=generator.device).to(inputs)
    return BaselineSet(inputs, "gaussian", refs=eps, scale=scale, clamp=clamp, name="gaussian")


def _baseline_values(model: nn.Module, dist: BaselineSet, target: Target, sample: torch.Tensor, index: torch.Tensor,
                     internal_batch_size: int | None) -> torch.Tensor:
    """Explained values at baselines ``(sample[r], index[r])``, ``internal_batch_size`` rows at a time."""
    out = torch.empty(sample.shape[0], device=dist.inputs.device, dtype=dist.inputs.dtype)
    with torch.no_grad():
        for start, stop in chunk_ranges(sample.shape[0], internal_batch_size):
            rows = dist.rows(sample[start:stop], index[start:stop])
            out[start:stop], _ = target.select(sample[start:stop].cpu()).forward(model, rows, grads=False)
    return out


def _completeness(attributions: torch.Tensor, f_x: torch.Tensor, f_base: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gap = f_x - f_base
    delta = attributions.flatten(1).sum(dim=1) - gap
    return delta, delta.abs() / gap.abs().clamp_min(torch.finfo(dtype).tiny)


@register_method("multi_baseline_ig", kind="input", family="gradient", multiplies_batch=True,
                 aliases=("multi_baseline_integrated_gradients",),
                 randomization="passes (rho 0.02-0.10 with blur baselines, 2 trained models)")
def multi_baseline_ig(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baselines: Any = "uniform",
    n_baselines: int = 8,
    n_steps: int = 50,
    integration: str = "gausslegendre",
    internal_batch_size: int | None = None,
    mean: Any = None,
    blur_sigmas: Sequence[float] | None = None,
    stdevs: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Attribution:
    """Integrated Gradients averaged over a distribution of baselines (Sturmfels et al. 2020):
    ``mean_m IG(x; b_m)``, one full path integral per baseline. ``baselines``: a tensor ``[M, C,
    H, W]`` of reference images (e.g. training images), or ``uniform`` | ``gaussian`` | ``blur``
    | ``mean`` | ``zeros`` (see :func:`baseline_set`; medical images: ``mean`` or ``blur``
    rather than black).

    ``extras["completeness_error"]`` compares ``sum(map)`` with ``f(x) - mean_m f(b_m)`` (exact up
    to the quadrature); ``extras["baseline_values"]`` is ``mean_m f(b_m)``. The ``n_steps * M *
    B`` interpolated inputs run ``internal_batch_size`` rows at a time."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    gen = make_generator(inputs.device, seed, generator)
    dist = baseline_set(inputs, baselines, n_baselines=n_baselines, mean=mean, blur_sigmas=blur_sigmas,
                        stdevs=stdevs, noise_range=noise_range, generator=gen)
    step_list, alpha_list = quadrature(integration, n_steps)
    steps = torch.tensor(step_list, device=inputs.device, dtype=inputs.dtype)
    alphas = torch.tensor(alpha_list, device=inputs.device, dtype=inputs.dtype)
    batch, count = inputs.shape[0], dist.count
    total = torch.zeros_like(inputs)
    view = (-1,) + (1,) * (inputs.dim() - 1)
    with inference_model(model, keep=target.layers) as model:
        # row r: sample r % B, step (r // B) % n_steps, baseline r // (B * n_steps)
        for start, stop in chunk_ranges(count * n_steps * batch, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            sample, step, index = rows % batch, (rows // batch) % n_steps, rows // (batch * n_steps)
            base = dist.rows(sample, index)
            diff = inputs[sample] - base
            grads, _ = input_gradients(model, torch.addcmul(base, alphas[step].view(view), diff), target.select(sample.cpu()))
            del base
            total.index_add_(0, sample, grads.mul_(diff).mul_(steps[step].view(view)))  # grads is ours
        f_x = feature_values(model, inputs, target)
        pairs = torch.arange(count * batch, device=inputs.device)
        f_b = _baseline_values(model, dist, target, pairs % batch, pairs // batch, internal_batch_size)
    attributions = total.div_(count)
    expected = f_b.view(count, batch).mean(dim=0)
    delta, error = _completeness(attributions, f_x, expected, inputs.dtype)
    return _result(
        "multi_baseline_ig", attributions, target, f_x, inputs,
        convergence_delta=delta.detach(), completeness_error=error.detach(), baseline_values=expected.detach(),
        baseline=dist.name, n_baselines=count, n_steps=n_steps, integration=integration,
    )


@register_method("expected_gradients", kind="input", family="gradient", multiplies_batch=True, aliases=("eg",),
                 randomization="passes (rho -0.01-0.01, 2 trained models)")
def expected_gradients(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baselines: Any = "uniform",
    n_samples: int = 50,
    n_baselines: int | None = None,
    internal_batch_size: int | None = None,
    mean: Any = None,
    blur_sigmas: Sequence[float] | None = None,
    stdevs: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    baseline_index: torch.Tensor | None = None,
    alphas: torch.Tensor | None = None,
) -> Attribution:
    """Expected Gradients (Erion et al. 2021): the mean over ``n_samples`` draws of ``grad(b + a
    (x - b)) * (x - b)`` with ``b`` drawn uniformly from the baselines (same ``baselines`` as
    :func:`multi_baseline_ig`) and ``a ~ U(0, 1)``: an unbiased estimate of multi-baseline IG
    over the same baselines. ``n_baselines`` (named noise distributions): how many noise images
    are drawn to sample from (default ``n_samples``; 8 sigmas for ``blur``).

    Draws come from ``generator`` (or a generator seeded with ``seed``: same seed, same map);
    ``baseline_index`` (``[B, n_samples]`` long) and ``alphas`` (``[B, n_samples]``) fix them.
    ``extras["completeness_error"]`` compares ``sum(map)`` with ``f(x)`` minus the mean of ``f``
    over the drawn baselines (exact only in expectation)."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be a positive integer, got {n_samples!r}")
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    gen = make_generator(inputs.device, seed, generator)
    if n_baselines is None:
        n_baselines = 8 if isinstance(baselines, str) and baselines == "blur" else n_samples
    dist = baseline_set(inputs, baselines, n_baselines=n_baselines, mean=mean, blur_sigmas=blur_sigmas,
                        stdevs=stdevs, noise_range=noise_range, generator=gen)
    if baseline_index is None:
        baseline_index = torch.randint(dist.count, (batch, n_samples), generator=gen, device=gen.device)
    if alphas is None:
        alphas = torch.rand((batch, n_samples), generator=gen, device=gen.device)
    baseline_index = torch.as_tensor(baseline_index, dtype=torch.long).to(inputs.device)
    alphas = torch.as_tensor(alphas).to(device=inputs.device, dtype=inputs.dtype)
    if baseline_index.shape != (batch, n_samples) or alphas.shape != (batch, n_samples):
        raise ValueError(f"baseline_index and alphas must be [B, n_samples] = [{batch}, {n_samples}]")
    if baseline_index.numel() and (int(baseline_index.min()) < 0 or int(baseline_index.max()) >= dist.count):
        raise ValueError(f"baseline_index must lie in [0, {dist.count}) (there are {dist.count} baselines)")
    total = torch.zeros_like(inputs)
    view = (-1,) + (1,) * (inputs.dim() - 1)
    with inference_model(model, keep=target.layers) as model:
        # row r: draw r % n of sample r // n (Captum's GradientShap order)
        for start, stop in chunk_ranges(batch * n_samples, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            sample, draw = rows // n_samples, rows % n_samples
            base = dist.rows(sample, baseline_index[sample, draw])
            diff = inputs[sample] - base
            grads, _ = input_gradients(model, torch.addcmul(base, alphas[sample, draw].view(view), diff),
                                       target.select(sample.cpu()))
            del base
            total.index_add_(0, sample, grads.mul_(diff))
        f_x = feature_values(model, inputs, target)
        # f at each distinct (sample, baseline) pair drawn, once
        keys = torch.unique(torch.arange(batch, device=inputs.device).unsqueeze(1) * dist.count + baseline_index)
        f_pairs = _baseline_values(model, dist, target, keys // dist.count, keys % dist.count, internal_batch_size)
        lookup = torch.searchsorted(keys, torch.arange(batch, device=inputs.device).unsqueeze(1) * dist.count + baseline_index)
    attributions = total.div_(n_samples)
    expected = f_pairs[lookup].mean(dim=1)
    delta, error = _completeness(attributions, f_x, expected, inputs.dtype)
    return _result(
        "expected_gradients", attributions, target, f_x, inputs,
        convergence_delta=delta.detach(), completeness_error=error.detach(), baseline_values=expected.detach(),
        baseline=dist.name, n_baselines=dist.count, n_samples=n_samples,
    )


# ---------------------------------------------------------------------------- guided backprop
def _clamp_positive(grad: torch.Tensor) -> torch.Tensor:
    return grad.clamp(min=0)


class _GuidedHook:
    """Forward hook on an ``nn.ReLU``: its output's gradient is clamped at zero, so the ReLU's own
    backward (mask ``x > 0``) then yields guided backprop's ``(x > 0) * relu(grad_out)``."""

    def __call__(self, module: nn.Module, args: Any, output: torch.Tensor) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(_clamp_positive)


@contextmanager
def guided_relus(model: nn.Module) -> Iterator[int]:
    """Within the block, gradients through every ``nn.ReLU`` of ``model`` follow guided
    backpropagation; yields the number of ReLU modules hooked. Hooks are removed on exit, also on
    error. Functional ReLUs (``F.relu`` inside a forward) and other activations are not
    affected, so a model without ``nn.ReLU`` modules is an error."""
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    if not relus:
        raise ValueError(
            f"guided backpropagation modifies the backward pass of nn.ReLU modules, and "
            f"{type(model).__name__} has none (activations applied functionally or GELU/SiLU); "
            "use saliency or integrated_gradients instead"
        )
    with HookSet() as hooks:
        for relu in relus:
            hooks.forward(relu, _GuidedHook())  # its tensor hook is the method's documented backward rule
        yield len(relus)


@register_method("guided_backprop", kind="input", family="gradient", randomization="fails", aliases=("guided_backpropagation",))
def guided_backprop(
    model: Any, inputs: torch.Tensor, target: Any = None, *, internal_batch_size: int | None = None,
) -> Attribution:
    """Guided Backpropagation (Springenberg et al.): the gradient with negative signals zeroed at
    every ReLU on the way back. Known to FAIL the model-parameter randomization check (Adebayo et
    al. 2018): its maps stay nearly unchanged when the weights are randomized, because it mostly
    reconstructs the input's edges rather than reflecting what the model computes."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    with eval_mode(model), guided_relus(model):
        grads, values = input_gradients(model, inputs, target, internal_batch_size=internal_batch_size)
    return _result("guided_backprop", grads, target, values, inputs)
