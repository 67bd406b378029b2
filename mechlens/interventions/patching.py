"""Attribution patching: the effect of ablating (or patching) every latent of an SAE on a target,
estimated for all latents at once from one forward and one backward per batch, and the exact
effects it approximates (one intervened forward per latent).

The estimate (Syed et al. 2023; Marks et al. 2024, "Sparse Feature Circuits") is the first-order
Taylor term ``sum_p grad_z m * (z' - z)`` of the target ``m`` in the latents ``z`` (the SAE is
spliced into the layer with its error term, so the model is unchanged). Where the target is far
from linear in the latents, ``steps > 1`` averages the gradient along the straight path from the
ablated latents to the real ones (integrated gradients, all latents moved together).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens.engine import HookSet, eval_mode
from mechlens.features.base import SAELatent
from mechlens.features.forward import feature_forward
from mechlens.features.layout import as_position_rows, infer_layouts, rows_to_layout
from mechlens.features.parse import as_feature
from mechlens.interventions.core import Intervention, _input_space, intervene
from mechlens.interventions.effects import _batches
from mechlens.models.layers import get_module

__all__ = ["LatentEffects", "ResponsibleLatents", "ablation_effects", "attribution_patching", "rank_agreement",
           "responsible_latents"]

ABLATIONS = ("zero", "mean", "source")


@dataclass
class LatentEffects:
    """``effects[i]``: the mean over images of ``target(after) - target(before)`` when latent ``i``
    alone is set to its ablated value (at every position). ``latents``: the latents measured
    (exhaustive runs may measure a subset); ``active[i]``: on how many images latent ``i`` fired."""

    effects: np.ndarray
    latents: np.ndarray
    active: np.ndarray
    target: str
    layer: str
    ablation: str
    method: str  # "attribution" (steps == 1), "integrated" (steps > 1) or "exhaustive"
    images: int
    steps: int = 1
    seconds: float = 0.0
    forwards: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def top(self, n: int = 10, *, sign: str = "abs") -> np.ndarray:
        """The ``n`` latents with the largest effect (``sign``: ``"abs"``, ``"negative"``, ``"positive"``)."""
        score = {"abs": -np.abs(self.effects), "negative": self.effects, "positive": -self.effects}[sign]
        return self.latents[np.argsort(score, kind="stable")[:n]]

    def effect_of(self, latents: Sequence[int]) -> np.ndarray:
        where = {int(latent): i for i, latent in enumerate(self.latents)}
        missing = [int(latent) for latent in latents if int(latent) not in where]
        if missing:
            raise KeyError(f"latent(s) {missing[:5]} were not measured")
        return self.effects[[where[int(latent)] for latent in latents]]

    def __repr__(self) -> str:
        top = ", ".join(f"{int(i)}: {float(e):+.3g}" for i, e in zip(self.top(3), self.effect_of(self.top(3))))
        return (f"LatentEffects({self.method}, {len(self.latents)} latents of {self.layer!r} on {self.target}, "
                f"{self.ablation} ablation, {self.images} images; strongest {top})")

    def rows(self, n: int | None = None) -> list[dict[str, Any]]:
        """The latents, strongest effect first: latent, effect, images where it fired."""
        order = np.argsort(-np.abs(self.effects), kind="stable")[:n]
        return [{"latent": int(self.latents[i]), "effect": float(self.effects[i]), "active_images": int(self.active[i])}
                for i in order]

    def to_pandas(self) -> Any:
        from mechlens._display import to_pandas

        return to_pandas(self.rows())

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table(self.rows(20), caption=repr(self))

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "layer": self.layer, "ablation": self.ablation, "method": self.method,
                "steps": self.steps, "images": self.images, "seconds": self.seconds, "forwards": self.forwards,
                "latents": self.latents.tolist(), "effects": self.effects.tolist(), "active": self.active.tolist()}

    def to_json(self) -> str:
        return json_dumps(self.to_dict())


def _layer_and_layout(net: torch.nn.Module, sae: Any, layer: str | None, example: torch.Tensor) -> tuple[str, str]:
    trained_on = getattr(getattr(sae, "config", None), "layer", "") or ""
    if layer is None:
        if not trained_on:
            raise ValueError("the SAE does not record its layer; pass layer=")
        layer = trained_on
    elif trained_on and trained_on != layer:
        raise ValueError(f"the SAE was trained on layer {trained_on!r}, not {layer!r}")
    get_module(net, layer)
    recorded = getattr(getattr(sae, "config", None), "layout", "auto")
    given = recorded if recorded not in (None, "", "auto") else None
    return layer, infer_layouts(net, [layer], example[:1], layout=given)[layer].layout


def _ablated_latents(z: torch.Tensor, ablation: str, means: torch.Tensor | None, source_z: torch.Tensor | None) -> torch.Tensor:
    if ablation == "zero":
        return torch.zeros_like(z)
    if ablation == "mean":
        return means.to(z).expand_as(z)
    return source_z


def _check_common(ablation: str, means: Any, source: Any, steps: int) -> None:
    if ablation not in ABLATIONS:
        raise ValueError(f"ablation={ablation!r}; expected one of {', '.join(ABLATIONS)}")
    if ablation == "mean" and means is None:
        raise ValueError("ablation='mean' needs means= (each latent's mean value, e.g. FeatureStatistics.mean)")
    if ablation == "source" and source is None:
        raise ValueError("ablation='source' needs source= images (one per image of data)")
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")


def _source_batches(source: Any, batch_size: int):
    if source is None:
        while True:
            yield None
    for images, _ in _batches(source, batch_size):
        yield images


def attribution_patching(
    model: Any,
    sae: Any,
    data: Any,
    target: Any,
    *,
    layer: str | None = None,
    ablation: str = "zero",
    means: torch.Tensor | Sequence[float] | None = None,
    source: Any = None,
    steps: int = 1,
    batch_size: int = 64,
    progress: bool = False,
) -> LatentEffects:
    """Estimate, for every latent of ``sae`` at once, the effect on ``target`` (a Feature or spec
    such as ``"class:1"``) of setting the latent to 0 (``ablation="zero"``), to its mean
    (``"mean"``, ``means=[width]``) or to its value on ``source`` images (``"source"``, activation
    patching) at every position. One forward and one backward per batch (``steps`` of each with
    integrated gradients). ``data``: images (pixels for a ``LoadedModel``), ``(images, labels)`` or
    a Dataset; ``source`` is read in the same batches, image for image."""
    import time

    from tqdm.auto import tqdm

    _check_common(ablation, means, source, steps)
    target_feature = as_feature(target)
    net, to_model_input = _input_space(model)
    device = next(net.parameters()).device
    means_t = None if means is None else torch.as_tensor(means, dtype=torch.float32, device=device).reshape(-1)
    started = time.perf_counter()
    total: torch.Tensor | None = None
    active: torch.Tensor | None = None
    images_seen, forwards = 0, 0
    resolved: tuple[str, str] | None = None
    sources = _source_batches(source, batch_size)
    with eval_mode(net):
        for images, _ in tqdm(_batches(data, batch_size), desc="attribution patching", unit="batch", disable=not progress):
            x = to_model_input(images.to(device))
            source_images = next(sources)
            if resolved is None:
                resolved = _layer_and_layout(net, sae, layer, x)
            name, layout = resolved
            source_z = None
            if ablation == "source":
                if source_images is None or len(source_images) != len(images):
                    raise ValueError("source must hold one image per image of data (the same number, read in the same batches)")
                source_z = _latents_of(net, sae, name, layout, to_model_input(source_images.to(device)))
                forwards += 1
            grad_sum, z_real, ablated = None, None, None
            for alpha in _alphas(steps):
                state: dict[str, Any] = {}

                def splice(module: torch.nn.Module, args: Any, output: Any) -> Any:
                    rows, _ = as_position_rows(output, layout)
                    b, p, c = rows.shape
                    flat = rows.reshape(b * p, c)
                    with torch.no_grad():
                        z = sae.encode(flat)
                        error = flat - sae.decode(z)
                    base = _ablated_latents(z, ablation, means_t, None if source_z is None else source_z.reshape(b * p, -1))
                    point = (base + alpha * (z - base)).detach().requires_grad_(True)
                    state.update(z=z, base=base, point=point, shape=(b, p))
                    spliced = (sae.decode(point) + error).reshape(b, p, c)
                    return rows_to_layout(spliced, output, layout)

                with HookSet() as hooks:
                    hooks.forward(get_module(net, name), splice)
                    values = feature_forward(net, [target_feature], x, grads=True).values[:, 0]
                grad = torch.autograd.grad(values.sum(), state["point"])[0]
                forwards += 1
                grad_sum = grad if grad_sum is None else grad_sum + grad
                z_real, ablated = state["z"], state["base"]
            b, p = state["shape"]
            per_position = (grad_sum / steps) * (ablated - z_real)  # [B*P, W]
            per_image = per_position.reshape(b, p, -1).sum(dim=1).detach().double()
            fired = (z_real.reshape(b, p, -1) != 0).any(dim=1).sum(dim=0)
            total = per_image.sum(0) if total is None else total + per_image.sum(0)
            active = fired if active is None else active + fired
            images_seen += b
    if total is None:
        raise ValueError("no images to measure the latents on (the data is empty)")
    width = total.numel()
    return LatentEffects(effects=(total / images_seen).cpu().numpy(), latents=np.arange(width),
                         active=active.cpu().numpy(), target=target_feature.name, layer=resolved[0], ablation=ablation,
                         method="attribution" if steps == 1 else "integrated", images=images_seen, steps=steps,
                         seconds=round(time.perf_counter() - started, 3), forwards=forwards)


def _alphas(steps: int) -> list[float]:
    """Where the gradient is taken on the path from the ablated latents (0) to the real ones (1):
    the real point for one step (plain attribution patching), midpoints for several."""
    return [1.0] if steps == 1 else [(i + 0.5) / steps for i in range(steps)]


def _latents_of(net: torch.nn.Module, sae: Any, layer: str, layout: str, x: torch.Tensor) -> torch.Tensor:
    from mechlens.engine import capture

    with torch.no_grad(), capture(net, [layer]) as cap:
        net(x)
        rows, _ = as_position_rows(cap[layer], layout)
    b, p, c = rows.shape
    return sae.encode(rows.reshape(b * p, c)).reshape(b, p, -1)


def ablation_effects(
    model: Any,
    sae: Any,
    data: Any,
    target: Any,
    *,
    latents: Sequence[int] | None = None,
    layer: str | None = None,
    ablation: str = "zero",
    means: torch.Tensor | Sequence[float] | None = None,
    source: Any = None,
    batch_size: int = 64,
    progress: bool = False,
) -> LatentEffects:
    """The exact effects :func:`attribution_patching` estimates: one intervened forward per latent
    (of ``latents``, default every latent). With ``ablation="zero"`` a latent is only run on the
    images where it fires: elsewhere zeroing it changes nothing, exactly (the SAE's error term
    keeps the rest of the activation)."""
    import time

    from tqdm.auto import tqdm

    _check_common(ablation, means, source, 1)
    target_feature = as_feature(target)
    net, to_model_input = _input_space(model)
    device = next(net.parameters()).device
    means_t = None if means is None else torch.as_tensor(means, dtype=torch.float32).reshape(-1)
    started = time.perf_counter()
    sources = _source_batches(source, batch_size)
    batches = []
    for images, _ in _batches(data, batch_size):
        batches.append((images, next(sources)))
    if not batches:
        raise ValueError("no images to measure the latents on (the data is empty)")
    first = to_model_input(batches[0][0].to(device))
    name, layout = _layer_and_layout(net, sae, layer, first)
    width = _latents_of(net, sae, name, layout, first[:1]).shape[-1]
    chosen = np.arange(width) if latents is None else np.asarray([int(i) for i in latents])
    if chosen.size and (chosen.min() < 0 or chosen.max() >= width):
        raise IndexError(f"latents must lie in [0, {width}), got {chosen.min()}..{chosen.max()}")
    sums = np.zeros(len(chosen))
    active = np.zeros(len(chosen), dtype=np.int64)
    images_seen, forwards = 0, 0
    bar = tqdm(total=len(batches) * len(chosen), desc="ablation effects", unit="latent", disable=not progress)
    with eval_mode(net), torch.no_grad():
        for images, source_images in batches:
            x = to_model_input(images.to(device))
            z = _latents_of(net, sae, name, layout, x)
            fired = (z != 0).any(dim=1)  # [B, W]
            clean = feature_forward(net, [target_feature], x, grads=False).values[:, 0].double()
            forwards += 1
            if ablation == "source" and (source_images is None or len(source_images) != len(images)):
                raise ValueError("source must hold one image per image of data (the same number, read in the same batches)")
            for j, latent in enumerate(chosen):
                feature = SAELatent(name, sae, int(latent), layout=layout)
                rows = torch.arange(len(x)) if ablation != "zero" else fired[:, latent].nonzero().flatten()
                active[j] += int(fired[:, latent].sum())
                if len(rows):
                    if ablation == "zero":
                        edit = Intervention(feature, "zero")
                    elif ablation == "mean":
                        edit = Intervention(feature, "mean", value=float(means_t[latent]))
                    else:
                        edit = Intervention(feature, "patch", source=source_images[rows])
                    with intervene(model, edit):
                        after = feature_forward(net, [target_feature], x[rows], grads=False).values[:, 0].double()
                    forwards += 1 + (ablation == "source")  # a patch records its source's values first
                    sums[j] += float((after - clean[rows]).sum())
                bar.update(1)
            images_seen += len(x)
    bar.close()
    return LatentEffects(effects=sums / images_seen, latents=chosen, active=active, target=target_feature.name,
                         layer=name, ablation=ablation, method="exhaustive", images=images_seen,
                         seconds=round(time.perf_counter() - started, 3), forwards=forwards)


def rank_agreement(estimated: LatentEffects, exact: LatentEffects, *, top: int = 100) -> dict[str, float]:
    """How well ``estimated`` ranks latents: Spearman's rho between the estimated and exact effects
    over the ``top`` latents the estimate ranks highest by magnitude (those measured exactly), and
    the fraction of the exact top-10 found in the estimate's top-``top``."""
    from scipy.stats import spearmanr

    chosen = [int(i) for i in estimated.top(top) if int(i) in set(int(j) for j in exact.latents)]
    if len(chosen) < 3:
        raise ValueError(f"only {len(chosen)} of the estimate's top {top} latents were measured exactly")
    est, ex = estimated.effect_of(chosen), exact.effect_of(chosen)
    rho = float(spearmanr(est, ex).statistic)
    exact_top = set(int(i) for i in exact.top(10))
    return {"spearman": rho, "latents": len(chosen), "exact_top10_recall": len(exact_top & set(chosen)) / max(1, len(exact_top)),
            "pearson": float(np.corrcoef(est, ex)[0, 1])}


