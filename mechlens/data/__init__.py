"""Datasets: the deterministic synthetic shapes (with a plantable artefact) and adapters for
scikit-learn digits, scikit-image sample photos and image folders. Items are always
``(image [C,H,W] float in [0,1], label)``."""
from mechlens.data.adapters import (
    IMAGE_EXTENSIONS,
    SKIMAGE_IMAGES,
    DigitsDataset,
    ImageFolderDataset,
    SkimagePhotos,
    SkippedFile,
    UnreadableImageError,
    build_dataset,
    check_nonempty,
)
from mechlens.data.images import load_image
from mechlens.data.synthetic import (
    ARTEFACT_CORNERS,
    ARTEFACT_KINDS,
    SHAPE_CLASSES,
    SyntheticSampleInfo,
    SyntheticShapes,
    SyntheticShapesConfig,
)

__all__ = [
    "ARTEFACT_CORNERS", "ARTEFACT_KINDS", "SHAPE_CLASSES", "SyntheticSampleInfo", "SyntheticShapes",
    "SyntheticShapesConfig",
    "IMAGE_EXTENSIONS", "SKIMAGE_IMAGES", "DigitsDataset", "ImageFolderDataset", "SkimagePhotos",
    "SkippedFile", "UnreadableImageError", "build_dataset", "check_nonempty", "load_image",
]
