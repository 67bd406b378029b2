"""Interventions on features (see :mod:`mechlens.interventions`)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from mechlens._context import inferring_layouts
from mechlens.engine import HookSet, capture, eval_mode, unwrap
from mechlens.features.base import Channel, Direction, Neuron, SAELatent
from mechlens.features.layout import as_position_rows, infer_layouts, rows_to_layout
from mechlens.features.parse import as_feature
from mechlens.models.layers import get_module

__all__ = ["Intervention", "ablate", "clamp", "intervene", "intervened_forward", "patch", "scale", "steer"]

OPERATIONS = ("zero", "mean", "clamp", "scale", "add", "patch")


@dataclass
class Intervention:
    """Set ``feature``'s value ``v`` to ``op(v)``: ``zero`` (0), ``mean`` (``value``: the feature's
    mean value), ``clamp`` (``value``), ``scale`` (``value * v``), ``add`` (``v + value``: steering),
    ``patch`` (the value the feature takes on ``source`` images, sample by sample). ``mask``: only
    at these positions — a bool tensor ``[*spatial]`` or ``[B, *spatial]`` of the layer's map."""

    feature: Any
    op: str
    value: float | None = None
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.feature = as_feature(self.feature)
        if self.op not in OPERATIONS:
            raise ValueError(f"unknown intervention {self.op!r}; expected one of {', '.join(OPERATIONS)}")
        if not isinstance(self.feature, (Channel, Neuron, Direction, SAELatent)):
            raise TypeError(f"interventions edit a channel, a neuron, a direction or an SAE latent, not a "
                            f"{type(self.feature).__name__} ({self.feature.name})")
        if self.op in ("mean", "clamp", "scale", "add"):
            if self.value is None or not isinstance(self.value, (int, float)) or not math.isfinite(float(self.value)):
                raise ValueError(f"intervention {self.op!r} on {self.feature.name} needs a finite number, got {self.value!r}")
        if self.op == "patch" and not isinstance(self.source, torch.Tensor):
            raise ValueError(f"patching {self.feature.name} needs source images (a tensor like the model's input)")
        if isinstance(self.feature, SAELatent):
            trained_on = getattr(getattr(self.feature.sae, "config", None), "layer", "") or self.feature.layer
            if trained_on != self.feature.layer:
                raise ValueError(f"{self.feature.name}: the SAE was trained on layer {trained_on!r}, not {self.feature.layer!r}")
        if self.feature.layer == "":
            raise ValueError(f"{self.feature.name} is read at the model output; intervene on an internal layer")

    @property
    def layer(self) -> str:
        return self.feature.layer


def ablate(feature: Any, how: str = "zero", *, mean: float | None = None, mask: torch.Tensor | None = None) -> Intervention:
    """Switch ``feature`` off: to 0 (``how="zero"``) or to its mean value (``how="mean"``, ``mean=``)."""
    if how not in ("zero", "mean"):
        raise ValueError(f"ablate how={how!r}; expected 'zero' or 'mean' (pass the dataset mean as mean=)")
    return Intervention(feature, how, value=mean, mask=mask)


def clamp(feature: Any, value: float, *, mask: torch.Tensor | None = None) -> Intervention:
    """Hold ``feature`` at ``value``."""
    return Intervention(feature, "clamp", value=value, mask=mask)


def scale(feature: Any, factor: float, *, mask: torch.Tensor | None = None) -> Intervention:
    """Multiply ``feature`` by ``factor``."""
    return Intervention(feature, "scale", value=factor, mask=mask)


def steer(feature: Any, alpha: float, *, mask: torch.Tensor | None = None) -> Intervention:
    """Add ``alpha`` to ``feature`` (for a direction: ``alpha`` along it)."""
    return Intervention(feature, "add", value=alpha, mask=mask)


def patch(feature: Any, source: torch.Tensor, *, mask: torch.Tensor | None = None) -> Intervention:
    """Give ``feature`` on image ``i`` the value it takes on ``source[i]`` (activation patching)."""
    return Intervention(feature, "patch", source=source, mask=mask)


