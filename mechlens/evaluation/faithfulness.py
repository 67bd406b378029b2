"""Faithfulness and localisation of attribution maps.

* **Deletion / insertion** (Petsiuk et al., RISE; "pixel flipping", Samek et al.): remove the
  pixels a map ranks highest first (deletion: replace them by a baseline; insertion: start from
  the baseline and put them back) and follow the explained feature's value. A faithful map makes
  the deletion curve fall fast (low AUC) and the insertion curve rise fast (high AUC). All steps
  of all samples run batched, ``internal_batch_size`` rows at a time. Ties in a map are broken
  by a seeded random order, so a constant map is a random deletion order.
* **Pointing game** (Zhang et al.): is the map's maximum inside the ground-truth mask (within
  ``tolerance`` pixels)?
* **IoU**: the top pixels of the map (as many as the mask has, by default) against the mask.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mechlens.attribution.base import Attribution, chunk_ranges, eval_mode, resolve_target, unwrap_model
from mechlens.attribution.baselines import make_baseline

__all__ = [
    "PerturbationCurve",
    "PointingResult",
    "boxes_to_masks",
    "deletion_curve",
    "insertion_curve",
    "localization_iou",
    "perturbation_curve",
    "pointing_game",
    "random_maps",
]


def _heatmap(saliency: Attribution | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if isinstance(saliency, Attribution):
        return saliency.heatmap(size).detach()
    heat = torch.as_tensor(saliency).detach()
    if heat.dim() == 4:
        if heat.shape[1] != 1:
            raise ValueError(
                f"got a [B, C, H, W] map with C={heat.shape[1]}; pass an Attribution (its heatmap() folds the "
                "channels the method's way) or a [B, H, W] map"
            )
        heat = heat[:, 0]
    if heat.dim() != 3:
        raise ValueError(f"expected maps [B, H, W], got {tuple(heat.shape)}")
    if tuple(heat.shape[-2:]) != tuple(size):
        heat = F.interpolate(heat.unsqueeze(1).float(), size=size, mode="bilinear", align_corners=False).squeeze(1)
    return heat


def random_maps(shape: Sequence[int], *, seed: int = 0) -> torch.Tensor:
    """Uniform random maps (the "random attribution" reference of deletion / insertion)."""
    return torch.rand(tuple(shape), generator=torch.Generator().manual_seed(seed))


@dataclass
class PerturbationCurve:
    """``scores`` ``[B, steps + 1]`` of the explained feature at ``fractions`` ``[steps + 1]`` of
    the pixels removed (deletion) or inserted (insertion); ``auc`` ``[B]`` by the trapezoidal
    rule over fractions in [0, 1]."""

    mode: str
    baseline: str
    fractions: torch.Tensor
    scores: torch.Tensor
    auc: torch.Tensor

    @property
    def mean_auc(self) -> float:
        return float(self.auc.mean())

    def normalized_auc(self) -> torch.Tensor:
        """AUC divided by the score of the unperturbed input (deletion: first point; insertion:
        last point), comparable across samples with different scores."""
        reference = self.scores[:, 0] if self.mode == "deletion" else self.scores[:, -1]
        return self.auc / reference

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "baseline": self.baseline, "fractions": self.fractions.tolist(),
            "mean_scores": self.scores.mean(dim=0).tolist(), "auc": self.auc.tolist(), "mean_auc": self.mean_auc,
        }


def perturbation_curve(
    model: Any,
    inputs: torch.Tensor,
    target: Any,
    saliency: Attribution | torch.Tensor,
    *,
    mode: str = "deletion",
    steps: int = 32,
    baseline: Any = "zeros",
    internal_batch_size: int | None = 256,
    mean: Any = None,
    blur_sigma: float | None = None,
    seed: int = 0,
) -> PerturbationCurve:
    """Deletion or insertion curve of ``saliency`` (an :class:`Attribution` or ``[B, H, W]``
    maps, resized to the input) for the feature ``target`` (see the module docstring).
    ``baseline``: ``zeros`` | ``blur`` | ``mean`` | number | tensor
    (:func:`mechlens.attribution.make_baseline`)."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    if steps < 1:
        raise ValueError("steps must be at least 1")
    model = unwrap_model(model)
    inputs = inputs.detach()
    resolved = resolve_target(model, inputs, target)
    batch, _, height, width = inputs.shape
    pixels = height * width
    heat = _heatmap(saliency, (height, width)).to(inputs.device).reshape(batch, pixels)
    if heat.shape[0] != batch:
        raise ValueError(f"got {heat.shape[0]} maps for {batch} inputs")
    generator = torch.Generator().manual_seed(seed)
    perm = torch.randperm(pixels, generator=generator).to(inputs.device)
    order = perm[torch.argsort(-heat[:, perm].float(), dim=1, stable=True)]  # [B, P], most relevant first
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=inputs.device).expand(batch, pixels))
    counts = torch.round(torch.linspace(0, pixels, steps + 1, device=inputs.device)).long()
    base = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma,
                         generator=torch.Generator(device=inputs.device).manual_seed(seed)).detach()
    scores = torch.empty((steps + 1) * batch, device=inputs.device, dtype=inputs.dtype)
    with eval_mode(model), torch.no_grad():
        for start, stop in chunk_ranges((steps + 1) * batch, internal_batch_size):
            rows = torch.arange(start, stop, device=inputs.device)
            step, sample = rows // batch, rows % batch
            changed = (ranks[sample] < counts[step].unsqueeze(1)).view(-1, 1, height, width)
            if mode == "deletion":
                images = torch.where(changed, base[sample], inputs[sample])
            else:
                images = torch.where(changed, inputs[sample], base[sample])
            values, _ = resolved.select(sample.cpu()).forward(model, images, grads=False)
            scores[start:stop] = values
    scores = scores.view(steps + 1, batch).T.contiguous()
    fractions = counts.to(inputs.dtype) / pixels
    auc = torch.trapezoid(scores, fractions.unsqueeze(0).expand_as(scores), dim=1)
    name = baseline if isinstance(baseline, str) else "custom"
    return PerturbationCurve(mode=mode, baseline=name, fractions=fractions.cpu(), scores=scores.cpu(), auc=auc.cpu())


