"""Attribution evaluation metrics beyond deletion / insertion, batched and seeded.

Faithfulness (does the map say what the model uses?):

* :func:`road` (Rong et al. 2022, "A consistent and efficient evaluation strategy for attribution
  methods"): remove the top (MoRF) or bottom (LeRF) ``p`` % of the pixels and fill them by **noisy
  linear imputation** (each removed pixel the weighted mean of its 8 neighbours, 1/6 for edge and
  1/12 for corner neighbours, solved jointly as a sparse linear system per image, plus Gaussian
  noise), so the removal leaks no shape of the mask. Curves of the explained feature (and, for
  class targets, whether the prediction is still the class: Quantus' and the paper's accuracy)
  and their areas.
* :func:`infidelity` (Yeh et al. 2019): ``E[(a . I - (f(x) - f(x - I)))^2]`` over random
  perturbations ``I`` (Gaussian noise, random squares, or your own), as ``captum.metrics.infidelity``.
* :func:`faithfulness_correlation` (Bhatt et al. 2020): Pearson correlation, over random
  pixel subsets, between the attribution mass of the subset and the output drop when it is removed.

Robustness and randomization (does the map depend on the right things?):

* :func:`max_sensitivity` (Yeh et al. 2019): the largest relative change of the map under uniform
  input noise of radius ``r``, as ``captum.metrics.sensitivity_max``.
* :func:`random_logit` (Sixt et al. 2020): similarity between the map of the target class and
  of a random other class (low = class-sensitive).

Map properties and localisation (no model needed):

* :func:`sparseness` (Gini index, Chalasani et al. 2020), :func:`complexity` (entropy of the
  normalised absolute map, Bhatt et al. 2020).
* :func:`relevance_mass_accuracy` / :func:`relevance_rank_accuracy` (Arras et al. 2022) against
  ground-truth masks.

Conventions. Maps are an :class:`~mechlens.attribution.Attribution` (its :meth:`heatmap` folds
the channels and resizes a layer map to the input) or a tensor at the input's (or the masks')
resolution: ``[B, H, W]`` / ``[B, 1, H, W]`` for pixel maps, ``[B, C, H, W]`` like the input where
a metric weighs single input elements (:func:`infidelity`). Unlike Quantus, maps are not
normalised by their maximum first (Quantus divides by the batch's largest ``|a|`` by default;
every metric here except :func:`infidelity`, which is scale-dependent by definition, is
invariant to that). Targets are any feature (:func:`~mechlens.attribution.resolve_target`); all
perturbed inputs of all samples run through the model ``internal_batch_size`` rows at a time
(``"auto"``: 256 on an accelerator, fewer for large images on CPU, see
:func:`~mechlens.attribution.base.rows_per_pass`);
randomness comes only from ``seed`` (a ``torch.Generator``). Results are :class:`MetricResult`
(per-sample ``values``, ``mean``) or :class:`RoadResult`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    default_layer,
    get_method,
    resolve_target,
    rows_per_pass,
    takes_pixels,
)
from mechlens.attribution.baselines import make_baseline
from mechlens.engine import eval_mode, unwrap
from mechlens.evaluation.faithfulness import _heatmap, _masks  # private helpers, shared on purpose
from mechlens.evaluation.similarity import normalize_maps, spearman
from mechlens.features import OUTPUT, ClassLogit, feature_forward

__all__ = [
    "MetricResult",
    "RoadResult",
    "complexity",
    "faithfulness_correlation",
    "infidelity",
    "max_sensitivity",
    "noisy_linear_imputation",
    "random_logit",
    "relevance_mass_accuracy",
    "relevance_rank_accuracy",
    "road",
    "sparseness",
]


# ---------------------------------------------------------------------------- results
@dataclass
class MetricResult:
    """``values`` ``[B]`` (float64) of ``metric`` per sample; ``details``: the per-sample
    ingredients (e.g. the subset sums and output drops of faithfulness correlation)."""

    metric: str
    values: torch.Tensor
    higher_is_better: bool | None = None
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def mean(self) -> float:
        """Mean over the samples, ignoring NaN (undefined samples, e.g. a constant map)."""
        return float(self.values.double().nanmean())

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "values": [float(v) for v in self.values], "mean": self.mean,
                "higher_is_better": self.higher_is_better}

    def __repr__(self) -> str:
        better = {True: ", higher is better", False: ", lower is better", None: ""}[self.higher_is_better]
        return f"MetricResult({self.metric}: mean={self.mean:.4g} over {self.values.numel()} samples{better})"

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        rows = [{"sample": i, self.metric: float(v)} for i, v in enumerate(self.values)]
        rows.append({"sample": "mean", self.metric: self.mean})
        better = {True: " (higher is better)", False: " (lower is better)", None: ""}[self.higher_is_better]
        return html_table(rows, ["sample", self.metric], caption=f"{self.metric}{better}")


@dataclass
class RoadResult:
    """ROAD curves. ``percentages`` ``[P]``; per order (``"morf"``: most relevant removed first,
    ``"lerf"``: least relevant first) ``scores[order]`` ``[B, P]`` the explained feature after
    removing that share of the pixels, ``kept[order]`` ``[B, P]`` whether the model still predicts
    the target class (class targets only, else ``None``); ``values`` ``[B]`` the unperturbed
    feature. A faithful map makes MoRF fall fast and LeRF stay high."""

    percentages: torch.Tensor
    scores: dict[str, torch.Tensor]
    kept: dict[str, torch.Tensor] | None
    values: torch.Tensor
    noise: float

    def auc(self, order: str = "morf", *, accuracy: bool = False) -> torch.Tensor:
        """``[B]`` area under the curve of ``order`` over the removed fraction (trapezoid rule on
        ``percentages / 100``); ``accuracy=True``: under the kept-prediction curve."""
        curves = self._curves(order, accuracy)
        fractions = (self.percentages.double() / 100).expand_as(curves)
        return torch.trapezoid(curves.double(), fractions, dim=1)

    def accuracy(self, order: str = "morf") -> torch.Tensor:
        """``[P]`` share of the samples still predicted as their target class at each percentage
        (what Quantus' ``ROAD`` returns, for MoRF)."""
        return self._curves(order, True).double().mean(dim=0)

    @property
    def gap(self) -> float:
        """Mean LeRF AUC minus mean MoRF AUC of the feature curves (higher = more faithful; needs both orders)."""
        return float(self.auc("lerf").mean() - self.auc("morf").mean())

    def _curves(self, order: str, accuracy: bool) -> torch.Tensor:
        if order not in self.scores:
            raise ValueError(f"no {order!r} curve: this result has {', '.join(self.scores)}")
        if not accuracy:
            return self.scores[order]
        if self.kept is None:
            raise ValueError("the accuracy curve needs class targets (ClassLogit at the model output)")
        return self.kept[order]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"percentages": self.percentages.tolist(), "noise": self.noise}
        for order in self.scores:
            out[order] = {"mean_scores": self.scores[order].mean(dim=0).tolist(),
                          "auc": self.auc(order).tolist(), "mean_auc": float(self.auc(order).mean())}
            if self.kept is not None:
                out[order]["accuracy"] = self.accuracy(order).tolist()
        return out

    def __repr__(self) -> str:
        parts = [f"{order} AUC={float(self.auc(order).mean()):.4g}" for order in self.scores]
        return (f"RoadResult({', '.join(parts)}; {len(self.percentages)} percentages, "
                f"{self.values.numel()} samples, noise={self.noise})")

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        rows = []
        for order in self.scores:
            row: dict[str, Any] = {"order": order, "mean AUC": float(self.auc(order).mean())}
            if self.kept is not None:
                row["accuracy AUC"] = float(self.auc(order, accuracy=True).mean())
            rows.append(row)
        return html_table(rows, caption=f"ROAD over {len(self.percentages)} percentages, noise {self.noise}")


