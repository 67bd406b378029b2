"""The manipulability check: can the model's explanations be moved without changing its predictions?

Heo et al. ("Fooling neural network interpretations via adversarial model manipulation",
NeurIPS 2019) fine-tune a model so that an explanation method's maps point wherever the attacker
wants while the predictions stay the same; Dombrowski et al. (2019) show the same with input
perturbations and tie it to the curvature of the model. A map that can be moved that way says
more about how the function is *computed* than about what it *uses*.

:func:`manipulate_model` fine-tunes a copy of the model (Adam, minibatches of the given images) on

    loss = keep_weight * KL(softmax(f(x)) || softmax(f'(x)))   (or the MSE of the logits)
         - map_weight  * log(share of the attacked map's mass inside the target region)

where the attacked maps are computed differentiably (double backpropagation, ``create_graph=True``;
several methods at once: the mean of their losses). :data:`ATTACKABLE`: ``saliency``,
``input_x_gradient``, ``integrated_gradients``, ``smoothgrad`` / ``smoothgrad_sq`` / ``vargrad``
(over saliency, input x gradient or IG), and the gradient CAMs ``gradcam``, ``gradcam_plusplus``,
``hirescam``, ``xgradcam`` and ``layercam`` at a spatial layer, read in the layout the model
states as the registry reads it (``[B, C, h, w]``, Swin's ``[B, h, w, C]``, ViT tokens with their
CLS / register tokens dropped; ``layout=``, ``num_prefix_tokens=``, ``grid=`` as for the CAMs;
attention runs by its math kernel, the fused ones having no double backward). :func:`attacked_map` computes exactly
the registered method's ``heatmap(absolute=True)`` (same formula, the registry's own IG path and
quadrature and SmoothGrad noise code, so the same seed gives the same noise; tested to 1e-6).
Not attackable: guided backprop (its ReLU gradient hooks stay on the graph and would bend the
second-order backward too) and LRP / DeepLIFT (their rules run on detached layer inputs, so their
maps have no derivative w.r.t. the weights to follow). Each fine-tuning step runs the method, so
the attack uses :data:`ATTACK_DEFAULTS` unless ``method_kwargs`` say otherwise: 16 IG steps
(Spearman 0.98-0.99 with the 50-step map, median relative L1 difference 0.06-0.07, on four shapes
CNNs; 8 steps: 0.94-0.96 and 0.11-0.14) and 8 noise draws per step, drawn afresh at every step from
a generator seeded with the method's ``seed`` (the attack sees thousands of draws: it moves the
expected map, not one draw's). The maps measured afterwards use the method's own arguments
(``method_kwargs`` of :func:`manipulation_check`, which the attack also receives).

The log of the share pulls hardest where little mass is in the region yet (measured: the plain
share left the maps of some trained models unmoved in 300 steps). The model stays in eval mode
(BatchNorm statistics frozen, its affine parameters trained). The default region is the image's
``border`` (a frame covering 25% of it): a convolutional network sees the border through its zero
padding, so it can be pushed there; a corner is harder for it (measured on the small shapes CNN:
Grad-CAM still moves to a corner, the gradient barely). The defaults (300 steps, lr 3e-3,
``keep_weight`` 50 with KL) kept the predictions of 95-99% of held-out images on four trained
shapes CNNs while moving the gradient's and Grad-CAM's maps.

:func:`manipulation_check` then reports, on held-out images (``eval_images``), the prediction
agreement, the largest logit change and the mean KL (the tolerance says what "the same
predictions" means), and for every method asked for how far its maps moved: the share of map
mass in the target region before and after, and the Spearman rank correlation of the maps before
and after. Methods that only query the function (occlusion, RISE) cannot be moved much without
changing the logits; gradients and CAMs depend on how the function is computed and can be
(measured on four small shapes CNNs, see ``tests/mechlens/test_evaluation_manipulation.py``: the
attacked gradient and Grad-CAM maps kept Spearman 0.15-0.54 with the originals and gained
0.04-0.35 of their mass in the border; occlusion kept 0.61-0.69 and gained at most 0.05, the
function having changed a little on occluded inputs the fine-tuning never saw). Each attacked
alone with the defaults on the same four models (256 fit images, predictions kept on 95-100% of
held-out ones), measured with the method's own defaults:

    attacked                  its maps: rho, mass gain   occlusion: rho, mass gain   time (1 core)
    xgradcam                  -0.05-0.38, 0.07-0.17      0.63-0.75, -0.01-0.01       5-7 s
    smoothgrad (8 draws)      0.25-0.83,  0.05-0.25      0.58-0.75,  0.00-0.11       57-83 s
    integrated_gradients (16) 0.12-0.32,  0.34-0.56      0.62-0.72,  0.01-0.06       154-184 s

(SmoothGrad moved least on the model where plain saliency had, seed 2; attacking it or IG also
moved the plain gradient's maps, 0.07-0.27 of mass, attacking XGrad-CAM barely, <= 0.02.)
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from mechlens.attribution.base import attribute, get_method, make_generator, pixel_space, token_grid
from mechlens.attribution.cam import (
    _gradcam_weights,
    _gradcampp_weights,
    _hirescam_weights,
    _layercam_weights,
    _xgradcam_weights,
    to_grid,
)
from mechlens.attribution.gradients import _ig_path
from mechlens.attribution.smooth import _draw_chunks, _noise_std, _noisy_copies
from mechlens.attribution.layers import suggest_cam_layer
from mechlens.engine import HookSet, eval_mode
from mechlens.features.layout import infer_layouts
from mechlens.evaluation.similarity import spearman
from mechlens.models.layers import get_module

__all__ = ["ATTACKABLE", "ATTACK_DEFAULTS", "REGIONS", "ManipulationResult", "ManipulatedModel", "manipulate_model", "manipulation_check",
           "region_mask"]

#: Methods whose maps :func:`manipulate_model` can differentiate w.r.t. the weights.
ATTACKABLE: tuple[str, ...] = ("saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "smoothgrad_sq",
                               "vargrad", "gradcam", "gradcam_plusplus", "hirescam", "xgradcam", "layercam")
#: What the attack uses unless ``method_kwargs`` says otherwise: every fine-tuning step runs the
#: method (and backpropagates through it), so the registry's defaults (50 IG steps, 50 noise
#: draws) would make it 50 times dearer than the gradient; see the module docstring.
ATTACK_DEFAULTS: dict[str, dict[str, Any]] = {"integrated_gradients": {"n_steps": 16}, "smoothgrad": {"n_samples": 8},
                                              "smoothgrad_sq": {"n_samples": 8}, "vargrad": {"n_samples": 8}}
REGIONS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right", "border")


def region_mask(region: Any, size: tuple[int, int], *, fraction: float = 0.25) -> torch.Tensor:
    """The target region as a bool mask ``[H, W]`` (or ``[B, H, W]`` when given per image): a
    corner name (``top_left``, ...: a square) or ``"border"`` (a frame along the edges), covering
    about ``fraction`` of the image, or a mask."""
    height, width = size
    if isinstance(region, str):
        if region not in REGIONS:
            raise ValueError(f"unknown region {region!r}; give one of {', '.join(REGIONS)} or a bool mask [H, W]")
        if not 0 < fraction < 1:
            raise ValueError(f"the region must cover a fraction in (0, 1) of the image, got {fraction}")
        mask = torch.zeros(height, width, dtype=torch.bool)
        if region == "border":
            # a frame of width w covers 1 - (1 - 2w)^2 of a square image
            w = (1 - math.sqrt(1 - fraction)) / 2
            h_px, w_px = max(1, round(w * height)), max(1, round(w * width))
            mask[:h_px], mask[-h_px:], mask[:, :w_px], mask[:, -w_px:] = True, True, True, True
            return mask
        side = math.sqrt(fraction)
        h, w = max(1, round(side * height)), max(1, round(side * width))
        rows = slice(0, h) if region.startswith("top") else slice(height - h, height)
        cols = slice(0, w) if region.endswith("left") else slice(width - w, width)
        mask[rows, cols] = True
        return mask
    mask = torch.as_tensor(region).bool()
    if mask.dim() not in (2, 3) or tuple(mask.shape[-2:]) != (height, width):
        raise ValueError(f"a region mask must be [H, W] or [B, H, W] with H, W = {height}, {width}; got {tuple(mask.shape)}")
    if not mask.flatten(-2).any(dim=-1).all():
        raise ValueError("the region mask is empty (for some image); nothing to move the maps to")
    if mask.flatten(-2).all(dim=-1).any():
        raise ValueError("the region mask covers the whole image; the maps could not move into it")
    return mask


# ---------------------------------------------------------------------------- differentiable maps
def _class_index(logits: torch.Tensor, target: Any) -> torch.Tensor:
    """``[B]`` class indices: the predicted class (``None``), one class, or one per sample."""
    batch, classes = logits.shape
    if target is None:
        index = logits.argmax(dim=1)
    elif isinstance(target, int):
        index = torch.full((batch,), target, dtype=torch.long)
    else:
        index = torch.as_tensor(target)
        if index.is_floating_point() or index.shape != (batch,):
            raise ValueError(
                f"the manipulation target must be None (the predicted class), a class index or one class index per "
                f"image [B={batch}]; got {type(target).__name__} {tuple(getattr(index, 'shape', ()))}. It attacks class "
                "logits (the outputs it keeps), not other features")
    index = index.to(logits.device).long()
    if bool(((index < 0) | (index >= classes)).any()):
        raise ValueError(f"class indices must be in [0, {classes}), got {index.tolist()}")
    return index


_CAM_WEIGHTS = {"gradcam": _gradcam_weights, "gradcam_plusplus": _gradcampp_weights, "hirescam": _hirescam_weights,
                "xgradcam": _xgradcam_weights, "layercam": _layercam_weights}
_NOISE = ("smoothgrad", "smoothgrad_sq", "vargrad")
# keyword arguments each attackable method takes besides internal_batch_size (accepted: it does not
# change the values; only the noise methods' draws are chunked by it, as in the registry)
_IG_KEYS = ("baseline", "n_steps", "integration", "mean", "blur_sigma", "noise_range", "seed", "generator")
_ACCEPTED: dict[str, tuple[str, ...]] = {
    "saliency": ("abs",), "input_x_gradient": (), "integrated_gradients": _IG_KEYS,
    **{name: ("layer", "relu", "layout", "num_prefix_tokens", "grid") for name in _CAM_WEIGHTS},
    **{name: ("base", "n_samples", "stdev_spread", "stdevs", "seed", "generator", "base_internal_batch_size")
       for name in _NOISE},
}


def _check_kwargs(method: str, kwargs: Mapping[str, Any]) -> None:
    accepted = ("internal_batch_size", *_ACCEPTED[method])
    if method in _NOISE:
        base = get_method(kwargs.get("base", "saliency")).name
        if base not in _ACCEPTED or base in _NOISE or base in _CAM_WEIGHTS:
            raise ValueError(f"cannot attack {method} over base={base!r}: its base must be one of saliency, "
                             "input_x_gradient, integrated_gradients")
        accepted += _ACCEPTED[base]
    stray = sorted(set(kwargs) - set(accepted))
    if stray:
        raise ValueError(f"attacking {method} takes {', '.join(accepted)}; got {', '.join(stray)}")


def _raw_map(net: nn.Module, x: torch.Tensor, index: torch.Tensor, method: str, kwargs: dict[str, Any]
             ) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """The registry's ``Attribution.map`` of ``method`` (``[B, C, H, W]`` for ``kind="input"``,
    ``[B, h, w]`` for ``"layer"``) with the graph kept, its kind, and the logits on ``x`` when
    the method ran the model on ``x`` itself."""
    if method in ("saliency", "input_x_gradient"):
        x = x.detach().requires_grad_(True)
        logits = net(x)
        (grad,) = torch.autograd.grad(logits.gather(1, index[:, None]).sum(), x, create_graph=True)
        if method == "input_x_gradient":
            return grad * x, "input", logits
        return (grad.abs() if kwargs.get("abs", True) else grad), "input", logits
    if method == "integrated_gradients":
        ig = {k: v for k, v in kwargs.items() if k in _IG_KEYS}
        x = x.detach()
        x0, steps, alphas = _ig_path(x, ig.pop("baseline", "zeros"), ig.pop("n_steps", 50),
                                     ig.pop("integration", "gausslegendre"), **ig)
        n, view = alphas.numel(), (-1,) + (1,) * x.dim()
        # step-major rows, as the registry: x0 + alpha (x - x0)
        scaled = torch.addcmul(x0.unsqueeze(0), alphas.view(view), (x - x0).unsqueeze(0)).flatten(0, 1)
        scaled = scaled.detach().requires_grad_(True)
        logits = net(scaled)
        (grad,) = torch.autograd.grad(logits.gather(1, index.repeat(n)[:, None]).sum(), scaled, create_graph=True)
        total = (grad.view(n, *x.shape) * steps.view(view)).sum(0)
        return (x - x0) * total, "input", None
    if method in _CAM_WEIGHTS:
        layer = kwargs.get("layer")
        if layer is None:
            raise ValueError(f"attacking {method} needs layer=")
        seen: dict[str, torch.Tensor] = {}
        with HookSet() as hooks:
            hooks.forward(get_module(net, layer), lambda module, args, out: seen.__setitem__("a", out))
            logits = net(x)
        act = seen.get("a")
        if not isinstance(act, torch.Tensor) or act.dim() not in (3, 4):
            raise ValueError(f"layer {layer!r} gives {type(act).__name__} {tuple(getattr(act, 'shape', ()))}; "
                             f"attacking {method} needs a spatial layer ([B, C, h, w], [B, h, w, C] or [B, tokens, D])")
        # the layout from the model, as the registry's CAM reads it (never from the rank: Swin's
        # stages are [B, h, w, C], ViT blocks [B, tokens, D])
        known = infer_layouts(net, [layer], x, layout=kwargs.get("layout", "auto"),
                              num_prefix_tokens=kwargs.get("num_prefix_tokens"))[layer]
        prefix, grid = 0, kwargs.get("grid")
        if known.layout == "nlc":
            prefix, grid = token_grid(net, f"layer {layer!r}", act.shape[1], known.num_prefix_tokens, grid,
                                      tuple(x.shape[-2:]))
        (grad,) = torch.autograd.grad(logits.gather(1, index[:, None]).sum(), act, create_graph=True)
        cam = _CAM_WEIGHTS[method](to_grid(act, layout=known.layout, num_prefix_tokens=prefix, grid=grid),
                                   to_grid(grad, layout=known.layout, num_prefix_tokens=prefix, grid=grid))
        return (F.relu(cam) if kwargs.get("relu", True) else cam), "layer", logits
    if method in _NOISE:
        noise = dict(kwargs)
        base = get_method(noise.pop("base", "saliency")).name
        n_samples = int(noise.pop("n_samples", 50))
        sigma = _noise_std(x, noise.pop("stdev_spread", 0.15), noise.pop("stdevs", None))
        gen = make_generator(x.device, noise.pop("seed", 0), noise.pop("generator", None))
        noise.pop("base_internal_batch_size", None)
        chunk_size = noise.pop("internal_batch_size", None)
        batch, total, total_sq, kind = x.shape[0], 0.0, 0.0, "input"
        for start, stop in _draw_chunks(n_samples, batch, chunk_size):
            m = stop - start
            maps, kind, _ = _raw_map(net, _noisy_copies(x.detach(), sigma, m, gen), index.repeat(m), base, noise)
            maps = maps.view(m, batch, *maps.shape[1:])
            total = total + maps.sum(0)
            if method != "smoothgrad":
                total_sq = total_sq + (maps * maps).sum(0)
        mean = total / n_samples
        if method == "smoothgrad":
            return mean, kind, None
        mean_sq = total_sq / n_samples
        return (mean_sq if method == "smoothgrad_sq" else mean_sq - mean * mean), kind, None
    raise ValueError(f"cannot attack {method!r}: manipulate_model differentiates the maps of {', '.join(ATTACKABLE)}")


def attacked_map(net: nn.Module, x: torch.Tensor, index: torch.Tensor, method: str, *, layer: str | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``(map [B, H, W] >= 0, logits)`` of ``method`` with the graph kept, so that the map can be
    differentiated w.r.t. the weights (double backpropagation). The map is the registered
    method's ``heatmap(absolute=True)`` on the same inputs and ``kwargs`` (the method's own, e.g.
    ``n_steps`` or ``n_samples`` and ``seed``); ``layer`` for the CAMs."""
    name = get_method(method).name
    if name not in ATTACKABLE:
        raise ValueError(f"cannot attack {name!r}: manipulate_model differentiates the maps of {', '.join(ATTACKABLE)}")
    if name in _CAM_WEIGHTS and kwargs.get("layer") is None:
        kwargs["layer"] = layer
    _check_kwargs(name, kwargs)
    # attention by its math kernel: the fused CPU / flash kernels have no double backward (ViTs)
    with sdpa_kernel(SDPBackend.MATH):
        amap, kind, logits = _raw_map(net, x, index, name, dict(kwargs))
        if logits is None:
            logits = net(x)
    # Attribution.heatmap(absolute=True): channels summed (the gradient methods' channel_reduce),
    # |.| taken, layer maps resized bilinearly
    heat = amap.sum(dim=1).abs() if kind == "input" else amap.abs()
    if tuple(heat.shape[-2:]) != tuple(x.shape[-2:]):
        heat = F.interpolate(heat.unsqueeze(1), size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return heat, logits


def _inside_share(heat: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """``[B]`` share of each map's mass inside the region (0 for an all-zero map)."""
    mass = heat.flatten(1).sum(dim=1)
    inside = (heat * region).flatten(1).sum(dim=1)
    return inside / mass.clamp_min(1e-12)


# ---------------------------------------------------------------------------- fine-tuning
@dataclass
class ManipulatedModel:
    """The fine-tuned copy (``model``: an ``nn.Module`` or ``LoadedModel`` like the one given), the
    attacked ``methods``, the training ``history`` (per logged step: ``step``, ``map_loss``,
    ``keep_loss``) and the keyword arguments each attacked method ran with (``method_kwargs``)."""

    model: Any
    methods: list[str]
    layer: str | None
    region: torch.Tensor
    history: list[dict[str, float]] = field(default_factory=list)
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)


def _copy(model: Any) -> Any:
    net = getattr(model, "model", None)
    if isinstance(model, nn.Module):
        return copy.deepcopy(model)
    if isinstance(net, nn.Module) and dataclasses.is_dataclass(model):
        return dataclasses.replace(model, model=copy.deepcopy(net))
    raise TypeError(f"model must be an nn.Module or a LoadedModel, got {type(model).__name__}")


def manipulate_model(
    model: Any,
    images: torch.Tensor,
    target: Any = None,
    *,
    method: str | Sequence[str] = "gradcam",
    region: Any = "border",
    region_fraction: float = 0.25,
    layer: str | None = None,
    steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 32,
    map_weight: float = 1.0,
    keep_weight: float = 50.0,
    keep: str = "kl",
    seed: int = 0,
    log_every: int = 10,
    progress: bool = False,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
) -> ManipulatedModel:
    """Fine-tune a copy of ``model`` so that the maps of ``method`` (one name or several, attacked
    together: the map loss is their mean) for ``target`` (default: each image's predicted class)
    move into ``region`` while its logits on ``images`` stay those of ``model`` (``keep``:
    ``"kl"`` or ``"mse"``); see the module docstring. ``method_kwargs`` (per method name; others
    are ignored) go to the attacked maps over :data:`ATTACK_DEFAULTS`; the noise of SmoothGrad &
    co. is drawn afresh at every step from a generator seeded with their ``seed`` (an attack on the
    expected map, not on one draw). ``model`` is not modified."""
    attacked = [get_method(name).name for name in ([method] if isinstance(method, str) else list(method))]
    if not attacked:
        raise ValueError("give at least one method to attack, e.g. method='gradcam'")
    for name in attacked:
        if name not in ATTACKABLE:
            raise ValueError(f"cannot attack {name!r}: manipulate_model differentiates the maps of "
                             f"{', '.join(ATTACKABLE)} (double backpropagation); pick among them")
    # layer=None (as the report passes for CAMs) means the default layer, as in attribute()
    given = {get_method(k).name: {key: value for key, value in v.items() if not (key == "layer" and value is None)}
             for k, v in (method_kwargs or {}).items()}
    kwargs_of = {name: {**ATTACK_DEFAULTS.get(name, {}), **given.get(name, {})} for name in attacked}
    for name in attacked:  # noise over IG: IG's few attack steps too
        if name in _NOISE and get_method(kwargs_of[name].get("base", "saliency")).name == "integrated_gradients":
            kwargs_of[name] = {**ATTACK_DEFAULTS["integrated_gradients"], **kwargs_of[name]}
    for name in attacked:
        _check_kwargs(name, kwargs_of[name])
    if keep not in ("kl", "mse"):
        raise ValueError(f"keep must be 'kl' or 'mse', got {keep!r}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps and batch_size must be >= 1 and lr > 0; got steps={steps}, batch_size={batch_size}, lr={lr}")
    images = _check_batch(images, "images")
    mask = region_mask(region, tuple(images.shape[-2:]), fraction=region_fraction)
    if mask.dim() == 3 and mask.shape[0] != images.shape[0]:
        raise ValueError(f"a per-image region needs one mask per image: {mask.shape[0]} masks, {images.shape[0]} images")
    cams = [name for name in attacked if name in _CAM_WEIGHTS]
    if any("layer" not in kwargs_of[name] for name in cams) and layer is None:
        with pixel_space(model) as net:
            layer = suggest_cam_layer(net, tuple(images.shape[1:]))
    work = _copy(model)
    with pixel_space(model) as net, torch.no_grad(), eval_mode(net):
        reference = net(images)
    index = _class_index(reference, target)
    mask = mask.to(images.device).float()
    generator = torch.Generator().manual_seed(seed)
    run_kwargs = {name: dict(kw) for name, kw in kwargs_of.items()}
    for name, kw in run_kwargs.items():
        if name in _CAM_WEIGHTS:
            kw.setdefault("layer", layer)
        if name in _NOISE and kw.get("generator") is None:
            kw["generator"] = make_generator(images.device, kw.pop("seed", 0), None)
    history: list[dict[str, float]] = []
    from tqdm.auto import tqdm

    with pixel_space(work) as net, eval_mode(net):
        params = [p for p in net.parameters()]
        for p in params:
            p.requires_grad_(True)
        optimizer = torch.optim.Adam(params, lr=lr)
        order = torch.randperm(images.shape[0], generator=generator)
        cursor = 0
        for step in tqdm(range(steps), desc=f"manipulate {'+'.join(attacked)}", unit="step", disable=not progress,
                         leave=False):
            if cursor + batch_size > order.numel():
                order, cursor = torch.randperm(images.shape[0], generator=generator), 0
            rows = order[cursor:cursor + batch_size].to(images.device)
            cursor += batch_size
            region_rows = mask[rows] if mask.dim() == 3 else mask
            shares = []
            for name in attacked:
                heat, logits = attacked_map(net, images[rows], index[rows], name, **run_kwargs[name])
                shares.append(-torch.log(_inside_share(heat, region_rows).clamp_min(1e-6)).mean())
            map_loss = torch.stack(shares).mean()
            if keep == "kl":
                keep_loss = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(reference[rows], dim=1),
                                     log_target=True, reduction="batchmean")
            else:
                keep_loss = F.mse_loss(logits, reference[rows])
            loss = map_weight * map_loss + keep_weight * keep_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"the manipulation diverged at step {step} (loss {float(loss)}); lower lr (now {lr})")
            if step % log_every == 0 or step == steps - 1:
                history.append({"step": step, "map_loss": float(map_loss.detach()), "keep_loss": float(keep_loss.detach())})
        for p in params:
            p.grad = None
    if cams and layer is None:  # every CAM named its own layer: report the first
        layer = run_kwargs[cams[0]]["layer"]
    return ManipulatedModel(model=work, methods=attacked, layer=layer if cams else None,
                            region=mask.bool().cpu(), history=history, method_kwargs=kwargs_of)