@dataclass
class ResponsibleLatents:
    """The latents that carry the change of ``target`` between images and their counterfactual
    twins: ``latents`` (strongest first), the estimated share of the change each carries
    (``effects``: patching the latent's counterfactual value in), the measured ``change`` (mean of
    ``target(counterfactual) - target(image)``) and the fraction of it the chosen latents explain."""

    latents: list[int]
    effects: LatentEffects
    change: float
    explained: float

    def to_dict(self) -> dict[str, Any]:
        return {"latents": self.latents, "change": self.change, "explained": self.explained,
                "effects": [float(e) for e in self.effects.effect_of(self.latents)] if self.latents else []}


def responsible_latents(
    model: Any,
    sae: Any,
    images: torch.Tensor,
    counterfactuals: torch.Tensor,
    target: Any,
    *,
    coverage: float = 0.5,
    layer: str | None = None,
    steps: int = 1,
    batch_size: int = 64,
) -> ResponsibleLatents:
    """Which latents of ``sae`` make ``target`` differ between ``images`` and their
    ``counterfactuals`` (the same images without an artefact, say): attribution patching of each
    latent's counterfactual value, then the fewest latents, strongest first, whose estimated
    effects add up to ``coverage`` of the measured change. Raises when no set of latents gets there
    (the change lives in the SAE's error term or is not linear in the latents: try ``steps``)."""
    if not 0 < coverage <= 1:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if images.shape != counterfactuals.shape:
        raise ValueError(f"images {tuple(images.shape)} and counterfactuals {tuple(counterfactuals.shape)} must pair up")
    effects = attribution_patching(model, sae, images, target, layer=layer, ablation="source", source=counterfactuals,
                                   steps=steps, batch_size=batch_size)
    net, to_model_input = _input_space(model)
    feature = as_feature(target)
    with eval_mode(net), torch.no_grad():
        device = next(net.parameters()).device
        before = torch.cat([feature_forward(net, [feature], to_model_input(images[i:i + batch_size].to(device)), grads=False).values[:, 0]
                            for i in range(0, len(images), batch_size)])
        after = torch.cat([feature_forward(net, [feature], to_model_input(counterfactuals[i:i + batch_size].to(device)), grads=False).values[:, 0]
                           for i in range(0, len(images), batch_size)])
    change = float((after - before).double().mean())
    if change == 0:
        raise ValueError(f"{feature.name} does not change between the images and their counterfactuals")
    sign = "negative" if change < 0 else "positive"
    chosen, explained = [], 0.0
    for latent in effects.top(len(effects.latents), sign=sign):
        share = float(effects.effect_of([latent])[0]) / change
        if share <= 0:
            break
        chosen.append(int(latent))
        explained += share
        if explained >= coverage:
            return ResponsibleLatents(chosen, effects, change, explained)
    raise ValueError(f"the latents of the SAE explain only {explained:.0%} of the change of {feature.name} "
                     f"({change:+.3g}); the rest is in the SAE's error term or not linear in the latents (try steps=8)")
