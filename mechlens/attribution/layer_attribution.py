"""Layer attribution: how much each unit of a hidden layer contributes to a feature, with Captum's
semantics (``LayerIntegratedGradients``, ``LayerConductance``; parity tested).

* :func:`layer_integrated_gradients` integrates the gradient w.r.t. the layer's output along the
  straight line *in layer space* from ``L(baseline)`` to ``L(x)``: at each step the layer's output
  is replaced by ``L(x0) + alpha (L(x) - L(x0))`` while the model reads ``x`` (so paths that bypass
  the layer, e.g. a skip connection around it, see ``x``), then the integral is multiplied by
  ``L(x) - L(x0)``. The sum over the layer is ``f(x) - f(x0)`` whenever every path from the input
  to the feature runs through the layer (a stage of a sequential CNN, a whole ViT block).
* :func:`layer_conductance` moves the *input* from ``x0`` to ``x`` and sums ``dF/dL(x_k) *
  (L(x_{k+1}) - L(x_k))`` over consecutive nodes ``x_k`` (Dhamdhere et al.; Captum takes the
  ``n_steps + 1`` nodes of ``integration`` and ignores its weights). Summed over the layer this is
  a left Riemann sum of ``dF`` along the input path, so completeness holds only as ``n_steps``
  grows (error ``O(1 / n_steps)`` for a smooth model) and only up to the first and last node: use
  ``integration="riemann_trapezoid"`` for nodes at 0 and 1; with the Gauss-Legendre default
  (Captum's) the end nodes sit just inside [0, 1].

The result's ``map`` is ``[B, h, w]``, the attribution summed over the layer's channels (what
:meth:`Attribution.heatmap` resizes and what the metrics and plots read, as for CAMs); the
attribution of every unit, in the layer's own shape (``[B, K, h, w]`` for a conv layer, ``[B, T,
D]`` for ViT tokens; Captum's result), is ``extras["layer_attributions"]``. Token layers follow
the CAMs' layout rules (``layout``, ``num_prefix_tokens``, ``grid``; see
:mod:`mechlens.attribution.cam`): the map covers the patch tokens and
``extras["prefix_attribution"]`` holds the CLS / register tokens' share, so ``map.sum() +
prefix_attribution`` is the total. Layers without a spatial map (``[B, D]``) are refused.

The layer is kept out of the inference copy's BatchNorm folding (a folded conv's output is not
the original's), as CAMs do.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechlens._context import inferring_layouts
from mechlens.engine import HookSet, replace_output, unwrap
from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    make_generator,
    quadrature,
    register_method,
    resolve_target,
    token_grid,
)
from mechlens.attribution.baselines import constant_baseline_value, make_baseline
from mechlens.attribution.cam import to_grid
from mechlens.attribution.execution import inference_model
from mechlens.attribution.layers import vit_cam_layer
from mechlens.features.layout import infer_layouts
from mechlens.models.layers import get_module

__all__ = ["layer_conductance", "layer_integrated_gradients"]


class _CallCounter:
    """Forward hook counting the calls of one module in the user's forwards (not layout probes)."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if not inferring_layouts():
            self.calls += 1


def _check_layer(model: nn.Module, layer: Any, method: str) -> nn.Module:
    if not isinstance(layer, str) or not layer:
        raise ValueError(f"{method} needs layer='NAME' (a dotted module path, see `mechlens layers MODEL`)")
    return get_module(model, layer)  # unknown names: LayerNotFoundError listing the closest ones


def _once(counter: _CallCounter, layer: str) -> None:
    if counter.calls != 1:
        raise ValueError(
            f"layer {layer!r} runs {counter.calls} times per forward pass (a module shared between places, such as "
            "torchvision's block.relu), so its output is not one tensor to attribute to; pick a module that runs "
            "once, e.g. the block containing it"
        )


def _baseline(inputs: torch.Tensor, baseline: Any, **kw: Any) -> torch.Tensor:
    constant = constant_baseline_value(baseline)
    if constant is not None:
        return inputs.new_full((1,) * inputs.dim(), constant).expand_as(inputs)
    return make_baseline(inputs, baseline, **kw).detach()


