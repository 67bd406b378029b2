"""DeepDream: amplify what a layer (or any feature) sees in a real photograph.

    >>> from mechlens.featvis import deepdream, load_image
    >>> result = deepdream(loaded, load_image("skimage:astronaut"), "layer3", octaves=4)
    >>> result.save("dream.png"); result.objective_before, result.objective_after

The classic algorithm (Mordvintsev et al., 2015; the Caffe notebook's version that keeps the
detail of each octave):

* **Octaves.** The photo is shrunk ``octaves - 1`` times by ``octave_scale``. Starting from
  the smallest, each octave runs ``steps`` of gradient ascent, and the detail it added
  (dreamed minus original) is upsampled onto the next larger octave.
* **Random roll jitter.** Each step rolls the image by a random shift of up to ``jitter``
  pixels (from the seeded generator) and rolls the gradient back, so tile seams and the
  network's stride grid never stay in the same place.
* **Gradient normalization.** The step is ``step_size * g / mean|g|`` per image, so the step
  size means the same thing at every octave and for every layer.
* **Tiling.** An image larger than ``tile_size`` (default: the model's input size, from its
  preprocessing) is cut into equally sized, slightly overlapping tiles that are stacked into
  one batch (``internal_batch_size`` bounds how many go through the model at once); their
  gradients are stitched back (overlaps averaged).
* **Objective.** A layer name (``LayerEnergy``: mean squared activation), any Feature or spec
  string, or an :class:`~mechlens.featvis.Objective`, scored on each tile and summed.

Images are ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1]; the model's normalization is applied
inside. Hooks are scoped to the call; ``model.training`` is restored.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from mechlens.data.images import load_image
from mechlens.features.base import LayerEnergy
from mechlens.featvis._session import ModelSession, model_device, model_dtype, model_session, resolve_model
from mechlens.featvis.objectives import Objective, as_objective
from mechlens.featvis.render import save_png

__all__ = ["DreamResult", "deepdream", "dream_objective", "load_image", "tile_positions"]


def dream_objective(objective: Any) -> Objective:
    """A bare layer name -> :class:`LayerEnergy` of that layer; anything else as in
    :func:`mechlens.featvis.as_objective` (a spec string like ``channel:layer3:17``, a Feature,
    an Objective)."""
    if isinstance(objective, str) and ":" not in objective:
        return Objective(LayerEnergy(objective))
    return as_objective(objective)


def tile_positions(length: int, tile: int) -> list[int]:
    """Start offsets of equally sized tiles of ``tile`` covering ``length`` (the last one flush
    with the end; neighbours overlap when ``length`` is not a multiple of ``tile``)."""
    if length <= tile:
        return [0]
    count = math.ceil(length / tile)
    return sorted({round(i * (length - tile) / (count - 1)) for i in range(count)})


class _Tiler:
    """Cuts ``[B, C, H, W]`` into stacked tiles ``[B*T, C, th, tw]`` and stitches gradients back."""

    def __init__(self, height: int, width: int, tile: tuple[int, int] | None, device: torch.device) -> None:
        th, tw = (height, width) if tile is None else (min(tile[0], height), min(tile[1], width))
        self.size = (th, tw)
        self.ys = tile_positions(height, th)
        self.xs = tile_positions(width, tw)
        self.boxes = [(y, x) for y in self.ys for x in self.xs]
        coverage = torch.zeros(1, 1, height, width, device=device)
        for y, x in self.boxes:
            coverage[..., y:y + th, x:x + tw] += 1
        self.inverse_coverage = 1.0 / coverage

    @property
    def count(self) -> int:
        return len(self.boxes)

    def cut(self, images: torch.Tensor) -> torch.Tensor:
        th, tw = self.size
        if self.count == 1 and tuple(images.shape[-2:]) == (th, tw):
            return images
        tiles = torch.stack([images[..., y:y + th, x:x + tw] for y, x in self.boxes], dim=1)
        return tiles.flatten(0, 1)

    def stitch(self, tiles: torch.Tensor, batch: int) -> torch.Tensor:
        th, tw = self.size
        if self.count == 1 and tuple(self.inverse_coverage.shape[-2:]) == (th, tw):
            return tiles
        tiles = tiles.reshape(batch, self.count, *tiles.shape[1:])
        out = tiles.new_zeros(batch, tiles.shape[2], *self.inverse_coverage.shape[-2:])
        for t, (y, x) in enumerate(self.boxes):
            out[..., y:y + th, x:x + tw] += tiles[:, t]
        return out * self.inverse_coverage


class _TiledObjective:
    """Scores and gradients of an objective over the tiles of a batch of images."""

    def __init__(self, session: ModelSession, objective: Objective, normalize: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype, chunk: int | None, batch: int) -> None:
        self.session = session
        self.objective = objective
        self.normalize = normalize
        self.dtype = dtype
        self.chunk = chunk
        self.batch = batch

    def scores(self, tiles: torch.Tensor) -> torch.Tensor:
        x = self.normalize(tiles)
        return self.objective(self.session.forward(x.to(self.dtype) if x.dtype != self.dtype else x), tiles)

    def evaluate(self, images: torch.Tensor, tiler: _Tiler) -> torch.Tensor:
        """``[B]``: mean score over each image's tiles."""
        with torch.no_grad():
            tiles = tiler.cut(images)
            chunk = self.chunk or tiles.shape[0]
            values = torch.cat([self.scores(tiles[i:i + chunk]) for i in range(0, tiles.shape[0], chunk)])
            return values.reshape(self.batch, tiler.count).mean(dim=1)

    def gradient(self, images: torch.Tensor, tiler: _Tiler) -> torch.Tensor:
        """Gradient of the summed tile scores w.r.t. ``images`` (overlaps averaged)."""
        tiles = tiler.cut(images).detach().requires_grad_(True)
        chunk = self.chunk or tiles.shape[0]
        for i in range(0, tiles.shape[0], chunk):
            self.scores(tiles[i:i + chunk]).sum().backward(inputs=[tiles])
        assert tiles.grad is not None
        return tiler.stitch(tiles.grad, self.batch)


