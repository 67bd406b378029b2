"""Vision-transformer attention: per-head attention maps and attention rollout (timm ViTs).

timm's ``Attention`` computes ``F.scaled_dot_product_attention`` when ``fused_attn`` is set (the
default), so the attention probabilities never exist as a tensor and a hook on ``attn_drop``
sees nothing. :func:`unfused_attention` switches every module with a ``fused_attn`` flag to
the explicit ``softmax(q k^T) -> attn_drop -> @ v`` path for the duration of the call (same
numbers up to float rounding) and restores each flag afterwards, also on error;
:func:`attention_maps` hooks ``attn_drop`` to read the probabilities ``[B, heads, T, T]``.

Attention maps are class-agnostic: they do not depend on the explained feature (the target is
recorded but unused). For a feature-specific ViT map use Grad-CAM on patch tokens
(``gradcam(model, x, target, layer=vit_cam_layer(model))``).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mechlens.engine import HookSet, unwrap
from mechlens.attribution.base import (
    Attribution,
    check_images,
    eval_mode,
    token_grid,
    register_method,
    resolve_target,
)
from mechlens.models.layers import match_layer_pattern

__all__ = ["AttentionMaps", "attention_maps", "attention_modules", "attention_rollout", "unfused_attention"]


def attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every timm-style attention module (has ``fused_attn`` and an
    ``attn_drop`` submodule), in forward order."""
    found = [
        (name, module) for name, module in model.named_modules()
        if hasattr(module, "fused_attn") and isinstance(getattr(module, "attn_drop", None), nn.Module)
    ]
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no timm-style attention modules (with fused_attn and attn_drop); "
            "attention maps and rollout support timm vision transformers"
        )
    return found


@contextmanager
def unfused_attention(model: nn.Module) -> Iterator[list[str]]:
    """Set ``fused_attn = False`` on every module that has the flag; restore on exit."""
    saved = [(module, module.fused_attn) for module in model.modules() if hasattr(module, "fused_attn")]
    try:
        for module, _ in saved:
            module.fused_attn = False
        yield [type(m).__name__ for m, _ in saved]
    finally:
        for module, flag in saved:
            module.fused_attn = flag


class _AttnHook:
    def __init__(self, store: dict[str, torch.Tensor], name: str) -> None:
        self.store = store
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        self.store[self.name] = args[0].detach()


@dataclass
class AttentionMaps:
    """Attention probabilities ``attentions`` ``[B, L, heads, T, T]`` of ``layers`` (rows:
    queries, columns: keys; each row sums to 1), with the ``num_prefix_tokens`` (CLS/register
    tokens first) and the patch ``grid``."""

    layers: list[str]
    attentions: torch.Tensor
    num_prefix_tokens: int
    grid: tuple[int, int]

    def token_map(self, rows: torch.Tensor) -> torch.Tensor:
        """``[..., T]`` attention over keys -> ``[..., h, w]`` over the patch grid."""
        patches = rows[..., self.num_prefix_tokens :]
        return patches.reshape(*patches.shape[:-1], *self.grid)

    def cls_maps(self, layer: int = -1) -> torch.Tensor:
        """Per-head attention of the CLS token (or, without prefix tokens, the mean query) to
        every patch, ``[B, heads, h, w]``."""
        attn = self.attentions[:, layer]
        query = attn[..., 0, :] if self.num_prefix_tokens > 0 else attn.mean(dim=-2)
        return self.token_map(query)


def attention_maps(model: Any, inputs: torch.Tensor, *, layers: str | Sequence[str] | None = None) -> AttentionMaps:
    """Run ``model`` once and return the attention probabilities of its attention modules (all
    of them, or those matching the names / glob patterns in ``layers``)."""
    model = unwrap(model)
    inputs = check_images(inputs)
    modules = attention_modules(model)
    if layers is not None:
        patterns = [layers] if isinstance(layers, str) else list(layers)
        chosen = [(n, m) for n, m in modules if any(n == p or match_layer_pattern(p, n) for p in patterns)]
        if not chosen:
            raise ValueError(f"no attention module matches {patterns}; attention modules: {', '.join(n for n, _ in modules[:6])} ...")
        modules = chosen
    store: dict[str, torch.Tensor] = {}
    with unfused_attention(model), eval_mode(model), torch.no_grad(), HookSet() as hooks:
        for name, module in modules:
            hooks.forward(module.attn_drop, _AttnHook(store, name))
        model(inputs)
    missing = [n for n, _ in modules if n not in store]
    if missing:
        raise RuntimeError(
            f"no attention probabilities were captured from {', '.join(missing[:4])}: the module did not run its "
            "explicit softmax path (a custom attention that ignores fused_attn?)"
        )
    attentions = torch.stack([store[n] for n, _ in modules], dim=1)
    tokens = attentions.shape[-1]
    declared = getattr(model, "num_prefix_tokens", None)
    prefix, grid = token_grid(model, "the attention maps", tokens, declared if isinstance(declared, int) else None,
                              None, tuple(inputs.shape[-2:]))
    return AttentionMaps([n for n, _ in modules], attentions, prefix, grid)