def _layer_ends(model: nn.Module, inputs: torch.Tensor, target: Target, layer: str,
                internal_batch_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Explained values ``[N]`` and the layer's outputs on ``inputs`` (no gradients), in chunks."""
    values = torch.empty(inputs.shape[0], device=inputs.device, dtype=inputs.dtype)
    acts: torch.Tensor | None = None
    counter = _CallCounter()
    with torch.no_grad(), HookSet() as hooks:
        hooks.layer(model, layer, counter)
        for start, stop in chunk_ranges(inputs.shape[0], internal_batch_size):
            counter.calls = 0
            value, fwd = target.select(range(start, stop)).forward(model, inputs[start:stop], grads=False, keep_layers=[layer])
            _once(counter, layer)
            act = fwd.activations[layer]
            if not isinstance(act, torch.Tensor):
                raise TypeError(f"layer {layer!r} returns a {type(act).__name__}, not a tensor; pick the submodule producing the map")
            if acts is None:
                acts = act.new_empty((inputs.shape[0], *act.shape[1:]))
            acts[start:stop] = act
            values[start:stop] = value
    assert acts is not None
    return values, acts


class _Layout:
    """How a layer's output maps onto the patch grid (the CAMs' rules)."""

    def __init__(self, model: nn.Module, layer: str, inputs: torch.Tensor, act: torch.Tensor, layout: str,
                 num_prefix_tokens: int | None, grid: tuple[int, int] | None) -> None:
        known = infer_layouts(model, [layer], inputs[:1], layout=layout, num_prefix_tokens=num_prefix_tokens)[layer]
        self.layout, self.prefix, self.grid = known.layout, 0, grid
        if self.layout not in ("nchw", "nhwc", "nlc"):
            raise ValueError(
                f"layer attribution maps need a spatial layer ([B, C, H, W] or ViT tokens [B, tokens, D]); layer "
                f"{layer!r} gives {tuple(act.shape)} (layout {self.layout or 'unknown'}): pick a conv stage or a "
                "block's tokens, or pass layout="
            )
        if self.layout == "nlc":
            self.prefix, self.grid = token_grid(model, f"layer {layer!r}", act.shape[1], known.num_prefix_tokens, grid,
                                                tuple(inputs.shape[-2:]))

    def result(self, name: str, model: nn.Module, attributions: torch.Tensor, target: Target, f_x: torch.Tensor,
               f_0: torch.Tensor, inputs: torch.Tensor, layer: str, **extras: Any) -> Attribution:
        grid_map = to_grid(attributions, layout=self.layout, num_prefix_tokens=self.prefix, grid=self.grid)
        if self.layout == "nlc" and self.prefix:
            prefix = attributions[:, :self.prefix].flatten(1).sum(dim=1)
            extras["prefix_attribution"] = prefix
            if not grid_map.any() and prefix.any():
                raise ValueError(
                    f"all of the attribution at layer {layer!r} sits on its prefix (CLS) tokens, none on its patch "
                    "tokens, so the map would be empty: after the last attention block only the CLS token feeds the "
                    f"head. Use an earlier layer such as {vit_cam_layer(model)!r}"
                )
        gap = f_x - f_0
        delta = attributions.flatten(1).sum(dim=1) - gap
        error = delta.abs() / gap.abs().clamp_min(torch.finfo(inputs.dtype).tiny)
        return Attribution(
            map=grid_map.sum(dim=1).detach(), method=name, features=target.names, values=f_x.detach(), kind="layer",
            input_shape=tuple(inputs.shape),
            extras={"layer": layer, "layer_attributions": attributions.detach(), "layout": self.layout,
                    "convergence_delta": delta.detach(), "completeness_error": error.detach(),
                    "baseline_values": f_0.detach(), **extras},
        )


@register_method("layer_integrated_gradients", kind="layer", family="gradient", needs_layer=True,
                 multiplies_batch=True, aliases=("layer_ig",),
                 randomization="passes (rho 0.05-0.13 at stage3, 2 trained models)")
def layer_integrated_gradients(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    layer: str,
    baseline: Any = "zeros",
    n_steps: int = 50,
    integration: str = "gausslegendre",
    internal_batch_size: int | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    layout: str = "auto",
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Integrated Gradients onto ``layer``'s units (Captum's ``LayerIntegratedGradients``): the
    path runs in layer space from ``L(baseline)`` to ``L(x)`` (see the module docstring).
    ``baseline`` as for :func:`~mechlens.attribution.integrated_gradients`. ``map``: ``[B, h, w]``
    channel sums; ``extras["layer_attributions"]``: every unit; ``completeness_error`` against
    ``f(x) - f(baseline)``."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    _check_layer(model, layer, "layer_integrated_gradients")
    gen = make_generator(inputs.device, seed, generator)
    x0 = _baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range, generator=gen)
    step_list, alpha_list = quadrature(integration, n_steps)
    batch = inputs.shape[0]
    with inference_model(model, keep=[*target.layers, layer]) as net:
        ends, acts = _layer_ends(net, torch.cat([inputs, x0]), target.repeat(2), layer, internal_batch_size)
        shape = _Layout(net, layer, inputs, acts, layout, num_prefix_tokens, grid)
        a_x, a_0 = acts[:batch], acts[batch:]
        steps = torch.tensor(step_list, device=acts.device, dtype=acts.dtype)
        alphas = torch.tensor(alpha_list, device=acts.device, dtype=acts.dtype)
        view = (-1,) + (1,) * (acts.dim() - 1)
        total = torch.zeros_like(a_x)
        counter = _CallCounter()
        swap: dict[str, torch.Tensor] = {}

        def replace(output: Any) -> torch.Tensor:
            counter.calls += 1
            if not isinstance(output, torch.Tensor) or output.shape != swap["scaled"].shape:
                raise ValueError(f"layer {layer!r} gave an output unlike the one it gave on the inputs; it cannot be replaced")
            return swap["scaled"].clone()  # a non-leaf: a following in-place ReLU may overwrite it

        with replace_output(net, layer, replace):
            # Rows are step-major: row r is step r // B of sample r % B (Captum's order).
            for start, stop in chunk_ranges(n_steps * batch, internal_batch_size):
                rows = torch.arange(start, stop, device=inputs.device)
                step, sample = rows // batch, rows % batch
                a0 = a_0[sample]
                scaled = torch.addcmul(a0, alphas[step].view(view), a_x[sample] - a0).requires_grad_(True)
                del a0
                swap["scaled"] = scaled
                counter.calls = 0
                with torch.enable_grad():
                    values, _ = target.select(sample.cpu()).forward(net, inputs[sample], grads=True)
                    _once(counter, layer)
                    # a feature read before the layer is not on the graph of the replaced output at all
                    grad = torch.autograd.grad(values.sum(), scaled, allow_unused=True)[0] if values.requires_grad else None
                swap.clear()
                if grad is None:
                    raise RuntimeError(
                        f"the explained feature(s) {', '.join(f.name for f in target.features)} do not depend on layer "
                        f"{layer!r} (a feature read before that layer): choose a layer between the input and the feature"
                    )
                total.index_add_(0, sample, grad.mul_(steps[step].view(view)))
        attributions = (a_x - a_0) * total
        return shape.result("layer_integrated_gradients", net, attributions, target, ends[:batch], ends[batch:], inputs,
                            layer, n_steps=n_steps, integration=integration,
                            baseline=baseline if isinstance(baseline, (str, int, float)) or baseline is None else "tensor")


