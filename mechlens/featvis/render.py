"""Activation maximization: optimize images so that features fire.

    >>> from mechlens.features import Channel
    >>> result = render(loaded, Objective.per_image([Channel("layer3", c) for c in range(16)]),
    ...                 size=128, steps=256, seed=0)
    >>> result.images.shape                      # [16, 3, 128, 128] in [0, 1], image i shows channel i
    >>> result.save("out/")                      # PNG files

One step: the parameterization produces the images (sigmoid, decorrelated colour), the
transforms jitter / scale / rotate them (drawn from a generator seeded by ``seed``), the model's
normalization is applied, the model runs **only up to the last layer the objective reads**, and
Adam ascends the sum of the per-image scores. Only the image parameters receive gradients (the
model's weights are left alone). Hooks live for the whole call and are removed in ``finally``
(also on ``KeyboardInterrupt`` from a callback); ``model.training`` is restored.
"""
from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens.featvis._session import declared_input_size, model_device, model_dtype, model_session, resolve_model
from mechlens.featvis.objectives import Objective, as_objective, blur, l2, total_variation
from mechlens.featvis.param import ImageParam, make_param
from mechlens.featvis.transforms import as_transform

__all__ = ["Regularizers", "RenderResult", "image_filename", "render", "save_png", "to_uint8"]

Callback = Callable[[int, torch.Tensor, torch.Tensor], Any]


@dataclass(frozen=True)
class Regularizers:
    """Weights of the image penalties subtracted from the objective (all off by default).

    ``tv``: total variation (mean absolute neighbour difference); ``l2``: mean squared distance
    from mid grey; ``blur``: Lucid's blur penalty (distance to a 3x3 blur of the image).
    """

    tv: float = 0.0
    l2: float = 0.0
    blur: float = 0.0

    def apply(self, objective: Objective) -> Objective:
        if self.tv:
            objective = objective - self.tv * total_variation()
        if self.l2:
            objective = objective - self.l2 * l2()
        if self.blur:
            objective = objective - self.blur * blur()
        return objective

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[B, C, H, W]`` floats in [0, 1] -> ``[B, H, W, C]`` uint8."""
    array = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    return array.permute(0, 2, 3, 1).numpy()


def save_png(image: torch.Tensor, path: str | Path) -> Path:
    """Write one image ``[C, H, W]`` (or ``[1, C, H, W]``) in [0, 1] as a PNG file."""
    from PIL import Image

    if image.dim() == 4:
        if image.shape[0] != 1:
            raise ValueError(f"save_png writes one image; got a batch of {image.shape[0]}")
        image = image[0]
    array = to_uint8(image[None])[0]
    if array.shape[-1] == 1:
        array = array[..., 0]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def image_filename(index: int, name: str, prefix: str = "") -> str:
    """``{prefix}{index:03d}_{name}.png`` with the name made safe for any file system."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_.")[:80] or "image"
    return f"{prefix}{index:03d}_{slug}.png"


@dataclass
class RenderResult:
    """What :func:`render` returns.

    ``images``: ``[B, 3, H, W]`` in [0, 1] (CPU). ``losses``: ``[steps, B]`` per-image loss
    (minus the objective's score, regularizers included) at each step, on transformed images.
    ``objective``: ``[B]`` final score on the untransformed images. ``activations``: each term's
    unweighted value ``[B]`` on the final images (for a per-image objective the ``per_image``
    entry is image ``i``'s value of feature ``i``; :attr:`target_values` picks it).
    ``names``: what each image shows.
    """

    images: torch.Tensor
    losses: torch.Tensor
    objective: torch.Tensor
    activations: dict[str, torch.Tensor]
    names: list[str]
    seed: int
    steps: int
    seconds: float
    stopped_early: bool
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def target_values(self) -> torch.Tensor:
        """``[B]``: each image's final value of its target feature (the objective's only feature
        term; the objective's score when there is none or several)."""
        name = self.settings.get("target")
        return self.activations[name] if name in self.activations else self.objective

    @property
    def loss_curve(self) -> torch.Tensor:
        """``[steps]``: the mean loss over the batch at each step."""
        return self.losses.mean(dim=1)

    def save(self, directory: str | Path, prefix: str = "") -> list[Path]:
        """Write one PNG per image, ``{prefix}{i:03d}_{name}.png``; returns the paths."""
        directory = Path(directory)
        return [
            save_png(image, directory / image_filename(i, name or "image", prefix))
            for i, (image, name) in enumerate(zip(self.images, self.names))
        ]

    def to_dict(self, curve_points: int = 64) -> dict[str, Any]:
        """A JSON-able summary: names, final values, and the loss curve (at most ``curve_points``
        steps per image, evenly spaced, the last step included)."""
        steps = self.losses.shape[0]
        if steps:
            picks = np.unique(np.linspace(0, steps - 1, min(steps, curve_points)).round().astype(int))
        else:
            picks = np.zeros(0, dtype=int)
        return {
            "names": self.names,
            "target_values": [float(v) for v in self.target_values],
            "objective": [float(v) for v in self.objective],
            "activations": {k: [float(x) for x in v] for k, v in self.activations.items()},
            "loss_curve": {"steps": [int(p) + 1 for p in picks],
                           "loss": [[float(self.losses[p, b]) for p in picks] for b in range(self.losses.shape[1])]},
            "seed": self.seed, "steps": self.steps, "seconds": round(self.seconds, 3),
            "stopped_early": self.stopped_early, "settings": self.settings,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_dumps(self.to_dict(), indent=2))
        return path