def deletion_curve(model: Any, inputs: torch.Tensor, target: Any, saliency: Attribution | torch.Tensor, **kwargs: Any) -> PerturbationCurve:
    """:func:`perturbation_curve` with ``mode="deletion"`` (lower AUC = more faithful)."""
    return perturbation_curve(model, inputs, target, saliency, mode="deletion", **kwargs)


def insertion_curve(model: Any, inputs: torch.Tensor, target: Any, saliency: Attribution | torch.Tensor, **kwargs: Any) -> PerturbationCurve:
    """:func:`perturbation_curve` with ``mode="insertion"`` (higher AUC = more faithful)."""
    return perturbation_curve(model, inputs, target, saliency, mode="insertion", **kwargs)


# ---------------------------------------------------------------------------- localisation
def boxes_to_masks(boxes: Any, size: tuple[int, int]) -> torch.Tensor:
    """Boxes ``[B, 4]`` as ``(x0, y0, x1, y1)`` pixels (x1/y1 exclusive; fractional values
    rounded outwards) to boolean masks ``[B, H, W]``."""
    boxes = torch.as_tensor(boxes, dtype=torch.float64).reshape(-1, 4)
    height, width = size
    ys = torch.arange(height, dtype=torch.float64).view(1, -1, 1)
    xs = torch.arange(width, dtype=torch.float64).view(1, 1, -1)
    x0, y0, x1, y1 = (boxes[:, i].floor().view(-1, 1, 1) if i < 2 else boxes[:, i].ceil().view(-1, 1, 1) for i in range(4))
    return (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)