@register_method("layer_conductance", kind="layer", family="gradient", needs_layer=True, multiplies_batch=True,
                 aliases=("conductance",), randomization="passes (rho 0.05-0.13 at stage3, 2 trained models)")
def layer_conductance(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    layer: str,
    baseline: Any = "zeros",
    n_steps: int = 50,
    integration: str = "gausslegendre",
    internal_batch_size: int | None = None,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    layout: str = "auto",
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Conductance of ``layer``'s units (Dhamdhere et al.; Captum's ``LayerConductance``): the
    input moves from ``baseline`` to ``x`` over ``n_steps + 1`` nodes of ``integration`` and each
    unit gets ``sum_k dF/dL(x_k) * (L(x_{k+1}) - L(x_k))``. Complete as ``n_steps`` grows, with
    nodes at 0 and 1 (``integration="riemann_trapezoid"``); see the module docstring."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    _check_layer(model, layer, "layer_conductance")
    gen = make_generator(inputs.device, seed, generator)
    x0 = _baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range, generator=gen)
    _, alpha_list = quadrature(integration, n_steps + 1)  # Captum: n_steps + 1 nodes, weights unused
    alphas = torch.tensor(alpha_list, device=inputs.device, dtype=inputs.dtype)
    batch = inputs.shape[0]
    view = (-1,) + (1,) * (inputs.dim() - 1)
    with inference_model(model, keep=[*target.layers, layer]) as net:
        ends, acts = _layer_ends(net, torch.cat([inputs, x0]), target.repeat(2), layer, internal_batch_size)
        shape = _Layout(net, layer, inputs, acts, layout, num_prefix_tokens, grid)
        total = torch.zeros_like(acts[:batch])
        # dF/dL and L at each sample's previous node: the chunks run in node order
        prev_grad, prev_act = torch.empty_like(total), torch.empty_like(total)
        counter = _CallCounter()
        with HookSet() as hooks:
            hooks.layer(net, layer, counter)
            for start, stop in chunk_ranges((n_steps + 1) * batch, internal_batch_size):
                rows = torch.arange(start, stop, device=inputs.device)
                node, sample = rows // batch, rows % batch
                base = x0[sample]
                # the input requires grad so that the layer output is on the graph even with frozen weights
                x = torch.addcmul(base, alphas[node].view(view), inputs[sample] - base).requires_grad_(True)
                del base
                counter.calls = 0
                with torch.enable_grad():
                    values, fwd = target.select(sample.cpu()).forward(net, x, grads=True, keep_layers=[layer])
                    _once(counter, layer)
                    act = fwd.activations[layer]
                    (grad,) = torch.autograd.grad(values.sum(), act, allow_unused=True)
                if grad is None:
                    raise RuntimeError(
                        f"the explained feature(s) {', '.join(f.name for f in target.features)} do not depend on layer "
                        f"{layer!r} (a feature read before that layer): choose a layer between the input and the feature"
                    )
                act = act.detach()
                for k in range(start // batch, (stop - 1) // batch + 1):  # rows of node k: samples lo..hi
                    lo, hi = max(start, k * batch), min(stop, (k + 1) * batch)
                    b0, b1, r0, r1 = lo - k * batch, hi - k * batch, lo - start, hi - start
                    if k > 0:
                        total[b0:b1] += prev_grad[b0:b1] * (act[r0:r1] - prev_act[b0:b1])
                    prev_grad[b0:b1] = grad[r0:r1]
                    prev_act[b0:b1] = act[r0:r1]
        return shape.result("layer_conductance", net, total, target, ends[:batch], ends[batch:], inputs, layer,
                            n_steps=n_steps, integration=integration,
                            baseline=baseline if isinstance(baseline, (str, int, float)) or baseline is None else "tensor")

