"""The Feature protocol: a scalar readout of a model's internals.

A feature names a layer (a dotted ``named_modules()`` path, or ``""`` for the model's output)
and turns that layer's activation into

* :meth:`Feature.readout`: a per-position map ``[B, *spatial]`` (``[B]`` for flat layers), and
* :meth:`Feature.value`: one number per sample ``[B]`` (the map reduced by ``reduce``).

Every method in mechlens (attribution, TCAV, feature visualisation, the atlas) takes features,
so "explain class 3", "explain channel 17 of layer4" and "explain SAE latent 123" are the same
call with a different feature.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from mechlens.features.layout import as_position_rows, pool_positions, positions_to_map

__all__ = [
    "OUTPUT",
    "REDUCTIONS",
    "Channel",
    "ClassLogit",
    "Direction",
    "Feature",
    "LayerEnergy",
    "LatentEncoder",
    "Neuron",
    "SAELatent",
    "reduce_map",
]

OUTPUT = ""  # the layer name of the model's output (logits)
REDUCTIONS = ("mean", "max", "sum")


def reduce_map(readout: torch.Tensor, reduce: str) -> torch.Tensor:
    """Reduce a per-position map ``[B, ...]`` to ``[B]``."""
    if readout.dim() == 1:
        return readout
    flat = readout.reshape(readout.shape[0], -1)
    if reduce == "mean":
        return flat.mean(dim=1)
    if reduce == "max":
        return flat.amax(dim=1)
    if reduce == "sum":
        return flat.sum(dim=1)
    raise ValueError(f"unknown reduce {reduce!r}; expected one of {', '.join(REDUCTIONS)}")


@runtime_checkable
class Feature(Protocol):
    """What every method accepts. ``layer`` is ``""`` for the model output."""

    layer: str

    @property
    def name(self) -> str:
        """Short display name, e.g. ``channel:layer4:17``."""
        ...

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        """Per-position map ``[B, *spatial]`` (or ``[B]``) from the layer's activation."""
        ...

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        """One value per sample, ``[B]``."""
        ...


