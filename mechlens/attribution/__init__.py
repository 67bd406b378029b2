"""Attribution methods as probes into features.

Every method explains a *feature* (see :mod:`mechlens.features`): a class logit, a channel, a
CAV direction, an SAE latent. One convention for all of them::

    from mechlens.attribution import attribute, list_methods
    result = attribute(model, images, target="class:1", method="integrated_gradients", n_steps=64)
    result.map                      # [B, C, H, W] like the input ([B, h, w] for CAMs / attention)
    result.completeness_error       # IG reports it on every call
    result.heatmap()                # [B, H, W] at input resolution, for plots and metrics

``target`` may be a Feature, a spec string (``"channel:stage3:5"``), an int class, a per-sample
tensor of classes, or None (the predicted class). See ``docs/attribution.md`` for the methods,
their conventions and which of them fail the model-parameter randomization check.

Non-finite results are an error: explaining a NaN / infinite model output, or getting a map or a
completeness error that is not finite, raises :class:`NonFiniteError` naming the method, the
feature and the samples. ``allow_nonfinite=True`` (any method) keeps such results and counts
them in ``result.extras["nonfinite_samples"]``.

Gradient methods run an inference copy of the model (BatchNorm folded into its convolutions,
channels-last weights on CPU), forward-only ones feed it channels-last inputs, and occlusion
recomputes early layers only around each window (:mod:`mechlens.attribution.execution`,
:mod:`mechlens.attribution.local`): the same function with less work. ``with
exact_execution():`` runs the model as given, for bit-for-bit comparisons.
"""
from mechlens.attribution.base import (
    Attribution,
    MethodInfo,
    NonFiniteError,
    Target,
    attribute,
    check_finite,
    eval_mode,
    get_method,
    input_gradients,
    list_methods,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import exact_execution, inference_copy, inference_model
from mechlens.attribution.baselines import BASELINES, dataset_mean, gaussian_blur, make_baseline
from mechlens.attribution.cam import (
    ablationcam,
    eigen_gradcam,
    eigencam,
    fullgrad,
    fullgrad_bias_layers,
    gradcam,
    gradcam_plusplus,
    guided_gradcam,
    hirescam,
    layer_activations_and_gradients,
    layercam,
    multilayer_cam,
    principal_projection,
    scorecam,
    suggest_cam_layer,
    to_grid,
    vit_cam_layer,
    xgradcam,
)
from mechlens.attribution.gradients import (
    BASELINE_DISTRIBUTIONS,
    BaselineSet,
    baseline_set,
    expected_gradients,
    gradient_shap,
    guided_backprop,
    guided_relus,
    input_x_gradient,
    integrated_gradients,
    multi_baseline_ig,
    saliency,
)
from mechlens.attribution.layer_attribution import layer_conductance, layer_integrated_gradients
from mechlens.attribution.propagation import (
    LRP_COMPOSITES,
    LRP_RULES,
    CompletenessWarning,
    deeplift,
    deeplift_shap,
    lrp,
    lrp_rule_map,
)
from mechlens.attribution.perturbation import (
    feature_ablation,
    kernel_shap,
    lime,
    occlusion,
    rise,
    rise_masks,
    shapley_value_sampling,
    slic_segments,
    weighted_ridge,
)
from mechlens.attribution.smooth import noise_tunnel, smoothgrad, smoothgrad_sq, vargrad
from mechlens.attribution.vit import (
    AttentionMaps,
    attention,
    attention_maps,
    attention_modules,
    attention_rollout,
    rollout,
    unfused_attention,
)

__all__ = [
    "ablationcam", "eigen_gradcam", "eigencam", "fullgrad", "fullgrad_bias_layers", "hirescam", "multilayer_cam",
    "principal_projection", "xgradcam",
    "BASELINE_DISTRIBUTIONS", "BaselineSet", "baseline_set", "expected_gradients", "layer_conductance",
    "layer_integrated_gradients", "multi_baseline_ig",
    "CompletenessWarning", "LRP_COMPOSITES", "LRP_RULES", "deeplift", "deeplift_shap", "lrp", "lrp_rule_map",
    "AttentionMaps", "Attribution", "BASELINES", "MethodInfo", "NonFiniteError", "Target",
    "attention", "attention_maps", "attention_modules", "attention_rollout", "attribute", "check_finite",
    "dataset_mean", "eval_mode", "exact_execution", "feature_ablation", "gaussian_blur", "get_method", "gradcam", "gradcam_plusplus",
    "gradient_shap", "guided_backprop", "guided_gradcam", "guided_relus", "inference_copy", "inference_model", "input_gradients",
    "input_x_gradient", "integrated_gradients", "kernel_shap", "layer_activations_and_gradients",
    "layercam", "lime", "list_methods", "make_baseline", "noise_tunnel", "occlusion",
    "register_method", "resolve_target", "rise", "rise_masks", "rollout", "saliency", "scorecam",
    "shapley_value_sampling", "slic_segments",
    "smoothgrad", "smoothgrad_sq", "suggest_cam_layer", "to_grid", "unfused_attention",
    "vargrad", "vit_cam_layer", "weighted_ridge",
]
