"""Sparse autoencoders trained on the activation store: discover features.

>>> from mechlens.sae import TopKConfig, TrainConfig, train_sae, evaluate_store, feature_statistics
>>> result = train_sae("runs/acts", "stage2", TopKConfig(width=1024, k=16), TrainConfig(steps=2000), out="runs/sae")
>>> print(evaluate_store(result.sae, "runs/acts"))          # MSE, FVU, L0, dead / dense fractions
>>> feature_statistics(result.sae, "runs/acts").save("runs/sae")   # per-latent stats + exemplars

* architectures: :func:`create_sae`, :func:`list_architectures` (``relu``, ``topk``, ``batchtopk``,
  ``jumprelu``; ``gated``, ``matryoshka``, ``archetypal`` in :mod:`mechlens.sae.architectures`) and
  their typed configs; ``SAE.save(dir)`` / ``SAE.load(dir)`` (safetensors + JSON);
  a new architecture is a config subclass and an SAE subclass, registered with :func:`register_sae`,
  that declares its :class:`LossTerm` s (:mod:`mechlens.sae.terms`)
* training: :class:`SAETrainer` (any iterator of row batches; sweeps in one pass; checkpoints,
  resume, progress bar, CSV/JSON-lines log) and :func:`train_sae` for a store layer
* metrics: :func:`evaluate`, :func:`evaluate_store`, :func:`spliced_metrics`, :func:`plot_fvu_vs_l0`
* feature statistics: :func:`feature_statistics`
* dictionary comparison (:mod:`mechlens.sae.compare`): :func:`mmcs` against known atoms, :func:`stability` /
  :func:`seed_stability` across seeds (Hungarian), :func:`absorption`, :func:`splitting`
* interop (:mod:`mechlens.sae.interop`): :func:`export_saelens` / :func:`import_saelens` (SAELens's
  directory format), :func:`from_peer` (SAELens, dictionary_learning, overcomplete SAE objects)

A saved SAE reads raw activations (the training normalisation is folded into its weights) and
records its layer and pooling, so ``parse_feature("sae:PATH:123")`` is latent 123 as a
:class:`~mechlens.features.SAELatent`.
"""
from __future__ import annotations

from mechlens.sae.compare import (AbsorptionResult, ParentAbsorption, SeedStabilityResult, SplittingResult,
                                  StabilityResult, absorption, max_cosines, mmcs, seed_stability, splitting,
                                  stability)
from mechlens.sae.config import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUConfig,
    SAEConfig,
    TopKConfig,
    TrainConfig,
)
from mechlens.sae.data import NonFiniteActivationsError, Normalizer, StoreSource, TensorSource, geometric_median
from mechlens.sae.metrics import (
    SAEMetrics,
    SplicedMetrics,
    evaluate,
    evaluate_store,
    plot_fvu_vs_l0,
    splice_sae,
    spliced_metrics,
)
from mechlens.sae.modules import (
    SAE,
    BatchTopKSAE,
    JumpReLUSAE,
    ReLUSAE,
    SAECheckpointError,
    SAEOutput,
    TopKSAE,
    build_sae,
    create_sae,
    fold_normalization,
    list_architectures,
    register_sae,
    sae_class,
)
from mechlens.sae.lr import LRSearch, lr_rule
from mechlens.sae.synthetic import PlantedDictionary, planted_dictionary
from mechlens.sae.architectures import (ArchetypalConfig, ArchetypalSAE, GatedConfig, GatedSAE, MatryoshkaConfig,
                                        MatryoshkaSAE)
from mechlens.sae.interop import SAEInteropError, export_saelens, from_peer, import_saelens, peer_types
from mechlens.sae.terms import LossContext, LossTerm
from mechlens.sae.stats import FeatureStatistics, feature_statistics
from mechlens.sae.training import SAETrainer, TrainResult, find_learning_rate, save_saes, train_sae

__all__ = [
    "ArchetypalConfig", "ArchetypalSAE", "GatedConfig", "GatedSAE", "MatryoshkaConfig", "MatryoshkaSAE",
    "LRSearch", "PlantedDictionary", "find_learning_rate", "lr_rule", "planted_dictionary",
    "SAE", "BatchTopKConfig", "BatchTopKSAE", "FeatureStatistics", "JumpReLUConfig", "JumpReLUSAE",
    "LossContext", "LossTerm", "NonFiniteActivationsError", "Normalizer", "ReLUConfig", "ReLUSAE", "SAECheckpointError", "SAEConfig",
    "SAEMetrics", "SAEOutput", "SAETrainer", "SplicedMetrics", "StoreSource", "TensorSource", "TopKConfig",
    "TopKSAE", "TrainConfig", "TrainResult", "build_sae", "create_sae", "evaluate", "evaluate_store",
    "feature_from_spec", "feature_statistics", "fold_normalization", "geometric_median", "list_architectures",
    "plot_fvu_vs_l0", "register_sae", "sae_class", "save_saes", "splice_sae", "spliced_metrics", "train_sae",
    "AbsorptionResult", "ParentAbsorption", "SeedStabilityResult", "SplittingResult", "StabilityResult",
    "absorption", "max_cosines", "mmcs", "seed_stability", "splitting", "stability",
    "SAEInteropError", "export_saelens", "from_peer", "import_saelens", "peer_types",
]


def feature_from_spec(rest: str):
    """``"PATH:123"`` (the text after ``sae:`` in a feature spec) -> :class:`SAELatent` of latent 123
    of the SAE saved at ``PATH``, with the layer, pooling and layout it was trained with."""
    path, sep, index = rest.rpartition(":")
    if not sep or not path:
        raise ValueError(f"feature spec 'sae:{rest}': expected sae:PATH:INDEX")
    try:
        latent = int(index)
    except ValueError:
        raise ValueError(f"feature spec 'sae:{rest}': latent index must be an integer, got {index!r}") from None
    sae = SAE.load(path)
    try:
        return sae.feature(latent, source=path)
    except (IndexError, ValueError) as error:
        raise type(error)(f"feature spec 'sae:{rest}': {error}") from None