@dataclass
class DreamResult:
    """``image``: ``[B, 3, H, W]`` in [0, 1] (CPU, the input's size). ``objective_before`` /
    ``objective_after``: ``[B]`` the objective on the input and on the result (mean over tiles
    at full resolution). ``octave_sizes``: ``(H, W)`` of each octave, smallest first;
    ``tiles``: tiles per image at full resolution."""

    image: torch.Tensor
    objective_before: torch.Tensor
    objective_after: torch.Tensor
    octave_sizes: list[tuple[int, int]]
    tiles: int
    steps: int
    seconds: float
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | Path) -> list[Path]:
        """Write the image as PNG (a batch: ``stem_000.png``, ``stem_001.png``, ...)."""
        path = Path(path)
        if self.image.shape[0] == 1:
            return [save_png(self.image[0], path)]
        return [save_png(im, path.with_name(f"{path.stem}_{i:03d}{path.suffix or '.png'}"))
                for i, im in enumerate(self.image)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "objective_before": [float(v) for v in self.objective_before],
            "objective_after": [float(v) for v in self.objective_after],
            "octave_sizes": [list(s) for s in self.octave_sizes], "tiles": self.tiles, "steps": self.steps,
            "seconds": round(self.seconds, 3), "size": list(self.image.shape[-2:]), "settings": self.settings,
        }


def _resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    shrink = images.shape[-2] > size[0] or images.shape[-1] > size[1]
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def _octave_sizes(height: int, width: int, octaves: int, scale: float, min_size: int) -> list[tuple[int, int]]:
    sizes = [(height, width)]
    for _ in range(octaves - 1):
        h, w = (round(s / scale) for s in sizes[-1])
        if min(h, w) < min_size:
            break
        sizes.append((h, w))
    return sizes[::-1]


