"""Objectives: what feature visualization maximizes, built from :mod:`mechlens.features`.

An :class:`Objective` is a weighted sum of *terms*. Every term maps the activations of one
forward pass (and the images) to **one score per image** ``[B]``, and the objective's score is
``sum(weight * term)``; rendering maximizes the sum of the per-image scores. Terms:

``feature(f)`` / ``Objective(f)``
    every image maximizes feature ``f`` (``batch=i``: only image ``i`` does).
``per_image([f0, f1, ...])``
    **batched**: image ``i`` maximizes feature ``i``; one optimization renders them all, which
    is how an atlas of many features is made (``Objective.per_image(features)``).
``diversity(layer)``
    minus the mean cosine similarity of each image's Gram matrix at ``layer`` with the other
    images' (Lucid's diversity term): add it to make a batch of images of one feature differ.
``layer_energy(layer)``
    the DeepDream objective (mean squared activation of the whole layer).
``total_variation()``, ``l2()``, ``blur()``
    image penalties (positive numbers): *subtract* them, ``obj - 1e-2 * total_variation()``.

Composition: ``a + b``, ``a - b``, ``2.0 * a``, ``a / 2``, ``-a`` ("what suppresses it"); a
bare :class:`~mechlens.features.Feature` is promoted to ``feature(f)``. Terms are small objects
(no closures), so an objective prints as what it computes::

    >>> Objective.per_image([Channel("layer3", c) for c in range(4)]) + 0.5 * diversity("layer3")
    Objective(1*per_image[channel:layer3:0, ... (4)] + 0.5*diversity:layer3)
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from mechlens.features.base import Feature, LayerEnergy
from mechlens.features.batched import DiagonalPlan, diagonal_values
from mechlens.features.layout import as_position_rows
from mechlens.features.parse import as_feature

__all__ = [
    "BlurPenalty",
    "Diversity",
    "FeatureTerm",
    "L2Penalty",
    "Objective",
    "PerImageTerm",
    "Term",
    "TotalVariation",
    "as_objective",
    "blur",
    "diagonal_values",
    "diversity",
    "feature",
    "l2",
    "layer_energy",
    "per_image",
    "total_variation",
]


# ---------------------------------------------------------------------------- terms
class Term:
    """One ingredient of an objective: ``__call__(activations, images) -> [B]`` scores.

    ``layers``: the layers it reads (``""`` = model output); ``batch_size``: the batch it needs
    (``None`` = any).
    """

    layers: tuple[str, ...] = ()
    batch_size: int | None = None
    min_batch: int = 1

    @property
    def name(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def image_names(self, batch: int) -> list[str]:
        """What each image shows, according to this term."""
        return [self.name] * batch

    def __repr__(self) -> str:
        return self.name


class FeatureTerm(Term):
    """Feature ``f`` on every image (``index=None``) or on image ``index`` only (others score 0)."""

    def __init__(self, feature: Feature | str, index: int | None = None) -> None:
        self.feature = feature = as_feature(feature)
        self.index = None if index is None else int(index)
        if self.index is not None and self.index < 0:
            raise ValueError(f"batch index must be >= 0, got {index}")
        self.layers = (feature.layer,)
        self.min_batch = 1 if self.index is None else self.index + 1

    @property
    def name(self) -> str:
        return self.feature.name + ("" if self.index is None else f"[{self.index}]")

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        act = activations[self.feature.layer]
        if self.index is None:
            return self.feature.value(act)
        if self.index >= act.shape[0]:
            raise ValueError(f"the objective addresses image {self.index} of a batch of {act.shape[0]}")
        value = self.feature.value(act[self.index:self.index + 1]).reshape(1)
        return F.pad(value, (self.index, act.shape[0] - self.index - 1))  # zeros elsewhere, on the device

    def image_names(self, batch: int) -> list[str]:
        if self.index is None:
            return [self.feature.name] * batch
        return [self.feature.name if i == self.index else "" for i in range(batch)]


class PerImageTerm(Term):
    """Image ``i`` scores ``features[i]``: the batched objective (see :func:`diagonal_values`)."""

    def __init__(self, features: Sequence[Feature | str]) -> None:
        self.features = [as_feature(f) for f in features]
        if not self.features:
            raise ValueError("per_image needs at least one feature")
        self.layers = tuple(dict.fromkeys(f.layer for f in self.features))
        self.batch_size = len(self.features)
        self.min_batch = len(self.features)
        self._plan = DiagonalPlan(self.features)

    @property
    def name(self) -> str:
        shown = ", ".join(f.name for f in self.features[:2])
        more = f", ... ({len(self.features)})" if len(self.features) > 2 else ""
        return f"per_image[{shown}{more}]"

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return self._plan(activations)

    def image_names(self, batch: int) -> list[str]:
        return [f.name for f in self.features]


class Diversity(Term):
    """Minus the mean cosine similarity of each image's Gram matrix at ``layer`` with every
    other image's (Lucid's ``diversity``; 0 for a batch of one). Higher = more diverse."""

    def __init__(self, layer: str, layout: str = "auto") -> None:
        self.layer = layer
        self.layout = layout
        self.layers = (layer,)

    @property
    def name(self) -> str:
        return f"diversity:{self.layer}"

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        rows, _ = as_position_rows(activations[self.layer], self.layout, layer=self.layer)  # [B, P, C]
        b = rows.shape[0]
        grams = torch.matmul(rows.transpose(1, 2), rows).reshape(b, -1)  # [B, C*C]
        grams = F.normalize(grams, dim=1)
        similarity = grams @ grams.T
        return -(similarity.sum(dim=1) - similarity.diagonal()) / b


class TotalVariation(Term):
    """Mean absolute difference of neighbouring pixels per image (a penalty: subtract it)."""

    @property
    def name(self) -> str:
        return "total_variation"

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        dy = (images[..., 1:, :] - images[..., :-1, :]).abs().flatten(1).mean(dim=1)
        dx = (images[..., :, 1:] - images[..., :, :-1]).abs().flatten(1).mean(dim=1)
        return dy + dx


class L2Penalty(Term):
    """Mean squared distance of the pixels from ``constant`` (0.5 = mid grey) per image."""

    def __init__(self, constant: float = 0.5) -> None:
        self.constant = float(constant)

    @property
    def name(self) -> str:
        return "l2"

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return (images - self.constant).pow(2).flatten(1).mean(dim=1)


class BlurPenalty(Term):
    """Lucid's ``blur_input_each_step``: half the mean squared difference between the image and
    a (gradient-stopped) 3x3 box blur of it; pulls each pixel toward its neighbourhood."""

    @property
    def name(self) -> str:
        return "blur"

    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        channels = images.shape[1]
        kernel = images.new_full((channels, 1, 3, 3), 1.0 / 9.0)
        with torch.no_grad():
            blurred = F.conv2d(F.pad(images, [1] * 4, mode="replicate"), kernel, groups=channels)
        return 0.5 * (images - blurred).pow(2).flatten(1).mean(dim=1)


# ---------------------------------------------------------------------------- the objective
class Objective:
    """A weighted sum of :class:`Term` objects, scored per image (see the module docstring)."""

    def __init__(self, terms: Feature | Term | str | Iterable[tuple[float, Term]] | None = None) -> None:
        if terms is None:
            self.terms: tuple[tuple[float, Term], ...] = ()
        elif isinstance(terms, str):
            self.terms = ((1.0, FeatureTerm(terms)),)
        elif isinstance(terms, Term):
            self.terms = ((1.0, terms),)
        elif isinstance(terms, Feature):
            self.terms = ((1.0, FeatureTerm(terms)),)
        else:
            self.terms = tuple((float(w), t) for w, t in terms)
            for _, t in self.terms:
                if not isinstance(t, Term):
                    raise TypeError(f"objective terms must be Term objects, got {type(t).__name__}")
        sizes = {t.batch_size for _, t in self.terms if t.batch_size is not None}
        if len(sizes) > 1:
            raise ValueError(f"terms need different batch sizes {sorted(sizes)} (per_image objectives of different lengths)")

    # -- constructors
    @classmethod
    def per_image(cls, features: Sequence[Feature | str]) -> "Objective":
        """Image ``i`` maximizes ``features[i]`` (one batched optimization)."""
        return cls(PerImageTerm(features))  # type: ignore[arg-type]

    @classmethod
    def feature(cls, feature: Feature | str, batch: int | None = None) -> "Objective":
        """Every image (or image ``batch`` only) maximizes ``feature``."""
        return feature_objective(feature, batch)

    # -- properties
    @property
    def layers(self) -> list[str]:
        """Layers the objective reads, first-seen order (``""`` = the model output)."""
        return list(dict.fromkeys(layer for _, t in self.terms for layer in t.layers))

    @property
    def batch_size(self) -> int | None:
        """The batch a per-image objective requires, else ``None``."""
        for _, t in self.terms:
            if t.batch_size is not None:
                return t.batch_size
        return None

    @property
    def min_batch(self) -> int:
        return max((t.min_batch for _, t in self.terms), default=1)

    def check_batch(self, batch: int) -> None:
        if self.batch_size is not None and batch != self.batch_size:
            raise ValueError(f"this objective renders {self.batch_size} images (one per feature), not {batch}")
        if batch < self.min_batch:
            raise ValueError(f"this objective addresses image {self.min_batch - 1}; the batch has only {batch}")

    # -- evaluation
    def __call__(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """Per-image scores ``[B]`` (higher is better)."""
        if not self.terms:
            raise ValueError("the objective is empty")
        total: torch.Tensor | None = None
        for weight, term in self.terms:
            value = term(activations, images)
            value = value if weight == 1.0 else weight * value
            total = value if total is None else total + value
        assert total is not None
        return total

    def evaluate(self, activations: Mapping[str, torch.Tensor], images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(scores [B], {term name: unweighted term values [B]})``."""
        values: dict[str, torch.Tensor] = {}
        total: torch.Tensor | None = None
        for weight, term in self.terms:
            value = term(activations, images)
            name, k = term.name, 2
            while name in values:
                name, k = f"{term.name}#{k}", k + 1
            values[name] = value
            total = weight * value if total is None else total + weight * value
        if total is None:
            raise ValueError("the objective is empty")
        return total, values

    def _feature_terms(self) -> list[tuple[float, Term]]:
        return [(w, t) for w, t in self.terms if isinstance(t, (FeatureTerm, PerImageTerm))]

    def image_names(self, batch: int) -> list[str]:
        """A short description of what each image of a batch maximizes."""
        features = self._feature_terms()
        if len(features) == 1:
            weight, term = features[0]
            names = term.image_names(batch)
            return [f"-{n}" if weight < 0 and n else n for n in names]
        if len(self.terms) == 1:
            return self.terms[0][1].image_names(batch)
        return [repr(self)] * batch

    @property
    def target_name(self) -> str | None:
        """The name (as in :meth:`evaluate`) of the objective's only feature term, if it has one."""
        features = self._feature_terms()
        return features[0][1].name if len(features) == 1 else None

    # -- algebra
    def _combine(self, other: Any, sign: float) -> "Objective":
        other_obj = as_objective(other)
        return Objective(self.terms + tuple((sign * w, t) for w, t in other_obj.terms))

    def __add__(self, other: Any) -> "Objective":
        return self._combine(other, 1.0)

    def __radd__(self, other: Any) -> "Objective":
        if isinstance(other, numbers.Number) and other == 0:  # sum([...]) starts from 0
            return self
        return as_objective(other)._combine(self, 1.0)

    def __sub__(self, other: Any) -> "Objective":
        return self._combine(other, -1.0)

    def __rsub__(self, other: Any) -> "Objective":
        return as_objective(other)._combine(self, -1.0)

    def __mul__(self, factor: Any) -> "Objective":
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool):
            raise TypeError(f"an objective can only be multiplied by a number, got {type(factor).__name__}")
        return Objective((float(factor) * w, t) for w, t in self.terms)

    __rmul__ = __mul__

    def __truediv__(self, factor: Any) -> "Objective":
        if not isinstance(factor, numbers.Real) or isinstance(factor, bool):
            raise TypeError(f"an objective can only be divided by a number, got {type(factor).__name__}")
        return self * (1.0 / float(factor))

    def __neg__(self) -> "Objective":
        return self * -1.0

    def __repr__(self) -> str:
        text = ""
        for i, (w, t) in enumerate(self.terms):
            if i == 0:
                text = f"{w:g}*{t.name}"
            else:
                text += f" {'-' if w < 0 else '+'} {abs(w):g}*{t.name}"
        return f"Objective({text})"


