"""The shared core of every attribution method: targets, the result type, the registry.

* **Targets are features.** ``target`` may be any :class:`~mechlens.features.Feature` (a class
  logit, a channel, a CAV direction, an SAE latent), a feature spec string (``"class:3"``,
  ``"channel:stage3:5"``), an ``int`` (shorthand for ``ClassLogit``), a per-sample sequence /
  tensor of class indices, a per-sample sequence of features, or ``None`` (the predicted class
  of each sample). :func:`resolve_target` turns all of these into one :class:`Target`: distinct
  features plus, per sample, which of them to explain. Every method reads feature values through
  :func:`mechlens.features.feature_forward`, so "explain class 3" and "explain SAE latent 123"
  run the same code.
* **Batch-first results.** A method returns an :class:`Attribution` whose ``map`` is shaped like
  the input (``kind="input"``: ``[B, C, H, W]``) or like the layer it explains (``kind="layer"``:
  ``[B, h, w]``, CAMs and ViT attention); :meth:`Attribution.heatmap` gives ``[B, H, W]`` at input
  resolution for plots and metrics.
* **Registry.** ``get_method("gradcam")``, ``list_methods("grad*")`` and one call,
  :func:`attribute`, for every method (timm-style).
* **House rules.** The model runs in eval mode during a method and every module's ``training``
  flag is restored afterwards; hooks are removed in ``finally``; randomness only through seeds /
  ``torch.Generator``.
"""
from __future__ import annotations

import contextvars
import difflib
import fnmatch
import functools
import inspect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mechlens.engine import HookSet, eval_mode, unwrap
from mechlens.features import ClassLogit, Feature, FeatureForward, as_feature, feature_forward

__all__ = [
    "Attribution",
    "MethodInfo",
    "NonFiniteError",
    "Target",
    "attribute",
    "check_finite",
    "eval_mode",
    "get_method",
    "input_gradients",
    "pixel_space",
    "takes_pixels",
    "list_methods",
    "register_method",
    "resolve_target",
]


# ---------------------------------------------------------------------------- model helpers
@contextmanager
def pixel_space(model: Any) -> Iterator[Any]:
    """One input space for every entry point: images in ``[0, 1]``. For a
    :class:`~mechlens.models.LoadedModel` this yields its module with the model's normalization
    applied inside (a forward pre-hook on the module, removed on exit, so gradients, baselines and
    perturbations all live in pixel space); a plain ``nn.Module`` is yielded as it is (you
    normalize)."""
    preprocessing = getattr(model, "preprocessing", None)
    net = getattr(model, "model", None)
    if isinstance(model, nn.Module) or preprocessing is None or not isinstance(net, nn.Module):
        yield model
        return

    def normalize(module: nn.Module, args: tuple) -> tuple:
        return (preprocessing.normalize(args[0]), *args[1:]) if args else args

    with HookSet() as hooks:
        hooks.pre(net, normalize)
        yield net


