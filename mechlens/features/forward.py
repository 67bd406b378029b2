"""Run a model and read features: the one forward pass every feature-based method shares."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from mechlens.engine import HookSet, StopAfter, capture, unwrap
from mechlens.features.base import OUTPUT, Feature, _FeatureBase, feature_layers, reduce_map
from mechlens.features.batched import DiagonalPlan
from mechlens.features.layout import infer_layouts, layout_scope
from mechlens.features.parse import as_features

__all__ = ["FeatureForward", "feature_forward"]


@dataclass
class FeatureForward:
    """Result of :func:`feature_forward`.

    ``values``: ``[B, F]`` one column per feature; ``readouts``: per-feature maps;
    ``activations``: layer -> captured output (attached to the graph when ``grads=True``);
    ``output``: the model output (``None`` when the forward stopped early).
    """

    values: torch.Tensor
    readouts: list[torch.Tensor]
    activations: dict[str, torch.Tensor]
    output: torch.Tensor | None


def feature_forward(
    model: nn.Module,
    features: Feature | str | Sequence[Feature | str],
    inputs: torch.Tensor,
    *,
    grads: bool = True,
    keep_layers: Sequence[str] = (),
    stop_early: bool = False,
    per_sample: bool = False,
) -> FeatureForward:
    """Run ``model(inputs)`` and read ``features`` (and keep ``keep_layers``' activations).
    ``features``: one or a list of Features, spec strings or class indices (:func:`as_feature`).

    ``grads=True`` keeps the activations on the autograd graph, so gradients of the feature
    values w.r.t. the input or any kept layer can be taken. ``stop_early=True`` aborts the forward
    once every needed layer has run (saves the rest of the network; only valid when each needed
    module runs once per forward, which is true of blocks/stages but not of a shared ``relu``).
    ``per_sample=True``: ``features[i]`` is read on sample ``i`` only (one per sample), through
    each kind's batched read (:class:`~mechlens.features.DiagonalPlan`); ``values`` is ``[B, 1]``
    and ``readouts`` is empty.
    """
    model = unwrap(model)
    feature_list = as_features(features)
    if not feature_list:
        raise ValueError("feature_forward needs at least one feature")
    layers = feature_layers(feature_list)
    hooked = [name for name in dict.fromkeys([*layers, *keep_layers]) if name != OUTPUT]
    # Layouts from the model, never from the rank: features left at layout="auto" must have one
    # (an ambiguous layer is an error here); kept layers get theirs where the model says it.
    read_auto = [f.layer for f in feature_list if getattr(f, "layout", None) == "auto" and f.layer != OUTPUT]
    known = infer_layouts(model, read_auto, inputs) if read_auto else {}
    others = [name for name in hooked if name not in known]  # read by the caller, maybe not at all
    if others:
        known.update(infer_layouts(model, others, inputs, strict=False))
    with layout_scope(known):
        return _feature_forward(model, feature_list, inputs, layers, hooked, grads=grads, stop_early=stop_early,
                                per_sample=per_sample)


def _feature_forward(model: nn.Module, feature_list: list[Feature], inputs: torch.Tensor, layers: list[str],
                     hooked: list[str], *, grads: bool, stop_early: bool, per_sample: bool = False) -> FeatureForward:
    with capture(model, hooked, grads=grads, detach=not grads) if hooked else _null_capture() as cap, HookSet() as hooks:
        stopper = StopAfter(model, hooked, hooks, armed=stop_early and OUTPUT not in layers)
        output = stopper.run(model, inputs)
        if cap is not None:
            cap.check_all_fired()
        activations = {name: cap[name] for name in hooked} if cap is not None else {}
    if OUTPUT in layers:
        if not isinstance(output, torch.Tensor):
            raise TypeError(
                f"the model output is a {type(output).__name__}, not a logits tensor; a feature on the "
                "output needs model(x) to return [B, classes]: say which output that is with "
                    "mechlens.engine.select_output(model, 'logits' | KEY | INDEX)"
            )
        activations[OUTPUT] = output
    if per_sample:
        values = DiagonalPlan(feature_list)(activations)[:, None]
        return FeatureForward(values=values, readouts=[], activations=activations, output=output)
    readouts = [feature.readout(activations[feature.layer]) for feature in feature_list]
    values = torch.stack(
        [
            # Built-in kinds reduce the readout already computed instead of reading twice.
            reduce_map(readout, feature.reduce) if isinstance(feature, _FeatureBase)
            else feature.value(activations[feature.layer])
            for feature, readout in zip(feature_list, readouts)
        ],
        dim=1,
    )
    return FeatureForward(values=values, readouts=readouts, activations=activations, output=output)


class _null_capture:
    def __enter__(self):
        return None

    def __exit__(self, *exc) -> bool:
        return False