def _values(feature: Any, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """``feature``'s value at every position ``[B, P]`` of ``rows`` ``[B, P, C]`` (plus what the
    edit needs: the SAE latents and error)."""
    if isinstance(feature, (Channel, Neuron)):
        _check_channel(feature, rows.shape[-1])
        return rows[..., feature.index], None
    if isinstance(feature, Direction):
        vector = torch.as_tensor(feature.vector).reshape(-1).to(rows.device, rows.dtype)
        if vector.numel() != rows.shape[-1]:
            raise ValueError(f"direction {feature.name} has {vector.numel()} dimensions but layer {feature.layer!r} "
                             f"has {rows.shape[-1]} channels")
        return rows @ vector, vector
    b, p, c = rows.shape
    flat = rows.reshape(b * p, c)
    latents = feature.sae.encode(flat)
    if not -latents.shape[-1] <= feature.index < latents.shape[-1]:
        raise IndexError(f"latent {feature.index} is out of range: the SAE has {latents.shape[-1]} latents")
    return latents[:, feature.index].reshape(b, p), latents


def _check_channel(feature: Any, size: int) -> None:
    if not -size <= feature.index < size:
        raise IndexError(f"channel {feature.index} is out of range: layer {feature.layer!r} has {size} channels")


def _write(feature: Any, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor, extra: Any) -> torch.Tensor:
    """``rows`` with ``feature``'s value changed from ``old`` to ``new`` ([B, P]) and nothing else."""
    if isinstance(feature, (Channel, Neuron)):
        out = rows.clone()
        out[..., feature.index] = new
        return out
    if isinstance(feature, Direction):
        vector = extra
        return rows + ((new - old) / vector.dot(vector).clamp_min(1e-30)).unsqueeze(-1) * vector
    b, p, c = rows.shape
    latents = extra
    edited = latents.clone()
    edited[:, feature.index] = new.reshape(-1).to(edited.dtype)
    sae = feature.sae
    # the SAE's error term rides along: decode(z') + (x - decode(z)); identity edits give x back
    delta = sae.decode(edited) - sae.decode(latents)
    return rows + delta.reshape(b, p, c).to(rows.dtype)


def _position_mask(feature: Any, mask: torch.Tensor | None, spatial: tuple[int, ...], batch: int,
                   device: torch.device) -> torch.Tensor | None:
    positions = max(1, math.prod(spatial))
    if isinstance(feature, Neuron):
        if len(feature.position) != len(spatial):
            raise ValueError(f"neuron position {feature.position} does not fit layer {feature.layer!r} of shape {spatial}")
        only = torch.zeros(batch, positions, dtype=torch.bool, device=device)
        only[:, feature.flat_position(spatial)] = True
        mask = only if mask is None else only & _position_mask(Channel(feature.layer, 0), mask, spatial, batch, device)
        return mask
    if mask is None:
        return None
    mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
    if tuple(mask.shape) == tuple(spatial):
        return mask.reshape(1, positions).expand(batch, positions)
    if tuple(mask.shape) == (batch, *spatial):
        return mask.reshape(batch, positions)
    raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit layer {feature.layer!r}: expected {tuple(spatial)} "
                     f"or {(batch, *spatial)}")


class _LayerEdit:
    """The forward hook of one layer: applies its interventions in order to the layer's output."""

    def __init__(self, layer: str, interventions: list[Intervention], layout: Callable[[], str]) -> None:
        self.layer, self.interventions, self.layout = layer, interventions, layout
        self.sources: dict[int, torch.Tensor] = {}  # id(intervention) -> source values [B, P]
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if inferring_layouts():
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.layer!r} returns a {type(output).__name__}; interventions edit a tensor output")
        layout = self.layout()
        rows, spatial = as_position_rows(output, layout)
        for intervention in self.interventions:
            old, extra = _values(intervention.feature, rows)
            new = self._target(intervention, old)
            where = _position_mask(intervention.feature, intervention.mask, spatial, rows.shape[0], rows.device)
            if where is not None:
                new = torch.where(where, new, old)
            rows = _write(intervention.feature, rows, old, new, extra)
        self.calls += 1
        return rows_to_layout(rows, output, layout)

    def _target(self, intervention: Intervention, old: torch.Tensor) -> torch.Tensor:
        op, value = intervention.op, intervention.value
        if op == "zero":
            return torch.zeros_like(old)
        if op in ("mean", "clamp"):
            return torch.full_like(old, float(value))
        if op == "scale":
            return old * float(value)
        if op == "add":
            return old + float(value)
        source = self.sources[id(intervention)]
        if source.shape != old.shape:
            raise ValueError(f"patching {intervention.feature.name}: the source batch gives {tuple(source.shape)} "
                             f"values but the run has {tuple(old.shape)} (the same number of images, same size)")
        return source.to(old.dtype)