def render(
    model: Any,
    objective: Any,
    *,
    size: int | tuple[int, int] = 128,
    steps: int = 256,
    batch: int | None = None,
    param: str | ImageParam = "fft",
    decorrelate: str | bool = "svd",
    transforms: Any = "standard",
    lr: float = 0.05,
    seed: int = 0,
    preprocessing: Any = None,
    regularizers: Regularizers | Mapping[str, float] | None = None,
    thresholds: Sequence[int] = (),
    callback: Callback | None = None,
    stop_early: bool | None = None,
    input_size: tuple[int, int] | None = None,
) -> RenderResult:
    """Maximize ``objective`` over images (see the module docstring).

    ``model``: an ``nn.Module`` or a :class:`~mechlens.models.LoadedModel` (whose
    normalization is then applied inside; pass ``preprocessing`` to override, ``False`` for
    none). ``objective``: an :class:`Objective`, a Feature, a spec string, or a list of them
    (one image each). ``batch``: images to optimize (default: one per feature of a per-image
    objective, else 1). ``param``: ``"fft"`` (default), ``"pixel"`` or an :class:`ImageParam`
    (which then fixes batch and size). ``transforms``: ``"standard"`` (Lucent's list),
    ``None`` or a list. ``regularizers``: :class:`Regularizers` or a dict like ``{"tv": 0.05}``.
    ``thresholds``: steps at which to keep a copy of the images (``result.snapshots``).
    ``callback(step, images, scores)`` runs after every step (raise to stop; hooks are still
    released). ``stop_early``: stop the forward after the last needed layer (``None``: auto).
    ``input_size``: ``(H, W)`` the model takes; the transformed images are resized to it before
    each forward (default: the size a fixed-size model declares — a timm ``patch_embed`` with a
    strict image size, torchvision's ``VisionTransformer.image_size`` —, else none: the model sees
    the padded and rescaled images as they are). Deterministic for a given ``seed`` on a given device.
    """
    module, normalize = resolve_model(model, preprocessing)
    obj = as_objective(objective)
    if regularizers is not None:
        regs = regularizers if isinstance(regularizers, Regularizers) else Regularizers(**dict(regularizers))
        obj = regs.apply(obj)
    else:
        regs = Regularizers()
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    device = model_device(module)
    dtype = model_dtype(module)
    generator = torch.Generator().manual_seed(int(seed))
    if isinstance(param, ImageParam):
        image_param = param.to(device)
        if batch is not None and batch != image_param.batch:
            raise ValueError(f"batch={batch} but the parameterization holds {image_param.batch} images")
        batch = image_param.batch
    else:
        batch = batch if batch is not None else (obj.batch_size or obj.min_batch)
        image_param = make_param(param, batch=batch, size=size, decorrelate=decorrelate,
                                 generator=generator, device=device)
    obj.check_batch(batch)
    transform = as_transform(transforms)
    fixed = tuple(input_size) if input_size is not None else declared_input_size(module)

    def to_model(x: torch.Tensor) -> torch.Tensor:
        if fixed is not None and tuple(x.shape[-2:]) != fixed:
            x = torch.nn.functional.interpolate(x, size=fixed, mode="bilinear", align_corners=False)
        return x.to(dtype) if x.dtype != dtype else x

    params = [p for p in image_param.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    scores = torch.zeros(steps, batch, device=device)
    keep = {int(t) for t in thresholds}
    snapshots: dict[int, torch.Tensor] = {}
    start = time.perf_counter()
    with model_session(module, obj.layers, stop_early=stop_early) as session:
        for step in range(steps):
            optimizer.zero_grad(set_to_none=True)
            images = image_param()
            x = normalize(transform(images, generator))
            try:
                activations = session.forward(to_model(x))
            except (AssertionError, RuntimeError, ValueError) as error:
                if step or fixed is not None or tuple(x.shape[-2:]) == (image_param.height, image_param.width):
                    raise
                raise ValueError(
                    f"the model refused a {x.shape[-2]}x{x.shape[-1]} input ({error}); the transforms pad and "
                    "rescale the image: pass input_size=(H, W), the size the model takes, to resize to it"
                ) from error
            score = obj(activations, images)
            (-score.sum()).backward(inputs=params)
            optimizer.step()
            scores[step] = score.detach()
            if step + 1 in keep:
                with torch.no_grad():
                    snapshots[step + 1] = image_param().detach().cpu()
            if callback is not None:
                callback(step, images.detach(), score.detach())
        with torch.no_grad():
            images = image_param()
            x = normalize(images)
            final, values = obj.evaluate(session.forward(to_model(x)), images)
        stopped_early = session.stops_early
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    settings = {
        "size": [image_param.height, image_param.width], "batch": batch,
        "param": type(image_param).__name__, "decorrelate": image_param.decorrelate, "lr": lr,
        "transforms": [repr(t) for t in transform.transforms], "regularizers": regs.to_dict(),
        "objective": repr(obj), "target": obj.target_name, "device": str(device),
    }
    return RenderResult(
        images=images.detach().float().cpu(), losses=(-scores).cpu(), objective=final.float().cpu(),
        activations={k: v.detach().float().cpu() for k, v in values.items()}, names=obj.image_names(batch),
        seed=int(seed), steps=steps, seconds=seconds, stopped_early=stopped_early, snapshots=snapshots,
        settings=settings,
    )
