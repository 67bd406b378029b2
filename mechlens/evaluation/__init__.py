"""When to trust an attribution map: sanity checks, faithfulness, localisation, stability, plots.

* :func:`randomization_check`: Adebayo et al.'s model-parameter randomization (cascading or
  independent), Spearman and SSIM per layer.
* :func:`deletion_curve` / :func:`insertion_curve`: pixel-flipping faithfulness with AUCs.
* :func:`pointing_game` / :func:`localization_iou` against masks or boxes
  (:func:`boxes_to_masks`).
* :func:`attribution_stability`: maps under small shifts and noise.
* :mod:`mechlens.evaluation.metrics`: ROAD (noisy linear imputation), infidelity,
  max-sensitivity, random-logit, faithfulness correlation, sparseness, complexity, relevance
  mass / rank accuracy (parity with Quantus and captum.metrics).
* :func:`roar`: remove and retrain (Hooker et al.) with a random ranking as control, cached.
* :func:`manipulation_check`: fine-tune a copy so a method's maps move while predictions stay
  (Heo et al. 2019), and measure how far every method's maps moved.
* :func:`evaluate_methods` (``mechlens evaluate``): every check for many methods on one model,
  a table and a verdict per method.
* :mod:`mechlens.evaluation.plots`: overlays, method comparisons, the randomization cascade.
"""
from mechlens.evaluation.faithfulness import (
    PerturbationCurve,
    PointingResult,
    boxes_to_masks,
    deletion_curve,
    insertion_curve,
    localization_iou,
    perturbation_curve,
    pointing_game,
    random_maps,
)
from mechlens.evaluation.metrics import (
    MetricResult,
    RoadResult,
    complexity,
    faithfulness_correlation,
    infidelity,
    max_sensitivity,
    noisy_linear_imputation,
    random_logit,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road,
    sparseness,
)
from mechlens.evaluation.manipulation import (
    ATTACK_DEFAULTS,
    ATTACKABLE,
    REGIONS,
    ManipulatedModel,
    ManipulationResult,
    attacked_map,
    manipulate_model,
    manipulation_check,
    region_mask,
)
from mechlens.evaluation.plots import (
    display_image,
    plot_curves,
    plot_methods,
    plot_overlay,
    plot_randomization,
    save_figure,
)
from mechlens.evaluation.randomization import (
    RandomizationResult,
    randomization_check,
    randomization_layers,
    randomize_module_,
)
from mechlens.evaluation.report import (
    CHECKS,
    OPTIONAL_CHECKS,
    VERDICTS,
    Check,
    CheckContext,
    MethodReport,
    default_attack,
    evaluate_methods,
    map_agreement,
)
from mechlens.evaluation.roar import RetrainRecipe, RoarResult, pixel_ranks, remove_top_pixels, roar
from mechlens.evaluation.similarity import normalize_maps, spearman, ssim
from mechlens.evaluation.stability import StabilityResult, attribution_stability, shift_images

__all__ = [
    "ATTACK_DEFAULTS", "ATTACKABLE", "CHECKS", "OPTIONAL_CHECKS", "Check", "CheckContext", "ManipulatedModel", "ManipulationResult", "MethodReport", "REGIONS",
    "RetrainRecipe", "RoarResult", "VERDICTS", "attacked_map", "default_attack", "evaluate_methods", "manipulate_model",
    "manipulation_check", "map_agreement", "pixel_ranks", "region_mask", "remove_top_pixels", "roar",
    "MetricResult", "RoadResult", "complexity", "faithfulness_correlation", "infidelity", "max_sensitivity",
    "noisy_linear_imputation", "random_logit", "relevance_mass_accuracy", "relevance_rank_accuracy", "road",
    "sparseness",
    "PerturbationCurve", "PointingResult", "RandomizationResult", "StabilityResult",
    "attribution_stability", "boxes_to_masks", "deletion_curve", "display_image", "insertion_curve",
    "localization_iou", "normalize_maps", "perturbation_curve", "plot_curves", "plot_methods",
    "plot_overlay", "plot_randomization", "pointing_game", "random_maps", "randomization_check",
    "randomization_layers", "randomize_module_", "save_figure", "shift_images", "spearman", "ssim",
]
