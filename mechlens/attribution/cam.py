"""Class-activation maps of a feature at a layer: Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM and
Guided Grad-CAM.

``layer`` is a dotted ``named_modules()`` path. Conv layers (``[B, K, h, w]``) are used as they
are; token layers of ViTs (``[B, T, D]``) drop the ``num_prefix_tokens`` CLS/register tokens
(default: the model's ``num_prefix_tokens`` attribute) and reshape the patch tokens onto the
patch grid (default: ``model.patch_embed.grid_size``, else a square). For a timm ViT pick a layer
whose patch tokens still reach the output, e.g. ``blocks.11.norm1`` (:func:`vit_cam_layer`):
after the last block only the CLS token feeds the head, so gradients on patch tokens are zero.

Maps are the raw CAMs at layer resolution, after the ReLU and before any resizing or min-max
scaling (pytorch-grad-cam scales each map to [0, 1] and resizes it to the input; compare with
``Attribution.heatmap()`` normalised the same way). The formulas follow pytorch-grad-cam 1.5:
Grad-CAM++ uses its closed form (eq. 19 of Chattopadhyay et al. with first-order gradients),
Score-CAM weights channels by the softmax over channels of the feature value on the input
masked by each upsampled (``align_corners=True``), min-max normalised activation map.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mechlens.engine import unwrap
from mechlens.attribution.layers import suggest_cam_layer, vit_cam_layer
from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    isqrt_grid,
    token_grid,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import inference_model, prefer_channels_last
from mechlens.features.layout import infer_layouts, resolve_layout

__all__ = [
    "LayerMaps",
    "gradcam",
    "gradcam_plusplus",
    "guided_gradcam",
    "layer_activations_and_gradients",
    "layercam",
    "scorecam",
    "suggest_cam_layer",
    "to_grid",
    "vit_cam_layer",
]


def to_grid(
    activation: torch.Tensor,
    *,
    layout: str = "auto",
    num_prefix_tokens: int = 0,
    grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """A layer output as ``[B, K, h, w]`` channel maps (see the module docstring)."""
    layout = resolve_layout(activation, layout)
    if layout == "nchw":
        return activation
    if layout == "nhwc":
        return activation.permute(0, 3, 1, 2)
    if layout == "nlc":
        tokens = activation[:, num_prefix_tokens:]
        h, w = grid if grid is not None else isqrt_grid(tokens.shape[1])
        if h * w != tokens.shape[1]:
            raise ValueError(
                f"{tokens.shape[1]} patch tokens (after dropping {num_prefix_tokens} prefix tokens) do not fill a "
                f"{h}x{w} grid; pass grid= and num_prefix_tokens= matching the model"
            )
        return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], h, w)
    raise ValueError(
        f"a CAM needs a spatial layer ([B, C, H, W] or [B, tokens, D]); the chosen layer gives "
        f"{tuple(activation.shape)}. Pick an earlier layer (e.g. the last conv stage)."
    )


class LayerMaps:
    """Activations ``A`` and gradients ``G`` (``[B, K, h, w]``) of the explained values at a layer,
    plus the values themselves."""

    def __init__(self, activations: torch.Tensor, gradients: torch.Tensor | None, values: torch.Tensor) -> None:
        self.activations = activations
        self.gradients = gradients
        self.values = values


def layer_activations_and_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    layer: str,
    *,
    gradients: bool = True,
    layout: str = "auto",
    num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> LayerMaps:
    """One forward (and backward when ``gradients``) returning ``layer``'s channel maps, the
    gradient of each sample's explained value w.r.t. them, and the values."""
    if not isinstance(layer, str) or not layer:
        raise ValueError("a CAM needs layer='NAME' (a dotted module path, see `mechlens layers MODEL`)")
    # The input requires grad so that the layer output is on the graph even with frozen weights.
    x = inputs.detach().requires_grad_(gradients)
    with torch.set_grad_enabled(gradients):
        values, fwd = target.forward(model, x, grads=gradients, keep_layers=[layer])
        act = fwd.activations[layer]
        if not isinstance(act, torch.Tensor):
            raise TypeError(f"layer {layer!r} returns a {type(act).__name__}, not a tensor; pick the submodule producing the map")
        grad = None
        if gradients:
            (grad,) = torch.autograd.grad(values.sum(), act, allow_unused=True)
            if grad is None:
                raise RuntimeError(
                    f"the explained feature(s) {', '.join(f.name for f in target.features)} do not depend on layer "
                    f"{layer!r} (a feature read before that layer, or a token layer after which only CLS reaches "
                    "the head): choose a layer between the input and the feature"
                )
    known = infer_layouts(model, [layer], inputs, layout=layout, num_prefix_tokens=num_prefix_tokens)[layer]
    layout, prefix = known.layout, 0
    if layout == "nlc":
        prefix, grid = token_grid(model, f"layer {layer!r}", act.shape[1], known.num_prefix_tokens, grid, tuple(inputs.shape[-2:]))
    if grad is not None and layout == "nlc" and prefix > 0 and not grad[:, prefix:].any() and grad[:, :prefix].any():
        raise ValueError(
            f"the gradient reaches only the prefix (CLS) tokens of layer {layer!r}, none of its patch tokens, so "
            "every CAM would be empty: after the last attention block only the CLS token feeds the head. Use an "
            f"earlier layer such as {vit_cam_layer(model)!r} (mechlens.attribution.vit_cam_layer(model))"
        )
    activations = to_grid(act.detach(), layout=layout, num_prefix_tokens=prefix, grid=grid)
    grads = to_grid(grad.detach(), layout=layout, num_prefix_tokens=prefix, grid=grid) if grad is not None else None
    return LayerMaps(activations, grads, values.detach())