# ---------------------------------------------------------------------------- shared helpers
def _batch_of(saliency: Attribution | torch.Tensor) -> int:
    return int(saliency.map.shape[0] if isinstance(saliency, Attribution) else torch.as_tensor(saliency).shape[0])


def _pixel_maps(saliency: Attribution | torch.Tensor, size: tuple[int, int], batch: int, what: str) -> torch.Tensor:
    """``[B, H, W]`` maps at ``size``: an Attribution's heatmap (resized as its kind says), a
    tensor only when it already has that size (no silent resampling of raw maps)."""
    if not isinstance(saliency, Attribution):
        shape = tuple(torch.as_tensor(saliency).shape)
        if len(shape) not in (3, 4) or tuple(shape[-2:]) != tuple(size):
            raise ValueError(
                f"maps of shape {shape} do not match the {what} ({size[0]}x{size[1]}): pass [B, H, W] maps at that "
                "resolution, or an Attribution (its heatmap() resizes a layer map)"
            )
    heat = _heatmap(saliency, size)
    if heat.shape[0] != batch:
        raise ValueError(f"got {heat.shape[0]} maps for {batch} {what.split()[-1]}: give one map per sample")
    return heat


def _element_maps(saliency: Attribution | torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` attributions of single input elements: an input-shaped map as it is, a
    pixel map (``[B, H, W]``, ``[B, 1, H, W]``, a layer Attribution's heatmap) repeated over channels."""
    if isinstance(saliency, Attribution) and saliency.kind == "input" and tuple(saliency.map.shape) == tuple(inputs.shape):
        return saliency.map.detach()
    raw = None if isinstance(saliency, Attribution) else torch.as_tensor(saliency).detach()
    if raw is not None and tuple(raw.shape) == tuple(inputs.shape):
        return raw
    if raw is not None and raw.dim() == 4 and raw.shape[1] != 1:
        raise ValueError(f"maps of shape {tuple(raw.shape)} do not match the inputs {tuple(inputs.shape)}: pass [B, C, H, W] "
                         "like the inputs or a pixel map [B, H, W]")
    heat = _pixel_maps(saliency, tuple(inputs.shape[-2:]), inputs.shape[0], "inputs")
    return heat.unsqueeze(1).expand_as(inputs)


def _class_indices(target: Target) -> torch.Tensor | None:
    """``[B]`` class index per sample when every feature is a class logit at the model output."""
    if not all(isinstance(f, ClassLogit) and f.layer == OUTPUT for f in target.features):
        return None
    return torch.tensor([target.features[int(i)].index for i in target.index], dtype=torch.long)


# Up to this many distinct features (e.g. a class per sample) are read on every perturbed row and
# picked, one batched readout each; the per-row feature path builds a feature list per row.
_FEW_FEATURES = 64


def _row_values(model: Any, target: Target, sample: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """The explained value of each row of ``images`` (row ``r`` is a copy of sample ``sample[r]``)
    and the :class:`~mechlens.features.FeatureForward`, without gradients."""
    rows = target.select(sample.cpu())
    if 1 < len(target.features) <= _FEW_FEATURES:
        fwd = feature_forward(model, list(target.features), images, grads=False)
        return rows.pick(fwd.values), fwd
    return rows.forward(model, images, grads=False)


def _sample_chunks(batch: int, per_sample: int, size: int | None) -> list[tuple[int, int, int, int]]:
    """Chunks ``(first, last, start, stop)`` of the sample-major rows ``b * per_sample + k`` that
    hold whole samples ``first..last-1`` (or part of one sample when ``per_sample > size``), at
    most ``size`` rows each."""
    if size is not None and size < 1:
        raise ValueError(f"internal_batch_size must be a positive integer, got {size}")
    if size is None or per_sample <= size:
        step = batch if size is None else max(1, size // per_sample)
        return [(b, min(b + step, batch), b * per_sample, min(b + step, batch) * per_sample) for b in range(0, batch, step)]
    return [(b, b + 1, b * per_sample + lo, b * per_sample + hi)
            for b in range(batch) for lo, hi in chunk_ranges(per_sample, size)]


def _ranks(heat: torch.Tensor, generator: torch.Generator, *, descending: bool) -> torch.Tensor:
    """``[B, P]`` rank of each pixel (0 = removed first); ties broken by a seeded random order."""
    batch, pixels = heat.shape
    perm = torch.randperm(pixels, generator=generator).to(heat.device)
    key = -heat[:, perm] if descending else heat[:, perm]
    order = perm[torch.argsort(key, dim=1, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=heat.device).expand(batch, pixels))
    return ranks


def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Pearson correlation of ``[B, N]`` tensors (float64); NaN for a constant row."""
    a = a.double() - a.double().mean(dim=1, keepdim=True)
    b = b.double() - b.double().mean(dim=1, keepdim=True)
    denominator = a.norm(dim=1) * b.norm(dim=1)
    out = (a * b).sum(dim=1) / denominator
    return torch.where(denominator > 0, out, torch.full_like(out, math.nan))


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


# ---------------------------------------------------------------------------- ROAD
# The 8 neighbours of the ROAD imputation (Rong et al.): edges 1/6, corners 1/12, summing to 1.
_STENCIL = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=torch.float64)
# Each neighbour pair once, as (dy, dx, weight) with the neighbour after the pixel in raster order.
_FORWARD_NEIGHBOURS = ((0, 1, 1 / 6), (1, -1, 1 / 12), (1, 0, 1 / 6), (1, 1, 1 / 12))


def noisy_linear_imputation(images: torch.Tensor, removed: Any, *, noise: float = 0.01,
                            generator: torch.Generator | None = None, seed: int = 0) -> torch.Tensor:
    """ROAD's imputation: every pixel marked in ``removed`` (``[N, H, W]`` or ``[H, W]`` bool) gets
    the weighted mean of its in-image neighbours (edges 1/6, corners 1/12; removed neighbours are
    unknowns too), one sparse symmetric positive-definite system per image and all channels at
    once, then ``noise`` x N(0, 1) (seeded). Returns new images; kept pixels are unchanged.

    The system is banded (bandwidth at most ``W + 1`` in raster order), so each image is one
    LAPACK banded Cholesky solve (``dpbsv``) over only its removed pixels (Quantus builds a
    ``lil_matrix`` in Python and calls SuperLU per image)."""
    from scipy.linalg.lapack import dpbsv

    check_images(images, "images")
    n, channels, height, width = images.shape
    mask = torch.as_tensor(removed).bool().cpu()
    if mask.dim() == 2:
        mask = mask.unsqueeze(0).expand(n, -1, -1)
    if tuple(mask.shape) != (n, height, width):
        raise ValueError(f"removed must be [N, H, W] = {[n, height, width]} (or [H, W]), got {list(mask.shape)}")
    full = mask.flatten(1).all(dim=1)
    if full.any():
        raise ValueError(f"images {full.nonzero().flatten().tolist()[:8]} have every pixel removed: nothing to "
                         "impute from; remove fewer pixels (ROAD percentages must be below 100)")
    x = images.detach().to("cpu", torch.float64)
    out = x.clone()
    # right-hand side: the weighted sum of each pixel's kept neighbours (zero padding = outside the
    # image), as 8 shifted adds (a float64 conv2d is 10x slower on CPU); degree: the in-image weight
    padded = F.pad(x * (~mask).unsqueeze(1), (1, 1, 1, 1))
    ones = F.pad(torch.ones(height, width, dtype=x.dtype), (1, 1, 1, 1))
    rhs = torch.zeros_like(x)
    degree = torch.zeros(height, width, dtype=x.dtype)
    for dy in range(3):
        for dx in range(3):
            weight = float(_STENCIL[dy, dx])
            if weight:
                rhs += weight * padded[..., dy : dy + height, dx : dx + width]
                degree += weight * ones[dy : dy + height, dx : dx + width]
    rhs = rhs.view(n, channels, -1).numpy()
    degree = degree.flatten().numpy()
    flat = mask.flatten(1).numpy()
    # for each forward neighbour offset: the pixels p whose neighbour p + offset is in the image and both are removed
    pair_masks = []
    for dy, dx, weight in _FORWARD_NEIGHBOURS:
        both = torch.zeros(n, height, width, dtype=torch.bool)
        x0, x1 = max(0, -dx), width - max(0, dx)
        both[:, : height - dy, x0:x1] = mask[:, : height - dy, x0:x1] & mask[:, dy:, x0 + dx : x1 + dx]
        pair_masks.append((dy * width + dx, weight, both.flatten(1).numpy()))
    gen = (generator if generator is not None else _generator(seed)) if noise else None
    result = out.view(n, channels, -1).numpy()
    for i in range(n):
        row = flat[i]
        index = np.flatnonzero(row)
        m = index.size
        if m == 0:
            continue
        variable = np.cumsum(row) - 1  # unknown number of each removed pixel (raster order)
        couplings = []
        for offset, weight, both in pair_masks:
            p = np.flatnonzero(both[i])
            if p.size:
                couplings.append((variable[p], variable[p + offset], weight))
        # the band is as wide as the farthest coupling (<= W + 1; far less for scattered pixels)
        bandwidth = max([int((vq - vp).max()) for vp, vq, _ in couplings], default=0)
        band = np.zeros((bandwidth + 1, m), order="F")  # LAPACK upper band storage: band[kd + i - j, j] = A[i, j]
        band[bandwidth] = degree[index]
        for vp, vq, weight in couplings:
            band[bandwidth - (vq - vp), vq] = -weight
        b = np.asfortranarray(rhs[i][:, index].T)
        _, solution, info = dpbsv(band, b, lower=0, overwrite_ab=1, overwrite_b=1)
        if info != 0:  # cannot happen for a valid mask (every removed region touches a kept pixel)
            raise RuntimeError(f"the imputation system of image {i} is singular (LAPACK dpbsv info={info})")
        if gen is not None:  # one draw per image: the stream does not depend on how images are batched
            solution = solution + noise * torch.randn(m, channels, generator=gen).double().numpy()
        result[i][:, index] = solution.T
    return out.to(device=images.device, dtype=images.dtype)


ROAD_ORDERS = ("morf", "lerf")


@takes_pixels
def road(
    model: Any,
    inputs: torch.Tensor,
    target: Any,
    saliency: Attribution | torch.Tensor,
    *,
    percentages: Sequence[float] = tuple(range(1, 100, 2)),
    orders: Sequence[str] = ROAD_ORDERS,
    noise: float = 0.01,
    internal_batch_size: int | str | None = "auto",
    seed: int = 0,
) -> RoadResult:
    """ROAD (Remove And Debias) curves of ``saliency`` for the feature ``target``: for each order
    and percentage ``p`` the ``floor(H * W * p / 100)`` top (MoRF) or bottom (LeRF) pixels of the
    map are replaced by :func:`noisy_linear_imputation` and the model is run on the result (see
    the module docstring). Defaults are the paper's and Quantus': ``p`` = 1, 3, ..., 99, noise 0.01."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    pcts = [float(p) for p in percentages]
    if not pcts or any(not 0 <= p < 100 for p in pcts):
        raise ValueError(f"percentages must be a non-empty list of values in [0, 100), got {list(percentages)}")
    orders = list(orders)
    if not orders or any(o not in ROAD_ORDERS for o in orders) or len(set(orders)) != len(orders):
        raise ValueError(f"orders must be distinct values of {ROAD_ORDERS}, got {orders}")
    resolved = resolve_target(model, inputs, target)
    batch, _, height, width = inputs.shape
    pixels = height * width
    heat = _pixel_maps(saliency, (height, width), batch, "inputs").to(inputs.device).reshape(batch, pixels)
    generator = _generator(seed)
    ranks = torch.stack([_ranks(heat, generator, descending=(o == "morf")) for o in orders])  # [O, B, P]
    counts = torch.tensor([int(pixels * p / 100) for p in pcts], device=inputs.device)  # Quantus' int() rounding
    n_pct = len(pcts)
    total = len(orders) * n_pct * batch  # rows: (order, percentage, sample), sample fastest
    scores = torch.empty(total, dtype=torch.float64)
    classes = _class_indices(resolved)
    kept = torch.empty(total, dtype=torch.bool) if classes is not None else None
    # forward-only: the model runs as given, as the deletion curves run it (inference_model's
    # channels-last feed cost more than it saved on small inputs, and there is nothing to fold for)
    with eval_mode(model), torch.no_grad():
        values, _ = resolved.forward(model, inputs, grads=False)
        for start, stop in chunk_ranges(total, rows_per_pass(internal_batch_size, inputs)):
            rows = torch.arange(start, stop, device=inputs.device)
            sample, step, order = rows % batch, (rows // batch) % n_pct, rows // (batch * n_pct)
            removed = (ranks[order, sample] < counts[step].unsqueeze(1)).view(-1, height, width)
            images = noisy_linear_imputation(inputs[sample], removed, noise=noise, generator=generator)
            out, fwd = _row_values(model, resolved, sample, images)
            scores[start:stop] = out.detach().double().cpu()
            if kept is not None:
                kept[start:stop] = fwd.output.argmax(dim=1).cpu() == classes[sample.cpu()]
    shape = (len(orders), n_pct, batch)
    curves = scores.view(shape).permute(0, 2, 1)
    return RoadResult(
        percentages=torch.tensor(pcts, dtype=torch.float64),
        scores={o: curves[i].contiguous() for i, o in enumerate(orders)},
        kept=None if kept is None else {o: kept.view(shape).permute(0, 2, 1)[i].contiguous() for i, o in enumerate(orders)},
        values=values.detach().double().cpu(),
        noise=float(noise),
    )


# ---------------------------------------------------------------------------- infidelity
INFIDELITY_PERTURBATIONS = ("gaussian", "square")


@takes_pixels
def infidelity(
    model: Any,
    inputs: torch.Tensor,
    target: Any,
    saliency: Attribution | torch.Tensor,
    *,
    n_perturb_samples: int = 10,
    perturbation: str | Callable[[torch.Tensor, torch.Generator], torch.Tensor] = "gaussian",
    noise_std: float = 0.1,
    patch_size: int = 4,
    baseline: Any = "zeros",
    perturbations: torch.Tensor | None = None,
    normalize: bool = False,
    internal_batch_size: int | str | None = "auto",
    seed: int = 0,
) -> MetricResult:
    """Infidelity ``mean_k (a . I_k - (f(x) - f(x - I_k)))^2`` per sample (Yeh et al.; Captum's
    ``infidelity`` with the same perturbations gives the same numbers). ``a``: the map per input
    element (a pixel map counts once per channel). Perturbations ``I`` (``n_perturb_samples`` per
    sample, seeded, drawn sample-major like Captum's ``repeat_interleave``):

    * ``"gaussian"``: ``I ~ N(0, noise_std^2)`` per element;
    * ``"square"``: a random ``patch_size`` square set to ``baseline`` (``I = x - baseline`` there);
    * a callable ``(rows [N, C, H, W], generator) -> I`` (Captum's ``perturb_func`` minus the
      perturbed inputs, which are ``rows - I``);
    * ``perturbations``: explicit ``I`` ``[B, K, C, H, W]`` (overrides the above).

    ``normalize``: scale the map by the least-squares optimal ``beta`` first (Captum's
    ``normalize=True``). Lower is better. ``details``: ``explained`` (``a . I``) and ``drops``
    (``f(x) - f(x - I)``), both ``[B, K]``."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    resolved = resolve_target(model, inputs, target)
    batch, channels, height, width = inputs.shape
    attributions = _element_maps(saliency, inputs).to(inputs.device, inputs.dtype)
    if perturbations is not None:
        perturbations = torch.as_tensor(perturbations).to(inputs.device, inputs.dtype)
        if perturbations.dim() != 5 or perturbations.shape[0] != batch or tuple(perturbations.shape[2:]) != tuple(inputs.shape[1:]):
            raise ValueError(f"perturbations must be [B, K, C, H, W] with B, C, H, W = {batch}, {channels}, {height}, "
                             f"{width}, got {tuple(perturbations.shape)}")
        samples = int(perturbations.shape[1])
    else:
        samples = int(n_perturb_samples)
        if not callable(perturbation) and perturbation not in INFIDELITY_PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {INFIDELITY_PERTURBATIONS} or a callable (rows, generator) -> I, "
                             f"got {perturbation!r}")
        if perturbation == "square" and not 1 <= patch_size <= min(height, width):
            raise ValueError(f"patch_size must be between 1 and {min(height, width)}, got {patch_size}")
    if samples < 1:
        raise ValueError("n_perturb_samples must be at least 1")
    generator = _generator(seed)
    base = make_baseline(inputs, baseline, generator=_generator(seed)).detach() if perturbation == "square" else None
    total = batch * samples  # rows: sample-major (row = b * K + k), Captum's order
    explained = torch.empty(total, dtype=torch.float64)
    perturbed_values = torch.empty(total, dtype=torch.float64)
    flat_attributions = attributions.flatten(1)
    if perturbations is not None:  # all at once: one pass over the given tensor, chunks are views
        explained = torch.einsum("bkd,bd->bk", perturbations.flatten(2), flat_attributions).double().cpu().reshape(-1)
        perturbed_all = (inputs.unsqueeze(1) - perturbations).flatten(0, 1)
    with eval_mode(model), torch.no_grad():
        values, _ = resolved.forward(model, inputs, grads=False)
        for start, stop in chunk_ranges(total, rows_per_pass(internal_batch_size, inputs)):
            sample = torch.arange(start, stop, device=inputs.device) // samples
            if perturbations is not None:
                out, _ = _row_values(model, resolved, sample, perturbed_all[start:stop])
                perturbed_values[start:stop] = out.double().cpu()
                continue
            rows = inputs[sample]
            if callable(perturbation):
                noise = torch.as_tensor(perturbation(rows, generator)).to(rows)
                if noise.shape != rows.shape:
                    raise ValueError(f"the perturbation function returned {tuple(noise.shape)} for rows {tuple(rows.shape)}")
            elif perturbation == "gaussian":
                noise = noise_std * torch.randn(rows.shape, generator=generator, dtype=rows.dtype).to(rows.device)
            else:
                top = torch.randint(0, height - patch_size + 1, (rows.shape[0],), generator=generator).to(rows.device)
                left = torch.randint(0, width - patch_size + 1, (rows.shape[0],), generator=generator).to(rows.device)
                ys = torch.arange(height, device=rows.device).view(1, -1, 1)
                xs = torch.arange(width, device=rows.device).view(1, 1, -1)
                square = ((ys >= top.view(-1, 1, 1)) & (ys < top.view(-1, 1, 1) + patch_size)
                          & (xs >= left.view(-1, 1, 1)) & (xs < left.view(-1, 1, 1) + patch_size)).unsqueeze(1)
                noise = torch.where(square, rows - base[sample], torch.zeros_like(rows))
            out, _ = _row_values(model, resolved, sample, rows - noise)
            perturbed_values[start:stop] = out.double().cpu()
            explained[start:stop] = (flat_attributions[sample] * noise.flatten(1)).sum(dim=1).double().cpu()
    explained = explained.view(batch, samples)
    drops = values.double().cpu().unsqueeze(1) - perturbed_values.view(batch, samples)
    details: dict[str, Any] = {"explained": explained, "drops": drops}
    if normalize:
        squares = explained.pow(2).sum(dim=1)
        beta = torch.where(squares > 0, (explained * drops).sum(dim=1) / squares, torch.zeros_like(squares))
        details["beta"] = beta
        explained = beta.unsqueeze(1) * explained
    scores = (explained - drops).pow(2).mean(dim=1)
    return MetricResult("infidelity", scores, higher_is_better=False, details=details)


# ---------------------------------------------------------------------------- max-sensitivity
@takes_pixels
def max_sensitivity(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    method: str = "saliency",
    *,
    n_perturb_samples: int = 10,
    radius: float = 0.02,
    norm: str | float = "fro",
    perturb_func: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    internal_batch_size: int | None = None,
    seed: int = 0,
    **method_kwargs: Any,
) -> MetricResult:
    """Max-sensitivity (Yeh et al.; ``captum.metrics.sensitivity_max``): for ``n_perturb_samples``
    copies ``x + u``, ``u ~ U(-radius, radius)`` per element (seeded; drawn sample-major in one
    stream, as Captum draws them), ``max ||m(x + u) - m(x)|| / ||m(x)||`` of the method's raw maps
    ``m`` (``Attribution.map``; a zero reference norm counts as 1, as in Captum). All copies of all
    samples go through ``method`` ``internal_batch_size`` rows per call (None: one call).
    ``perturb_func(rows, generator) -> perturbed rows`` replaces the uniform noise. Lower is
    better; ``details["sensitivities"]`` ``[B, K]``."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    info = get_method(method)
    default_layer(info, model, inputs, method_kwargs)
    resolved = resolve_target(model, inputs, target)
    if n_perturb_samples < 1:
        raise ValueError("n_perturb_samples must be at least 1")
    order = {"fro": 2.0, "inf": math.inf}.get(norm, norm) if isinstance(norm, str) else float(norm)
    if not isinstance(order, float):
        raise ValueError(f"norm must be 'fro', 'inf' or a number, got {norm!r}")
    batch, samples = inputs.shape[0], int(n_perturb_samples)
    reference = info.fn(model, inputs, resolved, **method_kwargs).map.detach().flatten(1).double()
    reference_norm = torch.linalg.vector_norm(reference, ord=order, dim=1)
    reference_norm = torch.where(reference_norm == 0, torch.ones_like(reference_norm), reference_norm)
    generator = _generator(seed)
    total = batch * samples
    sensitivities = torch.empty(total, dtype=torch.float64, device=reference.device)
    for start, stop in chunk_ranges(total, internal_batch_size):
        sample = torch.arange(start, stop) // samples
        rows = inputs[sample.to(inputs.device)]
        if perturb_func is not None:
            perturbed = torch.as_tensor(perturb_func(rows, generator)).to(rows)
        else:
            noise = torch.empty(rows.shape, dtype=rows.dtype).uniform_(-radius, radius, generator=generator)
            perturbed = rows + noise.to(rows.device)
        maps = info.fn(model, perturbed, resolved.select(sample), **method_kwargs).map.detach().flatten(1).double()
        change = torch.linalg.vector_norm(maps - reference[sample.to(maps.device)], ord=order, dim=1)
        sensitivities[start:stop] = change / reference_norm[sample.to(maps.device)]
    sensitivities = sensitivities.view(batch, samples).cpu()
    return MetricResult("max_sensitivity", sensitivities.amax(dim=1), higher_is_better=False,
                        details={"sensitivities": sensitivities, "method": info.name})


# ---------------------------------------------------------------------------- random logit
SIMILARITIES = ("ssim", "spearman", "pearson")


def _ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`mechlens.evaluation.similarity.ssim` (scikit-image's SSIM of the min-max scaled
    maps, 7x7 uniform window, sample covariance) for the whole batch in a few tensor ops: only
    windows inside the map are needed (scikit-image crops the padded border before averaging, so
    its padding never counts)."""
    if a.shape != b.shape or a.dim() != 3:
        raise ValueError(f"ssim compares batches of 2-d maps [B, H, W] of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    side = min(a.shape[1:])
    if side < 3:
        raise ValueError(f"maps of {tuple(a.shape[1:])} pixels are too small for SSIM (need at least 3x3)")
    win = min(7, side if side % 2 == 1 else side - 1)
    x = normalize_maps(a).double()
    y = normalize_maps(b).double()
    # window means over the valid region by running sums (float64; 10x an average pool on CPU)
    sums = F.pad(torch.stack([x, y, x * x, y * y, x * y], dim=1), (0, 0, 1, 0)).cumsum(dim=-2)
    sums = sums[..., win:, :] - sums[..., :-win, :]
    sums = F.pad(sums, (1, 0)).cumsum(dim=-1)
    mean_x, mean_y, xx, yy, xy = ((sums[..., win:] - sums[..., :-win]) / (win * win)).unbind(1)
    unbiased = win * win / (win * win - 1)
    var_x = unbiased * (xx - mean_x * mean_x)
    var_y = unbiased * (yy - mean_y * mean_y)
    cov = unbiased * (xy - mean_x * mean_y)
    c1, c2 = 0.01 ** 2, 0.03 ** 2  # scikit-image's K1, K2 with data_range 1
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return index.flatten(1).mean(dim=1)


def _similarity(kind: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if callable(kind):
        return torch.as_tensor(kind(a, b), dtype=torch.float64).reshape(-1)
    if kind == "ssim":
        return _ssim(a, b)
    if kind == "spearman":
        return spearman(a, b)
    if kind == "pearson":
        return _pearson(a.flatten(1), b.flatten(1))
    raise ValueError(f"similarity must be one of {SIMILARITIES} or a callable (a, b) -> [B], got {kind!r}")


@takes_pixels
def random_logit(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    method: str = "saliency",
    *,
    saliency: Attribution | torch.Tensor | None = None,
    others: Any = None,
    num_classes: int | None = None,
    similarity: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ssim",
    absolute: bool = False,
    seed: int = 0,
    **method_kwargs: Any,
) -> MetricResult:
    """Random-logit test (Sixt et al.; Quantus ``RandomLogit``): similarity between each sample's
    heatmap for its target class and for a different class drawn uniformly (seeded) from the
    other ``num_classes - 1`` (default: the model's output width). Both maps come from one
    batched call of ``method``; ``saliency``: the target's maps if you have them (from the same
    method; ``[B, H, W]`` or an Attribution), then only the other class is explained.
    ``others``: the alternative targets yourself (any per-sample target, e.g. features other
    than classes; required when the target is not a class logit).
    ``similarity``: ``ssim`` (min-max scaled 2-d maps), ``spearman``, ``pearson`` or a callable
    ``(a [B, H, W], b) -> [B]``. Lower is better. ``details["others"]``: the alternative targets."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    info = get_method(method)
    default_layer(info, model, inputs, method_kwargs)
    resolved = resolve_target(model, inputs, target)
    batch = inputs.shape[0]
    if others is None:
        classes = _class_indices(resolved)
        if classes is None:
            raise ValueError("random_logit draws another class, so the target must be class logits; for other features "
                             "pass others= (one alternative feature per sample)")
        if num_classes is None:
            with eval_mode(model), torch.no_grad():
                output = model(inputs[:1])
            num_classes = int(output.shape[1])
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2 to draw another class, got {num_classes}")
        if int(classes.max()) >= num_classes:
            raise ValueError(f"target class {int(classes.max())} is outside num_classes={num_classes}")
        # uniform over the other classes: draw among num_classes - 1 slots and skip the target's own
        draw = torch.randint(0, num_classes - 1, (batch,), generator=_generator(seed))
        other_classes = draw + (draw >= classes).long()
        normalize = [resolved.features[int(i)].normalize for i in resolved.index]
        others = [ClassLogit(int(c), normalize=n) for c, n in zip(other_classes.tolist(), normalize)]
        labels: Any = other_classes
    else:
        labels = others
    other_target = resolve_target(model, inputs, others)
    if saliency is not None:
        given = _pixel_maps(saliency, tuple(inputs.shape[-2:]), batch, "inputs").cpu()
        given = given.abs() if absolute else given
        other = info.fn(model, inputs, other_target, **method_kwargs).heatmap(absolute=absolute).detach().cpu()
    else:
        both = Target(resolved.features + other_target.features,
                      torch.cat([resolved.index, other_target.index + len(resolved.features)]))
        maps = info.fn(model, torch.cat([inputs, inputs]), both, **method_kwargs).heatmap(absolute=absolute).detach().cpu()
        given, other = maps[:batch], maps[batch:]
    scores = _similarity(similarity, given, other)
    name = getattr(similarity, "__name__", similarity)
    return MetricResult("random_logit", scores, higher_is_better=False,
                        details={"others": labels, "method": info.name, "similarity": name})


# ---------------------------------------------------------------------------- map properties
def _flat_maps(saliency: Attribution | torch.Tensor, absolute: bool) -> torch.Tensor:
    """``[B, N]`` float64: an Attribution's heatmap, or a tensor map ``[B, ...]`` flattened."""
    if isinstance(saliency, Attribution):
        heat = saliency.heatmap().detach()
    else:
        heat = torch.as_tensor(saliency).detach()
        if heat.dim() < 2 or not heat.is_floating_point():
            raise ValueError(f"maps must be a float tensor [B, ...] (one map per sample) or an Attribution, got "
                             f"{tuple(heat.shape)} {heat.dtype}")
    flat = heat.flatten(1).double().cpu()
    return flat.abs() if absolute else flat


def sparseness(saliency: Attribution | torch.Tensor, *, absolute: bool = True) -> MetricResult:
    """Gini index of each map (Chalasani et al. 2020; Quantus ``Sparseness``): 0 for a uniform
    map, -> 1 when one pixel holds everything. ``absolute``: of ``|a|`` (Quantus' default; the
    Gini index assumes non-negative values). NaN for an all-zero map. Higher is better."""
    flat = _flat_maps(saliency, absolute)
    n = flat.shape[1]
    ordered = torch.from_numpy(np.sort(flat.numpy(), axis=1))  # numpy's sort: 4x torch's on CPU rows
    weights = 2 * torch.arange(1, n + 1, dtype=torch.float64) - n - 1
    total = ordered.sum(dim=1)
    gini = (ordered * weights).sum(dim=1) / (n * total)
    return MetricResult("sparseness", torch.where(total != 0, gini, torch.full_like(gini, math.nan)), higher_is_better=True)


def complexity(saliency: Attribution | torch.Tensor) -> MetricResult:
    """Entropy (nats) of the distribution ``|a| / sum |a|`` over the map's pixels (Bhatt et al.
    2020; Quantus ``Complexity``): ``log(N)`` for a uniform map, 0 for a single pixel. NaN for an
    all-zero map. Lower is better."""
    flat = _flat_maps(saliency, True)
    total = flat.sum(dim=1, keepdim=True)
    share = flat / total
    entropy = -torch.special.xlogy(share, share).sum(dim=1)
    return MetricResult("complexity", torch.where(total.squeeze(1) > 0, entropy, torch.full_like(entropy, math.nan)),
                        higher_is_better=False)


def _mask_metric_inputs(saliency: Attribution | torch.Tensor, masks: Any, absolute: bool) -> tuple[torch.Tensor, torch.Tensor]:
    masks_t = torch.as_tensor(masks)
    if masks_t.dim() == 4 and masks_t.shape[1] == 1:
        masks_t = masks_t[:, 0]
    batch = _batch_of(saliency)
    masks_t = _masks(masks_t, batch).cpu()
    heat = _pixel_maps(saliency, tuple(masks_t.shape[-2:]), batch, "masks").cpu().double().flatten(1)
    return (heat.abs() if absolute else heat), masks_t.flatten(1)


def relevance_mass_accuracy(saliency: Attribution | torch.Tensor, masks: Any, *, absolute: bool = False) -> MetricResult:
    """Share of the map's total relevance inside the ground-truth mask (Arras et al. 2022; Quantus
    ``RelevanceMassAccuracy``), ``masks`` ``[B, H, W]`` at the maps' resolution (an Attribution
    is resized to them). ``absolute``: of ``|a|`` (Quantus' default is the signed map, as here).
    Higher is better."""
    heat, inside = _mask_metric_inputs(saliency, masks, absolute)
    return MetricResult("relevance_mass_accuracy", (heat * inside).sum(dim=1) / heat.sum(dim=1), higher_is_better=True)


def relevance_rank_accuracy(saliency: Attribution | torch.Tensor, masks: Any, *, absolute: bool = False) -> MetricResult:
    """Share of the map's top-``K`` pixels inside the mask, ``K`` = the mask's size (Arras et al.
    2022; Quantus ``RelevanceRankAccuracy``). Pixels tied with the ``K``-th value count
    fractionally (the expected score under a random tie break; Quantus takes numpy's order).
    Higher is better."""
    heat, inside = _mask_metric_inputs(saliency, masks, absolute)
    k = inside.sum(dim=1)
    ordered = torch.from_numpy(np.sort(heat.numpy(), axis=1))  # ascending
    threshold = ordered.gather(1, (heat.shape[1] - k).unsqueeze(1))  # the K-th largest value
    above = heat > threshold
    tied = heat == threshold
    slots = k - above.sum(dim=1)  # how many of the tied pixels make the top K
    hits = (above & inside).sum(dim=1) + slots * (tied & inside).sum(dim=1) / tied.sum(dim=1)
    return MetricResult("relevance_rank_accuracy", hits.double() / k, higher_is_better=True)


# ---------------------------------------------------------------------------- faithfulness correlation
@takes_pixels
def faithfulness_correlation(
    model: Any,
    inputs: torch.Tensor,
    target: Any,
    saliency: Attribution | torch.Tensor,
    *,
    n_runs: int = 100,
    subset_size: int = 224,
    baseline: Any = "zeros",
    subsets: Any = None,
    mean: Any = None,
    internal_batch_size: int | str | None = "auto",
    seed: int = 0,
) -> MetricResult:
    """Faithfulness correlation (Bhatt et al. 2020; Quantus ``FaithfulnessCorrelation``): for
    ``n_runs`` random subsets of ``subset_size`` pixels (all channels; seeded), Pearson correlation
    between the map's sum over the subset and the drop ``f(x) - f(x')`` when the subset is set to
    ``baseline`` (:func:`~mechlens.attribution.make_baseline`; Quantus' ``"black"`` is the image's
    minimum: pass ``inputs.amin(dim=(1, 2, 3), keepdim=True)``). ``subsets``: explicit boolean
    masks, ``[B, R, H, W]`` (pixels) or ``[B, R, C, H, W]`` (single elements, weighed with the map
    per element: Quantus' choice). Higher is better; ``details``: ``sums`` and ``drops`` ``[B, R]``."""
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    resolved = resolve_target(model, inputs, target)
    batch, channels, height, width = inputs.shape
    pixels = height * width
    if subsets is not None:
        chosen = torch.as_tensor(subsets).bool().to(inputs.device)
        if chosen.dim() not in (4, 5) or chosen.shape[0] != batch or tuple(chosen.shape[-2:]) != (height, width) or (
                chosen.dim() == 5 and chosen.shape[2] != channels):
            raise ValueError(f"subsets must be boolean masks [B, R, H, W] or [B, R, C, H, W] for inputs "
                             f"{tuple(inputs.shape)}, got {tuple(chosen.shape)}")
        runs = int(chosen.shape[1])
        if chosen.dim() == 5:
            weights = _element_maps(saliency, inputs).to(inputs.device).flatten(1).double()
            sums = (chosen.flatten(2).double() * weights.unsqueeze(1)).sum(dim=2)
        else:
            heat = _pixel_maps(saliency, (height, width), batch, "inputs").to(inputs.device).flatten(1).double()
            sums = (chosen.flatten(2).double() * heat.unsqueeze(1)).sum(dim=2)
    else:
        runs = int(n_runs)
        if not 1 <= subset_size < pixels:
            raise ValueError(f"subset_size must be between 1 and {pixels - 1} (the image has {pixels} pixels), got {subset_size}")
        heat = _pixel_maps(saliency, (height, width), batch, "inputs").to(inputs.device).flatten(1).double()
        # subset_size distinct pixels per (sample, run), sample-major: the head of a seeded random
        # permutation (a per-row randperm is 3x faster on CPU than a top-k of random keys)
        generator = _generator(seed)
        picked = torch.stack([torch.randperm(pixels, generator=generator)[:subset_size] for _ in range(batch * runs)])
        picked = picked.to(inputs.device)
        chosen = torch.zeros(batch * runs, pixels, dtype=torch.bool, device=inputs.device)
        chosen.scatter_(1, picked, True)
        chosen = chosen.view(batch, runs, height, width)
        sums = heat.unsqueeze(1).expand(batch, runs, pixels).gather(2, picked.view(batch, runs, -1)).sum(dim=2)
    if runs < 2:
        raise ValueError("a correlation needs at least 2 runs (subsets)")
    base = make_baseline(inputs, baseline, mean=mean, generator=_generator(seed)).detach()
    total = batch * runs  # rows: sample-major
    perturbed_values = torch.empty(total, dtype=torch.float64)
    where = chosen if chosen.dim() == 5 else chosen.unsqueeze(2)  # [B, R, 1 or C, H, W]
    with eval_mode(model), torch.no_grad():
        values, _ = resolved.forward(model, inputs, grads=False)
        for first, last, start, stop in _sample_chunks(batch, runs, rows_per_pass(internal_batch_size, inputs)):
            # rows [start, stop) are runs of samples first..last-1: broadcast, no gathered copies
            part = where.flatten(0, 1)[start:stop].unflatten(0, (last - first, -1))
            images = torch.where(part, base[first:last].unsqueeze(1), inputs[first:last].unsqueeze(1)).flatten(0, 1)
            sample = torch.arange(start, stop, device=inputs.device) // runs
            out, _ = _row_values(model, resolved, sample, images)
            perturbed_values[start:stop] = out.double().cpu()
    drops = values.double().cpu().unsqueeze(1) - perturbed_values.view(batch, runs)
    sums = sums.cpu()
    return MetricResult("faithfulness_correlation", _pearson(sums, drops), higher_is_better=True,
                        details={"sums": sums, "drops": drops})
