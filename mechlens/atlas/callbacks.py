"""Ready-made ``visualize`` and ``attribute`` callbacks for :func:`mechlens.atlas.build_atlas`,
for any feature set (an SAE is taken as its latents)."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from mechlens.atlas.features import FeatureSet, sae_features
from mechlens.models.loading import LoadedModel

__all__ = ["feature_attributor", "feature_visualizer"]


def _as_set(features: Any) -> FeatureSet:
    if isinstance(features, FeatureSet):
        return features
    if isinstance(features, nn.Module) and hasattr(features, "W_dec"):
        return sae_features(features)
    raise TypeError(f"expected a FeatureSet or an SAE, got {type(features).__name__}")


def feature_visualizer(model: LoadedModel, features: Any, *, size: int = 48, steps: int = 64, batch: int = 32,
                       seed: int = 0, diversity: int = 0, diversity_weight: float = 1e2
                       ) -> Callable[[Sequence[int]], torch.Tensor]:
    """Render features ``batch`` at a time (one image per feature, one optimization per batch).
    ``diversity=n``: also a batch of ``n`` images per feature pushed apart by a Gram-matrix
    diversity term at the features' layer (one optimization per feature: n times the cost), so
    the result is ``[F, 1 + n, 3, H, W]``."""
    from mechlens.featvis import diversity as diversity_term
    from mechlens.featvis import feature as feature_term
    from mechlens.featvis import render

    feature_set = _as_set(features)

    if batch < 1 or steps < 0 or size < 1 or diversity < 0:
        raise ValueError(f"feature_visualizer needs batch >= 1, steps >= 0, size >= 1 and diversity >= 0; got batch={batch}, "
                         f"steps={steps}, size={size}, diversity={diversity}")

    def visualize(ids: Sequence[int]) -> torch.Tensor:
        ids = list(ids)
        chunks = [ids[i:i + batch] for i in range(0, len(ids), batch)]
        plain = torch.cat([render(model, [feature_set.feature(j) for j in chunk], size=size, steps=steps, seed=seed).images
                           for chunk in chunks])
        if diversity <= 0:
            return plain
        diverse = [render(model, feature_term(feature_set.feature(j)) + diversity_weight * diversity_term(feature_set.layer),
                          batch=diversity, size=size, steps=steps, seed=seed).images for j in ids]
        return torch.cat([plain.unsqueeze(1), torch.stack(diverse)], dim=1)

    # what build_atlas records: pages rendered with other settings are not reused
    visualize.settings = {"callback": "mechlens.atlas.feature_visualizer", "size": size, "steps": steps,  # type: ignore[attr-defined]
                          "batch": batch, "seed": seed, "diversity": diversity, "diversity_weight": diversity_weight}
    return visualize


def feature_attributor(model: LoadedModel, features: Any, *, methods: dict[str, dict[str, Any]] | None = None
                       ) -> Callable[[int, torch.Tensor], dict[str, torch.Tensor]]:
    """Attribution maps of one feature on images in ``[0, 1]`` (the loaded model normalizes them,
    so maps and baselines are in pixel space). ``methods``: display name -> ``attribute`` kwargs;
    default Grad-CAM at the features' own layer. Its ``batched(ids, images)`` explains image ``i``
    for feature ``ids[i]``, a whole batch per call (what the atlas's attribution panel uses)."""
    from mechlens.attribution import attribute

    feature_set = _as_set(features)
    chosen = methods or {"Grad-CAM": {"method": "gradcam", "layer": feature_set.layer}}

    def attribute_feature(index: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(model.device)
        return {name: attribute(model, x, feature_set.feature(index), **kwargs).heatmap()
                for name, kwargs in chosen.items()}

    def batched(ids: Sequence[int], images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Image ``i`` explained for feature ``ids[i]``: one attribution call per method for the batch."""
        if len(ids) != len(images):
            raise ValueError(f"batched attribution takes one image per feature: got {len(images)} images for {len(ids)} ids")
        x = images.to(model.device)
        targets = [feature_set.feature(int(i)) for i in ids]
        return {name: attribute(model, x, targets, **kwargs).heatmap() for name, kwargs in chosen.items()}

    attribute_feature.batched = batched  # type: ignore[attr-defined]
    attribute_feature.settings = {"callback": "mechlens.atlas.feature_attributor",  # type: ignore[attr-defined]
                                  "methods": {name: {k: repr(v) for k, v in sorted(kwargs.items())}
                                              for name, kwargs in chosen.items()}}
    return attribute_feature
