"""The reference classifier of the project: a SmallCNN trained on SyntheticShapes with a planted
ruler artefact, and the measurement of how much it relies on that artefact ("Clever Hans").

>>> clf = load_or_train_shapes_classifier(ShapesRecipe(), cache_dir="runs/shapes")
>>> clf.reliance.flip_rate      # other classes predicted as the artefact class once it is pasted

Measured on 2 CPU cores with the default recipe (6000 images of 64x64, ruler on 95% of the
``square`` training images, 8 epochs): ~40 s of training when the cores are not shared; >99%
accuracy on clean images of the four classes that never carry the ruler. Square accuracy falls
from 100% with the ruler to 20-52% without it (seeds 0 and 1), and pasting the ruler onto images
of other classes makes the model call 52-56% of them "square" (0% on the clean images). See
``tests/mechlens/test_training.py`` for the asserted bounds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from mechlens.models.loading import CHECKPOINT_CONFIG, LoadedModel, load_model
from mechlens.models.training import (
    BatchTransform,
    TrainResult,
    predict,
    save_checkpoint,
    train_classifier,
)

__all__ = [
    "ShapesRecipe",
    "ShapesClassifier",
    "ArtefactReliance",
    "artefact_reliance",
    "train_shapes_classifier",
    "load_or_train_shapes_classifier",
]


def _default_train_data() -> SyntheticShapesConfig:
    return SyntheticShapesConfig(
        num_samples=6000, image_size=64, seed=0, split="train",
        artefact_class=1, artefact_probability=0.95,
    )


@dataclass(frozen=True)
class ShapesRecipe:
    """Everything that determines the trained model (data, architecture, optimisation)."""

    train_data: SyntheticShapesConfig = field(default_factory=_default_train_data)
    test_samples: int = 1000
    test_split: str = "test"
    model_spec: str = "mechlens:small_cnn"
    model_seed: int = 0
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    channels_last: bool = True

    @property
    def test_data(self) -> SyntheticShapesConfig:
        """Same distribution as the training data (artefact included), another split."""
        return self.train_data.replace(num_samples=self.test_samples, split=self.test_split)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["train_data"] = self.train_data.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ShapesRecipe":
        data = dict(data)
        data["train_data"] = SyntheticShapesConfig.from_dict(data["train_data"])
        return cls(**data)

    def fingerprint(self, *extra: str) -> str:
        """Stable hash of the recipe (plus ``extra`` strings such as source-code hashes)."""
        payload = json.dumps(self.to_dict(), sort_keys=True) + "|".join(extra)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ArtefactReliance:
    """How much a classifier relies on the planted artefact, measured on counterfactual twins
    (the same test images with the artefact removed from all / pasted onto all).

    * ``accuracy``: the test split as configured (artefact where the data config puts it)
    * ``clean_accuracy`` / ``artefact_accuracy``: all images without / with the artefact
    * ``clean_class_accuracy`` / ``artefact_class_accuracy``: the artefact class only
    * ``other_clean_accuracy``: the other classes, without the artefact
    * ``flip_rate``: other-class images predicted as the artefact class once it is pasted
    * ``baseline_flip_rate``: the same on clean images
    """

    artefact_class: int
    accuracy: float
    clean_accuracy: float
    artefact_accuracy: float
    clean_class_accuracy: float
    artefact_class_accuracy: float
    other_clean_accuracy: float
    flip_rate: float
    baseline_flip_rate: float

    @property
    def class_accuracy_drop(self) -> float:
        """``artefact_class_accuracy - clean_class_accuracy``."""
        return self.artefact_class_accuracy - self.clean_class_accuracy

    def to_dict(self) -> dict[str, float]:
        data = dataclasses.asdict(self)
        data["class_accuracy_drop"] = self.class_accuracy_drop
        return data


def artefact_reliance(
    model: nn.Module,
    dataset: SyntheticShapes,
    *,
    artefact_class: int | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    transform: BatchTransform | None = None,
) -> ArtefactReliance:
    """Measure :class:`ArtefactReliance` of ``model`` on ``dataset`` and its two counterfactual
    twins (``dataset.with_artefact(False/True)``)."""
    if artefact_class is None:
        artefact_class = dataset.config.artefact_class
    if artefact_class is None:
        raise ValueError("the dataset has no artefact_class; pass artefact_class=")
    kw = dict(batch_size=batch_size, device=device, transform=transform)
    as_is = predict(model, dataset, **kw)
    clean = predict(model, dataset.with_artefact(False), **kw)
    pasted = predict(model, dataset.with_artefact(True), **kw)
    labels = clean.labels
    target = labels == artefact_class
    others = ~target
    if not target.any() or not others.any():
        raise ValueError("the dataset needs images of the artefact class and of other classes")

    def mean(mask: torch.Tensor) -> float:
        return float(mask.float().mean())

    return ArtefactReliance(
        artefact_class=int(artefact_class),
        accuracy=as_is.accuracy,
        clean_accuracy=clean.accuracy,
        artefact_accuracy=pasted.accuracy,
        clean_class_accuracy=mean(clean.correct[target]),
        artefact_class_accuracy=mean(pasted.correct[target]),
        other_clean_accuracy=mean(clean.correct[others]),
        flip_rate=mean(pasted.predicted[others] == artefact_class),
        baseline_flip_rate=mean(clean.predicted[others] == artefact_class),
    )


@dataclass
class ShapesClassifier:
    """A trained (or reloaded) shapes classifier with its data and figures."""

    loaded: LoadedModel
    recipe: ShapesRecipe
    reliance: ArtefactReliance
    train_result: TrainResult | None = None  # None when reloaded from a checkpoint
    train_seconds: float | None = None
    checkpoint: Path | None = None

    @property
    def model(self) -> nn.Module:
        return self.loaded.model

    def train_dataset(self, **kwargs: Any) -> SyntheticShapes:
        return SyntheticShapes(self.recipe.train_data, **kwargs)

    def test_dataset(self, **kwargs: Any) -> SyntheticShapes:
        return SyntheticShapes(self.recipe.test_data, **kwargs)


def train_shapes_classifier(
    recipe: ShapesRecipe | None = None,
    *,
    device: str | torch.device = "cpu",
    checkpoint_dir: str | Path | None = None,
    progress: bool = False,
) -> ShapesClassifier:
    """Train the reference classifier from ``recipe``; save a checkpoint if ``checkpoint_dir``."""
    recipe = recipe or ShapesRecipe()
    train = SyntheticShapes(recipe.train_data)
    num_classes = recipe.train_data.num_classes
    loaded = load_model(recipe.model_spec, num_classes=num_classes, seed=recipe.model_seed)
    result = train_classifier(
        loaded.model, train, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
        weight_decay=recipe.weight_decay, seed=recipe.seed, device=device, progress=progress,
        transform=loaded.preprocessing.normalize, channels_last=recipe.channels_last,
    )
    loaded.model.eval()
    test = SyntheticShapes(recipe.test_data)
    reliance = artefact_reliance(loaded.model, test, transform=loaded.preprocessing.normalize)
    checkpoint = None
    if checkpoint_dir is not None:
        model_kwargs = dict(loaded.model_kwargs)
        config = getattr(loaded.model, "config", None)
        if hasattr(config, "to_dict"):
            model_kwargs.update(config.to_dict())
        checkpoint = save_checkpoint(
            checkpoint_dir, loaded.model, spec=recipe.model_spec, model_kwargs=model_kwargs,
            preprocessing=loaded.preprocessing,
            metadata={
                "recipe": recipe.to_dict(), "train": result.to_dict(), "reliance": reliance.to_dict(),
            },
        )
    return ShapesClassifier(
        loaded=loaded, recipe=recipe, reliance=reliance, train_result=result,
        train_seconds=result.seconds, checkpoint=checkpoint,
    )


def _source_fingerprint() -> str:
    """Hash of the code that determines the trained weights, so caches expire when it changes."""
    import importlib

    digest = hashlib.sha256()
    # importlib, not `import mechlens.models.small_cnn as m`: the package attribute `small_cnn`
    # is the factory function, which shadows the submodule of the same name.
    for name in ("mechlens.data.synthetic", "mechlens.models.small_cnn", "mechlens.models.training"):
        digest.update(Path(importlib.import_module(name).__file__).read_bytes())
    digest.update(torch.__version__.encode())
    return digest.hexdigest()[:16]


def load_or_train_shapes_classifier(
    recipe: ShapesRecipe | None = None,
    *,
    cache_dir: str | Path,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> ShapesClassifier:
    """Reuse ``cache_dir/<fingerprint>`` if it holds a checkpoint of this recipe and this code,
    else train and save one there. Reliance figures are re-measured either way."""
    recipe = recipe or ShapesRecipe()
    directory = Path(cache_dir) / recipe.fingerprint(_source_fingerprint())
    if (directory / CHECKPOINT_CONFIG).is_file():
        try:
            loaded = load_model(str(directory), device=device)
        except (ValueError, OSError, RuntimeError):
            loaded = None  # a corrupt or stale cache entry: retrain below
        if loaded is not None:
            meta = json.loads((directory / CHECKPOINT_CONFIG).read_text()).get("metadata", {})
            test = SyntheticShapes(recipe.test_data)
            reliance = artefact_reliance(loaded.model, test, transform=loaded.preprocessing.normalize)
            return ShapesClassifier(
                loaded=loaded, recipe=recipe, reliance=reliance,
                train_seconds=meta.get("train", {}).get("seconds"), checkpoint=directory,
            )
    return train_shapes_classifier(recipe, device=device, checkpoint_dir=directory, progress=progress)