# ---------------------------------------------------------------------------- the check
@dataclass
class ManipulationResult:
    """What the manipulation did (see the module docstring). ``rows``: one dict per method with
    ``mass_before`` / ``mass_after`` (share of the |map| mass in the region, mean over images),
    ``mass_gain``, ``spearman`` (mean rank correlation of the maps before / after) and ``moved``.
    ``agreement``: share of held-out images whose predicted class is unchanged; ``max_logit_change``
    and ``mean_kl`` on the same images; ``preserved``: ``agreement >= tolerance``."""

    attacked: list[str]
    layer: str | None
    region: torch.Tensor
    rows: list[dict[str, Any]]
    agreement: float
    max_logit_change: float
    mean_kl: float
    tolerance: float
    manipulated: ManipulatedModel
    maps_before: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    maps_after: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    COLUMNS = ("method", "family", "mass_before", "mass_after", "mass_gain", "spearman", "moved")

    @property
    def preserved(self) -> bool:
        return self.agreement >= self.tolerance

    def row(self, method: str) -> dict[str, Any]:
        name = get_method(method).name
        for row in self.rows:
            if row["method"] == name:
                return row
        raise KeyError(f"no manipulation figures for {method!r}; have {', '.join(r['method'] for r in self.rows)}")

    def to_dict(self) -> dict[str, Any]:
        return {"attacked": self.attacked, "layer": self.layer, "region_fraction": float(self.region.float().mean()),
                "agreement": self.agreement, "max_logit_change": self.max_logit_change, "mean_kl": self.mean_kl,
                "tolerance": self.tolerance, "preserved": self.preserved, "methods": [dict(r) for r in self.rows],
                "history": list(self.manipulated.history)}

    def to_pandas(self) -> Any:
        from mechlens._display import to_pandas

        return to_pandas(self.rows, self.COLUMNS)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        caption = (f"{' and '.join(self.attacked)} maps pushed into the region: predictions kept on {self.agreement:.1%} of held-out "
                   f"images (tolerance {self.tolerance:.0%}), max logit change {self.max_logit_change:.3g}")
        return html_table(self.rows, self.COLUMNS, caption=caption)

    def plot(self, images: torch.Tensor | None = None, *, n: int = 4) -> Any:
        """Each method's maps before (top) and after (bottom) the manipulation on ``n`` images, the
        target region outlined."""
        import numpy as np

        from mechlens.attribution.display import as_rgb, draw_map, figure

        methods = list(self.maps_before)
        n = min(n, next(iter(self.maps_before.values())).shape[0]) if methods else 0
        if n == 0:
            raise ValueError("nothing to plot: no maps were kept")
        fig = figure(2.0 * n, 1.9 * 2 * len(methods))
        region = self.region.float().numpy()
        for m, method in enumerate(methods):
            for which, maps in enumerate((self.maps_before[method], self.maps_after[method])):
                for i in range(n):
                    ax = fig.add_subplot(2 * len(methods), n, (2 * m + which) * n + i + 1)
                    shown = as_rgb(images[i]) if images is not None else None
                    title = f"{method} {'before' if which == 0 else 'after'}" if i == 0 else None
                    draw_map(ax, fig, maps[i].float().numpy(), shown, sign="absolute", colorbar=False, title=title)
                    outline = region[i] if region.ndim == 3 else region
                    ax.contour(np.asarray(outline), levels=[0.5], colors="white", linewidths=0.8)
        fig.tight_layout()
        return fig

    def _repr_png_(self) -> bytes:
        from mechlens.attribution.display import quiet_png

        return quiet_png(self.plot)