def takes_pixels(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Decorator for functions whose first argument is a model: a ``LoadedModel`` is turned into
    its module with normalization inside for the call (see :func:`pixel_space`)."""
    @functools.wraps(fn)
    def wrapper(model: Any, *args: Any, **kwargs: Any) -> Any:
        with pixel_space(model) as net:
            return fn(net, *args, **kwargs)

    return wrapper


def chunk_ranges(total: int, size: int | None) -> Iterator[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``range(total)`` in pieces of ``size`` (all at once when
    ``size`` is None)."""
    if size is not None and size < 1:
        raise ValueError(f"internal_batch_size must be a positive integer, got {size}")
    step = total if size is None else size
    step = max(step, 1)
    for start in range(0, total, step):
        yield start, min(start + step, total)


#: Input elements per forward pass that ``internal_batch_size="auto"`` aims at on CPU (14 rows of
#: 3x224x224, the cap of 256 rows of 3x32x32): measured on the house SmallCNN, 512 perturbed
#: 224-px rows ran 2.5x faster in chunks of 16 than of 256, whose activations fall out of cache.
CPU_PASS_ELEMENTS = 1 << 21


def rows_per_pass(internal_batch_size: int | str | None, inputs: torch.Tensor, *, cap: int = 256) -> int | None:
    """Rows per forward pass: ``internal_batch_size`` as given (None: all at once), or for
    ``"auto"`` ``cap`` rows on an accelerator and, on CPU, as many as fit
    :data:`CPU_PASS_ELEMENTS` input elements (at least 1, at most ``cap``)."""
    if internal_batch_size != "auto":
        if isinstance(internal_batch_size, str):
            raise ValueError(f"internal_batch_size must be a positive integer, None or 'auto', got {internal_batch_size!r}")
        return internal_batch_size
    if inputs.device.type != "cpu":
        return cap
    return max(1, min(cap, CPU_PASS_ELEMENTS // max(1, inputs[0].numel())))


# ---------------------------------------------------------------------------- targets
@dataclass(frozen=True)
class Target:
    """Resolved target: distinct ``features`` and, per sample, ``index[b]`` of the feature that
    sample ``b`` is explained for. Expanded batches (IG steps, noise samples, masks) carry the
    original sample of each row and pick the same feature."""

    features: tuple[Feature, ...]
    index: torch.Tensor  # [B] long (CPU)

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("a target needs at least one feature")
        if self.index.dim() != 1:
            raise ValueError(f"target index must be 1-d [B], got shape {tuple(self.index.shape)}")

    @property
    def batch_size(self) -> int:
        return int(self.index.shape[0])

    @property
    def names(self) -> list[str]:
        """Per-sample feature names."""
        return [self.features[int(i)].name for i in self.index]

    @property
    def layers(self) -> list[str]:
        seen: dict[str, None] = {}
        for feature in self.features:
            seen.setdefault(feature.layer, None)
        return list(seen)

    def select(self, rows: torch.Tensor | Sequence[int]) -> "Target":
        """The target of a batch whose row ``r`` is original sample ``rows[r]``."""
        rows = torch.as_tensor(rows, dtype=torch.long)
        return Target(self.features, self.index[rows])

    def repeat(self, times: int) -> "Target":
        """The target of ``inputs.repeat(times, 1, 1, 1)`` (sample-major blocks of the batch)."""
        return Target(self.features, self.index.repeat(times))

    def pick(self, values: torch.Tensor) -> torch.Tensor:
        """From ``[N, F]`` feature values (one row per sample of this target) the ``[N]`` values
        each sample is explained for."""
        if values.shape[0] != self.batch_size:
            raise ValueError(f"got values for {values.shape[0]} rows but the target has {self.batch_size}")
        index = self.index.to(values.device).unsqueeze(1)
        return values.gather(1, index).squeeze(1)

    def forward(
        self,
        model: nn.Module,
        inputs: torch.Tensor,
        *,
        grads: bool = True,
        keep_layers: Sequence[str] = (),
    ) -> tuple[torch.Tensor, FeatureForward]:
        """Run the model on ``inputs`` (one row per sample of this target); returns the ``[N]``
        explained values and the :class:`FeatureForward`."""
        if len(self.features) == 1:
            fwd = feature_forward(model, list(self.features), inputs, grads=grads, keep_layers=keep_layers)
            return fwd.values[:, 0], fwd
        # a feature per sample: each kind reads its samples in one batched op (not every feature on every sample)
        per_sample = [self.features[int(i)] for i in self.index]
        fwd = feature_forward(model, per_sample, inputs, grads=grads, keep_layers=keep_layers, per_sample=True)
        return fwd.values[:, 0], fwd


def resolve_target(model: nn.Module, inputs: torch.Tensor, target: Any = None) -> Target:
    """Turn any accepted ``target`` (see the module docstring) into a :class:`Target` for the
    ``B = inputs.shape[0]`` samples. ``None`` runs the model once to take each sample's argmax
    class."""
    batch = int(inputs.shape[0])
    if isinstance(target, Target):
        if target.batch_size != batch:
            raise ValueError(f"the target is for {target.batch_size} samples but inputs has {batch}")
        return target
    if target is None:
        model = unwrap(model)
        with torch.no_grad(), eval_mode(model):
            output = model(inputs)
        if not isinstance(output, torch.Tensor) or output.dim() != 2:
            raise ValueError(
                "target=None means 'the predicted class', which needs model(x) to return [B, classes] "
                "logits; pass a Feature (e.g. Channel(layer, i)) instead"
            )
        target = output.argmax(dim=1)
    if isinstance(target, torch.Tensor):
        if target.dim() == 0:
            target = int(target.item())
        else:
            if target.is_floating_point() or target.dim() != 1:
                raise ValueError(f"a tensor target must hold one class index per sample [B], got {tuple(target.shape)} {target.dtype}")
            target = [int(v) for v in target.tolist()]
    if isinstance(target, (list, tuple)):
        if len(target) != batch:
            raise ValueError(
                f"a per-sample target needs one entry per sample: got {len(target)} for a batch of {batch} "
                "(pass a single feature or class index to explain the same one for every sample)"
            )
        features: list[Feature] = []
        keys: dict[Any, int] = {}
        index = []
        for item in target:
            feature = as_feature(item)
            key = ("class", feature.index, feature.normalize) if isinstance(feature, ClassLogit) else id(feature)
            if key not in keys:
                keys[key] = len(features)
                features.append(feature)
            index.append(keys[key])
        return Target(tuple(features), torch.tensor(index, dtype=torch.long))
    feature = as_feature(target)
    return Target((feature,), torch.zeros(batch, dtype=torch.long))


# ---------------------------------------------------------------------------- gradients
def input_gradients(
    model: nn.Module,
    inputs: torch.Tensor,
    target: Target,
    *,
    internal_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of each sample's explained value w.r.t. its input row, and the values; the batch
    is processed ``internal_batch_size`` rows at a time. Samples are independent (eval mode), so
    the gradient of the sum is the per-sample gradient.

    The result buffer is allocated only after the first chunk's backward (so it does not add to
    the peak of the forward/backward), and a single chunk returns autograd's gradient as it is
    (no buffer, no copy)."""
    ranges = list(chunk_ranges(inputs.shape[0], internal_batch_size))
    grads: torch.Tensor | None = None
    values = torch.empty(inputs.shape[0], device=inputs.device, dtype=inputs.dtype)
    for start, stop in ranges:
        x = inputs[start:stop].detach().requires_grad_(True)
        with torch.enable_grad():
            value, _ = target.select(range(start, stop)).forward(model, x, grads=True)
            (grad,) = torch.autograd.grad(value.sum(), x, allow_unused=True)
        if grad is None:
            raise RuntimeError(
                f"the feature(s) {', '.join(f.name for f in target.features)} do not depend on the input"
            )
        values[start:stop] = value.detach()
        if not grad.is_contiguous():  # channels-last weights (inference copy) give channels-last gradients
            grad = grad.contiguous()
        if len(ranges) == 1:
            return grad, values
        if grads is None:
            grads = torch.empty_like(inputs)
        grads[start:stop] = grad
    return (grads if grads is not None else torch.empty_like(inputs)), values


def feature_values(
    model: nn.Module, inputs: torch.Tensor, target: Target, *, internal_batch_size: int | None = None
) -> torch.Tensor:
    """``[N]`` explained values without gradients, in chunks."""
    out = torch.empty(inputs.shape[0], device=inputs.device, dtype=inputs.dtype)
    with torch.no_grad():
        for start, stop in chunk_ranges(inputs.shape[0], internal_batch_size):
            value, _ = target.select(range(start, stop)).forward(model, inputs[start:stop], grads=False)
            out[start:stop] = value
    return out


def check_images(inputs: Any, what: str = "inputs") -> torch.Tensor:
    if not isinstance(inputs, torch.Tensor):
        raise TypeError(f"{what} must be a tensor [B, C, H, W], got {type(inputs).__name__}")
    if inputs.dim() != 4:
        raise ValueError(f"{what} must be a batch of images [B, C, H, W], got shape {tuple(inputs.shape)}")
    if not inputs.is_floating_point():
        raise TypeError(f"{what} must be a floating-point tensor, got {inputs.dtype}")
    return inputs


# ---------------------------------------------------------------------------- result
@dataclass
class Attribution:
    """What every method returns.

    ``map``: ``[B, C, H, W]`` like the input (``kind="input"``) or ``[B, h, w]`` at the explained
    layer's resolution (``kind="layer"``). ``features``: per-sample feature names; ``values``:
    the explained feature value of each sample on its unperturbed input. ``extras``: method
    specific results (``completeness_error`` and ``convergence_delta`` for Integrated Gradients,
    ``segments`` and ``coefficients`` for LIME / KernelSHAP, per-head maps for ViT attention...;
    ``nonfinite_samples`` for every registered method, see :func:`check_finite`).
    ``channel_reduce`` is how :meth:`heatmap` folds the channels of an input-shaped map (``sum``
    for gradient methods, ``mean`` for methods that repeat one value over all channels).
    """

    map: torch.Tensor
    method: str
    features: list[str]
    values: torch.Tensor
    kind: str
    input_shape: tuple[int, ...]
    channel_reduce: str = "sum"
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def feature(self) -> str | list[str]:
        """The feature name when every sample explains the same one, else the per-sample list."""
        return self.features[0] if len(set(self.features)) == 1 else list(self.features)

    @property
    def completeness_error(self) -> torch.Tensor | None:
        """``|sum(map) - (f(x) - f(baseline))| / |f(x) - f(baseline)|`` per sample, for methods that
        satisfy completeness (Integrated Gradients, GradientSHAP in expectation, KernelSHAP)."""
        return self.extras.get("completeness_error")

    def heatmap(self, size: tuple[int, int] | None = None, *, reduce: str | None = None, absolute: bool = False) -> torch.Tensor:
        """``[B, H, W]`` map at input resolution (or ``size``): input-shaped maps folded over
        channels (``reduce``: ``sum`` | ``mean`` | ``abs_sum`` | ``max_abs``; default
        ``channel_reduce``), layer maps resized bilinearly."""
        heat = self.map.detach()
        if self.kind == "input":
            how = reduce or self.channel_reduce
            if how == "sum":
                heat = heat.sum(dim=1)
            elif how == "mean":
                heat = heat.mean(dim=1)
            elif how == "abs_sum":
                heat = heat.abs().sum(dim=1)
            elif how == "max_abs":
                heat = heat.abs().amax(dim=1)
            else:
                raise ValueError(f"unknown channel reduce {how!r}; expected sum, mean, abs_sum or max_abs")
        if absolute:
            heat = heat.abs()
        target = tuple(size) if size is not None else tuple(self.input_shape[-2:])
        if tuple(heat.shape[-2:]) != target:
            heat = F.interpolate(heat.unsqueeze(1).float(), size=target, mode="bilinear", align_corners=False).squeeze(1)
        return heat

    def __repr__(self) -> str:
        values = self.values.detach().float().reshape(-1)
        extra = f", extras={sorted(self.extras)}" if self.extras else ""
        return (f"Attribution(method={self.method!r}, feature={self.feature!r}, kind={self.kind!r}, "
                f"map={list(self.map.shape)}, values=[{float(values.min()):.4g}, {float(values.max()):.4g}]{extra})")

    def plot(self, images: Any = None, *, index: int | Sequence[int] | None = None, sign: str = "auto",
             outlier_percent: float = 2.0, alpha: float = 0.5, preprocessing: Any = None, max_samples: int = 8) -> Any:
        """A figure of the maps (over ``images``, the explained inputs, when given), one panel per
        sample (``index``: which; default the first ``max_samples``), normalised as Captum's
        ``visualize_image_attr`` does (``sign``: ``auto`` | ``all`` | ``positive`` | ``negative`` |
        ``absolute``; the top ``outlier_percent`` % of the mass clipped), each titled with its
        target and value, with a labelled colour bar; degenerate maps are flagged, not blank."""
        from mechlens.attribution.display import draw_map, figure

        chosen = list(range(min(max_samples, self.map.shape[0]))) if index is None else (
            [index] if isinstance(index, int) else list(index))
        if not chosen:
            raise ValueError("nothing to plot: no sample chosen")
        heat = self.heatmap()
        cols = min(4, len(chosen))
        rows = (len(chosen) + cols - 1) // cols
        fig = figure(3.3 * cols, 3.0 * rows)
        for k, i in enumerate(chosen):
            ax = fig.add_subplot(rows, cols, k + 1)
            shown = None
            if images is not None:
                from mechlens.attribution.display import as_rgb

                shown = as_rgb(images[i] if torch.as_tensor(images).dim() == 4 else images, preprocessing)
            draw_map(ax, fig, heat[i].float().cpu().numpy(), shown, sign=sign, outlier_percent=outlier_percent,
                     alpha=alpha, title=f"{self.method} · {self.features[i]} = {float(self.values.reshape(-1)[i]):.3g}")
        fig.tight_layout()
        return fig

    def _repr_png_(self) -> bytes:
        from mechlens.attribution.display import quiet_png

        return quiet_png(self.plot)  # the panel title says a map is degenerate

    def summary(self) -> dict[str, Any]:
        """JSON-ready statistics of the raw map and scalar extras (what the CLI writes)."""
        m = self.map.detach().float()
        out: dict[str, Any] = {
            "method": self.method,
            "feature": self.feature,
            "kind": self.kind,
            "shape": list(m.shape),
            "min": float(m.min()),
            "max": float(m.max()),
            "mean": float(m.mean()),
            "std": float(m.std()) if m.numel() > 1 else 0.0,
            "abs_mean": float(m.abs().mean()),
            "nonzero_fraction": float((m != 0).float().mean()),
            "feature_values": [float(v) for v in self.values.detach().float().reshape(-1)],
        }
        for key, value in self.extras.items():
            if isinstance(value, torch.Tensor) and value.numel() <= 64 and value.dim() <= 1:
                out[key] = [float(v) for v in value.detach().float().reshape(-1)]
            elif isinstance(value, (int, float, str, bool)) or value is None:
                out[key] = value
        return out


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class MethodInfo:
    """A registered attribution method.

    ``kind``: ``"input"`` or ``"layer"`` maps; ``family``: gradient | cam | perturbation | propagation |
    attention | smoothing; ``needs_layer``: the method takes ``layer=``; ``randomization``:
    what the model-parameter randomization check measured of it, per variant where they differ
    (``"passes"``, ``"fails"``, ``"fails with abs=True (the default); passes with abs=False"``,
    ``"n/a"``: not a function of the weights). Measured with cascading re-initialisation of every
    layer of the shapes CNN (2 trained models, 8 images): "fails" when the maps keep a mean
    Spearman >= 0.6 with the trained model's at some step, "passes" when < 0.5 throughout,
    "mixed" when trained models disagree;
    ``multiplies_batch``: the method runs many forward passes per sample and takes
    ``internal_batch_size``.
    """

    name: str
    fn: Callable[..., Attribution]
    kind: str
    family: str
    needs_layer: bool = False
    randomization: str = "passes"
    multiplies_batch: bool = False
    description: str = ""

    def __call__(self, model: Any, inputs: torch.Tensor, target: Any = None, **kwargs: Any) -> Attribution:
        return self.fn(model, inputs, target, **kwargs)


_METHODS: dict[str, MethodInfo] = {}
_ALIASES: dict[str, str] = {}


def register_method(
    name: str,
    *,
    kind: str,
    family: str,
    needs_layer: bool = False,
    randomization: str = "passes",
    multiplies_batch: bool = False,
    aliases: Sequence[str] = (),
    overwrite: bool = False,
) -> Callable[[Callable[..., Attribution]], Callable[..., Attribution]]:
    """Decorator adding an attribution function ``fn(model, inputs, target=None, **kw)`` to the
    registry under ``name`` (and ``aliases``). The registered (and returned) function also takes
    ``allow_nonfinite=False``: its result goes through :func:`check_finite`."""
    if kind not in ("input", "layer"):
        raise ValueError(f"kind must be 'input' or 'layer', got {kind!r}")

    def add(fn: Callable[..., Attribution]) -> Callable[..., Attribution]:
        if not overwrite and (name in _METHODS or name in _ALIASES):
            raise ValueError(f"an attribution method named {name!r} is already registered")
        doc = (fn.__doc__ or "").strip().splitlines()
        fn = _checked(fn)
        _METHODS[name] = MethodInfo(
            name=name, fn=fn, kind=kind, family=family, needs_layer=needs_layer,
            randomization=randomization, multiplies_batch=multiplies_batch,
            description=doc[0] if doc else "",
        )
        for alias in aliases:
            _ALIASES[alias] = name
        return fn

    return add


def get_method(name: str) -> MethodInfo:
    """The registered method ``name`` (or an alias such as ``ig``); an unknown name is an error
    listing the closest names."""
    if isinstance(name, MethodInfo):
        return name
    key = _ALIASES.get(name, name)
    if key in _METHODS:
        return _METHODS[key]
    names = sorted([*_METHODS, *_ALIASES])
    close = difflib.get_close_matches(name, names, n=4, cutoff=0.5)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown attribution method {name!r}.{hint} Available: {', '.join(sorted(_METHODS))}")


def list_methods(pattern: str = "*", *, family: str | None = None) -> list[str]:
    """Registered method names matching a wildcard ``pattern`` (timm-style), optionally of one
    ``family``."""
    return sorted(
        name for name, info in _METHODS.items()
        if fnmatch.fnmatchcase(name, pattern) and (family is None or info.family == family)
    )


def default_layer(info: MethodInfo, model: Any, inputs: Any, kwargs: dict[str, Any]) -> str | None:
    """For a method that needs a layer and has none in ``kwargs``: set ``kwargs["layer"]`` to the
    CLI's default (:func:`~mechlens.attribution.suggest_cam_layer`) and return it; else None.
    Every entry point that runs a method by name goes through here, so all pick the same layer."""
    if not info.needs_layer or kwargs.get("layer") is not None:
        return None
    from mechlens.attribution.layers import suggest_cam_layer

    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 2:
        raise ValueError(f"{info.name} needs layer= (or a batch of images to pick the default layer from)")
    kwargs["layer"] = suggest_cam_layer(model, tuple(inputs.shape[1:]))
    return kwargs["layer"]


def attribute(model: Any, inputs: torch.Tensor, target: Any = None, *, method: str = "saliency", **kwargs: Any) -> Attribution:
    """Explain ``target`` (any feature; see :func:`resolve_target`) on ``inputs`` with the
    registered ``method``; ``kwargs`` go to the method (``layer=`` for CAMs, ``n_steps=`` for IG,
    ``internal_batch_size=`` wherever a method multiplies the batch...).

    A method that needs a layer and gets none takes the CLI's default, the last top-level module
    with a spatial map (:func:`~mechlens.attribution.suggest_cam_layer`; ``extras["layer"]`` says
    which). For a ``LoadedModel`` one image ``[C, H, W]`` of its input size is a batch of one
    (:func:`mechlens.to_input` makes any image one)."""
    info = get_method(method)
    preprocessing = getattr(model, "preprocessing", None)
    if (isinstance(inputs, torch.Tensor) and inputs.dim() == 3 and preprocessing is not None
            and tuple(inputs.shape) == tuple(preprocessing.input_size)):
        inputs = inputs.unsqueeze(0)
    chosen = default_layer(info, model, inputs, kwargs)
    result = info.fn(model, inputs, target, **kwargs)
    if chosen is not None:
        result.extras.setdefault("layer", chosen)
    return result


# ---------------------------------------------------------------------------- non-finite results
class NonFiniteError(FloatingPointError):
    """An attribution explained a NaN / infinite model output, or its map is not finite."""


# Per-sample scalars that must be finite when a method reports them, and how the error names
# them (completeness is only checked for NaN: a relative error over f(x) - f(baseline) ~ 0 can
# be huge but meaningful).
_FINITE_EXTRAS = {"baseline_values": "the feature value at the baseline (the model output there)",
                  "convergence_delta": "the convergence delta"}
_NAN_EXTRAS = {"completeness_error": "the completeness error"}
_NESTED = contextvars.ContextVar("mechlens_attribution_nested", default=False)


def _bad_rows(tensor: Any, batch: int, *, nan_only: bool = False) -> torch.Tensor | None:
    """``[B]`` bool mask of the samples whose rows of ``tensor`` are not finite (None when the
    tensor is not per-sample)."""
    if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point() or tensor.dim() < 1 \
            or tensor.shape[0] != batch:
        return None
    flat = tensor.detach().reshape(batch, -1)
    bad = flat.isnan() if nan_only else ~torch.isfinite(flat)
    return bad.any(dim=1).cpu()


def check_finite(result: Attribution, *, allow_nonfinite: bool = False) -> Attribution:
    """Refuse (:class:`NonFiniteError`, one line) an attribution of a non-finite feature value,
    with a non-finite map or a NaN completeness error; with ``allow_nonfinite`` keep it and record
    ``extras["nonfinite_samples"]`` (how many samples are affected; ``nonfinite_sample_index``
    lists them). Every registered method's result goes through this."""
    batch = int(result.values.shape[0]) if result.values.dim() else 1
    masks = {
        "the explained feature value (the model output)": _bad_rows(result.values.reshape(batch, -1), batch),
        "the attribution map": _bad_rows(result.map, batch),
    }
    for key, name in {**_FINITE_EXTRAS, **_NAN_EXTRAS}.items():
        masks[name] = _bad_rows(result.extras.get(key), batch, nan_only=key in _NAN_EXTRAS)
    bad = torch.zeros(batch, dtype=torch.bool)
    for mask in masks.values():
        if mask is not None:
            bad |= mask
    count = int(bad.sum())
    result.extras["nonfinite_samples"] = count
    if count == 0:
        return result
    rows = bad.nonzero().flatten().tolist()
    result.extras["nonfinite_sample_index"] = rows
    if allow_nonfinite:
        return result
    what = next(name for name, mask in masks.items() if mask is not None and bool(mask.any()))
    features = sorted({result.features[i] for i in rows if i < len(result.features)})
    shown = ", ".join(map(str, rows[:8])) + (", ..." if len(rows) > 8 else "")
    hint = ("the model itself returns NaN/Inf there; check its weights, its dtype and the inputs' scale"
            if "model output" in what else
            "the model's output or its gradient overflowed; check the inputs' scale and the model's dtype")
    raise NonFiniteError(
        f"{result.method}: {what} is NaN or infinite for {count} of {batch} samples (feature "
        f"{', '.join(features)}; samples {shown}): {hint}, or pass allow_nonfinite=True "
        "(CLI: --allow-nonfinite) to keep such results and count them"
    )


def _checked(fn: Callable[..., Attribution]) -> Callable[..., Attribution]:
    """``fn`` with an ``allow_nonfinite=False`` keyword whose result goes through
    :func:`check_finite`; methods called inside another method (SmoothGrad's base, Guided
    Grad-CAM's parts) are checked once, on the outer result."""
    @functools.wraps(fn)
    def method(model: Any, inputs: torch.Tensor, target: Any = None, *, allow_nonfinite: bool = False,
               **kwargs: Any) -> Attribution:
        if _NESTED.get():
            return fn(model, inputs, target, **kwargs)
        token = _NESTED.set(True)
        try:
            with pixel_space(model) as net:  # a LoadedModel is explained on [0, 1] pixels
                result = fn(net, inputs, target, **kwargs)
        finally:
            _NESTED.reset(token)
        return check_finite(result, allow_nonfinite=allow_nonfinite)

    signature = inspect.signature(fn)
    params = list(signature.parameters.values())
    extra = inspect.Parameter("allow_nonfinite", inspect.Parameter.KEYWORD_ONLY, default=False, annotation="bool")
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    method.__signature__ = signature.replace(parameters=[*params[:at], extra, *params[at:]])  # type: ignore[attr-defined]
    return method


def quadrature(method: str, n_steps: int) -> tuple[list[float], list[float]]:
    """``(step_sizes, alphas)`` of the path integral: ``gausslegendre`` (default) or
    ``riemann_left|right|middle|trapezoid``. The weights always sum to 1. For the trapezoid rule
    on ``n`` nodes spanning [0, 1] the step is ``1 / (n - 1)``; Captum uses ``1 / n`` there, so its
    trapezoid weights sum to ``(n - 1) / n`` (a ``1 / n`` completeness error): our trapezoid maps
    are Captum's times ``n / (n - 1)`` (tested)."""
    if method == "gausslegendre":
        import numpy as np

        if n_steps < 1:
            raise ValueError("n_steps must be at least 1")
        nodes, weights = np.polynomial.legendre.leggauss(n_steps)
        return (0.5 * weights).tolist(), (0.5 * (1 + nodes)).tolist()
    kinds = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")
    if method not in kinds:
        raise ValueError(f"unknown integration method {method!r}; expected gausslegendre or one of {', '.join(kinds)}")
    if n_steps < 2:
        raise ValueError("Riemann sums need n_steps >= 2")
    steps = [1.0 / n_steps] * n_steps
    if method == "riemann_trapezoid":
        steps = [1.0 / (n_steps - 1)] * n_steps
        steps[0] /= 2
        steps[-1] /= 2
        alphas = torch.linspace(0, 1, n_steps).tolist()
    elif method == "riemann_left":
        alphas = torch.linspace(0, 1 - 1 / n_steps, n_steps).tolist()
    elif method == "riemann_middle":
        alphas = torch.linspace(1 / (2 * n_steps), 1 - 1 / (2 * n_steps), n_steps).tolist()
    else:
        alphas = torch.linspace(1 / n_steps, 1, n_steps).tolist()
    return steps, alphas


def make_generator(device: torch.device, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """An explicit generator: the one given, else a fresh one seeded with ``seed`` (default 0)."""
    if generator is not None:
        return generator
    gen = torch.Generator(device=device)
    gen.manual_seed(0 if seed is None else int(seed))
    return gen


def token_grid(model: nn.Module, what: str, tokens: int, prefix: int | None, grid: Any,
                image_hw: tuple[int, int]) -> tuple[int, tuple[int, int]]:
    """Prefix count and patch grid of a token layer: as given, else from the model, else the one
    grid of ``tokens - prefix`` cells with the input's aspect ratio; never a guess."""
    if prefix is None:
        raise ValueError(
            f"{what} is a token map of {tokens} tokens, but the model does not say how many of them are "
            "CLS/register tokens; pass num_prefix_tokens= (0 when every token is a patch)"
        )
    patches = tokens - prefix
    if grid is None:
        size = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if size is not None and int(size[0]) * int(size[1]) == patches:
            grid = (int(size[0]), int(size[1]))
    if grid is None:
        height, width = image_hw
        h = round((patches * height / width) ** 0.5) if patches > 0 else 0
        if h > 0 and patches % h == 0 and h * width == (patches // h) * height:
            grid = (h, patches // h)
    if grid is None:
        raise ValueError(
            f"the {patches} patch tokens of {what} do not tile a {image_hw[0]}x{image_hw[1]} input; "
            "pass grid=(h, w)"
        )
    return prefix, grid


def isqrt_grid(tokens: int) -> tuple[int, int]:
    side = int(math.isqrt(tokens))
    if side * side != tokens:
        raise ValueError(
            f"cannot arrange {tokens} tokens on a square grid; pass grid=(h, w) (and num_prefix_tokens=) explicitly"
        )
    return side, side
