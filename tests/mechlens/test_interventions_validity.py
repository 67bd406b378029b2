"""Interventions on the demo's trained shapes model (issue 19's acceptance): the latents that carry
the ruler, found causally, are switched off, switched on and patched, and attribution patching
agrees with exhaustive ablation.

The ruler latents are found as the demo finds them (:func:`responsible_latents`: attribution
patching of the clean twins' latent values into the ruler images, the fewest latents explaining
80% of the square logit's change). They are ablated along their decoder directions
(``space="decoder"``): the SAE reconstructs the rare ruler rows worst, so much of the ruler sits in
its error term, which a latent-space ablation keeps (that removes only 11-35% of the accuracy
gap, measured below, seeds 0/1/2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mechlens.engine import capture
from mechlens.interventions import ablate, intervened_forward, patch, steer
from mechlens.interventions.patching import ablation_effects, attribution_patching, rank_agreement, responsible_latents

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def twins(trained_shapes_model):
    test = trained_shapes_model.test_dataset()
    ids = np.arange(len(test))
    labels = torch.as_tensor(test.labels)
    square = int(test.config.artefact_class)
    return test.with_artefact(False).render(ids), test.with_artefact(True).render(ids), labels, square


def _logits(loaded, images, interventions=None) -> torch.Tensor:
    with torch.no_grad():
        if interventions is None:
            return loaded.model(loaded.preprocessing.normalize(images))
        return intervened_forward(loaded, images, interventions)


def test_ruler_latents_switch_the_shortcut_off_and_on(trained_shapes_model, shapes_saes, twins, record_figures) -> None:
    loaded, sae = trained_shapes_model.loaded, shapes_saes.stage3
    clean, ruler, labels, square = twins
    is_square = labels == square
    found = responsible_latents(loaded, sae, ruler[is_square], clean[is_square], f"class:{square}", coverage=0.8)
    latents = [sae.feature(i) for i in found.latents]

    def accuracy(logits: torch.Tensor, chosen: torch.Tensor) -> float:
        return float((logits.argmax(1) == labels[chosen]).float().mean())

    with_ruler, without = accuracy(_logits(loaded, ruler[is_square]), is_square), accuracy(_logits(loaded, clean[is_square]), is_square)
    ablated = accuracy(_logits(loaded, ruler[is_square], ablate(latents, space="decoder")), is_square)
    latent_space = accuracy(_logits(loaded, ruler[is_square], ablate(latents)), is_square)
    gap_removed = (with_ruler - ablated) / (with_ruler - without)
    others = ~is_square
    others_moved = abs(accuracy(_logits(loaded, clean[others], ablate(latents, space="decoder")), others)
                       - accuracy(_logits(loaded, clean[others]), others))
    # steering: add each latent's largest value on the ruler squares, on clean images of other classes
    with torch.no_grad(), capture(loaded.model, ["stage3"]) as cap:
        loaded.model(loaded.preprocessing.normalize(ruler[is_square]))
        rows = cap["stage3"].permute(0, 2, 3, 1).reshape(-1, cap["stage3"].shape[1])
        peak = sae.encode(rows).amax(dim=0)
    steered = _logits(loaded, clean[others], [steer(f, float(peak[f.index])) for f in latents])
    flipped = float((steered.argmax(1) == square).float().mean())
    # patching the ruler image's values into its clean copy, every class
    before, after = _logits(loaded, clean), _logits(loaded, ruler)
    patched = _logits(loaded, clean, patch(latents, ruler, space="decoder"))
    restored = float((patched[:, square] - before[:, square]).mean() / (after[:, square] - before[:, square]).mean())
    record_figures(latents=found.latents, explained=found.explained, gap_removed=gap_removed,
                   gap_removed_latent_space=(with_ruler - latent_space) / (with_ruler - without),
                   others_moved=others_moved, flipped=flipped, restored=restored)
    # Measured (seeds 0/1/2, 1 thread): 3 / 2 / 3 latents; gap removed 1.40 / 1.60 / 1.40 (the
    # squares fall below their clean accuracy: the ruler directions share some of the square's;
    # in latent space, error term kept: 0.22 / 0.61 / 0.11); other classes moved 0.001 on each;
    # flipped 1.000 on each; restored 0.956 / 0.980 / 0.917. The thresholds (>= 0.5,
    # < 2 points, >= 0.5, >= 0.8) hold with wide margins on every seed.
    assert 1 <= len(found.latents) <= 8
    assert gap_removed >= 0.5
    assert others_moved < 0.02
    assert flipped >= 0.5
    assert restored >= 0.8


def test_attribution_patching_ranks_latents_as_exhaustive_ablation_does(trained_shapes_model, shapes_saes, twins,
                                                                         record_figures) -> None:
    # stage2 is two conv blocks away from the logits (not linear in the latents, unlike stage3)
    loaded, sae = trained_shapes_model.loaded, shapes_saes.stage2
    clean, ruler, labels, square = twins
    images = ruler[:300]
    estimated = attribution_patching(loaded, sae, images, f"class:{square}")
    exact = ablation_effects(loaded, sae, images, f"class:{square}", latents=estimated.top(100))
    agreement = rank_agreement(estimated, exact, top=100)
    integrated = attribution_patching(loaded, sae, images, f"class:{square}", steps=4)
    integrated_agreement = rank_agreement(integrated, exact, top=100)
    record_figures(**agreement, integrated_spearman=integrated_agreement["spearman"])
    # Measured (seeds 0/1/2, 1 thread): spearman 0.9992 / 0.9990 / 0.9989; integrated (4 steps,
    # all latents moved together, so it estimates a joint path, not one latent's ablation)
    # 0.988 / 0.890 / 0.971. Threshold: the 0.8.
    assert estimated.forwards == 5 and exact.forwards > 100
    assert agreement["latents"] == 100
    assert agreement["spearman"] >= 0.8
    assert integrated_agreement["spearman"] >= 0.8


def test_a_circuit_for_square_through_two_sae_layers_is_faithful(trained_shapes_model, shapes_saes, twins,
                                                                  record_figures) -> None:
    import xml.etree.ElementTree as ElementTree

    from mechlens.interventions import feature_circuit

    loaded = trained_shapes_model.loaded
    clean, ruler, labels, square = twins
    images = ruler[labels == square][:100]
    circuit = feature_circuit(loaded, [shapes_saes.stage3, shapes_saes.stage2], images, f"class:{square}",
                              nodes_per_layer=None, faithfulness=0.8, reference=clean[:500])
    found = responsible_latents(loaded, shapes_saes.stage3, ruler[labels == square], clean[labels == square],
                                f"class:{square}", coverage=0.8)
    top_stage3 = [n.latent for n in circuit.nodes if n.layer == "stage3"][0]
    record_figures(size=circuit.size, faithfulness=circuit.faithfulness, completeness=circuit.completeness,
                   top_stage3=top_stage3, ruler_latents=found.latents, edges=len(circuit.edges), **circuit.metric)
    # Measured (seeds 0/1/2, 1 thread): 96 / 142 / 134 nodes of 1026, faithfulness 0.804 / 0.802 /
    # 0.802 (the search stops at the first size reaching 0.8), completeness 0.000 / -0.003 / -0.003;
    # the strongest stage3 node is a ruler latent on every seed (38 / 350 / 502).
    assert circuit.layers == ["stage2", "stage3"]  # put in forward order
    assert circuit.faithfulness >= 0.8
    assert abs(circuit.completeness) < 0.2
    assert circuit.size < 0.5 * (2 * 513)  # far from the whole dictionary
    assert top_stage3 in found.latents
    assert any(d == "target" for _, d, _ in circuit.edges) and any(s.startswith("stage2/") for s, _, _ in circuit.edges)
    ElementTree.fromstring(circuit.to_svg())  # well-formed
    assert circuit.to_dot().count("->") == len(circuit.edges)


def test_the_audit_ranks_a_ruler_latent_first_without_being_told_the_ruler(trained_shapes_model, shapes_saes, twins,
                                                                             record_figures) -> None:
    from mechlens.evaluation.audit import audit_store

    loaded, sae = trained_shapes_model.loaded, shapes_saes.stage3
    clean, ruler, labels, square = twins
    # no ruler mask, no ruler concept: the store, its images (with their object boxes) and the SAE
    audit = audit_store(loaded, shapes_saes.store, sae=sae)
    # what the ruler latents are is decided afterwards, causally, from the counterfactual twins
    found = responsible_latents(loaded, sae, ruler[labels == square], clean[labels == square], f"class:{square}", coverage=0.8)
    top = audit.top(3)
    record_figures(top=[(s.latent, s.class_name, s.score, s.causal, s.purity, s.spatial) for s in top],
                   ruler_latents=found.latents, spatial_evidence=audit.spatial_evidence)
    # Measured (seeds 0/1/2, 1 thread): the top two suspects are ruler latents on every seed
    # (38 0.69, 113 0.64 / 350 0.46, 234 0.39 / 48 0.88, 502 0.82); the best object latent scores
    # 0.32 / 0.21 / 0.41 (214 on seed 2, half of whose exemplars peak on the ruler). Object latents
    # keep 0-0.29 of their activation when the object is erased, ruler latents 0.46-0.91.
    assert audit.spatial_evidence == "off_object"
    assert top[0].latent in found.latents
    assert top[0].class_index == square
