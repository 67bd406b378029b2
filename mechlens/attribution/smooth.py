"""SmoothGrad, SmoothGrad² and VarGrad as a wrapper over any registered method.

``smoothgrad(model, x, target, base="integrated_gradients", n_samples=20, n_steps=16)`` runs the
base method on ``n_samples`` noisy copies of each input (Gaussian noise of std
``stdev_spread * (max(x_b) - min(x_b))`` per sample, Smilkov et al.'s parametrisation, or an
absolute ``stdevs``) and returns the mean map (``smoothgrad``), the mean of the squared maps
(``smoothgrad_sq``) or their variance (``vargrad``): Captum's NoiseTunnel conventions. Noise
comes only from ``generator`` / ``seed``. Noisy copies run ``internal_batch_size`` rows per call
of the base method (whole noise draws at a time); the base method's own batching is
``base_internal_batch_size``. Unknown keyword arguments go to the base method.
"""
from __future__ import annotations

from typing import Any

import torch

from mechlens.engine import unwrap
from mechlens.attribution.base import (
    Attribution,
    check_images,
    chunk_ranges,
    feature_values,
    get_method,
    make_generator,
    register_method,
    resolve_target,
)
from mechlens.attribution.execution import inference_model

__all__ = ["NOISE_KINDS", "noise_tunnel", "smoothgrad", "smoothgrad_sq", "vargrad"]

NOISE_KINDS = ("smoothgrad", "smoothgrad_sq", "vargrad")


def noise_tunnel(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    base: str = "saliency",
    kind: str = "smoothgrad",
    n_samples: int = 50,
    stdev_spread: float = 0.15,
    stdevs: float | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
    internal_batch_size: int | None = None,
    base_internal_batch_size: int | None = None,
    **base_kwargs: Any,
) -> Attribution:
    """The wrapper behind :func:`smoothgrad`, :func:`smoothgrad_sq` and :func:`vargrad` (see
    the module docstring)."""
    if kind not in NOISE_KINDS:
        raise ValueError(f"unknown noise kind {kind!r}; expected one of {', '.join(NOISE_KINDS)}")
    info = get_method(base)
    if info.family == "smoothing":
        raise ValueError(f"base={base!r} is itself a noise wrapper; pass the underlying method (e.g. 'saliency')")
    if n_samples < 1:
        raise ValueError("n_samples must be at least 1")
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    gen = make_generator(inputs.device, seed, generator)
    sigma = _noise_std(inputs, stdev_spread, stdevs)
    total = total_sq = None
    first: tuple[str, str, dict[str, Any]] | None = None  # kind, channel_reduce, scalar extras of the base
    kwargs = dict(base_kwargs)
    if base_internal_batch_size is not None:
        kwargs["internal_batch_size"] = base_internal_batch_size
    with inference_model(model, keep=target.layers) as model:
        for start, stop in _draw_chunks(n_samples, batch, internal_batch_size):
            m = stop - start
            noisy = _noisy_copies(inputs, sigma, m, gen)  # alive only during the base method
            result = info.fn(model, noisy, target.repeat(m), **kwargs)
            del noisy
            maps = result.map.reshape(m, batch, *result.map.shape[1:])
            total = maps.sum(0) if total is None else total + maps.sum(0)
            if kind != "smoothgrad":  # the squares are only needed by smoothgrad_sq and vargrad
                total_sq = (maps * maps).sum(0) if total_sq is None else total_sq + (maps * maps).sum(0)
            if first is None:  # keep the base's metadata, not its (large) map
                first = (result.kind, result.channel_reduce,
                         {k: v for k, v in result.extras.items() if not isinstance(v, torch.Tensor)})
            del result, maps
        values = feature_values(model, inputs, target)
    assert first is not None and total is not None
    mean = total / n_samples
    if kind == "smoothgrad":
        amap = mean
    else:
        assert total_sq is not None
        mean_sq = total_sq / n_samples
        amap = mean_sq if kind == "smoothgrad_sq" else mean_sq - mean * mean
    first_kind, first_reduce, extras = first
    extras.update(base=info.name, n_samples=n_samples, noise_std=sigma.detach())
    return Attribution(
        map=amap, method=kind if base == "saliency" else f"{kind}({info.name})",
        features=target.names, values=values, kind=first_kind, input_shape=tuple(inputs.shape),
        channel_reduce=first_reduce, extras=extras,
    )


def _noise_std(inputs: torch.Tensor, stdev_spread: float, stdevs: float | None) -> torch.Tensor:
    """``[B]`` noise standard deviations: ``stdevs`` for all, else ``stdev_spread`` times each
    sample's value range (Smilkov et al.)."""
    if stdevs is not None:
        return torch.full((inputs.shape[0],), float(stdevs), device=inputs.device, dtype=inputs.dtype)
    flat = inputs.flatten(1)
    return stdev_spread * (flat.amax(dim=1) - flat.amin(dim=1))


def _draw_chunks(n_samples: int, batch: int, internal_batch_size: int | None) -> list[tuple[int, int]]:
    """The noise draws ``[start, stop)`` run per call of the base method (whole draws at a time)."""
    return list(chunk_ranges(n_samples, n_samples if internal_batch_size is None else max(1, internal_batch_size // batch)))


def _noisy_copies(inputs: torch.Tensor, sigma: torch.Tensor, m: int, gen: torch.Generator) -> torch.Tensor:
    """``[m * B, ...]`` noisy copies of ``inputs``, draw-major (row ``r`` is draw ``r // B`` of
    sample ``r % B``): the next ``m`` draws of ``gen``. Shared with the manipulability check, so
    that the same seed gives the same noise there."""
    # noisy copies in place of the noise: one [m * B, ...] buffer
    noisy = torch.randn((m, *inputs.shape), generator=gen, device=gen.device).to(inputs)
    noisy.mul_(sigma.view((1, -1) + (1,) * (inputs.dim() - 1))).add_(inputs.unsqueeze(0))
    return noisy.reshape(m * inputs.shape[0], *inputs.shape[1:])


@register_method("smoothgrad", kind="input", family="smoothing", multiplies_batch=True, aliases=("noise_tunnel",),
                 randomization="fails over saliency with abs=True (the default); passes with abs=False")
def smoothgrad(model: Any, inputs: torch.Tensor, target: Any = None, *, base: str = "saliency", **kwargs: Any) -> Attribution:
    """SmoothGrad (Smilkov et al.): the base method's map averaged over noisy copies of the input."""
    return noise_tunnel(model, inputs, target, base=base, kind="smoothgrad", **kwargs)


@register_method("smoothgrad_sq", kind="input", family="smoothing", multiplies_batch=True, aliases=("smoothgrad2",),
                 randomization="fails")
def smoothgrad_sq(model: Any, inputs: torch.Tensor, target: Any = None, *, base: str = "saliency", **kwargs: Any) -> Attribution:
    """SmoothGrad²: the mean of the squared maps over noisy copies."""
    return noise_tunnel(model, inputs, target, base=base, kind="smoothgrad_sq", **kwargs)


@register_method("vargrad", kind="input", family="smoothing", multiplies_batch=True, randomization="fails")
def vargrad(model: Any, inputs: torch.Tensor, target: Any = None, *, base: str = "saliency", **kwargs: Any) -> Attribution:
    """VarGrad (Adebayo et al.): the variance of the maps over noisy copies."""
    return noise_tunnel(model, inputs, target, base=base, kind="vargrad", **kwargs)