def _cam_result(name: str, cam: torch.Tensor, target: Target, values: torch.Tensor, inputs: torch.Tensor, layer: str, **extras: Any) -> Attribution:
    return Attribution(
        map=cam.detach(), method=name, features=target.names, values=values,
        kind="layer", input_shape=tuple(inputs.shape), extras={"layer": layer, **extras},
    )


def _gradient_cam(
    name: str, weigh: Any, model: Any, inputs: torch.Tensor, target: Any, layer: str, relu: bool,
    internal_batch_size: int | None, **layout_kw: Any,
) -> Attribution:
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    cams, values = [], []
    with inference_model(model, keep=[*target.layers, layer]) as model:
        for start, stop in chunk_ranges(inputs.shape[0], internal_batch_size):
            maps = layer_activations_and_gradients(model, inputs[start:stop], target.select(range(start, stop)), layer, **layout_kw)
            cam = weigh(maps.activations, maps.gradients)
            cams.append(cam.clamp(min=0) if relu else cam)
            values.append(maps.values)
    return _cam_result(name, torch.cat(cams), target, torch.cat(values), inputs, layer, relu=relu)


def _gradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    weights = g.mean(dim=(2, 3), keepdim=True)
    return (weights * a).sum(dim=1)


def _gradcampp_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    g2 = g * g
    g3 = g2 * g
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    aij = g2 / (2 * g2 + sum_a * g3 + 1e-6)
    aij = torch.where(g != 0, aij, torch.zeros_like(aij))
    weights = (g.clamp(min=0) * aij).sum(dim=(2, 3), keepdim=True)
    return (weights * a).sum(dim=1)


def _layercam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g.clamp(min=0) * a).sum(dim=1)


@register_method("gradcam", kind="layer", family="cam", needs_layer=True, aliases=("grad_cam",),
                 randomization="mixed: maps keep rho 0.2-0.6 after re-initialising the head, by trained model")