def manipulation_check(
    model: Any,
    images: torch.Tensor,
    target: Any = None,
    *,
    methods: Sequence[str] = ("saliency", "gradcam", "occlusion"),
    attack: str | Sequence[str] = "gradcam",
    eval_images: torch.Tensor | None = None,
    region: Any = "border",
    region_fraction: float = 0.25,
    layer: str | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    tolerance: float = 0.95,
    moved_below: float = 0.5,
    moved_gain: float = 0.2,
    manipulated: ManipulatedModel | None = None,
    progress: bool = False,
    **manipulate_kwargs: Any,
) -> ManipulationResult:
    """Fine-tune a copy of ``model`` on ``images`` to move ``attack``'s maps into ``region``
    (:func:`manipulate_model`; ``manipulate_kwargs`` go there, or pass a ready ``manipulated``),
    then measure on ``eval_images`` (default: ``images``; better held-out ones) how far every
    method of ``methods`` moved and whether the predictions survived. A method ``moved`` when its
    maps' rank correlation with the originals fell below ``moved_below`` or its mass in the region
    grew by at least ``moved_gain``; ``tolerance``: the prediction agreement that counts as "the
    same predictions". ``method_kwargs`` (per method) configure the measured maps and, over
    :data:`ATTACK_DEFAULTS`, the attacked ones."""
    infos = [get_method(name) for name in methods]  # unknown names fail before any work
    kwargs_of = {get_method(k).name: dict(v) for k, v in (method_kwargs or {}).items()}
    if not 0 < tolerance <= 1:
        raise ValueError(f"tolerance is the prediction agreement to reach, in (0, 1]; got {tolerance}")
    images = _check_batch(images, "images")
    held_out = images if eval_images is None else _check_batch(eval_images, "eval_images")
    if held_out.shape[1:] != images.shape[1:]:
        raise ValueError(f"eval_images are {tuple(held_out.shape[1:])} but images {tuple(images.shape[1:])}")
    eval_target = target if eval_images is None else _eval_target(target, held_out)
    if manipulated is None:
        manipulated = manipulate_model(model, images, target, method=attack, region=region,
                                       region_fraction=region_fraction, layer=layer, progress=progress,
                                       method_kwargs=kwargs_of, **manipulate_kwargs)
    elif manipulate_kwargs:
        raise ValueError(f"{sorted(manipulate_kwargs)} configure the fine-tuning, but a ready `manipulated` model was given")
    with torch.no_grad():
        with pixel_space(model) as net, eval_mode(net):
            before_logits = net(held_out)
        with pixel_space(manipulated.model) as net, eval_mode(net):
            after_logits = net(held_out)
    index = _class_index(before_logits, eval_target)
    agreement = float((before_logits.argmax(1) == after_logits.argmax(1)).float().mean())
    max_change = float((after_logits - before_logits).abs().max())
    mean_kl = float(F.kl_div(F.log_softmax(after_logits, 1), F.log_softmax(before_logits, 1), log_target=True,
                             reduction="batchmean"))
    region_mask_ = manipulated.region
    if region_mask_.dim() == 3 and region_mask_.shape[0] != held_out.shape[0]:
        raise ValueError("a per-image region covers the fine-tuning images; pass eval_images=None to measure on them")
    cam_layer = manipulated.layer
    rows, before_maps, after_maps = [], {}, {}
    for info in infos:
        extra = dict(kwargs_of.get(info.name, {}))
        if info.needs_layer and "layer" not in extra and cam_layer is not None:
            extra["layer"] = cam_layer
        before = attribute(model, held_out, index, method=info.name, **extra).heatmap(absolute=True).detach().cpu()
        after = attribute(manipulated.model, held_out, index, method=info.name, **extra).heatmap(absolute=True).detach().cpu()
        mass_before, mass_after = _region_mass(before, region_mask_), _region_mass(after, region_mask_)
        rho = float(spearman(before, after).nanmean())
        moved = (not math.isnan(rho) and rho < moved_below) or (mass_after - mass_before >= moved_gain)
        rows.append({"method": info.name, "family": info.family, "mass_before": mass_before, "mass_after": mass_after,
                     "mass_gain": mass_after - mass_before, "spearman": rho, "moved": bool(moved)})
        before_maps[info.name], after_maps[info.name] = before, after
    return ManipulationResult(attacked=list(manipulated.methods), layer=cam_layer, region=region_mask_, rows=rows,
                              agreement=agreement, max_logit_change=max_change, mean_kl=mean_kl, tolerance=tolerance,
                              manipulated=manipulated, maps_before=before_maps, maps_after=after_maps)


def _eval_target(target: Any, held_out: torch.Tensor) -> Any:
    """The target on held-out images: the predicted class or one class for all; per-image targets
    belong to the fine-tuning images and cannot be carried over."""
    if target is None or isinstance(target, int):
        return target
    raise ValueError("a per-image target covers the fine-tuning images; with eval_images give target=None or one class index")


def _region_mass(heat: torch.Tensor, region: torch.Tensor) -> float:
    """Mean over images of the share of ``|heat|`` inside the region (images with an all-zero map
    left out; NaN when every map is zero)."""
    heat = heat.abs().float()
    mass = heat.flatten(1).sum(dim=1)
    inside = (heat * region.float()).flatten(1).sum(dim=1)
    share = inside / mass
    share = share[mass > 0]
    return float(share.mean()) if share.numel() else float("nan")


def _check_batch(images: Any, what: str) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{what} must be a float tensor of images [B, C, H, W], got "
                         f"{type(images).__name__} {tuple(getattr(images, 'shape', ()))}")
    if images.shape[0] == 0:
        raise ValueError(f"{what} is empty")
    return images.detach()