@contextlib.contextmanager
def intervene(model: Any, interventions: Intervention | Sequence[Intervention]) -> Iterator[dict[str, _LayerEdit]]:
    """Inside the block every forward of ``model``'s module runs with ``interventions`` applied
    (see the module docstring; you call the module on its own input, patch sources of a
    ``LoadedModel`` are pixels). Yields the per-layer edits (``edits[layer].calls``: forwards that used it).
    A layer that never ran inside the block is an error on exit; hooks never outlive the block."""
    net, to_model_input = _input_space(model)
    chosen = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    if not chosen:
        raise ValueError("intervene needs at least one intervention")
    by_layer: dict[str, list[Intervention]] = {}
    for intervention in chosen:
        by_layer.setdefault(intervention.layer, []).append(intervention)
    latest: dict[str, torch.Tensor] = {}
    known: dict[str, str] = {}

    def remember(module: nn.Module, args: Any) -> None:
        if not inferring_layouts() and args and isinstance(args[0], torch.Tensor):
            latest["inputs"] = args[0]

    def layout_of(layer: str) -> Callable[[], str]:
        def resolve() -> str:
            if layer not in known:
                explicit = {getattr(i.feature, "layout", "auto") for i in by_layer[layer]} - {"auto"}
                if len(explicit) > 1:
                    raise ValueError(f"interventions on layer {layer!r} disagree on its layout: {sorted(explicit)}")
                given = explicit.pop() if explicit else None
                known[layer] = infer_layouts(net, [layer], latest["inputs"].detach(), layout=given)[layer].layout
            return known[layer]
        return resolve

    edits = {layer: _LayerEdit(layer, items, layout_of(layer)) for layer, items in by_layer.items()}
    patches = [i for i in chosen if i.op == "patch"]
    if patches:
        _record_sources(net, patches, edits, to_model_input)
    completed = False
    with HookSet() as hooks:
        hooks.pre(net, remember)
        for layer, edit in edits.items():
            # first among the layer's hooks: every reader (a capture entered earlier too) sees the edit
            hooks.forward(get_module(net, layer), edit, prepend=True)
        yield edits
        completed = True
    if completed:
        silent = [layer for layer, edit in edits.items() if edit.calls == 0]
        if silent and any(edit.calls for edit in edits.values()):
            raise RuntimeError(f"layer(s) {', '.join(silent)} did not run during the forward, so nothing was intervened "
                               "there (an unused module or a branch the forward skips)")


def _input_space(model: Any) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor]]:
    """The module, and how images become its input: a ``LoadedModel`` takes pixels in ``[0, 1]``
    and normalizes them (the house's one input space); a plain module takes its own input."""
    net = unwrap(model)
    preprocessing = getattr(model, "preprocessing", None) if net is not model else None
    return net, (preprocessing.normalize if preprocessing is not None else (lambda x: x))


def _record_sources(net: nn.Module, patches: list[Intervention], edits: dict[str, _LayerEdit],
                    to_model_input: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """The values each patched feature takes on its source images (one clean forward per source)."""
    by_source: dict[int, list[Intervention]] = {}
    for intervention in patches:
        by_source.setdefault(id(intervention.source), []).append(intervention)
    for group in by_source.values():
        source = to_model_input(group[0].source)
        layers = list(dict.fromkeys(i.layer for i in group))
        known = infer_layouts(net, layers, source[:1])
        with eval_mode(net), torch.no_grad(), capture(net, layers) as cap:
            net(source)
            for intervention in group:
                rows, _ = as_position_rows(cap[intervention.layer], known[intervention.layer].layout)
                values, _ = _values(intervention.feature, rows)
                edits[intervention.layer].sources[id(intervention)] = values


def intervened_forward(model: Any, inputs: torch.Tensor, interventions: Intervention | Sequence[Intervention]) -> Any:
    """``model(inputs)`` with ``interventions`` applied (the function form of :func:`intervene`).
    For a ``LoadedModel`` ``inputs`` (and patch sources) are pixels in ``[0, 1]``."""
    net, to_model_input = _input_space(model)
    with intervene(model, interventions) as edits:
        output = net(to_model_input(inputs))
    silent = [layer for layer, edit in edits.items() if edit.calls == 0]
    if silent:
        raise RuntimeError(f"layer(s) {', '.join(silent)} did not run during the forward, so nothing was intervened "
                           "there (an unused module or a branch the forward skips)")
    return output