def deepdream(
    model: Any,
    image: Any,
    objective: Any,
    *,
    octaves: int = 4,
    octave_scale: float = 1.4,
    steps: int = 10,
    step_size: float = 0.01,
    jitter: int = 32,
    tile_size: int | tuple[int, int] | None | str = "auto",
    internal_batch_size: int | None = None,
    min_size: int = 32,
    preprocessing: Any = None,
    seed: int = 0,
    callback: Callable[[int, int, torch.Tensor], Any] | None = None,
    stop_early: bool | None = None,
) -> DreamResult:
    """Dream ``objective`` into ``image`` (see the module docstring for every step).

    ``model``: ``nn.Module`` or :class:`~mechlens.models.LoadedModel`. ``image``: tensor
    ``[3,H,W]`` / ``[B,3,H,W]`` in [0, 1], a path or ``"skimage:NAME"``. ``objective``: a layer
    name, a feature (spec) or an Objective. ``steps``: per octave. ``tile_size``: ``"auto"``
    (the model's input size when known, else no tiling), ``None`` (never tile) or a size.
    ``internal_batch_size``: most tiles per forward. ``min_size``: smallest octave side.
    ``callback(octave, step, images)`` after each step (raise to stop; hooks are released).
    """
    module, normalize = resolve_model(model, preprocessing)
    if isinstance(image, torch.Tensor) and image.dim() == 4:
        images = image.detach().float()
    else:
        images = load_image(image)[None]
    if images.shape[1] != 3:
        raise ValueError(f"expected RGB images [B, 3, H, W], got {tuple(images.shape)}")
    if octaves < 1 or octave_scale <= 1.0:
        raise ValueError(f"need octaves >= 1 and octave_scale > 1, got {octaves} and {octave_scale}")
    if tile_size == "auto":
        size = getattr(getattr(model, "preprocessing", None), "image_size", None)
        tile = tuple(size) if size is not None else None
    elif tile_size is None:
        tile = None
    else:
        tile = (int(tile_size), int(tile_size)) if isinstance(tile_size, int) else tuple(int(s) for s in tile_size)
    obj = dream_objective(objective)
    if obj.batch_size is not None:
        raise ValueError("DeepDream scores every tile with the same objective; a per-image objective does not apply")
    device = model_device(module)
    dtype = model_dtype(module)
    generator = torch.Generator().manual_seed(int(seed))
    images = images.to(device).clamp(0, 1)
    batch, _, height, width = images.shape
    sizes = _octave_sizes(height, width, octaves, octave_scale, min_size)
    start = time.perf_counter()

    with model_session(module, obj.layers, stop_early=stop_early) as session:
        tiled = _TiledObjective(session, obj, normalize, dtype, internal_batch_size, batch)
        full_tiler = _Tiler(height, width, tile, device)
        before = tiled.evaluate(images, full_tiler)
        pyramid = [_resize(images, s) for s in sizes]
        detail = torch.zeros_like(pyramid[0])
        x = images
        for octave, base in enumerate(pyramid):
            detail = _resize(detail, tuple(base.shape[-2:]))
            x = (base + detail).clamp(0, 1)
            h, w = base.shape[-2:]
            tiler = full_tiler if (h, w) == (height, width) else _Tiler(h, w, tile, device)
            for step in range(steps):
                dy, dx = (int(v) for v in torch.randint(-jitter, jitter + 1, (2,), generator=generator)) if jitter else (0, 0)
                rolled = torch.roll(x, shifts=(dy, dx), dims=(-2, -1))
                grad = torch.roll(tiled.gradient(rolled, tiler), shifts=(-dy, -dx), dims=(-2, -1))
                grad = grad / (grad.abs().mean(dim=(1, 2, 3), keepdim=True) + 1e-8)
                x = (x + step_size * grad).clamp(0, 1)
                if callback is not None:
                    callback(octave, step, x.detach())
            detail = x - base
        after = tiled.evaluate(x, full_tiler)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    settings = {
        "octaves": len(sizes), "octave_scale": octave_scale, "step_size": step_size, "jitter": jitter,
        "tile_size": list(full_tiler.size), "objective": repr(obj), "seed": int(seed), "device": str(device),
    }
    return DreamResult(
        image=x.detach().float().cpu(), objective_before=before.float().cpu(), objective_after=after.float().cpu(),
        octave_sizes=[tuple(int(v) for v in s) for s in sizes], tiles=full_tiler.count, steps=steps * len(sizes),
        seconds=time.perf_counter() - start, settings=settings,
    )
