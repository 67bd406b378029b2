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

__all__ = ["Intervention", "ablate", "clamp", "decoder_directions", "intervene", "intervened_forward", "patch", "scale",
           "steer"]

OPERATIONS = ("zero", "mean", "resample", "clamp", "scale", "add", "patch")
SPACES = ("latent", "decoder")
# a span of several directions has coordinates but no natural "value" to clamp or add to
SPAN_OPERATIONS = ("zero", "resample", "scale", "patch")


@dataclass
class Intervention:
    """Set ``feature``'s value ``v`` to ``op(v)``: ``zero`` (0), ``mean`` (``value``: the feature's
    mean value), ``resample`` (its value on another image of the batch: image ``i`` takes image
    ``(i - s) % B``'s, ``s`` in ``[1, B)`` drawn from the seed ``value``), ``clamp`` (``value``),
    ``scale`` (``value * v``), ``add`` (``v + value``: steering), ``patch`` (the value the feature takes on ``source`` images, sample by sample). ``mask``: only
    at these positions — a bool tensor ``[*spatial]`` or ``[B, *spatial]`` of the layer's map.

    ``feature`` may be a list of features of one layer, edited together: SAE latents of one SAE
    share one encoding (the latents are edited side by side, then decoded once); several
    directions are edited as the span they open (orthonormal coordinates). ``space`` (SAE latents
    only): ``"latent"`` edits the latents and keeps the SAE's error term (identity is exact);
    ``"decoder"`` edits the activation along the latents' decoder directions, error term
    included — what an SAE reconstructs poorly (rare inputs) is edited too."""

    feature: Any
    op: str
    value: float | None = None
    source: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    space: str = "latent"

    def __post_init__(self) -> None:
        members = [as_feature(f) for f in self.feature] if isinstance(self.feature, (list, tuple)) else [as_feature(self.feature)]
        if not members:
            raise ValueError("an intervention needs at least one feature")
        self.feature = members[0] if len(members) == 1 else tuple(members)
        if self.op not in OPERATIONS:
            raise ValueError(f"unknown intervention {self.op!r}; expected one of {', '.join(OPERATIONS)}")
        if self.space not in SPACES:
            raise ValueError(f"unknown space {self.space!r}; expected one of {', '.join(SPACES)}")
        for feature in members:
            if not isinstance(feature, (Channel, Neuron, Direction, SAELatent)):
                raise TypeError(f"interventions edit a channel, a neuron, a direction or an SAE latent, not a "
                                f"{type(feature).__name__} ({feature.name})")
            if isinstance(feature, SAELatent):
                trained_on = getattr(getattr(feature.sae, "config", None), "layer", "") or feature.layer
                if trained_on != feature.layer:
                    raise ValueError(f"{feature.name}: the SAE was trained on layer {trained_on!r}, not {feature.layer!r}")
            if feature.layer == "":
                raise ValueError(f"{feature.name} is read at the model output; intervene on an internal layer")
        if len({f.layer for f in members}) > 1:
            raise ValueError(f"features edited together must share a layer, got {sorted({f.layer for f in members})}")
        kinds = {_kind(f) for f in members}
        if len(kinds) > 1:
            raise ValueError("features edited together must be of one kind (channels/neurons, directions, or latents of one SAE)")
        if self.space == "decoder" and kinds != {"latent"}:
            raise ValueError("space='decoder' is for SAE latents (it edits along their decoder directions)")
        if kinds == {"latent"} and len({id(f.sae) for f in members}) > 1:
            raise ValueError("SAE latents edited together must come from one SAE")
        if self.is_span and len(members) > 1 and self.op not in SPAN_OPERATIONS:
            raise ValueError(f"{self.op!r} on several directions at once is ambiguous; use one of {', '.join(SPAN_OPERATIONS)} "
                             "or one intervention per direction")
        if self.op == "resample" and (not isinstance(self.value, int) or isinstance(self.value, bool)):
            raise ValueError(f"resample ablation of {self.name} needs an integer seed, got {self.value!r}")
        if self.op in ("mean", "clamp", "scale", "add"):
            self.value = _finite_values(self.value, len(members), f"intervention {self.op!r} on {self.name}")
        if self.op == "patch" and not isinstance(self.source, torch.Tensor):
            raise ValueError(f"patching {self.name} needs source images (a tensor like the model's input)")

    @property
    def members(self) -> tuple[Any, ...]:
        return self.feature if isinstance(self.feature, tuple) else (self.feature,)

    @property
    def layer(self) -> str:
        return self.members[0].layer

    @property
    def name(self) -> str:
        names = [f.name for f in self.members]
        return names[0] if len(names) == 1 else f"{names[0]}+{len(names) - 1} more"

    @property
    def is_span(self) -> bool:
        """Edited as coordinates along directions of the activation (directions, decoder space)."""
        return isinstance(self.members[0], Direction) or self.space == "decoder"


