"""Causal interventions on features during the forward pass: ablate, clamp, scale, steer, patch.

>>> with intervene(model, [ablate(latent), steer(cav_direction, 4.0)]):
...     logits = model(images)
>>> logits = intervened_forward(model, images, [patch(channel, source_images)])

Every intervention edits one feature's value at its layer, on every position (or the positions
of ``mask``), and leaves the rest of the activation as it was:

* a channel / neuron: its entry of the channel vector;
* a direction (a CAV, a probe weight): the component along the direction (``rows += (v' - v)
  d / |d|^2``), so ablating it projects the direction out;
* an SAE latent: the latent, with the SAE's reconstruction *and its error term* spliced back
  (``x' = decode(z') + (x - decode(z))``), so an identity intervention reproduces the model.

Several interventions compose in one forward (in the order given, per layer). The hooks come
from the forward engine and are removed on exit, also on error.
"""
from mechlens.interventions.core import (
    Intervention,
    ablate,
    clamp,
    decoder_directions,
    intervene,
    intervened_forward,
    patch,
    scale,
    steer,
)

from mechlens.interventions.effects import EffectTable, intervention_effects
from mechlens.interventions.patching import (
    LatentEffects,
    ResponsibleLatents,
    ablation_effects,
    attribution_patching,
    rank_agreement,
    responsible_latents,
)
from mechlens.interventions.circuits import Circuit, CircuitNode, feature_circuit

__all__ = [
    "Circuit", "CircuitNode", "EffectTable", "Intervention", "LatentEffects", "ResponsibleLatents", "ablate",
    "ablation_effects", "attribution_patching", "clamp", "decoder_directions", "feature_circuit", "intervene",
    "intervened_forward", "intervention_effects", "patch", "rank_agreement", "responsible_latents", "scale", "steer",
]
