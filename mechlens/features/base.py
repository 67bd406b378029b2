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
from typing import Any, Callable, Hashable, Iterable, Protocol, Sequence, runtime_checkable

import torch

from mechlens.features.layout import as_position_rows, pool_positions, positions_to_map, resolve_layout

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


def cached_index(cache: dict | None, key: Hashable, values: Callable[[], Iterable[int]], device: torch.device) -> torch.Tensor:
    """A long tensor of ``values()`` on ``device``, built once per ``cache`` (a batched read
    repeated every optimisation step copies nothing from the host after the first)."""
    if cache is None:
        return torch.tensor(list(values()), device=device, dtype=torch.long)
    full = (key, device)
    tensor = cache.get(full)
    if tensor is None:
        tensor = cache[full] = torch.tensor(list(values()), device=device, dtype=torch.long)
    return tensor


def check_indices(indices: Iterable[int], size: int, what: str, layer: str) -> None:
    """Every index addresses one of ``size`` channels/classes/latents (negative ones count back)."""
    for index in indices:
        _check_index(index, size, what, layer)


def read_loop(features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None) -> torch.Tensor:
    """``[G]``: ``features[g]`` on sample ``samples[g]`` (sample ``g`` when ``samples`` is None),
    one read per sample: the batched read of a kind that has no faster one."""
    x = activation if samples is None else activation[samples]
    return torch.stack([f.value(x[g:g + 1]).reshape(()) for g, f in enumerate(features)])