def as_objective(obj: Any) -> Objective:
    """An :class:`Objective` from an objective, a term, a feature, a spec string, or a list of
    features / specs (-> :meth:`Objective.per_image`)."""
    if isinstance(obj, Objective):
        return obj
    if isinstance(obj, (Term, str)) or isinstance(obj, Feature):
        return Objective(obj)
    if isinstance(obj, (list, tuple)):
        return Objective.per_image(obj)
    raise TypeError(
        f"cannot make an objective from a {type(obj).__name__}; pass a Feature (e.g. Channel('layer3', 17)), "
        "a spec string ('channel:layer3:17'), a list of features (one image each) or an Objective"
    )


def feature_objective(f: Feature | str, batch: int | None = None) -> Objective:
    return Objective(FeatureTerm(f, batch))


feature = feature_objective


def per_image(features: Sequence[Feature | str]) -> Objective:
    """Image ``i`` maximizes ``features[i]``."""
    return Objective.per_image(features)


def diversity(layer: str, layout: str = "auto") -> Objective:
    """Gram-matrix diversity of the batch at ``layer`` (add it, weighted)."""
    return Objective(Diversity(layer, layout))


def layer_energy(layer: str) -> Objective:
    """The DeepDream objective: mean squared activation of ``layer``."""
    return Objective(FeatureTerm(LayerEnergy(layer)))


def total_variation() -> Objective:
    """Total-variation penalty (subtract it)."""
    return Objective(TotalVariation())


def l2(constant: float = 0.5) -> Objective:
    """L2 penalty toward ``constant`` (subtract it)."""
    return Objective(L2Penalty(constant))


def blur() -> Objective:
    """Blur penalty (subtract it)."""
    return Objective(BlurPenalty())
