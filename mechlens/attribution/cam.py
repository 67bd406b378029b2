"""Class-activation maps of a feature at a layer: Grad-CAM, Grad-CAM++, Layer-CAM, Score-CAM,
Guided Grad-CAM, HiResCAM, XGrad-CAM, EigenCAM, Eigen-Grad-CAM, Ablation-CAM, FullGrad, and the
fusion of one CAM over several layers.

``layer`` is a dotted ``named_modules()`` path. Conv layers (``[B, K, h, w]``) are used as they
are; token layers of ViTs (``[B, T, D]``) drop the ``num_prefix_tokens`` CLS/register tokens
(default: the model's ``num_prefix_tokens`` attribute) and reshape the patch tokens onto the
patch grid (default: ``model.patch_embed.grid_size``, else a square). For a timm ViT pick a layer
whose patch tokens still reach the output, e.g. ``blocks.11.norm1`` (:func:`vit_cam_layer`):
after the last block only the CLS token feeds the head, so gradients on patch tokens are zero.

Maps are the raw CAMs at layer resolution, after the ReLU and before any resizing or min-max
scaling (pytorch-grad-cam scales each map to [0, 1] and resizes it to the input; compare with
``Attribution.heatmap()`` normalised the same way). FullGrad and :func:`multilayer_cam` combine
several layers and return ``[B, H, W]`` maps at input resolution, before pytorch-grad-cam's final
min-max scaling. The formulas follow pytorch-grad-cam 1.5:
Grad-CAM++ uses its closed form (eq. 19 of Chattopadhyay et al. with first-order gradients),
Score-CAM weights channels by the softmax over channels of the feature value on the input
masked by each upsampled (``align_corners=True``), min-max normalised activation map; EigenCAM
takes the sign of its principal component from numpy's SVD as pytorch-grad-cam does
(:func:`principal_projection`); Ablation-CAM ablates as pytorch-grad-cam (see :func:`ablationcam`).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mechlens._context import inferring_layouts
from mechlens.engine import HookSet, unwrap
from mechlens.attribution.layers import suggest_cam_layer, vit_cam_layer
from mechlens.attribution.base import (
    Attribution,
    NonFiniteError,
    Target,
    check_images,
    chunk_ranges,
    get_method,
    list_methods,
    isqrt_grid,
    token_grid,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import inference_model, prefer_channels_last
from mechlens.features.base import OUTPUT
from mechlens.features.layout import infer_layouts, resolve_layout

__all__ = [
    "LayerMaps",
    "ablationcam",
    "eigen_gradcam",
    "eigencam",
    "fullgrad",
    "fullgrad_bias_layers",
    "gradcam",
    "gradcam_plusplus",
    "guided_gradcam",
    "hirescam",
    "layer_activations_and_gradients",
    "layercam",
    "multilayer_cam",
    "principal_projection",
    "scorecam",
    "suggest_cam_layer",
    "to_grid",
    "vit_cam_layer",
    "xgradcam",
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
    plus the values themselves; ``raw`` is the layer's output as the model returns it (prefix
    tokens included) and ``layout`` its layout (``nchw`` | ``nhwc`` | ``nlc``)."""

    def __init__(self, activations: torch.Tensor, gradients: torch.Tensor | None, values: torch.Tensor,
                 raw: torch.Tensor | None = None, layout: str = "nchw") -> None:
        self.activations = activations
        self.gradients = gradients
        self.values = values
        self.raw = raw if raw is not None else activations
        self.layout = layout


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
    return LayerMaps(activations, grads, values.detach(), raw=act.detach(), layout=layout)


def _cam_result(name: str, cam: torch.Tensor, target: Target, values: torch.Tensor, inputs: torch.Tensor, layer: str, **extras: Any) -> Attribution:
    return Attribution(
        map=cam.detach(), method=name, features=target.names, values=values,
        kind="layer", input_shape=tuple(inputs.shape), extras={"layer": layer, **extras},
    )