def attention_rollout(
    attentions: torch.Tensor | AttentionMaps,
    *,
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    residual: bool = True,
) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): fuse heads (``mean`` | ``max`` | ``min``),
    optionally zero the lowest ``discard_ratio`` of each layer's entries (never the
    diagonal), add the identity for the residual stream (``0.5 A + 0.5 I``), renormalise rows,
    and multiply the layers from the input up. Returns ``[B, T, T]`` whose rows sum to 1."""
    attn = attentions.attentions if isinstance(attentions, AttentionMaps) else attentions
    if attn.dim() != 5:
        raise ValueError(f"expected attentions [B, layers, heads, T, T], got {tuple(attn.shape)}")
    if head_fusion == "mean":
        fused = attn.mean(dim=2)
    elif head_fusion == "max":
        fused = attn.amax(dim=2)
    elif head_fusion == "min":
        fused = attn.amin(dim=2)
    else:
        raise ValueError(f"unknown head_fusion {head_fusion!r}; expected mean, max or min")
    fused = fused.double()
    batch, n_layers, tokens, _ = fused.shape
    eye = torch.eye(tokens, dtype=fused.dtype, device=fused.device)
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError("discard_ratio must be in [0, 1)")
    if discard_ratio > 0:
        flat = fused.flatten(2)
        k = int(flat.shape[-1] * discard_ratio)
        if k > 0:
            threshold = flat.kthvalue(k, dim=-1, keepdim=True).values
            keep = (flat > threshold) | eye.flatten().bool()
            fused = (flat * keep).view_as(fused)
    result = eye.expand(batch, tokens, tokens).clone()
    for layer in range(n_layers):
        a = fused[:, layer]
        if residual:
            a = 0.5 * a + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result.to(attn.dtype)


def _attention_result(name: str, amap: torch.Tensor, target: Any, inputs: torch.Tensor, values: torch.Tensor, **extras: Any) -> Attribution:
    return Attribution(
        map=amap, method=name, features=target.names, values=values, kind="layer",
        input_shape=tuple(inputs.shape), extras={"class_agnostic": True, **extras},
    )


def _values(model: nn.Module, inputs: torch.Tensor, target: Any) -> torch.Tensor:
    from mechlens.attribution.base import feature_values

    with eval_mode(model):
        return feature_values(model, inputs, target)


@register_method("attention", kind="layer", family="attention", randomization="n/a", aliases=("attention_map",))
def attention(model: Any, inputs: torch.Tensor, target: Any = None, *, block: int = -1, head: int | None = None) -> Attribution:
    """Attention of the CLS token to each patch at ``block`` (default the last), averaged over
    heads or of one ``head``; per-head maps in ``extras["heads"]`` ``[B, heads, h, w]``.
    Class-agnostic (the target is not used by the map)."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    maps = attention_maps(model, inputs)
    heads = maps.cls_maps(block)
    amap = heads.mean(dim=1) if head is None else heads[:, head]
    return _attention_result("attention", amap, target, inputs, _values(model, inputs, target),
                             heads=heads, layer=maps.layers[block])


@register_method("rollout", kind="layer", family="attention", randomization="n/a", aliases=("attention_rollout",))
def rollout(
    model: Any, inputs: torch.Tensor, target: Any = None, *, head_fusion: str = "mean", discard_ratio: float = 0.0,
) -> Attribution:
    """Attention rollout of the CLS token over the patches (:func:`attention_rollout`); the
    rollout matrix ``[B, T, T]`` is in ``extras["rollout"]``. Class-agnostic."""
    model = unwrap(model)
    inputs = check_images(inputs)
    target = resolve_target(model, inputs, target)
    maps = attention_maps(model, inputs)
    joint = attention_rollout(maps, head_fusion=head_fusion, discard_ratio=discard_ratio)
    query = joint[:, 0] if maps.num_prefix_tokens > 0 else joint.mean(dim=1)
    return _attention_result("rollout", maps.token_map(query), target, inputs, _values(model, inputs, target),
                             rollout=joint, layers=len(maps.layers))
