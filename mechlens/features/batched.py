"""Batched reads: feature ``i`` on sample ``i`` for a whole batch, one tensor op per kind.

featvis renders one image per feature, the atlas one exemplar per feature, attribution explains
a different class (or latent) for each sample: all of them read "the diagonal". Features are
grouped by their :meth:`batch_key` and each group is read by its kind's ``read_diagonal`` (see
:class:`~mechlens.features.base.FeatureBase`); a kind without one (only the Feature protocol)
is read one sample at a time.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from mechlens.features.base import Feature, cached_index, read_loop

__all__ = ["DiagonalPlan", "diagonal_values"]


@dataclass
class _Group:
    """Features of one batch key: read together by their kind's ``read_diagonal``."""

    read: Callable[..., torch.Tensor]
    layer: str
    samples: list[int]
    cache: dict = field(default_factory=dict, repr=False)


def _read_one_at_a_time(features: Sequence[Feature], activation: torch.Tensor, samples: torch.Tensor | None = None,
                        cache: dict | None = None) -> torch.Tensor:
    return read_loop(features, activation, samples)


class DiagonalPlan:
    """How to read ``features[i]`` on sample ``i``: the groups, built once and reused (their
    index tensors are cached, so repeated reads, e.g. every featvis step, copy nothing)."""

    def __init__(self, features: Sequence[Feature]) -> None:
        self.features = list(features)
        if not self.features:
            raise ValueError("a diagonal read needs at least one feature")
        groups: dict[Any, _Group] = {}
        for i, f in enumerate(self.features):
            batch_key = getattr(f, "batch_key", None)
            read = getattr(type(f), "read_diagonal", None)
            key = batch_key() if batch_key is not None and read is not None else ("one at a time", f.layer)
            group = groups.setdefault(key, _Group(read if read is not None else _read_one_at_a_time, f.layer, []))
            group.samples.append(i)
        self.groups = list(groups.values())

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(g.layer for g in self.groups))

    def __call__(self, activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``[B]`` from one forward's ``activations`` (layer -> tensor, ``""`` = the output)."""
        batch = len(self.features)
        first = activations[self.groups[0].layer]
        if first.shape[0] != batch:
            raise ValueError(f"a per-sample read of {batch} features needs a batch of {batch}, got {first.shape[0]}")
        if len(self.groups) == 1:  # every sample in order: no gather of the samples
            group = self.groups[0]
            return group.read(self.features, first, None, group.cache)
        out: torch.Tensor | None = None
        for group in self.groups:
            act = activations[group.layer]
            samples = cached_index(group.cache, "samples", lambda g=group: g.samples, act.device)
            values = group.read([self.features[i] for i in group.samples], act, samples, group.cache)
            if out is None:
                out = values.new_zeros(batch)
            out = out.index_put((samples,), values)
        assert out is not None
        return out


def diagonal_values(features: Sequence[Feature], activations: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``[B]``: the value of ``features[i]`` on sample ``i`` (see :class:`DiagonalPlan`)."""
    return DiagonalPlan(features)(activations)
