"""The feature atlas: a browsable static site publishing a feature set — an SAE's latents, the
channels of a layer, CAV directions — one page of panels per feature (:func:`build_atlas`,
``mechlens atlas``), with measured causal effects beside the linear ones and, optionally, a
feature circuit drawn with the atlas's images."""
from mechlens.atlas.build import AtlasResult, build_atlas
from mechlens.atlas.callbacks import feature_attributor, feature_visualizer
from mechlens.atlas.compute import ablation_disagrees, class_gradients, linear_ablation_effects, logit_effects
from mechlens.atlas.features import FeatureSet, channel_features, direction_features, sae_features
from mechlens.atlas.panels import (
    AtlasContext,
    AttributionPanel,
    CausalEffectsPanel,
    ConceptsPanel,
    ExemplarsPanel,
    FeatvisPanel,
    HistogramPanel,
    LogitEffectsPanel,
    MapPanel,
    QuantilesPanel,
    SimilarPanel,
    Panel,
)

__all__ = [
    "AtlasContext", "AtlasResult", "AttributionPanel", "CausalEffectsPanel", "ConceptsPanel", "ExemplarsPanel",
    "FeatureSet", "FeatvisPanel", "HistogramPanel", "LogitEffectsPanel", "MapPanel", "Panel", "QuantilesPanel",
    "SimilarPanel", "ablation_disagrees", "class_gradients",
    "build_atlas", "channel_features", "direction_features", "feature_attributor", "feature_visualizer",
    "linear_ablation_effects", "logit_effects", "sae_features",
]
