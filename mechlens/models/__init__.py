"""Models: loading by name with preprocessing, layer names and shapes, the small CNN family,
and a short training routine with safetensors checkpoints."""
from mechlens.models.layers import (
    LayerInfo,
    LayerNotFoundError,
    get_module,
    is_pattern,
    layer_names,
    layer_shapes,
    match_layer_pattern,
    output_shape,
    resolve_layers,
)
from mechlens.models.loading import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LoadedModel,
    ModelEntry,
    Preprocessing,
    PretrainedWeightsUnavailableError,
    get_model_entry,
    list_models,
    load_model,
    load_state_dict_file,
    register_model,
)
from mechlens.models.outputs import select_output
from mechlens.models.shapes import (
    ArtefactReliance,
    ShapesClassifier,
    ShapesRecipe,
    artefact_reliance,
    load_or_train_shapes_classifier,
    train_shapes_classifier,
)
from mechlens.models.small_cnn import ConvBlock, SmallCNN, SmallCNNConfig, small_cnn
from mechlens.models.training import (
    EpochStats,
    Predictions,
    TrainResult,
    evaluate_accuracy,
    load_checkpoint,
    load_weights,
    predict,
    save_checkpoint,
    save_weights,
    train_classifier,
)

__all__ = [
    "select_output",
    "IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "ModelEntry", "Preprocessing",
    "PretrainedWeightsUnavailableError", "get_model_entry", "list_models", "load_model",
    "load_state_dict_file", "register_model",
    "LayerInfo", "LayerNotFoundError", "get_module", "is_pattern", "layer_names", "layer_shapes",
    "match_layer_pattern", "output_shape", "resolve_layers",
    "ArtefactReliance", "ShapesClassifier", "ShapesRecipe", "artefact_reliance",
    "load_or_train_shapes_classifier", "train_shapes_classifier",
    "ConvBlock", "SmallCNN", "SmallCNNConfig", "small_cnn",
    "EpochStats", "Predictions", "TrainResult", "evaluate_accuracy", "load_checkpoint",
    "load_weights", "predict", "save_checkpoint", "save_weights", "train_classifier",
]
