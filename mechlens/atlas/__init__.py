"""The feature atlas: a browsable static site publishing every feature of an SAE
(:func:`build_atlas`, ``mechlens atlas``)."""
from mechlens.atlas.build import AtlasResult, build_atlas, logit_effects
from mechlens.atlas.callbacks import sae_attributor, sae_visualizer

__all__ = ["AtlasResult", "build_atlas", "logit_effects", "sae_attributor", "sae_visualizer"]