def _gradient_cam(
    name: str, weigh: Any, model: Any, inputs: torch.Tensor, target: Any, layer: str, relu: bool,
    internal_batch_size: int | None, gradients: bool = True, **layout_kw: Any,
) -> Attribution:
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    cams, values = [], []
    with inference_model(model, keep=[*target.layers, layer], gradients=gradients) as model:
        for start, stop in chunk_ranges(inputs.shape[0], internal_batch_size):
            maps = layer_activations_and_gradients(model, inputs[start:stop], target.select(range(start, stop)), layer,
                                                   gradients=gradients, **layout_kw)
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




# ---------------------------------------------------------------------------- HiResCAM, XGrad-CAM
def _hirescam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    return (g * a).sum(dim=1)


def _xgradcam_weights(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    # pytorch-grad-cam's order of operations: (g * a / (sum_hw a + eps)) summed over positions
    sum_a = a.sum(dim=(2, 3), keepdim=True)
    weights = (g * a / (sum_a + 1e-7)).sum(dim=(2, 3), keepdim=True)
    return (weights * a).sum(dim=1)


@register_method("hirescam", kind="layer", family="cam", needs_layer=True, aliases=("hires_cam",),
                 randomization="mixed: equals Grad-CAM at a layer read through global average pooling "
                 "(rho 0.34-0.59 on 3 trained models)")
def hirescam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """HiResCAM (Draelos & Carin): ``relu(sum_k dF/dA_k * A_k)``, the gradient not averaged over
    positions (so the map is exactly the layer's first-order contribution per position)."""
    return _gradient_cam("hirescam", _hirescam_weights, model, inputs, target, layer, relu, internal_batch_size,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


@register_method("xgradcam", kind="layer", family="cam", needs_layer=True, aliases=("xgrad_cam",),
                 randomization="mixed: equals Grad-CAM at a layer read through global average pooling (rho 0.34-0.59)")
def xgradcam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """XGrad-CAM (Fu et al.): channel weights ``sum_hw(dF/dA_k * A_k) / (sum_hw A_k + 1e-7)``."""
    return _gradient_cam("xgradcam", _xgradcam_weights, model, inputs, target, layer, relu, internal_batch_size,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


# ---------------------------------------------------------------------------- EigenCAM
_SIGNS = ("numpy", "max")


def principal_projection(maps: torch.Tensor, *, sign: str = "numpy") -> torch.Tensor:
    """``[B, K, h, w] -> [B, h, w]``: each sample's positions x channels matrix, centred over
    positions, projected on its first right singular vector (pytorch-grad-cam's
    ``get_2d_projection``).

    The sign of a singular vector is arbitrary, and after the CAM's ReLU it decides which half of
    the map survives. ``sign="numpy"`` takes it from ``numpy.linalg.svd``, the call
    pytorch-grad-cam makes (same LAPACK, same sign: its maps exactly; torch's SVD, MKL or cuSOLVER,
    picks the other sign for about 40 % of matrices). ``sign="max"`` computes on the tensor's
    device and flips each map so that its largest magnitude is positive (the correction of
    Seg-Eigen-CAM, pytorch-grad-cam's ``get_2d_projection_with_sign_correction``)."""
    if sign not in _SIGNS:
        raise ValueError(f"sign must be one of {', '.join(map(repr, _SIGNS))}, got {sign!r}")
    if not torch.isfinite(maps).all():
        raise NonFiniteError("the layer's maps hold NaN or Inf values, so their principal component is undefined; "
                             "check the model's weights, its dtype and the inputs' scale")
    batch, _, h, w = maps.shape
    rows = maps.flatten(2).transpose(1, 2)  # [B, h*w, K]
    centred = rows - rows.mean(dim=1, keepdim=True)
    if sign == "numpy":
        import numpy as np

        host = centred.detach().to("cpu", torch.float64 if centred.dtype == torch.float64 else torch.float32).numpy()
        # full_matrices=False: the same first singular vector as pytorch-grad-cam's full SVD
        # (tested), without the [h*w, h*w] U it never uses
        axes = np.stack([np.linalg.svd(m, full_matrices=False)[2][0] for m in host])
        axis = torch.from_numpy(axes).to(device=centred.device, dtype=centred.dtype)
        return (centred @ axis.unsqueeze(2)).view(batch, h, w)
    work = centred if centred.dtype in (torch.float32, torch.float64) else centred.float()
    axis = torch.linalg.svd(work, full_matrices=False).Vh[:, 0].to(centred.dtype)
    projection = (centred @ axis.unsqueeze(2)).squeeze(2)
    flip = projection.amin(dim=1).abs() > projection.amax(dim=1).abs()
    return torch.where(flip.unsqueeze(1), -projection, projection).view(batch, h, w)


@register_method("eigencam", kind="layer", family="cam", needs_layer=True, aliases=("eigen_cam",),
                 randomization="fails (rho 1.00: the map does not depend on the head)")
def eigencam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True, sign: str = "numpy",
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """EigenCAM (Muhammad & Yeasin), gradient-free: the first principal component of the layer's
    activations (:func:`principal_projection`). The map does not depend on the target, which only
    sets the reported ``values``."""
    if sign not in _SIGNS:
        raise ValueError(f"sign must be one of {', '.join(map(repr, _SIGNS))}, got {sign!r}")
    return _gradient_cam("eigencam", lambda a, g: principal_projection(a, sign=sign), model, inputs, target, layer,
                         relu, internal_batch_size, gradients=False,
                         layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


@register_method("eigen_gradcam", kind="layer", family="cam", needs_layer=True, aliases=("eigengradcam",),
                 randomization="fails (rho 0.99)")
def eigen_gradcam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True, sign: str = "numpy",
    internal_batch_size: int | None = None, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Eigen-Grad-CAM: the first principal component of ``dF/dA * A`` (:func:`principal_projection`)."""
    if sign not in _SIGNS:
        raise ValueError(f"sign must be one of {', '.join(map(repr, _SIGNS))}, got {sign!r}")
    return _gradient_cam("eigen_gradcam", lambda a, g: principal_projection(g * a, sign=sign), model, inputs, target,
                         layer, relu, internal_batch_size, layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid)


# ---------------------------------------------------------------------------- Ablation-CAM
_ABLATION_OFFSET = 1e7  # pytorch-grad-cam's ABLATION_VALUE


class _AblatedCopies:
    """Forward hook on the CAM layer: while armed with ``channels`` (``[n]``, ``-1``: leave the
    copy as it is) it returns ``n`` copies of the layer's output for one sample, copy ``i`` with
    channel ``channels[i]`` set to ``value``. With ``expand`` the network ran one row up to here,
    so the batch grows at this layer; otherwise it already has ``n`` identical rows."""

    def __init__(self, layer: str, axis: int, expand: bool) -> None:
        self.layer, self.axis, self.expand = layer, axis, expand
        self.channels: torch.Tensor | None = None
        self.value: torch.Tensor | None = None
        self.calls = 0

    def arm(self, channels: torch.Tensor, value: torch.Tensor) -> None:
        self.channels, self.value, self.calls = channels, value, 0

    def disarm(self) -> None:
        self.channels = self.value = None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor | None:
        if self.channels is None or inferring_layouts():
            return None
        self.calls += 1
        if self.calls > 1:
            raise ValueError(f"layer {self.layer!r} runs more than once per forward pass; Ablation-CAM needs a module "
                             "called once (pick the block or stage that contains it)")
        n = self.channels.shape[0]
        rows_in = output.shape[0]
        if rows_in != (1 if self.expand else n):
            raise RuntimeError(f"layer {self.layer!r} got {rows_in} rows, expected {1 if self.expand else n}")
        rows = output.expand(n, *output.shape[1:]).clone() if self.expand else output.clone()
        ablate = (self.channels >= 0).nonzero().squeeze(1)
        rows.movedim(self.axis, 1)[ablate, self.channels[ablate]] = self.value.to(rows.dtype)  # a view of rows
        return rows


class _RunsBefore:
    """Records whether a target feature's layer ran before the CAM layer (then ablating the CAM
    layer cannot change it)."""

    def __init__(self, copies: _AblatedCopies) -> None:
        self.copies = copies
        self.early = False

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.copies.channels is not None and self.copies.calls == 0 and not inferring_layouts():
            self.early = True


def _ablation_values(raw: torch.Tensor, ablation_value: float | str) -> torch.Tensor:
    """``[B]`` value each sample's ablated channel is set to."""
    if isinstance(ablation_value, str):
        if ablation_value != "auto":
            raise ValueError(f"ablation_value must be 'auto' or a number, got {ablation_value!r}")
        lowest = raw.flatten(1).amin(dim=1)
        # pytorch-grad-cam: 0 when the layer's smallest value is 0 (a ReLU output), else far below it
        # (computed in at least float32, as there; clamped where -1e7 overflows float16)
        below = (lowest.to(torch.promote_types(raw.dtype, torch.float32)) - _ABLATION_OFFSET)
        below = below.clamp(min=torch.finfo(raw.dtype).min).to(raw.dtype)
        return torch.where(lowest == 0, torch.zeros_like(lowest), below)
    if isinstance(ablation_value, bool) or not isinstance(ablation_value, (int, float)):
        raise TypeError(f"ablation_value must be 'auto' or a number, got {type(ablation_value).__name__}")
    return torch.full((raw.shape[0],), float(ablation_value), device=raw.device, dtype=raw.dtype)


@register_method("ablationcam", kind="layer", family="cam", needs_layer=True, multiplies_batch=True,
                 aliases=("ablation_cam",), randomization="mixed: rho 0.55-0.89 by trained model (4 models)")
def ablationcam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layer: str, relu: bool = True,
    ablation_value: float | str = "auto", relative: bool = True, internal_batch_size: int | None = 64,
    expand_at_layer: bool = True, layout: str = "auto", num_prefix_tokens: int | None = None,
    grid: tuple[int, int] | None = None,
) -> Attribution:
    """Ablation-CAM (Desai & Ramaswamy), gradient-free: channel ``k`` is weighted by the relative
    drop of the feature value when channel ``k`` of ``layer`` is ablated,
    ``(F(x) - F(x; A_k := v)) / F(x)`` (``relative=False``: the drop itself).

    ``ablation_value="auto"`` is pytorch-grad-cam's rule: ``v = 0`` when the sample's smallest
    value at the layer is 0 (ReLU outputs), else that smallest value minus ``1e7``. (Within one of
    its batches pytorch-grad-cam lowers ``v`` by another ``1e7`` per row, an artefact of an
    in-place update; its batch_size=1 results are what it means, and what this returns.) A number
    sets ``v``. A channel of a ViT token layer is ablated over all tokens, prefix tokens included.

    Batched: each forward runs one sample up to ``layer``, where a hook expands the batch into
    ``internal_batch_size`` copies, each with a different channel ablated, and runs the rest of the
    network on them. Models that combine the layer's output with an earlier tensor (residual
    connections) see that tensor broadcast over the copies, which a check row (the un-ablated
    copy, once per call) verifies; ``expand_at_layer=False`` runs every copy through the whole
    network instead. Channels already equal to ``v`` everywhere (dead channels) are not run: their
    ablation changes nothing, so their weight is 0."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    with inference_model(model, gradients=False) as run, torch.no_grad():
        maps = layer_activations_and_gradients(
            run, inputs, target, layer, gradients=False, layout=layout, num_prefix_tokens=num_prefix_tokens, grid=grid,
        )
        channels = maps.activations.shape[1]
        axis = 1 if maps.layout == "nchw" else maps.raw.dim() - 1
        values = _ablation_values(maps.raw, ablation_value)
        by_channel = maps.raw.movedim(axis, 1).flatten(2)  # [B, K, positions]
        live = (by_channel != values.view(-1, 1, 1)).any(dim=2).cpu()  # which channels to run, on the host
        ablated = maps.values.unsqueeze(1).repeat(1, channels)  # a dead channel's ablation leaves the value
        copies = _AblatedCopies(layer, axis, expand_at_layer)
        forwards = rows_run = 0
        check_pending = expand_at_layer
        with HookSet() as hooks:
            hooks.layer(run, layer, copies)
            order = _RunsBefore(copies)
            names = dict(run.named_modules())
            for name in target.layers:
                if name != OUTPUT and name != layer and name in names:
                    hooks.layer(run, name, order)
            for b in range(batch):
                todo = live[b].nonzero().squeeze(1)
                if check_pending:
                    todo = torch.cat([torch.tensor([-1]), todo])
                single = Target((target.features[int(target.index[b])],), torch.zeros(1, dtype=torch.long))
                for start, stop in chunk_ranges(todo.shape[0], internal_batch_size):
                    ks = todo[start:stop]
                    n = ks.shape[0]
                    x = inputs[b:b + 1] if expand_at_layer else inputs[b:b + 1].expand(n, *inputs.shape[1:])
                    copies.arm(ks.to(inputs.device), values[b])
                    try:
                        got, _ = single.repeat(n).forward(run, x, grads=False)
                    except RuntimeError as error:
                        if not expand_at_layer:
                            raise
                        raise ValueError(
                            f"ablationcam: the network from layer {layer!r} on did not accept a batch expanded at that "
                            f"layer ({error}); pass expand_at_layer=False to run every ablated copy through the whole "
                            "network"
                        ) from error
                    finally:
                        copies.disarm()
                    if order.early:
                        raise RuntimeError(
                            f"the explained feature(s) {', '.join(f.name for f in target.features)} do not depend on "
                            f"layer {layer!r} (read before it): choose a layer between the input and the feature"
                        )
                    if got.shape[0] != n:
                        raise ValueError(
                            f"ablationcam: {n} ablated copies of layer {layer!r} gave {got.shape[0]} feature values; the "
                            "model reshapes the batch by its input size: pass expand_at_layer=False"
                        )
                    forwards += 1
                    rows_run += n
                    if int(ks[0]) == -1:
                        _check_broadcast(got[0], maps.values[b], layer, b)
                        check_pending = False
                        got, ks = got[1:], ks[1:]
                    ablated[b, ks.to(ablated.device)] = got
        original = maps.values.unsqueeze(1)
        drop = original - ablated
        if relative:
            zero = (maps.values == 0).nonzero().flatten().tolist()
            if zero:
                raise ValueError(
                    f"ablationcam: the explained value is 0 for sample(s) {zero}, so the relative drop "
                    "(value - ablated) / value is undefined; pass relative=False to weight channels by the drop itself"
                )
            weights = drop / original
        else:
            weights = drop
        cam = (weights[:, :, None, None] * maps.activations).sum(dim=1)
    if relu:
        cam = cam.clamp(min=0)
    return _cam_result(
        "ablationcam", cam, target, maps.values, inputs, layer, relu=relu, channel_weights=weights,
        ablated_values=ablated, ablation_value=values, forward_passes=forwards, ablated_copies_run=rows_run,
    )


def _check_broadcast(got: torch.Tensor, expected: torch.Tensor, layer: str, sample: int) -> None:
    # float rounding differs between batch sizes (about 1e-6 relative); a mis-broadcast is O(1)
    if (got - expected).abs() > 1e-4 * (1.0 + expected.abs()):
        raise ValueError(
            f"ablationcam: expanding the batch at layer {layer!r} changed the un-ablated feature value of sample "
            f"{sample} ({float(expected):.6g} -> {float(got):.6g}): the model mixes that layer's output with rows "
            "from before it in a way that does not broadcast; pass expand_at_layer=False"
        )


# ---------------------------------------------------------------------------- FullGrad
_BIAS_TYPES = (nn.Conv2d, nn.BatchNorm2d)


def fullgrad_bias_layers(model: Any) -> list[str]:
    """The modules whose bias-gradients FullGrad sums: exact ``nn.Conv2d`` / ``nn.BatchNorm2d``
    with a bias (pytorch-grad-cam's rule; a subclass such as timm's ``BatchNormAct2d`` applies an
    activation too, so the gradient at its output is not its bias's)."""
    return [name for name, m in unwrap(model).named_modules() if type(m) in _BIAS_TYPES and m.bias is not None]


def _effective_bias(module: nn.Module, name: str) -> torch.Tensor:
    if isinstance(module, nn.BatchNorm2d):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(f"fullgrad: BatchNorm {name!r} normalises with batch statistics (track_running_stats="
                             "False), so it has no fixed bias; FullGrad needs eval-mode BatchNorms with running statistics")
        # eval-mode BatchNorm is w * (x - m) / sqrt(v + eps) + b: its bias is b - m * w / sqrt(v + eps)
        return (-(module.running_mean * module.weight / torch.sqrt(module.running_var + module.eps)) + module.bias).detach()
    return module.bias.detach()


def _minmax(maps: torch.Tensor) -> torch.Tensor:
    """Each ``[..., h, w]`` map shifted to min 0 and divided by ``1e-7 + max`` (pytorch-grad-cam's
    ``scale_cam_image``)."""
    flat = maps.flatten(-2)
    flat = flat - flat.amin(dim=-1, keepdim=True)
    return (flat / (1e-7 + flat.amax(dim=-1, keepdim=True))).view_as(maps)


def _resize(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[B, h, w]`` maps resized bilinearly (half-pixel centres, as cv2's INTER_LINEAR) to ``size``."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps.unsqueeze(1), size=tuple(size), mode="bilinear", align_corners=False).squeeze(1)


@register_method("fullgrad", kind="layer", family="cam", aliases=("full_grad",), randomization="fails (rho 0.91-0.93)")
def fullgrad(model: Any, inputs: torch.Tensor, target: Any = None, *, internal_batch_size: int | None = None) -> Attribution:
    """FullGrad (Srinivas & Fleuret): ``|x * dF/dx|`` plus, for every conv and BatchNorm layer
    (:func:`fullgrad_bias_layers`), ``|b * dF/dz|`` (``z`` the layer's output, ``b`` its bias), each
    channel min-max scaled, resized to the input and summed, as pytorch-grad-cam does. The map is
    ``[B, H, W]`` at input resolution (``kind="layer"``), before pytorch-grad-cam's final per-sample
    min-max scaling. Takes no ``layer``: every bias layer contributes."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    if getattr(model, "_mechlens_folded", None):
        raise ValueError("fullgrad sums the bias terms of the model's own conv and BatchNorm layers, but this "
                         "inference_copy has folded its BatchNorms into the convolutions: pass the original model")
    names = fullgrad_bias_layers(model)
    modules = dict(model.named_modules())
    biases = [_effective_bias(modules[name], name) for name in names]
    size = tuple(inputs.shape[-2:])
    maps, values = [], []
    # No BatchNorm folding: a folded pair has one bias (b_conv * s + b_bn) where FullGrad, here and in
    # the paper's code, sums |b_conv * dF/dz_conv| and |b_bn * dF/dz_bn| separately, and the folded BN
    # has no output to take dF/dz_bn at. So the model runs as it is (optimize=False).
    with inference_model(model, optimize=False) as run:
        for start, stop in chunk_ranges(inputs.shape[0], internal_batch_size):
            x = inputs[start:stop].detach().requires_grad_(True)
            with torch.enable_grad():
                value, fwd = target.select(range(start, stop)).forward(run, x, grads=True, keep_layers=names)
                outputs = [fwd.activations[name] for name in names]
                grads = torch.autograd.grad(value.sum(), [x, *outputs], allow_unused=True)
            if grads[0] is None:
                raise RuntimeError(f"the feature(s) {', '.join(f.name for f in target.features)} do not depend on the input")
            total = _minmax((grads[0] * x).detach().abs()).sum(dim=1)
            for bias, grad in zip(biases, grads[1:]):
                if grad is None:  # a layer after the feature's: dF/dz = 0, a zero term
                    continue
                term = _minmax((bias.view(1, -1, 1, 1) * grad).abs()).sum(dim=1)
                total = total + _resize(term, size)  # resizing is linear: sum the channels first
            maps.append(total)
            values.append(value.detach())
    return Attribution(
        map=torch.cat(maps), method="fullgrad", features=target.names, values=torch.cat(values), kind="layer",
        input_shape=tuple(inputs.shape), extras={"bias_layers": names},
    )


# ---------------------------------------------------------------------------- several layers
_AGGREGATES = ("mean", "max")


@register_method("multilayer_cam", kind="layer", family="cam", aliases=("multi_layer_cam",),
                 randomization="mixed: follows its cam (cam='gradcam' at stage2+stage3: rho 0.31-0.36, 2 trained models)")
def multilayer_cam(
    model: Any, inputs: torch.Tensor, target: Any = None, *, layers: Sequence[str] | None = None,
    cam: str = "gradcam", aggregate: str = "mean", **cam_kwargs: Any,
) -> Attribution:
    """The registered CAM ``cam`` at each of ``layers``, each map (after a ReLU) min-max scaled per
    sample at its layer's resolution, resized to the input and aggregated over layers (``mean``: as
    pytorch-grad-cam with several ``target_layers``; or ``max``). ``[B, H, W]`` at input resolution,
    before pytorch-grad-cam's final min-max scaling; ``extras["layer_maps"]`` holds the scaled
    per-layer maps ``[B, L, H, W]``. ``cam_kwargs`` go to the CAM at every layer. (``cam``, not
    ``method``: :func:`attribute` takes ``method="multilayer_cam"``.)"""
    if layers is None or isinstance(layers, str) or len(layers) == 0:
        raise ValueError("multilayer_cam needs layers=[NAME, ...] (a list of dotted module paths, see "
                         "`mechlens layers MODEL`)")
    if "layer" in cam_kwargs:
        raise ValueError("multilayer_cam takes layers=[...], not layer=")
    if aggregate not in _AGGREGATES:
        raise ValueError(f"aggregate must be one of {', '.join(map(repr, _AGGREGATES))}, got {aggregate!r}")
    info = get_method(cam)
    if not (info.needs_layer and info.kind == "layer"):
        cams = sorted(n for n in list_methods(family="cam") if get_method(n).needs_layer and get_method(n).kind == "layer")
        raise ValueError(f"multilayer_cam fuses layer CAMs; {info.name!r} is not one. Use one of: {', '.join(cams)}")
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    size = tuple(inputs.shape[-2:])
    scaled, values = [], None
    for layer in layers:
        result = info.fn(model, inputs, target, layer=layer, **cam_kwargs)
        values = result.values if values is None else values
        scaled.append(_resize(_minmax(result.map.clamp(min=0)), size))  # scale, then resize: pytorch-grad-cam's order
    stacked = torch.stack(scaled, dim=1)
    fused = stacked.mean(dim=1) if aggregate == "mean" else stacked.amax(dim=1)
    return Attribution(
        map=fused, method="multilayer_cam", features=target.names, values=values, kind="layer",
        input_shape=tuple(inputs.shape),
        extras={"layers": list(layers), "cam": info.name, "aggregate": aggregate, "layer_maps": stacked},
    )
