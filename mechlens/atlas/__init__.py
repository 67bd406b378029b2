"""The feature atlas: a browsable static site publishing a feature set — an SAE's latents, the
channels of a layer, CAV directions — one page of panels per feature (:func:`build_atlas`,
``mechlens atlas``)."""
from mechlens.atlas.build import AtlasResult, build_atlas
from mechlens.atlas.callbacks import feature_attributor, feature_visualizer
from mechlens.atlas.compute import logit_effects
from mechlens.atlas.features import FeatureSet, channel_features, direction_features, sae_features
from mechlens.atlas.panels import (
    AtlasContext,
    AttributionPanel,
    ConceptsPanel,
    ExemplarsPanel,
    FeatvisPanel,
    HistogramPanel,
    LogitEffectsPanel,
    MapPanel,
    Panel,
)

__all__ = [
    "AtlasContext", "AtlasResult", "AttributionPanel", "ConceptsPanel", "ExemplarsPanel", "FeatureSet",
    "FeatvisPanel", "HistogramPanel", "LogitEffectsPanel", "MapPanel", "Panel", "build_atlas", "channel_features",
    "direction_features", "feature_attributor", "feature_visualizer", "logit_effects", "sae_features",
]