def _finite_values(value: Any, count: int, what: str) -> float | torch.Tensor:
    """A finite number, or (for several features) one finite number per feature."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(float(value)):
        return float(value)
    if isinstance(value, (torch.Tensor, list, tuple)) and not isinstance(value, bool):
        values = torch.as_tensor(value, dtype=torch.float64).reshape(-1)
        if values.numel() == count and bool(torch.isfinite(values).all()):
            return values if count > 1 else float(values[0])
        if values.numel() != count:
            raise ValueError(f"{what} needs {count} value(s), one per feature, got {values.numel()}")
    raise ValueError(f"{what} needs a finite number, got {value!r}")


def _kind(feature: Any) -> str:
    return "channel" if isinstance(feature, (Channel, Neuron)) else "direction" if isinstance(feature, Direction) else "latent"


def ablate(feature: Any, how: str = "zero", *, mean: float | None = None, seed: int = 0, mask: torch.Tensor | None = None,
           space: str = "latent") -> Intervention:
    """Switch ``feature`` (or a list of features) off: to 0 (``how="zero"``), to its mean value
    (``how="mean"``, ``mean=``), or to its value on another image of the batch
    (``how="resample"``, seeded: a resampling ablation keeps the feature's distribution)."""
    if how not in ("zero", "mean", "resample"):
        raise ValueError(f"ablate how={how!r}; expected 'zero', 'mean' (pass the dataset mean as mean=) or 'resample'")
    if how == "resample":
        return Intervention(feature, how, value=int(seed), mask=mask, space=space)
    return Intervention(feature, how, value=mean, mask=mask, space=space)


def clamp(feature: Any, value: float, *, mask: torch.Tensor | None = None, space: str = "latent") -> Intervention:
    """Hold ``feature`` at ``value``."""
    return Intervention(feature, "clamp", value=value, mask=mask, space=space)


def scale(feature: Any, factor: float, *, mask: torch.Tensor | None = None, space: str = "latent") -> Intervention:
    """Multiply ``feature`` by ``factor``."""
    return Intervention(feature, "scale", value=factor, mask=mask, space=space)


def steer(feature: Any, alpha: float, *, mask: torch.Tensor | None = None, space: str = "latent") -> Intervention:
    """Add ``alpha`` to ``feature`` (for a direction: ``alpha`` along it)."""
    return Intervention(feature, "add", value=alpha, mask=mask, space=space)


def patch(feature: Any, source: torch.Tensor, *, mask: torch.Tensor | None = None, space: str = "latent") -> Intervention:
    """Give ``feature`` on image ``i`` the value it takes on ``source[i]`` (activation patching)."""
    return Intervention(feature, "patch", source=source, mask=mask, space=space)


def decoder_directions(sae: Any, indices: Sequence[int]) -> torch.Tensor:
    """``[len(indices), d_in]``: each latent's direction in the layer's own space
    (``decode(e_i) - decode(0)``, so an SAE's input normalization is undone)."""
    with torch.no_grad():
        width = int(getattr(sae, "width", 0)) or sae.encode(torch.zeros(1, sae.d_in)).shape[-1]
        for i in indices:
            if not -width <= int(i) < width:
                raise IndexError(f"latent {i} is out of range: the SAE has {width} latents")
        device = next(sae.parameters()).device
        unit = torch.zeros(len(indices), width, device=device)
        unit[torch.arange(len(indices)), torch.as_tensor([int(i) for i in indices])] = 1.0
        return sae.decode(unit) - sae.decode(torch.zeros(1, width, device=device))


class _Edit:
    """How one intervention reads its features' values ``[B, P, n]`` from rows ``[B, P, C]`` and
    writes new values back, leaving everything else as it was."""

    def __init__(self, intervention: Intervention, channels: int, device: torch.device, dtype: torch.dtype) -> None:
        members = intervention.members
        self.intervention = intervention
        self.kind = "span" if intervention.is_span else _kind(members[0])
        if self.kind == "channel":
            for feature in members:
                _check_channel(feature, channels)
            self.index = torch.as_tensor([f.index for f in members], device=device)
        elif self.kind == "latent":
            self.sae = members[0].sae
            self.index = torch.as_tensor([f.index for f in members], device=device)
        else:
            if isinstance(members[0], SAELatent):
                vectors = decoder_directions(members[0].sae, [f.index for f in members]).to(device, dtype)
            else:
                vectors = torch.stack([torch.as_tensor(f.vector).reshape(-1).to(device, dtype) for f in members])
            if vectors.shape[-1] != channels:
                raise ValueError(f"direction {intervention.name} has {vectors.shape[-1]} dimensions but layer "
                                 f"{intervention.layer!r} has {channels} channels")
            if len(members) == 1 and not isinstance(members[0], SAELatent):
                # one direction keeps its own units: the value is rows @ vector
                self.basis, self.dual = vectors.T, vectors.T / vectors.pow(2).sum().clamp_min(1e-30)
            else:
                basis, _ = torch.linalg.qr(vectors.T.double())
                self.basis = self.dual = basis.to(dtype)

    def values(self, rows: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if self.kind == "channel":
            return rows[..., self.index], None
        if self.kind == "span":
            return rows @ self.basis, None
        b, p, c = rows.shape
        latents = self.sae.encode(rows.reshape(b * p, c))
        width = latents.shape[-1]
        if bool(((self.index < -width) | (self.index >= width)).any()):
            raise IndexError(f"latent {self.index.tolist()} is out of range: the SAE has {width} latents")
        return latents[:, self.index].reshape(b, p, -1), latents

    def write(self, rows: torch.Tensor, old: torch.Tensor, new: torch.Tensor, latents: Any) -> torch.Tensor:
        if self.kind == "channel":
            out = rows.clone()
            out[..., self.index] = new.to(rows.dtype)
            return out
        if self.kind == "span":
            return rows + (new - old).to(rows.dtype) @ self.dual.T
        b, p, c = rows.shape
        edited = latents.clone()
        edited[:, self.index] = new.reshape(b * p, -1).to(edited.dtype)
        # the SAE's error term rides along: decode(z') + (x - decode(z)); identity edits give x back
        delta = self.sae.decode(edited) - self.sae.decode(latents)
        return rows + delta.reshape(b, p, c).to(rows.dtype)


def _check_channel(feature: Any, size: int) -> None:
    if not -size <= feature.index < size:
        raise IndexError(f"channel {feature.index} is out of range: layer {feature.layer!r} has {size} channels")


def _position_mask(intervention: Intervention, spatial: tuple[int, ...], batch: int,
                   device: torch.device) -> torch.Tensor | None:
    """``[B, P, n]`` (or None: everywhere): where each of the intervention's features is edited."""
    positions = max(1, math.prod(spatial))
    members, mask = intervention.members, intervention.mask
    region = None
    if mask is not None:
        mask = torch.as_tensor(mask, dtype=torch.bool, device=device)
        if tuple(mask.shape) == tuple(spatial):
            region = mask.reshape(1, positions).expand(batch, positions)
        elif tuple(mask.shape) == (batch, *spatial):
            region = mask.reshape(batch, positions)
        else:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit layer {intervention.layer!r}: expected "
                             f"{tuple(spatial)} or {(batch, *spatial)}")
    if not any(isinstance(f, Neuron) for f in members):
        return None if region is None else region.unsqueeze(-1)
    where = torch.zeros(batch, positions, len(members), dtype=torch.bool, device=device)
    for j, feature in enumerate(members):
        if isinstance(feature, Neuron):
            if len(feature.position) != len(spatial):
                raise ValueError(f"neuron position {feature.position} does not fit layer {feature.layer!r} of shape {spatial}")
            where[:, feature.flat_position(spatial), j] = True
        else:
            where[..., j] = True
    return where if region is None else where & region.unsqueeze(-1)


class _LayerEdit:
    """The forward hook of one layer: applies its interventions in order to the layer's output."""

    def __init__(self, layer: str, interventions: list[Intervention], layout: Callable[[], str]) -> None:
        self.layer, self.interventions, self.layout = layer, interventions, layout
        self.sources: dict[int, torch.Tensor] = {}  # id(intervention) -> source values [B, P, n]
        self.compiled: dict[Any, _Edit] = {}
        self.calls = 0

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if inferring_layouts():
            return None
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.layer!r} returns a {type(output).__name__}; interventions edit a tensor output")
        layout = self.layout()
        rows, spatial = as_position_rows(output, layout)
        for intervention in self.interventions:
            edit = self.edit_of(intervention, rows)
            old, latents = edit.values(rows)
            new = self._target(intervention, old)
            where = _position_mask(intervention, spatial, rows.shape[0], rows.device)
            if where is not None:
                new = torch.where(where, new, old)
            rows = edit.write(rows, old, new, latents)
        self.calls += 1
        return rows_to_layout(rows, output, layout)

    def edit_of(self, intervention: Intervention, rows: torch.Tensor) -> "_Edit":
        key = (id(intervention), rows.shape[-1], rows.device, rows.dtype)
        if key not in self.compiled:
            self.compiled[key] = _Edit(intervention, rows.shape[-1], rows.device, rows.dtype)
        return self.compiled[key]

    def _target(self, intervention: Intervention, old: torch.Tensor) -> torch.Tensor:
        op = intervention.op
        value = intervention.value.to(old) if isinstance(intervention.value, torch.Tensor) else intervention.value
        if op == "zero":
            return torch.zeros_like(old)
        if op == "resample":
            batch = old.shape[0]
            if batch < 2:
                raise ValueError(f"resample ablation of {intervention.name} needs at least 2 images in the batch")
            generator = torch.Generator().manual_seed(int(intervention.value) + self.calls)
            shift = int(torch.randint(1, batch, (1,), generator=generator))
            return old.roll(shift, dims=0)  # image i gets image (i - shift) % B's value: never its own
        if op in ("mean", "clamp"):
            return torch.zeros_like(old) + value
        if op == "scale":
            return old * value
        if op == "add":
            return old + value
        source = self.sources[id(intervention)]
        if source.shape != old.shape:
            raise ValueError(f"patching {intervention.name}: the source batch gives {tuple(source.shape)} "
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
                explicit = {getattr(f, "layout", "auto") for i in by_layer[layer] for f in i.members} - {"auto"}
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
                values, _ = edits[intervention.layer].edit_of(intervention, rows).values(rows)
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