def _masks(masks: Any, batch: int) -> torch.Tensor:
    masks = torch.as_tensor(masks)
    if masks.dim() == 2:
        masks = masks.unsqueeze(0).expand(batch, -1, -1)
    if masks.dim() != 3 or masks.shape[0] != batch:
        raise ValueError(f"masks must be [B, H, W] with B={batch}, got {tuple(masks.shape)}")
    masks = masks.bool()
    empty = ~masks.flatten(1).any(dim=1)
    if empty.any():
        raise ValueError(f"masks of samples {empty.nonzero().flatten().tolist()} are empty; nothing to point at")
    return masks


def _dilate(masks: torch.Tensor, tolerance: int) -> torch.Tensor:
    if tolerance <= 0:
        return masks
    grown = F.max_pool2d(masks.float().unsqueeze(1), kernel_size=2 * tolerance + 1, stride=1, padding=tolerance)
    return grown.squeeze(1) > 0


@dataclass
class PointingResult:
    """``hits`` ``[B]``: the map's maximum fell inside the (dilated) mask; ``points`` ``[B, 2]``
    the ``(y, x)`` of each maximum; ``chance`` ``[B]`` the hit probability of a uniformly random
    point (the dilated mask's area fraction)."""

    hits: torch.Tensor
    points: torch.Tensor
    chance: torch.Tensor

    @property
    def rate(self) -> float:
        return float(self.hits.float().mean())

    @property
    def chance_rate(self) -> float:
        return float(self.chance.mean())


def pointing_game(saliency: Attribution | torch.Tensor, masks: Any, *, tolerance: int = 0) -> PointingResult:
    """Pointing game of maps against ground-truth ``masks`` ``[B, H, W]`` (maps resized to the
    masks' size). A constant map has no maximum and counts as a miss."""
    masks_t = torch.as_tensor(masks)
    size = tuple(masks_t.shape[-2:])
    batch = saliency.map.shape[0] if isinstance(saliency, Attribution) else torch.as_tensor(saliency).shape[0]
    masks_t = _masks(masks_t, batch)
    heat = _heatmap(saliency, size).cpu().float()
    flat = heat.flatten(1)
    arg = flat.argmax(dim=1)
    points = torch.stack([arg // size[1], arg % size[1]], dim=1)
    grown = _dilate(masks_t.cpu(), tolerance)
    hits = grown.flatten(1).gather(1, arg.unsqueeze(1)).squeeze(1)
    constant = flat.amax(dim=1) == flat.amin(dim=1)
    hits = hits & ~constant
    chance = grown.flatten(1).float().mean(dim=1)
    return PointingResult(hits=hits, points=points, chance=chance)


def localization_iou(saliency: Attribution | torch.Tensor, masks: Any, *, fraction: float | None = None) -> torch.Tensor:
    """IoU ``[B]`` between the mask and the map's top pixels: as many as the mask covers, or the
    top ``fraction`` of the image."""
    masks_t = torch.as_tensor(masks)
    size = tuple(masks_t.shape[-2:])
    batch = saliency.map.shape[0] if isinstance(saliency, Attribution) else torch.as_tensor(saliency).shape[0]
    masks_t = _masks(masks_t, batch).cpu()
    heat = _heatmap(saliency, size).cpu().float().flatten(1)
    pixels = heat.shape[1]
    if fraction is None:
        counts = masks_t.flatten(1).sum(dim=1)
    else:
        if not 0 < fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        counts = torch.full((batch,), max(1, round(fraction * pixels)), dtype=torch.long)
    order = torch.argsort(-heat, dim=1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels).expand(batch, pixels))
    top = ranks < counts.unsqueeze(1)
    truth = masks_t.flatten(1)
    inter = (top & truth).sum(dim=1).double()
    union = (top | truth).sum(dim=1).double()
    return inter / union
