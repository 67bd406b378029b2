"""Ready-made ``visualize`` and ``attribute`` callbacks for :func:`mechlens.atlas.build_atlas`."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from mechlens.features import SAELatent
from mechlens.models.loading import LoadedModel

__all__ = ["sae_attributor", "sae_visualizer"]


def _latent(sae: Any, index: int) -> SAELatent:
    config = sae.config
    return SAELatent(config.layer, sae, int(index), pooling=getattr(config, "pooling", "all"),
                     layout=getattr(config, "layout", "auto"))


def sae_visualizer(model: LoadedModel, sae: Any, *, size: int = 48, steps: int = 64, batch: int = 32,
                   seed: int = 0) -> Callable[[Sequence[int]], torch.Tensor]:
    """Render SAE latents ``batch`` at a time (one image per latent, one optimization per batch)."""
    from mechlens.featvis import render

    def visualize(latents: Sequence[int]) -> torch.Tensor:
        chunks = [list(latents[i:i + batch]) for i in range(0, len(latents), batch)]
        return torch.cat([render(model, [_latent(sae, j) for j in chunk], size=size, steps=steps, seed=seed).images
                          for chunk in chunks])

    return visualize


def sae_attributor(model: LoadedModel, sae: Any, *, methods: dict[str, dict[str, Any]] | None = None
                   ) -> Callable[[int, torch.Tensor], dict[str, torch.Tensor]]:
    """Attribution maps of an SAE latent on images in ``[0, 1]`` (the loaded model normalizes them,
    so maps and baselines are in pixel space). ``methods``: display name -> ``(method, kwargs)``;
    default Grad-CAM at the SAE's own layer."""
    from mechlens.attribution import attribute

    chosen = methods or {"Grad-CAM": {"method": "gradcam", "layer": sae.config.layer}}

    def attribute_latent(latent: int, images: torch.Tensor) -> dict[str, torch.Tensor]:
        x = images.to(model.device)
        return {name: attribute(model, x, _latent(sae, latent), **kwargs).heatmap()
                for name, kwargs in chosen.items()}

    return attribute_latent
