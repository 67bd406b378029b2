"""Images in, model input out: :func:`load_image` reads one image from anywhere as ``[3, H, W]``
pixels in [0, 1] (the house's input space; a ``LoadedModel`` normalises them itself)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["load_image"]


def load_image(source: Any, *, max_side: int | None = None) -> torch.Tensor:
    """An RGB image ``[3, H, W]`` in [0, 1] from a file path, ``"skimage:NAME"`` (a photo bundled
    with scikit-image, e.g. ``skimage:astronaut``), a PIL image, an ``HxW[xC]`` array or a tensor.
    ``max_side`` shrinks it (antialiased) so that its longer side is at most that."""
    from PIL import Image

    if isinstance(source, torch.Tensor):
        image = source.detach().float()
        if image.dim() == 4 and image.shape[0] == 1:
            image = image[0]
        if image.dim() != 3:
            raise ValueError(f"expected an image [3, H, W], got shape {tuple(image.shape)}")
    elif isinstance(source, (str, Path)) and str(source).startswith("skimage:"):
        from mechlens.data.adapters import SkimagePhotos

        image = SkimagePhotos([str(source).split(":", 1)[1]], image_size=None)[0][0]
    elif isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"no image file at {path} (or use skimage:astronaut for a bundled photo)")
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        image = torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255.0
    elif isinstance(source, Image.Image):
        image = torch.from_numpy(np.asarray(source.convert("RGB")).copy()).permute(2, 0, 1).float() / 255.0
    else:
        array = np.asarray(source)
        if array.ndim == 2:
            array = np.repeat(array[..., None], 3, axis=2)
        scale = 255.0 if np.issubdtype(array.dtype, np.integer) else 1.0
        image = torch.from_numpy(array[..., :3].astype(np.float32) / scale).permute(2, 0, 1)
    if image.shape[0] == 1:
        image = image.expand(3, -1, -1)
    if max_side is not None and max(image.shape[-2:]) > max_side:
        h, w = image.shape[-2:]
        factor = max_side / max(h, w)
        size = (max(1, round(h * factor)), max(1, round(w * factor)))
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
    return image.clamp(0, 1).contiguous()