class _FeatureBase:
    """Shared ``value`` (readout reduced) and ``repr``; subclasses are dataclasses."""

    layer: str
    reduce: str

    def readout(self, activation: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        return reduce_map(self.readout(activation), self.reduce)

    def __str__(self) -> str:
        return self.name  # type: ignore[attr-defined]


def _check_index(index: int, size: int, what: str, layer: str) -> None:
    if not -size <= index < size:
        where = f"layer {layer!r}" if layer else "the model output"
        raise IndexError(f"{what} index {index} is out of range: {where} has {size} {what}s")


@dataclass(frozen=True, eq=False)
class ClassLogit(_FeatureBase):
    """The logit (or ``log_softmax`` / ``softmax``) of class ``index`` at the model output."""

    index: int
    normalize: str | None = None  # None | "log_softmax" | "softmax"
    layer: str = OUTPUT
    reduce: str = "mean"

    @property
    def name(self) -> str:
        return f"class:{self.index}" + (f":{self.normalize}" if self.normalize else "")

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        if activation.dim() != 2:
            raise ValueError(
                f"ClassLogit reads [B, classes] logits, got shape {tuple(activation.shape)} from "
                f"{self.layer or 'the model output'}"
            )
        _check_index(self.index, activation.shape[1], "class", self.layer)
        if self.normalize == "log_softmax":
            activation = activation.log_softmax(dim=1)
        elif self.normalize == "softmax":
            activation = activation.softmax(dim=1)
        elif self.normalize is not None:
            raise ValueError(f"unknown normalize {self.normalize!r}; expected None, 'log_softmax' or 'softmax'")
        return activation[:, self.index]


@dataclass(frozen=True, eq=False)
class Channel(_FeatureBase):
    """Channel ``index`` of ``layer``: its map over positions; value = mean over positions."""

    layer: str
    index: int
    layout: str = "auto"
    reduce: str = "mean"

    @property
    def name(self) -> str:
        return f"channel:{self.layer}:{self.index}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
        _check_index(self.index, rows.shape[-1], "channel", self.layer)
        return positions_to_map(rows[..., self.index], spatial)


@dataclass(frozen=True, eq=False)
class Neuron(_FeatureBase):
    """Channel ``index`` at one position (``(y, x)`` for conv maps, ``(t,)`` for tokens)."""

    layer: str
    index: int
    position: tuple[int, ...]
    layout: str = "auto"
    reduce: str = "mean"

    @property
    def name(self) -> str:
        return f"neuron:{self.layer}:{self.index}:{','.join(map(str, self.position))}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
        _check_index(self.index, rows.shape[-1], "channel", self.layer)
        if len(self.position) != len(spatial):
            raise ValueError(
                f"neuron position {self.position} has {len(self.position)} coordinates but layer "
                f"{self.layer!r} has spatial shape {spatial}"
            )
        for coordinate, size in zip(self.position, spatial):
            if not 0 <= coordinate < size:
                raise IndexError(f"neuron position {self.position} is outside spatial shape {spatial}")
        flat = 0
        for coordinate, size in zip(self.position, spatial):
            flat = flat * size + coordinate
        return rows[:, flat, self.index]


@dataclass(frozen=True, eq=False)
class Direction(_FeatureBase):
    """Projection of the channel vector onto ``vector`` at every position (a CAV, a probe
    weight, a decoder row). ``pooling`` pools positions first (match how the direction was
    learnt: a CAV fitted on mean-pooled activations uses ``"mean"``)."""

    layer: str
    vector: torch.Tensor
    label: str = "direction"
    pooling: str = "all"
    layout: str = "auto"
    reduce: str = "mean"

    @property
    def name(self) -> str:
        return f"{self.label}:{self.layer}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
        vector = torch.as_tensor(self.vector).reshape(-1)
        if vector.numel() != rows.shape[-1]:
            raise ValueError(
                f"direction has {vector.numel()} dimensions but layer {self.layer!r} has {rows.shape[-1]} channels"
            )
        rows = pool_positions(rows, self.pooling, layer=self.layer)
        projected = rows @ vector.to(device=rows.device, dtype=rows.dtype)
        return positions_to_map(projected, spatial if self.pooling == "all" else ())


@runtime_checkable
class LatentEncoder(Protocol):
    """Anything that encodes channel vectors ``[N, d]`` into latents ``[N, width]`` (an SAE)."""

    def encode(self, x: torch.Tensor) -> torch.Tensor: ...


@dataclass(frozen=True, eq=False)
class SAELatent(_FeatureBase):
    """Latent ``index`` of a sparse autoencoder trained on ``layer``'s rows, per position.

    ``pooling`` must match the capture the SAE was trained on (``"all"`` for per-position rows,
    ``"mean"``/``"max"``/``"cls"`` for pooled rows).
    """

    layer: str
    sae: Any  # LatentEncoder; typed loosely so nn.Modules with extra methods pass mypy
    index: int
    pooling: str = "all"
    layout: str = "auto"
    reduce: str = "mean"
    source: str = field(default="", compare=False)  # path the SAE was loaded from, for names

    @property
    def name(self) -> str:
        return f"sae:{self.source or self.layer}:{self.index}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
        rows = pool_positions(rows, self.pooling, layer=self.layer)
        b, p, d = rows.shape
        latents = self.sae.encode(rows.reshape(b * p, d))
        _check_index(self.index, latents.shape[-1], "latent", self.layer)
        return positions_to_map(latents[:, self.index].reshape(b, p), spatial if self.pooling == "all" else ())


@dataclass(frozen=True, eq=False)
class LayerEnergy(_FeatureBase):
    """Mean squared activation of a whole layer (the DeepDream objective) per sample."""

    layer: str
    layout: str = "auto"
    reduce: str = "mean"

    @property
    def name(self) -> str:
        return f"layer:{self.layer}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
        return positions_to_map(rows.pow(2).mean(dim=-1), spatial)


def feature_layers(features: Sequence[Feature]) -> list[str]:
    """Distinct layers of ``features`` in first-seen order (``""`` = model output)."""
    seen: dict[str, None] = {}
    for feature in features:
        seen.setdefault(feature.layer, None)
    return list(seen)