def gradcam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Grad-CAM (Selvaraju et al.): ``relu(sum_k mean(dF/dA_k) A_k)`` at ``layer``."""
    return _gradient_cam("gradcam", _gradcam_weights, model, inputs, target, layer, relu, internal_batch_size,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


@register_method("gradcam_plusplus", kind="layer", family="cam", needs_layer=True, aliases=("gradcam++", "gradcampp"),
                 randomization="fails")
def gradcam_plusplus(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Grad-CAM++ (Chattopadhyay et al.), pytorch-grad-cam's closed form of the pixel weights."""
    return _gradient_cam("gradcam_plusplus", _gradcampp_weights, model, inputs, target, layer, relu, internal_batch_size,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


@register_method("layercam", kind="layer", family="cam", needs_layer=True, aliases=("layer_cam",), randomization="fails")
def layercam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Layer-CAM (Jiang et al.): ``relu(sum_k relu(dF/dA_k) * A_k)``, per position."""
    return _gradient_cam("layercam", _layercam_weights, model, inputs, target, layer, relu, internal_batch_size,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


@register_method("scorecam", kind="layer", family="cam", needs_layer=True, multiplies_batch=True, aliases=("score_cam",),
                 randomization="fails")
def scorecam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = 64, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Score-CAM (Wang et al.), gradient-free: channel ``k`` is weighted by the softmax over
    channels of the feature value on ``x * mask_k`` (``mask_k``: activation map ``k`` upsampled to
    the input and min-max scaled). All ``B * K`` masked inputs run batched,
    ``internal_batch_size`` at a time; channels whose map is constant (dead channels: their mask
    is all zeros) share one forward pass of the zero image instead of one each."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    # The inference copy (BatchNorm folded, channels-last weights on CPU) although nothing is
    # differentiated: thousands of masked forwards pay back its one weight copy (resnet18: 5 %
    # faster per forward for 44 MB), and the CAM layer is kept unfolded.
    with inference_model(model, keep=[*target.layers, layer], gradients=True) as model, torch.no_grad():
        maps = layer_activations_and_gradients(
            model, inputs, target, layer, gradients=False, layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid,
        )
        acts = maps.activations  # [B, K, h, w]
        channels = acts.shape[1]
        flat = acts.flatten(2)
        # upsampling is linear and preserves constants, so min/max of the map decide constancy
        constant = (flat.amax(dim=2) - flat.amin(dim=2)) == 0  # [B, K]
        scores = torch.empty(batch, channels, device=inputs.device, dtype=inputs.dtype)
        pairs_host = (~constant).nonzero().cpu()  # [(b, k)]; the one host sync (targets index on the host)
        if pairs_host.shape[0] < batch * channels:
            zero_values, _ = Target(target.features, torch.arange(len(target.features))).forward(
                model, torch.zeros((len(target.features), *inputs.shape[1:]), device=inputs.device, dtype=inputs.dtype),
                grads=False,
            )
            per_sample = zero_values[target.index.to(inputs.device)]  # [B]
            scores[constant] = per_sample.unsqueeze(1).expand(batch, channels)[constant]
        pairs = pairs_host.to(inputs.device)
        size = inputs.shape[-2:]
        for start, stop in chunk_ranges(pairs.shape[0], internal_batch_size):
            b, k = pairs[start:stop, 0], pairs[start:stop, 1]
            up = F.interpolate(acts[b, k].unsqueeze(1), size=size, mode="bilinear", align_corners=True)
            lo = up.flatten(1).amin(dim=1).view(-1, 1, 1, 1)
            hi = up.flatten(1).amax(dim=1).view(-1, 1, 1, 1)
            mask = (up - lo) / (hi - lo + 1e-8)
            values, _ = target.select(pairs_host[start:stop, 0]).forward(model, prefer_channels_last(inputs[b] * mask), grads=False)
            scores[b, k] = values
        weights = scores.softmax(dim=1)
        cam = (weights[:, :, None, None] * acts).sum(dim=1)
    if relu:
        cam = cam.clamp(min=0)
    return _cam_result(
        "scorecam", cam, target, maps.values, inputs, layer, relu=relu,
        channel_scores=scores, masked_inputs_run=int(pairs_host.shape[0]) + (1 if pairs_host.shape[0] < batch * channels else 0),
    )


@register_method("guided_gradcam", kind="input", family="cam", needs_layer=True, randomization="fails", aliases=("guided_grad_cam",))
def guided_gradcam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, internal_batch_size: int | None = None,
    interpolate: str = "bilinear", layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Guided Grad-CAM: Guided Backprop times the Grad-CAM map upsampled to the input. Inherits
    Guided Backprop's failure of the model-parameter randomization check (Adebayo et al.)."""
    from mechlens.attribution.gradients import guided_backprop

    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    cam = gradcam(model, inputs, target, layer=layer, internal_batch_size=internal_batch_size,
                  layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)
    guided = guided_backprop(model, inputs, target, internal_batch_size=internal_batch_size)
    align = False if interpolate in ("bilinear", "bicubic") else None
    up = F.interpolate(cam.map.unsqueeze(1), size=inputs.shape[-2:], mode=interpolate, align_corners=align)
    return Attribution(
        map=guided.map * up, method="guided_gradcam", features=target.names,
        values=guided.values, kind="input", input_shape=tuple(inputs.shape), extras={"layer": layer},
    )


