"""What an atlas publishes: a set of features of one layer, read from the store's rows.

A :class:`FeatureSet` turns store rows ``[N, C]`` into feature values ``[N, width]``
(``encode``) and gives each feature a direction in the layer's space (``directions``, for logit
effects, the overview map and concept alignment). :func:`sae_features`, :func:`channel_features`
and :func:`direction_features` cover an SAE's latents, the channels of a layer and a list of
CAV (or probe) directions; any ``nn.Module`` with the same attributes works.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from mechlens.features import Channel, Direction

__all__ = ["FeatureSet", "channel_features", "direction_features", "sae_features"]


class FeatureSet(nn.Module):
    """``width`` features of ``layer``: ``encode(rows [N, d_in]) -> [N, width]``, ``directions``
    ``[width, d_in]``, a ``title`` and one ``spec`` string per feature (how to name it elsewhere).
    ``kind``: ``"latent"``, ``"channel"``, ``"direction"`` (what a feature id means to other tools)."""

    kind = "feature"

    def __init__(self, layer: str, d_in: int, directions: torch.Tensor, title: str) -> None:
        super().__init__()
        self.layer, self.d_in, self.title = layer, int(d_in), title
        self.register_buffer("directions", directions.detach().float().clone())

    @property
    def width(self) -> int:
        return int(self.directions.shape[0])

    @property
    def device(self) -> torch.device:
        return self.directions.device

    def encode(self, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def spec(self, index: int) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature(self, index: int) -> Any:  # pragma: no cover - abstract
        """Feature ``index`` as a :class:`mechlens.features.Feature` (to render or attribute it)."""
        raise NotImplementedError

    def write_directions(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), d_in]``: how the layer's rows change per unit of each feature's value (what
        an intervention on the feature writes); the ``directions`` where encoding is a projection."""
        return self.directions[torch.as_tensor([int(i) for i in ids], dtype=torch.long, device=self.device)]


class _SAEFeatures(FeatureSet):
    kind = "latent"

    def __init__(self, sae: Any, source: str = "") -> None:
        super().__init__(sae.config.layer, sae.d_in, sae.W_dec.detach(),
                         f"{sae.width}-latent {type(sae).__name__} on {sae.config.layer}")
        self.sae, self.source = sae, source

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return self.sae.encode(rows)

    def spec(self, index: int) -> str:
        return f"sae:{self.source}:{index}" if self.source else f"latent {index}"

    def feature(self, index: int) -> Any:
        return self.sae.feature(index, source=self.source)

    def write_directions(self, ids: Sequence[int]) -> torch.Tensor:
        from mechlens.interventions import decoder_directions

        # decode(e_i) - decode(0), not W_dec: an SAE that normalizes its input decodes through it
        return decoder_directions(self.sae, ids)


class _ChannelFeatures(FeatureSet):
    kind = "channel"

    def __init__(self, layer: str, d_in: int, channels: Sequence[int]) -> None:
        channels = [int(c) for c in channels]
        bad = [c for c in channels if not 0 <= c < d_in]
        if bad:
            raise ValueError(f"channel {bad[0]} is out of range: layer {layer!r} has {d_in} channels")
        super().__init__(layer, d_in, torch.eye(d_in)[channels], f"{len(channels)} channels of {layer}")
        self.register_buffer("channels", torch.tensor(channels, dtype=torch.long))

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, self.channels.to(rows.device)]

    def spec(self, index: int) -> str:
        return f"channel:{self.layer}:{int(self.channels[index])}"

    def feature(self, index: int) -> Any:
        return Channel(self.layer, int(self.channels[index]))


class _DirectionFeatures(FeatureSet):
    kind = "direction"

    def __init__(self, layer: str, vectors: torch.Tensor, names: Sequence[str]) -> None:
        unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
        super().__init__(layer, vectors.shape[1], unit, f"{len(names)} directions in {layer}")
        self.names = list(names)

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.directions.to(rows.dtype).T

    def spec(self, index: int) -> str:
        return self.names[index]

    def feature(self, index: int) -> Any:
        return Direction(self.layer, self.directions[index].cpu(), label=self.names[index])


def sae_features(sae: Any, source: str = "") -> FeatureSet:
    """The latents of ``sae`` (its layer, its encoder, its decoder rows as directions)."""
    return _SAEFeatures(sae, source)


def channel_features(layer: str, d_in: int, channels: Sequence[int] | None = None) -> FeatureSet:
    """Channels of ``layer`` (all ``d_in`` by default); a channel's direction is its basis vector."""
    return _ChannelFeatures(layer, d_in, range(d_in) if channels is None else channels)


def direction_features(layer: str, directions: Any, names: Sequence[str] | None = None) -> FeatureSet:
    """Directions of ``layer`` — CAVs (``mechlens.probes.CAV``), probe weights or raw vectors
    ``[F, d_in]`` — scored as the projection of each row on the unit direction."""
    items = list(directions) if not isinstance(directions, (np.ndarray, torch.Tensor)) else list(directions)
    vectors = torch.stack([torch.as_tensor(np.asarray(getattr(d, "vector", d), dtype=np.float32)).reshape(-1)
                           for d in items])
    foreign = [d for d in items if getattr(d, "layer", layer) not in (layer, "")]
    if foreign:
        raise ValueError(f"direction {getattr(foreign[0], 'concept', '?')!r} was fitted at layer "
                         f"{foreign[0].layer!r}, not at {layer!r}")
    names = list(names) if names is not None else [str(getattr(d, "concept", f"direction {i}")) for i, d in enumerate(items)]
    return _DirectionFeatures(layer, vectors, names)
