"""Activation layouts: how a layer's output maps onto rows of channel vectors.

Every tool that reads features (the capture job, SAEs, CAVs, attribution, feature
visualisation) sees an activation as ``[B, P, C]``: ``B`` samples, ``P`` positions (pixels of a
conv map, tokens of a transformer, or 1 for a flat vector) and ``C`` channels. One store row is
one ``C``-vector at one position (or one pooled vector per sample).

Layouts
    ``"nchw"``  conv maps ``[B, C, H, W]`` (positions are ``y * W + x``)
    ``"nhwc"``  channels-last maps ``[B, H, W, C]`` (timm ConvNeXt/Swin internals)
    ``"nlc"``   token maps ``[B, T, D]`` (positions are token indices, CLS first in timm ViTs)
    ``"nc"``    flat vectors ``[B, C]``
    ``"auto"``  by rank: 4 -> nchw, 3 -> nlc, 2 -> nc
"""
from __future__ import annotations

from typing import Literal

import torch

__all__ = [
    "LAYOUTS",
    "POOLINGS",
    "Layout",
    "Pooling",
    "as_position_rows",
    "pool_positions",
    "positions_to_map",
    "resolve_layout",
]

Layout = Literal["auto", "nchw", "nhwc", "nlc", "nc"]
Pooling = Literal["all", "mean", "max", "cls"]
LAYOUTS: tuple[str, ...] = ("auto", "nchw", "nhwc", "nlc", "nc")
POOLINGS: tuple[str, ...] = ("all", "mean", "max", "cls")
_RANK_OF = {"nchw": 4, "nhwc": 4, "nlc": 3, "nc": 2}


def resolve_layout(activation: torch.Tensor, layout: str = "auto") -> str:
    """The concrete layout of ``activation`` (``"auto"`` decided by rank)."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    if not isinstance(activation, torch.Tensor):
        raise TypeError(
            f"a feature reads a tensor activation, got {type(activation).__name__} (a layer that "
            "returns a tuple/dict: hook the submodule that produces the tensor you want)"
        )
    if layout == "auto":
        layout = {4: "nchw", 3: "nlc", 2: "nc"}.get(activation.dim(), "")
        if not layout:
            raise ValueError(
                f"cannot infer the layout of a {activation.dim()}-d activation {tuple(activation.shape)}; "
                "expected [B,C,H,W], [B,T,D] or [B,C] (pass layout= explicitly)"
            )
    elif activation.dim() != _RANK_OF[layout]:
        raise ValueError(
            f"layout {layout!r} expects a {_RANK_OF[layout]}-d activation, got shape {tuple(activation.shape)}"
        )
    return layout


def as_position_rows(activation: torch.Tensor, layout: str = "auto") -> tuple[torch.Tensor, tuple[int, ...]]:
    """``activation`` as ``[B, P, C]`` plus its spatial shape (``(H, W)``, ``(T,)`` or ``()``).

    A view where the layout allows it (``nhwc``, ``nlc``, ``nc``); ``nchw`` is permuted (no copy
    until the caller needs contiguous memory).
    """
    layout = resolve_layout(activation, layout)
    if layout == "nchw":
        b, c, h, w = activation.shape
        return activation.flatten(2).transpose(1, 2), (h, w)
    if layout == "nhwc":
        b, h, w, c = activation.shape
        return activation.reshape(b, h * w, c), (h, w)
    if layout == "nlc":
        return activation, (activation.shape[1],)
    return activation.unsqueeze(1), ()


def positions_to_map(values: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Per-position values ``[B, P]`` back to ``[B, *spatial]`` (``[B]`` for flat layers)."""
    if not spatial:
        return values.reshape(values.shape[0])
    return values.reshape(values.shape[0], *spatial)


def pool_positions(rows: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pool ``[B, P, C]`` rows over positions: ``all`` keeps them, ``mean``/``max`` reduce to one
    row per sample, ``cls`` keeps the first token (timm ViTs put CLS first)."""
    if pooling == "all":
        return rows
    if pooling == "mean":
        return rows.mean(dim=1, keepdim=True)
    if pooling == "max":
        return rows.amax(dim=1, keepdim=True)
    if pooling == "cls":
        return rows[:, :1]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")
