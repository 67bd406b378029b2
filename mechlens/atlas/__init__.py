"""The feature atlas: a browsable static site publishing every feature of an SAE
(:func:`build_atlas`, ``mechlens atlas``)."""
from mechlens.atlas.build import AtlasResult, build_atlas, logit_effects

__all__ = ["AtlasResult", "build_atlas", "logit_effects"]
