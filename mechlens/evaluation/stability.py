"""Stability of attribution maps under small input changes (a few-pixel shift, faint noise).

A map that explains the model should move with the image and barely change under noise the
model ignores. Each augmented copy's map is shifted back into the original frame and compared
with the original map by Spearman rank correlation over the interior (the border that a shift
invents is left out). All augmented copies run in one batched call of the method; the target
is resolved once on the original inputs, so every copy explains the same feature.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mechlens.engine import unwrap
from mechlens.attribution.base import default_layer, get_method, resolve_target, takes_pixels
from mechlens.evaluation.similarity import spearman

__all__ = ["StabilityResult", "attribution_stability", "shift_images"]


def shift_images(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate ``[..., H, W]`` by ``(dy, dx)`` pixels, filling the uncovered border by
    replicating the edge."""
    if dy == 0 and dx == 0:
        return x.clone()
    pad = max(abs(dy), abs(dx))
    shape = x.shape
    flat = x.reshape(-1, 1, *shape[-2:]) if x.dim() != 4 else x
    padded = F.pad(flat.float(), (pad, pad, pad, pad), mode="replicate").to(x.dtype)
    h, w = shape[-2:]
    out = padded[..., pad - dy : pad - dy + h, pad - dx : pad - dx + w]
    return out.reshape(shape)


@dataclass
class StabilityResult:
    """``spearman`` ``[A, B]``: per augmentation (``augmentations`` names them) and sample."""

    method: str
    augmentations: list[str]
    spearman: torch.Tensor

    @property
    def mean(self) -> float:
        return float(self.spearman.nanmean())

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "augmentations": list(self.augmentations),
            "spearman": [float(v) for v in self.spearman.nanmean(dim=1)], "mean": self.mean,
        }


@takes_pixels
def attribution_stability(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    method: str = "saliency",
    *,
    shifts: Sequence[tuple[int, int]] = ((0, 2), (2, 0), (0, -2), (-2, 0)),
    noise_std: float = 0.0,
    n_noise: int = 0,
    absolute: bool = True,
    seed: int = 0,
    **method_kwargs: Any,
) -> StabilityResult:
    """Spearman correlation between the map of ``inputs`` and the maps of shifted copies
    (``shifts`` of ``(dy, dx)`` pixels) and of ``n_noise`` copies with Gaussian noise of std
    ``noise_std`` (seeded); see the module docstring."""
    model = unwrap(model)
    info = get_method(method)
    inputs = inputs.detach()
    default_layer(info, model, inputs, method_kwargs)
    resolved = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    copies, names = [], []
    for dy, dx in shifts:
        copies.append(shift_images(inputs, int(dy), int(dx)))
        names.append(f"shift({dy},{dx})")
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    for i in range(n_noise):
        noise = torch.randn(inputs.shape, generator=generator, device=inputs.device).to(inputs)
        copies.append(inputs + noise_std * noise)
        names.append(f"noise({noise_std})#{i}")
    if not copies:
        raise ValueError("no augmentations: pass shifts and/or n_noise > 0")
    stacked = torch.cat([inputs, *copies])
    result = info.fn(model, stacked, resolved.repeat(len(copies) + 1), **method_kwargs)
    heat = result.heatmap(absolute=absolute).detach().cpu()
    original = heat[:batch]
    margin = max([max(abs(int(dy)), abs(int(dx))) for dy, dx in shifts] or [0])
    h, w = original.shape[-2:]
    crop = (slice(None), slice(margin, h - margin), slice(margin, w - margin))
    rows = []
    for a, (name, _) in enumerate(zip(names, copies)):
        aug = heat[(a + 1) * batch : (a + 2) * batch]
        if a < len(shifts):
            dy, dx = shifts[a]
            aug = shift_images(aug, -int(dy), -int(dx))
        rows.append(spearman(original[crop], aug[crop]))
    return StabilityResult(method=info.name, augmentations=names, spearman=torch.stack(rows))