class _FeatureBase:
    """Shared ``value`` (readout reduced), batched reads and ``repr``; subclasses are dataclasses.

    Batched reads: features whose :meth:`batch_key` is equal are read together by one call of
    their class's :meth:`read_diagonal` (feature ``g`` on sample ``g``: featvis renders one image
    per feature, the atlas scores one exemplar per feature). The default reads one sample at a
    time; a kind overrides both methods to read a whole group with one tensor op — built-in and
    third-party kinds alike (see ``docs/extending.md``).
    """

    layer: str
    reduce: str

    def readout(self, activation: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        return reduce_map(self.readout(activation), self.reduce)

    def batch_key(self) -> Hashable:
        """Features with equal keys are read by one :meth:`read_diagonal` call."""
        return (type(self), self.layer)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        """``[G]``: ``features[g]`` (all of one :meth:`batch_key`) on sample ``samples[g]`` of
        ``activation`` (sample ``g`` when ``samples`` is None). ``cache``: a dict the caller keeps
        for the same group across calls (constant index tensors live there)."""
        return read_loop(features, activation, samples)

    def __str__(self) -> str:
        return self.name  # type: ignore[attr-defined]


FeatureBase = _FeatureBase  # the public base of feature kinds (built-in and third-party)


def _check_index(index: int, size: int, what: str, layer: str) -> None:
    if not -size <= index < size:
        where = f"layer {layer!r}" if layer else "the model output"
        raise IndexError(f"{what} index {index} is out of range: {where} has {size} {what}s")


def _normalized(logits: torch.Tensor, normalize: str | None) -> torch.Tensor:
    if normalize == "log_softmax":
        return logits.log_softmax(dim=1)
    if normalize == "softmax":
        return logits.softmax(dim=1)
    if normalize is not None:
        raise ValueError(f"unknown normalize {normalize!r}; expected None, 'log_softmax' or 'softmax'")
    return logits


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
        return _normalized(activation, self.normalize)[:, self.index]

    def batch_key(self) -> Hashable:
        return (ClassLogit, self.layer, self.normalize)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        first, device = features[0], activation.device
        logits = activation if samples is None else activation[samples]
        if logits.dim() != 2:
            raise ValueError(f"ClassLogit reads [B, classes] logits, got shape {tuple(logits.shape)}")
        logits = _normalized(logits, first.normalize)
        check_indices([f.index for f in features], logits.shape[1], "class", first.layer)
        rows = cached_index(cache, "arange", lambda: range(len(features)), device)
        return logits[rows, cached_index(cache, "index", lambda: [f.index for f in features], device)]

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

    def batch_key(self) -> Hashable:
        return (Channel, self.layer, self.layout, self.reduce)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        first, device = features[0], activation.device
        which = samples if samples is not None else cached_index(cache, "arange", lambda: range(len(features)), device)
        index = cached_index(cache, "index", lambda: [f.index for f in features], device)
        layout = resolve_layout(activation, first.layout, layer=first.layer)
        if layout == "nchw":
            check_indices([f.index for f in features], activation.shape[1], "channel", first.layer)
            return reduce_map(activation[which, index], first.reduce)  # [G, H, W]: a gather, no copy
        rows, spatial = as_position_rows(activation, layout)
        check_indices([f.index for f in features], rows.shape[-1], "channel", first.layer)
        return reduce_map(positions_to_map(rows[which, :, index], spatial), first.reduce)

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
        return rows[:, self.flat_position(spatial), self.index]

    def batch_key(self) -> Hashable:
        return (Neuron, self.layer, self.layout)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        first, device = features[0], activation.device
        rows, spatial = as_position_rows(activation, first.layout, layer=first.layer)
        check_indices([f.index for f in features], rows.shape[-1], "channel", first.layer)
        which = samples if samples is not None else cached_index(cache, "arange", lambda: range(len(features)), device)
        flat = cached_index(cache, ("position", spatial), lambda: [f.flat_position(spatial) for f in features], device)
        return rows[which, flat, cached_index(cache, "index", lambda: [f.index for f in features], device)]

    def flat_position(self, spatial: tuple[int, ...]) -> int:
        """The row index of this neuron's position in a map of shape ``spatial``."""
        if len(self.position) != len(spatial) or any(not 0 <= p < n for p, n in zip(self.position, spatial)):
            raise IndexError(f"neuron position {self.position} is outside spatial shape {spatial} of {self.layer!r}")
        flat = 0
        for coordinate, size in zip(self.position, spatial):
            flat = flat * size + coordinate
        return flat

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

    def batch_key(self) -> Hashable:
        return (Direction, self.layer, self.layout, self.pooling, self.reduce)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        first = features[0]
        rows, spatial = as_position_rows(activation, first.layout, layer=first.layer)
        rows = pool_positions(rows if samples is None else rows[samples], first.pooling, layer=first.layer)
        key = ("vectors", rows.device, rows.dtype)
        vectors = cache.get(key) if cache is not None else None
        if vectors is None:
            vectors = torch.stack([torch.as_tensor(f.vector).reshape(-1) for f in features]).to(rows.device, rows.dtype)
            if cache is not None:
                cache[key] = vectors
        if vectors.shape[1] != rows.shape[-1]:
            raise ValueError(
                f"direction has {vectors.shape[1]} dimensions but layer {first.layer!r} has {rows.shape[-1]} channels"
            )
        projected = torch.einsum("gpc,gc->gp", rows, vectors)
        return reduce_map(positions_to_map(projected, spatial if first.pooling == "all" else ()), first.reduce)

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

    def batch_key(self) -> Hashable:
        return (SAELatent, self.layer, id(self.sae), self.layout, self.pooling, self.reduce)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        first, device = features[0], activation.device
        rows, spatial = as_position_rows(activation, first.layout, layer=first.layer)
        rows = pool_positions(rows if samples is None else rows[samples], first.pooling, layer=first.layer)
        g, p, d = rows.shape
        latents = first.sae.encode(rows.reshape(g * p, d))  # one encode for the whole group
        check_indices([f.index for f in features], latents.shape[-1], "latent", first.layer)
        picked = latents.reshape(g, p, -1)[cached_index(cache, "arange", lambda: range(g), device), :,
                                           cached_index(cache, "index", lambda: [f.index for f in features], device)]
        return reduce_map(positions_to_map(picked, spatial if first.pooling == "all" else ()), first.reduce)

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

    def batch_key(self) -> Hashable:
        return (LayerEnergy, self.layer, self.layout, self.reduce)

    @classmethod
    def read_diagonal(cls, features: Sequence[Any], activation: torch.Tensor, samples: torch.Tensor | None = None,
                      cache: dict | None = None) -> torch.Tensor:
        return features[0].value(activation if samples is None else activation[samples])  # same for every member

def feature_layers(features: Sequence[Feature]) -> list[str]:
    """Distinct layers of ``features`` in first-seen order (``""`` = model output)."""
    seen: dict[str, None] = {}
    for feature in features:
        seen.setdefault(feature.layer, None)
    return list(seen)
