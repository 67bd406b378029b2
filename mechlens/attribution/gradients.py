"""Gradient methods with input-shaped maps: saliency, input x gradient, Integrated Gradients,
GradientSHAP and Guided Backpropagation.

Conventions follow Captum's (so the parity tests compare like with like): saliency takes the
absolute gradient by default; Integrated Gradients uses Gauss-Legendre quadrature with 50 steps
by default and multiplies by ``inputs - baseline``; GradientSHAP averages
``grad(baseline + alpha (x + noise - baseline)) * (x + noise - baseline)`` over random baselines
and ``alpha ~ U(0, 1)``; Guided Backprop clamps the gradient flowing back through every
``nn.ReLU`` to be non-negative.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

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
from mechlens.attribution.baselines import constant_baseline_value, make_baseline

__all__ = [
    "gradient_shap",
    "guided_backprop",
    "guided_relus",
    "input_x_gradient",
    "integrated_gradients",
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
    gen = make_generator(inputs.device, seed, generator)
    constant = constant_baseline_value(baseline)
    if constant is not None:  # a broadcast scalar: no [B, C, H, W] baseline buffer
        x0 = inputs.new_full((1,) * inputs.dim(), constant).expand_as(inputs)
    else:
        x0 = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range,
                           generator=gen).detach()
    step_list, alpha_list = quadrature(integration, n_steps)
    steps = torch.tensor(step_list, device=inputs.device, dtype=inputs.dtype)
    alphas = torch.tensor(alpha_list, device=inputs.device, dtype=inputs.dtype)
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
