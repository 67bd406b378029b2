"""Image parameterizations: what the optimizer actually changes.

An :class:`ImageParam` is an ``nn.Module`` whose parameters are optimized and whose
``forward()`` returns the images ``[B, 3, H, W]`` in ``[0, 1]``:

``PixelImage``
    one free value per pixel and colour.
``FourierImage``
    the image's 2-D real spectrum, scaled by ``1 / f**decay_power`` (Lucid's spectral
    parameterization: low frequencies change fastest, which whitens the gradient and gives
    far less high-frequency noise than pixels).

Both go through the same colour head (:meth:`ImageParam.to_rgb`): an optional *decorrelated*
colour space (the square root of ImageNet's colour covariance, Lucid's
``color_correlation_svd_sqrt``, or its Cholesky factor) and a sigmoid, so every value the
optimizer can reach is a valid image. The model's own normalization is applied later, by
:func:`mechlens.featvis.render` (after the transforms), never here.

Randomness: the initial values are drawn from an explicit ``torch.Generator`` (on the CPU, so a
seed gives the same start on every device) and moved to ``device``.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "COLOR_CORRELATION_SVD_SQRT",
    "FourierImage",
    "ImageParam",
    "PixelImage",
    "color_matrix",
    "make_param",
    "rfft2d_freqs",
]

# Square root of ImageNet's RGB covariance (Lucid, lucid/optvis/param/color.py).
COLOR_CORRELATION_SVD_SQRT = ((0.26, 0.09, 0.02), (0.27, 0.00, -0.05), (0.27, -0.09, 0.03))
DECORRELATIONS = ("svd", "cholesky", "none")


def color_matrix(kind: str = "svd") -> torch.Tensor:
    """``[3, 3]`` matrix ``M`` mapping decorrelated colour to RGB (``rgb = M @ c``), scaled so its
    largest column norm is 1. ``"svd"``: Lucid's symmetric square root of the covariance;
    ``"cholesky"``: the lower-triangular factor of the same covariance; ``"none"``: identity."""
    if kind not in DECORRELATIONS:
        raise ValueError(f"unknown colour decorrelation {kind!r}; expected one of {', '.join(DECORRELATIONS)}")
    if kind == "none":
        return torch.eye(3)
    root = torch.tensor(COLOR_CORRELATION_SVD_SQRT, dtype=torch.float64)
    if kind == "cholesky":
        root = torch.linalg.cholesky(root @ root.T)
    root = root / root.norm(dim=0).max()
    return root.float()


def rfft2d_freqs(height: int, width: int) -> torch.Tensor:
    """Frequency magnitude of every bin of ``torch.fft.rfft2`` of an ``height x width`` image."""
    fy = torch.fft.fftfreq(height, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(width, dtype=torch.float64)[None, :]
    return torch.sqrt(fx * fx + fy * fy)


def _size(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    height, width = (int(s) for s in size)
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {size!r}")
    return height, width


class ImageParam(nn.Module):
    """Base class: ``forward()`` -> images ``[B, 3, H, W]`` in ``[0, 1]``.

    Subclasses implement :meth:`raw` (unbounded values in the decorrelated colour space);
    this class applies the colour matrix and the sigmoid.
    """

    batch: int
    height: int
    width: int

    def __init__(self, batch: int, size: int | tuple[int, int], *, decorrelate: str | bool = "svd",
                 sigmoid: bool = True) -> None:
        super().__init__()
        if int(batch) < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.batch = int(batch)
        self.height, self.width = _size(size)
        kind = "svd" if decorrelate is True else "none" if decorrelate is False else decorrelate
        self.decorrelate = kind
        self.sigmoid = bool(sigmoid)
        self.register_buffer("color", color_matrix(kind), persistent=False)

    def raw(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_rgb(self, raw: torch.Tensor) -> torch.Tensor:
        """Decorrelated values ``[B, 3, H, W]`` -> RGB in ``[0, 1]`` (sigmoid) or unbounded."""
        if self.decorrelate != "none":
            raw = torch.einsum("rc,bchw->brhw", self.color, raw)
        return torch.sigmoid(raw) if self.sigmoid else raw

    def forward(self) -> torch.Tensor:
        return self.to_rgb(self.raw())

    def extra_repr(self) -> str:
        return f"batch={self.batch}, size=({self.height}, {self.width}), decorrelate={self.decorrelate!r}, sigmoid={self.sigmoid}"


class PixelImage(ImageParam):
    """One free parameter per pixel (in the decorrelated colour space unless ``decorrelate=False``)."""

    def __init__(self, batch: int = 1, size: int | tuple[int, int] = 128, *, sd: float = 0.01,
                 decorrelate: str | bool = "svd", sigmoid: bool = True,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(batch, size, decorrelate=decorrelate, sigmoid=sigmoid)
        init = torch.randn(self.batch, 3, self.height, self.width, generator=_cpu_generator(generator)) * sd
        self.pixels = nn.Parameter(init)
        if device is not None:
            self.to(device)

    def raw(self) -> torch.Tensor:
        return self.pixels


class FourierImage(ImageParam):
    """The image's real 2-D spectrum, scaled by ``1 / max(f, 1/max(H, W)) ** decay_power``.

    ``decay_power=1`` is Lucid's default (natural images have ~``1/f`` amplitude spectra).
    The inverse FFT uses ``norm="ortho"`` and the result is divided by 4, as in Lucid.
    """

    def __init__(self, batch: int = 1, size: int | tuple[int, int] = 128, *, sd: float = 0.01,
                 decay_power: float = 1.0, decorrelate: str | bool = "svd", sigmoid: bool = True,
                 generator: torch.Generator | None = None, device: str | torch.device | None = None) -> None:
        super().__init__(batch, size, decorrelate=decorrelate, sigmoid=sigmoid)
        freqs = rfft2d_freqs(self.height, self.width)
        scale = 1.0 / torch.clamp(freqs, min=1.0 / max(self.height, self.width)) ** float(decay_power)
        self.decay_power = float(decay_power)
        self.register_buffer("scale", scale.float()[None, None], persistent=False)
        shape = (self.batch, 3, *freqs.shape, 2)  # real and imaginary parts
        init = torch.randn(shape, generator=_cpu_generator(generator)) * sd
        self.spectrum = nn.Parameter(init)
        if device is not None:
            self.to(device)

    def raw(self) -> torch.Tensor:
        spectrum = torch.view_as_complex(self.spectrum) * self.scale
        image = torch.fft.irfft2(spectrum, s=(self.height, self.width), norm="ortho")
        return image / 4.0


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is not None and generator.device.type != "cpu":
        raise ValueError("pass a CPU torch.Generator: initial values are drawn on the CPU and moved, so a seed "
                         "gives the same image on every device")
    return generator


PARAMETERIZATIONS = ("fft", "pixel")


def make_param(kind: str = "fft", *, batch: int = 1, size: int | tuple[int, int] = 128,
               decorrelate: str | bool = "svd", sd: float = 0.01, decay_power: float = 1.0,
               generator: torch.Generator | None = None, device: str | torch.device | None = None) -> ImageParam:
    """Build a parameterization by name: ``"fft"`` (:class:`FourierImage`) or ``"pixel"``."""
    if kind == "fft":
        return FourierImage(batch, size, sd=sd, decay_power=decay_power, decorrelate=decorrelate,
                            generator=generator, device=device)
    if kind == "pixel":
        return PixelImage(batch, size, sd=sd, decorrelate=decorrelate, generator=generator, device=device)
    raise ValueError(f"unknown parameterization {kind!r}; expected one of {', '.join(PARAMETERIZATIONS)}")
