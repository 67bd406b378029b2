"""Models: loading by name with preprocessing, layer names and shapes, the small CNN family,
and a short training routine with safetensors checkpoints."""
from mechlens.models.layers import (
    LayerNotFoundError,
    get_module,
    is_pattern,
    layer_names,
    match_layer_pattern,
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
    to_input,
)
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
    "IMAGENET_MEAN", "IMAGENET_STD", "LoadedModel", "ModelEntry", "Preprocessing",
    "PretrainedWeightsUnavailableError", "get_model_entry", "list_models", "load_model",
    "load_state_dict_file", "register_model", "to_input",
    "LayerNotFoundError", "get_module", "is_pattern", "layer_names",
    "match_layer_pattern", "resolve_layers",
    "ArtefactReliance", "ShapesClassifier", "ShapesRecipe", "artefact_reliance",
    "load_or_train_shapes_classifier", "train_shapes_classifier",
    "ConvBlock", "SmallCNN", "SmallCNNConfig", "small_cnn",
    "EpochStats", "Predictions", "TrainResult", "evaluate_accuracy", "load_checkpoint",
    "load_weights", "predict", "save_checkpoint", "save_weights", "train_classifier",
]
