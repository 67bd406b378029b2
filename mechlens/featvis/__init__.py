"""Feature visualization: show what any feature wants to see.

* :mod:`~mechlens.featvis.param` — image parameterizations (pixels, Fourier with ``1/f``
  decay, decorrelated colour, sigmoid output);
* :mod:`~mechlens.featvis.transforms` — pad, jitter, random scale and rotation (pure torch,
  explicit generator), composable;
* :mod:`~mechlens.featvis.objectives` — objectives over :mod:`mechlens.features` with
  ``+ - *`` and negation, per-image (batched) objectives, diversity, regularizers;
* :mod:`~mechlens.featvis.render` — :func:`render`, regularized activation maximization;
* :mod:`~mechlens.featvis.deepdream` — :func:`deepdream` on photographs (octaves, roll jitter,
  gradient normalization, tiling).

See ``docs/featvis.md``.
"""
from mechlens.featvis.deepdream import DreamResult, deepdream, dream_objective, load_image, tile_positions
from mechlens.featvis.objectives import (
    BlurPenalty,
    Diversity,
    FeatureTerm,
    L2Penalty,
    Objective,
    PerImageTerm,
    Term,
    TotalVariation,
    as_objective,
    blur,
    diagonal_values,
    diversity,
    feature,
    l2,
    layer_energy,
    per_image,
    total_variation,
)
from mechlens.featvis.param import FourierImage, ImageParam, PixelImage, color_matrix, make_param, rfft2d_freqs
from mechlens.featvis.render import Regularizers, RenderResult, render, save_png, to_uint8
from mechlens.featvis.transforms import (
    Compose,
    Jitter,
    Pad,
    RandomRotate,
    RandomScale,
    Resize,
    Transform,
    as_transform,
    standard_transforms,
)

__all__ = [
    "BlurPenalty", "Compose", "Diversity", "DreamResult", "FeatureTerm", "FourierImage", "ImageParam",
    "Jitter", "L2Penalty", "Objective", "Pad", "PerImageTerm", "PixelImage", "RandomRotate", "RandomScale",
    "Regularizers", "RenderResult", "Resize", "Term", "TotalVariation", "Transform", "as_objective",
    "as_transform", "blur", "color_matrix", "deepdream", "diagonal_values", "diversity", "dream_objective",
    "feature", "l2", "layer_energy", "load_image", "make_param", "per_image", "render", "rfft2d_freqs",
    "save_png", "standard_transforms", "tile_positions", "to_uint8", "total_variation",
]
