"""Transformation robustness: random pads, shifts, scales and rotations applied to the image at
every optimization step, so that the feature has to be excited robustly rather than by one
exact pattern of pixels.

Pure torch, batched, and random only through the ``torch.Generator`` passed to each call (a
CPU generator: the choices are drawn on the host and the images never leave the device).
A transform is any :class:`Transform` (``t(images, generator) -> images``) or any plain
callable ``f(images) -> images``; :class:`Compose` chains them.

    >>> t = Compose([Pad(12), Jitter(8), RandomScale([0.9, 1.0, 1.1]), RandomRotate(range(-10, 11))])
    >>> out = t(images, torch.Generator().manual_seed(0))

:func:`standard_transforms` is Lucent's (and Lucid's) default list: pad 12 (constant 0.5),
jitter 8, scale 0.9..1.1, rotate -10..10 degrees (plus five extra zeros), jitter 4.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "Compose",
    "Jitter",
    "Pad",
    "RandomRotate",
    "RandomScale",
    "Resize",
    "Transform",
    "as_transform",
    "standard_transforms",
]


def _choice(values: Sequence[float], generator: torch.Generator | None, size: int | None = None):
    index = torch.randint(len(values), (1 if size is None else size,), generator=generator)
    if size is None:
        return values[int(index)]
    return torch.as_tensor(values, dtype=torch.float32)[index]


class Transform:
    """Base class of the built-in transforms: ``__call__(images [B,C,H,W], generator)``."""

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class Pad(Transform):
    """Pad every side by ``width`` pixels: ``mode="constant"`` with ``value`` (0.5 = mid grey,
    as in Lucent's standard transforms), or ``"reflect"`` / ``"replicate"``."""

    def __init__(self, width: int, mode: str = "constant", value: float = 0.5) -> None:
        if width < 0:
            raise ValueError(f"pad width must be >= 0, got {width}")
        if mode not in ("constant", "reflect", "replicate", "circular"):
            raise ValueError(f"unknown pad mode {mode!r}")
        self.width, self.mode, self.value = int(width), mode, float(value)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.width == 0:
            return images
        if self.mode == "constant":
            return F.pad(images, [self.width] * 4, mode="constant", value=self.value)
        return F.pad(images, [self.width] * 4, mode=self.mode)


class Jitter(Transform):
    """Shift the batch by a random ``(dy, dx)`` in ``[0, d)`` pixels (one shift per step, the
    size unchanged). The shift wraps around (``torch.roll``); after a :class:`Pad` of at least
    ``d`` pixels what wraps in is padding, so this equals Lucent's translate-with-fill at the
    cost of one copy."""

    def __init__(self, d: int) -> None:
        if d < 1:
            raise ValueError(f"jitter needs d >= 1, got {d}")
        self.d = int(d)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.d == 1:
            return images
        dy, dx = (int(v) for v in torch.randint(self.d, (2,), generator=generator))
        if dy == 0 and dx == 0:
            return images
        return torch.roll(images, shifts=(dy, dx), dims=(-2, -1))


class RandomScale(Transform):
    """Resize the batch by a factor drawn from ``scales`` (bilinear; the size changes, as in
    Lucent, so the network sees the pattern at slightly different scales)."""

    def __init__(self, scales: Iterable[float]) -> None:
        self.scales = [float(s) for s in scales]
        if not self.scales or min(self.scales) <= 0:
            raise ValueError(f"scales must be a non-empty list of positive factors, got {self.scales}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        scale = _choice(self.scales, generator)
        if scale == 1.0:
            return images
        h, w = images.shape[-2:]
        size = (max(1, math.ceil(scale * h)), max(1, math.ceil(scale * w)))
        return F.interpolate(images, size=size, mode="bilinear", align_corners=True)


class RandomRotate(Transform):
    """Rotate each image by its own angle (degrees) drawn from ``angles``, about the centre,
    bilinear with zeros outside (one batched ``affine_grid`` / ``grid_sample``)."""

    def __init__(self, angles: Iterable[float]) -> None:
        self.angles = [float(a) for a in angles]
        if not self.angles:
            raise ValueError("angles must not be empty")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        b, _, h, w = images.shape
        radians = _choice(self.angles, generator, size=b) * (math.pi / 180.0)
        if not bool(radians.any()):
            return images
        cos, sin = radians.cos(), radians.sin()
        zero = torch.zeros_like(cos)
        # rotation in pixel space, expressed in affine_grid's normalized coordinates
        theta = torch.stack([
            torch.stack([cos, -sin * (h / w), zero], dim=1),
            torch.stack([sin * (w / h), cos, zero], dim=1),
        ], dim=1).to(device=images.device, dtype=images.dtype, non_blocking=True)
        grid = F.affine_grid(theta, [b, images.shape[1], h, w], align_corners=False)
        return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Resize(Transform):
    """Resize to a fixed ``size`` (for models that need one input size, e.g. ViTs)."""

    def __init__(self, size: int | tuple[int, int]) -> None:
        self.size = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if tuple(images.shape[-2:]) == self.size:
            return images
        return F.interpolate(images, size=self.size, mode="bilinear", align_corners=False)


class Compose(Transform):
    """Apply ``transforms`` in order (built-in :class:`Transform` objects get the generator;
    plain callables are called with the images only)."""

    def __init__(self, transforms: Iterable[Transform | Callable[[torch.Tensor], torch.Tensor]]) -> None:
        self.transforms = list(transforms)
        for t in self.transforms:
            if not callable(t):
                raise TypeError(f"a transform must be callable, got {type(t).__name__}")

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            images = t(images, generator) if isinstance(t, Transform) else t(images)
        return images

    def __len__(self) -> int:
        return len(self.transforms)


def standard_transforms() -> list[Transform]:
    """Lucent's ``standard_transforms`` (Lucid's defaults), as mechlens transforms."""
    return [
        Pad(12, mode="constant", value=0.5),
        Jitter(8),
        RandomScale([1 + (i - 5) / 50.0 for i in range(11)]),
        RandomRotate(list(range(-10, 11)) + 5 * [0]),
        Jitter(4),
    ]


def as_transform(transforms) -> Compose:
    """``"standard"`` -> :func:`standard_transforms`; ``None`` / ``"none"`` / ``()`` -> nothing;
    a :class:`Transform`, a callable or a list of them -> :class:`Compose`."""
    if isinstance(transforms, Compose):
        return transforms
    if transforms is None:
        return Compose([])
    if isinstance(transforms, str):
        if transforms == "standard":
            return Compose(standard_transforms())
        if transforms == "none":
            return Compose([])
        raise ValueError(f"unknown transforms {transforms!r}; expected 'standard', 'none' or a list of transforms")
    if callable(transforms):
        return Compose([transforms])
    return Compose(transforms)
