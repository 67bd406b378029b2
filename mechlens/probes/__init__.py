"""Concept probes: CAVs, TCAV with statistical testing, linear probes on stored activations."""
from mechlens.probes.cav import CAV, CAV_CLASSIFIERS, CAVNotFoundError, ConstantActivationsError, cav_file_stem, save_cavs, train_cav
from mechlens.probes.concepts import CAV_POOLINGS, ConceptSet, concept_activations, pool_activation, random_concept_sets
from mechlens.probes.linear import CAVAlignment, LinearProbe, cav_sae_alignment, probe_store
from mechlens.probes.tcav import (
    TCAV_TESTS,
    ExchangeableTest,
    PairScores,
    RelativeTCAVResult,
    TCAVReport,
    TCAVResult,
    directional_derivatives,
    exchangeable_test,
    finite_difference_derivative,
    pair_scores,
    relative_tcav,
    run_tcav,
    target_gradients,
    tcav_scores,
    tcav_test,
)


def feature_from_spec(rest: str):
    """``cav:PATH`` -> the saved CAV as a :class:`mechlens.features.Direction`."""
    return CAV.load(rest).feature()


__all__ = [
    "TCAV_TESTS",
    "ExchangeableTest",
    "PairScores",
    "exchangeable_test",
    "pair_scores",
    "CAV",
    "CAVAlignment",
    "CAVNotFoundError",
    "CAV_CLASSIFIERS",
    "CAV_POOLINGS",
    "ConceptSet",
    "ConstantActivationsError",
    "LinearProbe",
    "RelativeTCAVResult",
    "TCAVReport",
    "TCAVResult",
    "cav_file_stem",
    "cav_sae_alignment",
    "concept_activations",
    "directional_derivatives",
    "feature_from_spec",
    "finite_difference_derivative",
    "pool_activation",
    "probe_store",
    "random_concept_sets",
    "relative_tcav",
    "run_tcav",
    "save_cavs",
    "target_gradients",
    "tcav_scores",
    "tcav_test",
]
