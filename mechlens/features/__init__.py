"""Features: scalar readouts of a model's internals, the one idea every mechlens tool speaks.

See :mod:`mechlens.features.base` for the protocol and kinds, :func:`feature_forward` for the
shared forward pass, :func:`parse_feature` for spec strings (:func:`as_feature`: a spec string,
a Feature or a class index -> a Feature, what every entry point applies) and :mod:`mechlens.features.layout`
for how activations map onto ``[B, positions, channels]`` rows.
"""
from mechlens.features.base import (
    OUTPUT,
    Channel,
    ClassLogit,
    Direction,
    Feature,
    FeatureBase,
    LatentEncoder,
    LayerEnergy,
    Neuron,
    SAELatent,
    feature_layers,
    reduce_map,
)
from mechlens.features.batched import DiagonalPlan, diagonal_values
from mechlens.features.forward import FeatureForward, feature_forward
from mechlens.features.layout import (
    AmbiguousLayoutError,
    LayerLayout,
    as_position_rows,
    infer_layouts,
    layout_scope,
    pool_positions,
    positions_to_map,
    resolve_layout,
)
from mechlens.features.shapes import LayerInfo, layer_shapes, output_shape
from mechlens.features.parse import FEATURE_KINDS, SPEC_FORMS, as_feature, as_features, parse_feature, register_feature_kind

__all__ = [
    "AmbiguousLayoutError",
    "DiagonalPlan",
    "FeatureBase",
    "FEATURE_KINDS",
    "OUTPUT",
    "Channel",
    "ClassLogit",
    "Direction",
    "Feature",
    "FeatureForward",
    "LatentEncoder",
    "LayerInfo",
    "LayerLayout",
    "LayerEnergy",
    "Neuron",
    "SAELatent",
    "SPEC_FORMS",
    "as_feature",
    "as_features",
    "as_position_rows",
    "diagonal_values",
    "feature_forward",
    "feature_layers",
    "infer_layouts",
    "layer_shapes",
    "layout_scope",
    "output_shape",
    "parse_feature",
    "pool_positions",
    "positions_to_map",
    "reduce_map",
    "register_feature_kind",
    "resolve_layout",
]
