"""Propagation-based attribution: DeepLIFT (rescale rule), DeepLiftShap and Layer-wise Relevance
Propagation (LRP) with Zennit's rules and composites.

All three run one modified backward pass: a forward hook on every module that has a rule replaces
the module's output by a custom autograd function whose backward applies the rule instead of the
module's gradient. Every other module (convolutions for DeepLIFT, flatten, dropout, max pooling for
LRP...) keeps its ordinary gradient.

* **DeepLIFT** (Shrikumar et al. 2017, rescale rule; Captum's ``DeepLift``): the model runs on
  ``cat([x, x0])``; at every nonlinearity the gradient is replaced by the multiplier
  ``(y - y0) / (x - x0)`` (the local gradient where ``|x - x0| < eps``), max pooling routes
  ``y - y0`` to the winners of the input and of the baseline (Captum's rule, accumulated), and the
  map is ``(x - x0) * multiplier``. Linear modules (convolutions, linear layers, eval-mode
  BatchNorm, average pooling, residual sums) need no rule, so the map sums to ``f(x) - f(x0)``
  (summation-to-delta; ``extras["convergence_delta"]`` and ``completeness_error`` report it).
* **DeepLiftShap** (Lundberg & Lee 2017; Captum's ``DeepLiftShap``): DeepLIFT averaged over a set
  of reference images.
* **LRP** (Bach et al. 2015; Montavon et al. 2019; Zennit's ``Gradient`` attributor with a
  composite): relevance flows backward as the "gradient"; convolutions and linear layers apply
  the epsilon / gamma / alpha-beta / z+ / z-box / flat / w-square rules, activations and
  BatchNorm pass it on, average pooling and residual additions split it in proportion to their
  inputs (Zennit's ``Norm`` rule), max pooling routes it to the winner. BatchNorm is merged into
  the preceding convolution / linear layer first (Zennit's canonizers).

Module hooks cannot see functional calls inside a ``forward`` (``F.relu(x)``, ``torch.sigmoid``,
``x * gate``): Captum and Zennit silently use plain gradients there. Here a
:class:`~torch.overrides.TorchFunctionMode` watches the model's forward: DeepLIFT refuses
functional nonlinearities and products of two activations (``check_functional=False`` accepts
them; the completeness check then reports the damage), LRP applies Zennit's residual ``Sum`` rule
to ``a + b`` of two activations (what Zennit's ResNet canonizer does), refuses products and
normalizations, and leaves other functional calls (``F.relu``) to their gradient, as Zennit does.

Differences from the peers (all tested): DeepLIFT equals Captum 0.9's ``DeepLift`` bit for bit on
models built from its supported modules inside :func:`~mechlens.attribution.exact_execution` (by
default it runs the house's inference copy, BatchNorm folded: the same map up to rounding), except where Captum 0.9 is wrong: a nonlinear module right
after another one (ReLU -> MaxPool) reads a stale gradient there (captum#1104, fixed upstream by
captum#1843), and overlapping max-pool windows lose multipliers to ``max_unpool``; both break
Captum's summation-to-delta and not ours. A module used twice (torchvision's shared ReLU) gets its
rule at each call (Captum refuses it). LRP equals Zennit up to its canonizer, which keeps each merged
BatchNorm with unit statistics that still divides by ``sqrt(1 + eps)`` (a 5e-6 relative change per
layer); relevance starts from ``f(x)``, where Zennit's default starts from 1.
"""
from __future__ import annotations

import copy
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from mechlens.attribution.base import (
    Attribution,
    Target,
    check_images,
    chunk_ranges,
    eval_mode,
    make_generator,
    register_method,
    resolve_target,
)
from mechlens.attribution.baselines import make_baseline
from mechlens.attribution.execution import can_fold, fold_batchnorm_pairs, fold_into, inference_model
from mechlens.engine import HookSet, unwrap
from mechlens.features.base import OUTPUT

__all__ = [
    "CompletenessWarning",
    "LRP_COMPOSITES",
    "LRP_RULES",
    "deeplift",
    "deeplift_shap",
    "lrp",
    "lrp_rule_map",
]

logger = logging.getLogger(__name__)


class CompletenessWarning(UserWarning):
    """A DeepLIFT map does not sum to ``f(x) - f(baseline)``: some nonlinearity of the model (or
    of the feature's readout) was differentiated instead of going through the rescale rule."""


# ---------------------------------------------------------------------------- module classes
# Elementwise nonlinearities: DeepLIFT's rescale rule applies to every one of them (Captum's list is
# ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus; the rule is the same for the others). For LRP they
# are Zennit's ``Activation`` types: relevance passes through unchanged.
_ELEMENTWISE: tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU,
    nn.Mish, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus, nn.Softsign,
    nn.LogSigmoid, nn.Tanhshrink, nn.Hardshrink, nn.Softshrink, nn.Threshold,
)
_MAX_POOLS: tuple[type, ...] = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_AVG_POOLS: tuple[type, ...] = (
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
_BATCH_NORMS: tuple[type, ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS: tuple[type, ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
)
# Nonlinear modules neither method has a rule for: the gradient through them is not a DeepLIFT
# multiplier nor an LRP relevance flow, so both refuse them rather than return a wrong map.
_UNSUPPORTED: tuple[type, ...] = tuple(t for t in (
    nn.Softmax, nn.Softmax2d, nn.LogSoftmax, nn.Softmin, nn.GLU, nn.MultiheadAttention, nn.LayerNorm,
    nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LocalResponseNorm,
    nn.CrossMapLRN2d, nn.LPPool1d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.FractionalMaxPool3d, nn.Bilinear,
    nn.RNNBase, nn.Transformer, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
    getattr(nn, "RMSNorm", None), getattr(nn, "LPPool3d", None),
) if t is not None)


def _check_modules(model: nn.Module, method: str) -> None:
    for name, module in model.named_modules():
        if isinstance(module, _UNSUPPORTED):
            hint = ("explain the logits: a feature on the layer before it" if isinstance(
                module, (nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d)) else "use a gradient method instead")
            raise ValueError(
                f"{method} has no rule for {type(module).__name__} (module {name or 'the model'!r}); its plain "
                f"gradient would not be a {method} map: {hint} (e.g. integrated_gradients)"
            )
        if isinstance(module, _MAX_POOLS) and getattr(module, "return_indices", False):
            raise ValueError(f"{method}: max pooling module {name!r} returns indices; use return_indices=False")


# ---------------------------------------------------------------------------- private model copy
def _freeze(module: nn.Module) -> None:
    """Replace the parameters of ``module`` (a private copy) by frozen ones sharing their storage:
    no weight gradients, and every tensor that requires grad during the forward derives from the
    input (what the functional watch relies on)."""
    for child in module.modules():
        for key, param in list(child._parameters.items()):  # noqa: SLF001 - swap entries, not the shared tensors
            if param is not None and param.requires_grad:
                child._parameters[key] = nn.Parameter(param.detach(), requires_grad=False)  # noqa: SLF001


@contextmanager
def _private_model(model: nn.Module) -> Iterator[nn.Module]:
    """A structural copy of ``model`` (tensors shared) that the method may hook and change:
    parameters frozen, in-place activations made out-of-place (a rule needs the activation's input
    intact). An uncopyable model is changed in place and restored on exit."""
    try:
        memo: dict[int, Any] = {id(t): t for t in model.buffers()}
        memo.update({id(p): nn.Parameter(p.detach(), requires_grad=False) for p in model.parameters()})
        twin = copy.deepcopy(model, memo=memo)
    except (copy.Error, TypeError, RuntimeError) as error:  # uncopyable: modify, then restore
        logger.debug("no private copy of %s (%s); hooking it in place", type(model).__name__, error)
        twin = None
    if twin is not None:
        _freeze(twin)
        for module in twin.modules():
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        yield twin.eval()
        return
    flags = [(p, p.requires_grad) for p in model.parameters()]
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        for module in inplace:
            module.inplace = False
        yield model
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        for module in inplace:
            module.inplace = True


# ---------------------------------------------------------------------------- rule functions
class _Rule(torch.autograd.Function):
    """Forward: the module's output ``y`` (a copy, so later in-place ops are safe). Backward: the
    rule ``fn(x, y, grad_output)`` instead of the module's gradient, sent to its input ``x``."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, y: torch.Tensor, fn: Callable[..., torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(x, y)
        ctx.fn = fn
        return y.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, y = ctx.saved_tensors
        return ctx.fn(x, y, grad), None, None


def _local_grad(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The module's own vector-Jacobian product at ``x`` (``module.forward``: no hooks)."""
    with torch.enable_grad():
        xd = x.detach().requires_grad_(True)
        (out,) = torch.autograd.grad(module.forward(xd), xd, grad)
    return out


def _halves(t: torch.Tensor) -> torch.Tensor:
    """``t[:n] - t[n:]`` of a ``[2n, ...]`` input/baseline batch, repeated for both halves."""
    n = t.shape[0] // 2
    delta = t[:n] - t[n:]
    return torch.cat([delta, delta])


def _rescale(module: nn.Module, eps: float) -> Callable[..., torch.Tensor]:
    def rule(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        delta_in, delta_out = _halves(x), _halves(y)
        new = grad * delta_out / delta_in  # Captum's order of operations
        small = delta_in.abs() < eps
        if bool(small.any()):  # x == x0 there: the multiplier is the local gradient
            new = torch.where(small, _local_grad(module, x, grad), new)
        return new

    return rule


def _max_pool_rule(module: nn.Module, eps: float) -> Callable[..., torch.Tensor]:
    """Captum's DeepLIFT max-pool rule: ``y - y0`` of each window goes to the input's winner when
    the input's max is larger, else to the baseline's winner, and is divided by ``x - x0`` there.
    Captum scatters with ``max_unpool``, which overwrites where overlapping windows share a winner;
    this accumulates (the pool's own backward), so overlapping pools also sum to delta."""
    def rule(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        n = x.shape[0] // 2
        out, out_ref = y[:n], y[n:]
        top = torch.maximum(out, out_ref)
        delta_out = torch.cat([top - out_ref, out - top])
        with torch.enable_grad():
            xd = x.detach().requires_grad_(True)
            pooled = module.forward(xd)
            (routed,) = torch.autograd.grad(pooled, xd, grad * delta_out, retain_graph=True)
            routed = routed[:n] + routed[n:]
            routed = torch.cat([routed, routed])
            delta_in = _halves(x)
            small = delta_in.abs() < eps
            new = routed / delta_in
            if bool(small.any()):
                (local,) = torch.autograd.grad(pooled, xd, grad)
                new = torch.where(small, local, new)
        return new

    return rule


# ---------------------------------------------------------------------------- the functional watch
_SKIP = object()


def _name(func: Any) -> str:
    return str(getattr(func, "__name__", "") or "")


def _graph_tensors(args: Sequence[Any], kwargs: Mapping[str, Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in (*args, *kwargs.values()):
        items = value if isinstance(value, (list, tuple)) else (value,)
        found += [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]
    return found


class _Watch(TorchFunctionMode):
    """Sees every torch function called while the model's forward runs (not inside a module that
    has its own rule) and hands it to ``handler(watch, name, func, args, kwargs)``, which returns a
    replacement result or ``_SKIP``. Module pre/forward hooks keep the stack of running modules."""

    def __init__(self, model: nn.Module, ruled: set[int], handler: Callable[..., Any], hooks: HookSet) -> None:
        super().__init__()
        self.handler = handler
        self.stack: list[tuple[str, bool]] = []
        for name, module in model.named_modules():
            hooks.pre(module, self._push(name, id(module) in ruled), prepend=True)
        self._pop_modules = list(model.modules())

    def arm(self, hooks: HookSet) -> None:
        """Register the pops last, so a module's own hooks still run inside its frame."""
        for module in self._pop_modules:
            hooks.forward(module, self._pop)

    def _push(self, name: str, ruled: bool) -> Callable[..., None]:
        def push(module: nn.Module, args: Any) -> None:
            self.stack.append((name, ruled))
        return push

    def _pop(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack:
            self.stack.pop()

    @property
    def where(self) -> str:
        named = [name for name, _ in self.stack if name]
        return f"module {named[-1]!r}" if named else "the model's own forward"

    def __torch_function__(self, func: Any, types: Any, args: Sequence[Any] = (),
                           kwargs: Mapping[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if self.stack and not self.stack[-1][1] and torch.is_grad_enabled():
            result = self.handler(self, _name(func), func, args, kwargs)
            if result is not _SKIP:
                return result
        return func(*args, **kwargs)


_NONLINEAR_FUNCTIONS = frozenset({
    "relu", "relu_", "relu6", "leaky_relu", "leaky_relu_", "elu", "elu_", "selu", "selu_", "celu", "celu_", "gelu",
    "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "hardtanh_", "sigmoid", "sigmoid_", "tanh", "tanh_",
    "softplus", "softsign", "logsigmoid", "log_sigmoid", "prelu", "rrelu", "rrelu_", "threshold", "threshold_",
    "tanhshrink", "hardshrink", "softshrink", "clamp", "clamp_", "clip", "clip_", "abs", "abs_", "exp", "exp_", "log",
    "log_", "sqrt", "sqrt_", "rsqrt", "pow", "pow_", "__pow__", "square", "erf", "sin", "cos", "maximum", "minimum",
    "amax", "amin", "max", "min", "topk", "norm", "std", "var",
    "max_pool1d", "max_pool2d", "max_pool3d", "max_pool1d_with_indices", "max_pool2d_with_indices",
    "max_pool3d_with_indices", "adaptive_max_pool1d", "adaptive_max_pool2d", "adaptive_max_pool3d",
    "adaptive_max_pool1d_with_indices", "adaptive_max_pool2d_with_indices", "adaptive_max_pool3d_with_indices",
})
_NORMALIZING_FUNCTIONS = frozenset({
    "softmax", "log_softmax", "softmin", "glu", "layer_norm", "group_norm", "instance_norm", "local_response_norm",
    "normalize", "rms_norm", "scaled_dot_product_attention", "multi_head_attention_forward", "lp_pool1d",
    "lp_pool2d", "lp_pool3d", "fractional_max_pool2d", "fractional_max_pool3d",
})
_PRODUCTS = frozenset({
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "multiply", "div", "div_", "divide", "true_divide",
    "__truediv__", "__rtruediv__", "__itruediv__", "__floordiv__", "matmul", "__matmul__", "__rmatmul__", "mm", "bmm",
    "einsum", "bilinear", "addcmul", "addcdiv", "baddbmm", "addbmm", "addmm", "outer", "inner", "dot", "kron",
})
_SUBTRACTIONS = frozenset({"sub", "sub_", "__sub__", "__rsub__", "__isub__", "subtract", "rsub"})
_ADDITIONS = frozenset({"add", "__add__", "__radd__", "__iadd__"})
_INPLACE_ADDITIONS = frozenset({"add_"})


def _deeplift_handler(watch: _Watch, name: str, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    graph = None
    if name in _NONLINEAR_FUNCTIONS or name in _NORMALIZING_FUNCTIONS:
        graph = _graph_tensors(args, kwargs)
        if graph:
            raise ValueError(
                f"deeplift: {watch.where} calls torch function {name!r} on an activation; module hooks cannot see "
                "functional calls, so DeepLIFT's rescale rule would not apply there and the map would not sum to "
                "f(x) - f(baseline): use nn modules (nn.ReLU(), nn.MaxPool2d...) in the model, or pass "
                "check_functional=False to accept plain gradients there (result.completeness_error shows the damage)"
            )
    elif name in _PRODUCTS:
        graph = _graph_tensors(args, kwargs)
        if len(graph) >= 2:
            raise ValueError(
                f"deeplift: {watch.where} multiplies two activations ({name!r}); DeepLIFT's rescale rule has no "
                "multiplier for a product (gates, attention): pass check_functional=False to use its plain gradient "
                "(result.completeness_error shows the damage), or use integrated_gradients"
            )
    return _SKIP


# ---------------------------------------------------------------------------- DeepLIFT
_FAMILY = "propagation"


def _deeplift_hooks(model: nn.Module, hooks: HookSet, eps: float) -> set[int]:
    """Rule hooks on every nonlinearity of ``model``; returns the ids of the hooked modules."""
    ruled: set[int] = set()
    for module in model.modules():
        if isinstance(module, _ELEMENTWISE):
            fn = _rescale(module, eps)
        elif isinstance(module, _MAX_POOLS):
            fn = _max_pool_rule(module, eps)
        else:
            continue
        ruled.add(id(module))

        def hook(mod: nn.Module, args: Any, output: Any, fn: Callable[..., torch.Tensor] = fn) -> Any:
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) or not torch.is_grad_enabled() \
                    or not x.requires_grad:
                return None
            return _Rule.apply(x, output.detach(), fn)

        hooks.forward(module, hook)
    return ruled


def _baseline_label(baseline: Any) -> Any:
    return baseline if isinstance(baseline, (str, int, float)) or baseline is None else "tensor"


def _check_eps(eps: float) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:  # 0 would divide 0 by 0 where x == x0
        raise ValueError(f"eps must be a positive number (Captum's default 1e-10), got {eps!r}")
    return float(eps)


def _deeplift_run(
    model: nn.Module, inputs: torch.Tensor, references: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    target: Target, rows: int, per_row: Callable[[torch.Tensor], torch.Tensor], *, eps: float,
    internal_batch_size: int | None, check_functional: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """DeepLIFT over ``rows`` (input, baseline) pairs; pair ``r`` is input ``per_row(r)`` with
    baseline ``references(r, sample)``. Returns the per-pair maps summed into each sample
    ``[B, ...]``, per-pair ``f(x)`` and ``f(x0)``, and per pair the summation-to-delta miss and
    its scale (``sum |map| + |f(x) - f(x0)|``)."""
    _check_modules(model, "deeplift")
    total = torch.zeros_like(inputs)
    f_x = inputs.new_empty(rows)
    f_0 = inputs.new_empty(rows)
    sums = inputs.new_empty(rows)
    abs_sums = inputs.new_empty(rows)
    with inference_model(model, keep=target.layers) as fast, _private_model(fast) as run, HookSet() as hooks:
        # BatchNorm folded or not is the same DeepLIFT map: in eval mode it is affine, and affine layers take the
        # plain gradient (their multiplier) in the rescale rule; the folded copy only saves work.
        ruled = _deeplift_hooks(run, hooks, eps)
        watch = None
        if check_functional:
            watch = _Watch(run, ruled, _deeplift_handler, hooks)
            watch.arm(hooks)
        for start, stop in chunk_ranges(rows, internal_batch_size):
            index = torch.arange(start, stop, device=inputs.device)
            sample = per_row(index)
            x = inputs[sample].detach().requires_grad_(True)
            x0 = references(index, sample).detach()
            batch = torch.cat([x, x0])
            chunk_target = target.select(sample.cpu())
            with torch.enable_grad():
                if watch is not None:
                    with watch:
                        values, _ = chunk_target.repeat(2).forward(run, batch, grads=True)
                else:
                    values, _ = chunk_target.repeat(2).forward(run, batch, grads=True)
                # Captum's objective: the outputs of both halves (the max-pool rule reads both gradients)
                (grad,) = torch.autograd.grad(values.sum(), x, allow_unused=True)
            if grad is None:
                raise RuntimeError(
                    f"the feature(s) {', '.join(f.name for f in target.features)} do not depend on the input"
                )
            attribution = (x.detach() - x0) * grad
            n = stop - start
            f_x[start:stop] = values[:n].detach()
            f_0[start:stop] = values[n:].detach()
            sums[start:stop] = attribution.flatten(1).sum(dim=1)
            abs_sums[start:stop] = attribution.flatten(1).abs().sum(dim=1)
            total.index_add_(0, sample, attribution)
    pair_delta = sums - (f_x - f_0)
    return total, f_x, f_0, (pair_delta, abs_sums + (f_x - f_0).abs())


def _check_summation(name: str, pair_delta: torch.Tensor, scale: torch.Tensor, tolerance: float,
                     on_incomplete: str) -> None:
    bad = pair_delta.abs() > tolerance * scale
    if not bool(bad.any()) or on_incomplete == "ignore":
        return
    worst = float((pair_delta.abs() / scale.clamp_min(torch.finfo(scale.dtype).tiny)).max())
    message = (
        f"{name}: the map misses summation-to-delta (sum(map) = f(x) - f(baseline)) by up to {worst:.2g} of its scale "
        f"for {int(bad.sum())} of {bad.numel()} (input, baseline) pairs: a nonlinearity was differentiated instead of "
        "rescaled (a functional call in a custom module's forward, or a nonlinear feature readout such as an SAE "
        "latent); the map is not DeepLIFT there. result.completeness_error has the per-sample error"
    )
    if on_incomplete == "raise":
        raise ValueError(message)
    warnings.warn(message, CompletenessWarning, stacklevel=3)


def _check_on_incomplete(on_incomplete: str, tolerance: float) -> None:
    if on_incomplete not in ("warn", "raise", "ignore"):
        raise ValueError(f"on_incomplete must be 'warn', 'raise' or 'ignore', got {on_incomplete!r}")
    if isinstance(tolerance, bool) or not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")


def _result(name: str, amap: torch.Tensor, target: Target, values: torch.Tensor, inputs: torch.Tensor,
            **extras: Any) -> Attribution:
    return Attribution(
        map=amap.detach(), method=name, features=target.names, values=values.detach(), kind="input",
        input_shape=tuple(inputs.shape), extras=extras,
    )


@register_method("deeplift", kind="input", family=_FAMILY, aliases=("deep_lift",),
                 randomization="passes (rho -0.02-0.26, 3 trained models)")
def deeplift(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baseline: Any = "zeros",
    eps: float = 1e-10,
    internal_batch_size: int | None = None,
    check_functional: bool = True,
    on_incomplete: str = "warn",
    tolerance: float = 1e-3,
    mean: Any = None,
    blur_sigma: float | None = None,
    noise_range: tuple[float, float] | None = None,
    seed: int | None = 0,
    generator: torch.Generator | None = None,
) -> Attribution:
    """DeepLIFT with the rescale rule (Shrikumar et al. 2017), as Captum's ``DeepLift``: the map is
    ``(x - x0) * m`` where ``m`` backpropagates the multipliers ``(y - y0) / (x - x0)`` of every
    nonlinearity (the local gradient where ``|x - x0| < eps``) and Captum's max-pool rule.
    ``baseline``: ``zeros`` | ``mean`` | ``blur`` | ``uniform`` | number | tensor (see
    :mod:`mechlens.attribution.baselines`).

    The rules live on modules: elementwise activation modules (``nn.ReLU``, ``nn.Sigmoid``,
    ``nn.Tanh``, ``nn.GELU``...; Captum covers ReLU, ELU, LeakyReLU, Sigmoid, Tanh, Softplus) and
    max pooling. Softmax, LayerNorm, attention... have no rule and are refused. ``F.relu`` /
    ``torch.sigmoid`` calls inside a ``forward`` are invisible to module hooks (Captum silently
    differentiates them); here they are detected and refused unless ``check_functional=False``.

    ``extras["convergence_delta"]`` is ``sum(map) - (f(x) - f(x0))`` (Captum's delta) and
    ``completeness_error`` its size relative to ``|f(x) - f(x0)|``; a miss beyond ``tolerance``
    (relative to the sum of the map's absolute values) triggers ``on_incomplete``: ``warn``
    (:class:`CompletenessWarning`) | ``raise`` | ``ignore``. The feature's readout is differentiated
    as is: exact for linear readouts (logits, channel means, directions), not for SAE latents.
    ``internal_batch_size``: samples per forward (each runs as 2 rows, input and baseline).
    """
    eps = _check_eps(eps)
    _check_on_incomplete(on_incomplete, tolerance)
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    gen = make_generator(inputs.device, seed, generator)
    x0 = make_baseline(inputs, baseline, mean=mean, blur_sigma=blur_sigma, noise_range=noise_range,
                       generator=gen).detach()
    amap, f_x, f_0, (pair_delta, scale) = _deeplift_run(
        model, inputs, lambda rows, sample: x0[sample], target, inputs.shape[0], lambda rows: rows, eps=eps,
        internal_batch_size=internal_batch_size, check_functional=check_functional,
    )
    gap = f_x - f_0
    delta = amap.flatten(1).sum(dim=1) - gap
    error = delta.abs() / gap.abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    _check_summation("deeplift", pair_delta, scale, tolerance, on_incomplete)
    return _result(
        "deeplift", amap, target, f_x, inputs, convergence_delta=delta.detach(), completeness_error=error.detach(),
        baseline_values=f_0.detach(), baseline=_baseline_label(baseline), eps=eps,
    )


@register_method("deeplift_shap", kind="input", family=_FAMILY, multiplies_batch=True,
                 aliases=("deepliftshap", "deep_shap", "deepshap"),
                 randomization="passes (rho 0.02-0.10, 2 trained models)")
def deeplift_shap(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    baselines: Any = None,
    eps: float = 1e-10,
    internal_batch_size: int | None = None,
    check_functional: bool = True,
    on_incomplete: str = "warn",
    tolerance: float = 1e-3,
) -> Attribution:
    """DeepLiftShap (Lundberg & Lee 2017), as Captum's ``DeepLiftShap``: the mean over the
    reference images ``baselines`` (a tensor ``[M, C, H, W]``, e.g. training images) of the
    DeepLIFT map of each input against each reference (see :func:`deeplift` for the rules and the
    checks).

    The map sums to ``f(x) - mean_m f(b_m)`` (``extras["convergence_delta"]``,
    ``completeness_error``; ``baseline_values`` is ``mean_m f(b_m)``). The ``B * M`` (input,
    reference) pairs run ``internal_batch_size`` pairs (``2 *`` that many rows) at a time.
    """
    eps = _check_eps(eps)
    _check_on_incomplete(on_incomplete, tolerance)
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    if not isinstance(baselines, torch.Tensor):
        raise ValueError(
            "deeplift_shap needs baselines=: a tensor [M, C, H, W] of reference images (e.g. training images); "
            f"got {type(baselines).__name__} (for a single baseline such as zeros or a blur, use deeplift)"
        )
    refs = baselines.detach().to(device=inputs.device, dtype=inputs.dtype)
    if refs.dim() == 3:
        refs = refs.unsqueeze(0)
    if refs.dim() != 4 or tuple(refs.shape[1:]) != tuple(inputs.shape[1:]) or refs.shape[0] < 1:
        raise ValueError(
            f"baselines of shape {tuple(baselines.shape)} do not match the inputs {tuple(inputs.shape)}: pass "
            f"[M, {', '.join(map(str, inputs.shape[1:]))}] reference images"
        )
    target = resolve_target(model, inputs, target)
    count = refs.shape[0]
    # pair r = input r // M with reference r % M (Captum's repeat_interleave / repeat order)
    amap, f_x, f_0, (pair_delta, scale) = _deeplift_run(
        model, inputs, lambda rows, sample: refs[rows % count], target, inputs.shape[0] * count,
        lambda rows: rows // count, eps=eps, internal_batch_size=internal_batch_size,
        check_functional=check_functional,
    )
    amap = amap / count
    batch = inputs.shape[0]
    f_x = f_x.view(batch, count)[:, 0]
    expected = f_0.view(batch, count).mean(dim=1)
    gap = f_x - expected
    delta = amap.flatten(1).sum(dim=1) - gap
    error = delta.abs() / gap.abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    _check_summation("deeplift_shap", pair_delta, scale, tolerance, on_incomplete)
    return _result(
        "deeplift_shap", amap, target, f_x, inputs, convergence_delta=delta.detach(),
        completeness_error=error.detach(), baseline_values=expected.detach(), n_baselines=count, eps=eps,
    )


# ---------------------------------------------------------------------------- LRP
LRP_RULES: tuple[str, ...] = ("epsilon", "gamma", "zplus", "alpha1_beta0", "alpha2_beta1", "zbox", "flat", "wsquare")

# Zennit's composites (zennit.composites, same names) and one-rule-everywhere maps. "conv": every
# convolution, "linear": every nn.Linear, "first": the first convolution or linear layer in module
# order (Zennit's Flat first map), "first_conv": the first convolution (Zennit's ZBox first map).
# Every composite also passes relevance through activations and (unmerged) BatchNorm, and applies
# the Norm rule to average pooling and residual sums (Zennit's layer_map_base).
LRP_COMPOSITES: dict[str, dict[str, str]] = {
    "epsilon_plus": {"conv": "zplus", "linear": "epsilon"},
    "epsilon_gamma_box": {"conv": "gamma", "linear": "epsilon", "first_conv": "zbox"},
    "epsilon_alpha2_beta1": {"conv": "alpha2_beta1", "linear": "epsilon"},
    "epsilon_plus_flat": {"conv": "zplus", "linear": "epsilon", "first": "flat"},
    "epsilon_alpha2_beta1_flat": {"conv": "alpha2_beta1", "linear": "epsilon", "first": "flat"},
    "epsilon": {"conv": "epsilon", "linear": "epsilon"},
    "gamma": {"conv": "gamma", "linear": "gamma"},
    "zplus": {"conv": "zplus", "linear": "zplus"},
    "alpha1_beta0": {"conv": "alpha1_beta0", "linear": "alpha1_beta0"},
    "alpha2_beta1": {"conv": "alpha2_beta1", "linear": "alpha2_beta1"},
}


def _check_choice(value: Any, choices: Sequence[str], what: str) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; expected one of {', '.join(choices)}")
    return value


def lrp_rule_map(
    model: nn.Module, composite: str = "epsilon_plus", *, rules: Mapping[str, str] | None = None,
    first_rule: str | None = None,
) -> dict[str, str]:
    """The LRP rule each module of ``model`` gets under ``composite`` (see :data:`LRP_COMPOSITES`),
    ``first_rule`` (for the first convolution / linear layer in module order, e.g. ``flat``,
    ``wsquare``, ``zbox``) and ``rules`` (module name -> rule, taking precedence): ``{name: rule}``
    for every module with a rule, including ``pass`` (activations, BatchNorm) and ``norm``
    (average pooling). Modules not listed keep their gradient (max pooling, flatten, dropout)."""
    spec = LRP_COMPOSITES[_check_choice(composite, list(LRP_COMPOSITES), "LRP composite")]
    if first_rule is not None:
        _check_choice(first_rule, LRP_RULES, "LRP rule for first_rule")
    named = dict(model.named_modules())
    for name, rule in (rules or {}).items():
        if name not in named:
            raise ValueError(f"rules names module {name!r}, which {type(model).__name__} does not have")
        if not isinstance(named[name], (*_CONVS, nn.Linear)):
            raise ValueError(f"rules[{name!r}]: LRP rules apply to convolutions and linear layers, not "
                             f"{type(named[name]).__name__}")
        _check_choice(rule, LRP_RULES, f"LRP rule for module {name!r}")
    plan: dict[str, str] = {}
    first_seen = first_conv_seen = False
    for name, module in named.items():
        if isinstance(module, (*_CONVS, nn.Linear)):
            is_conv = isinstance(module, _CONVS)
            rule = spec["conv" if is_conv else "linear"]
            if not first_seen:
                first_seen = True
                if first_rule is not None:
                    rule = first_rule
                elif "first" in spec:
                    rule = spec["first"]
            if is_conv and not first_conv_seen:
                first_conv_seen = True
                if first_rule is None and "first_conv" in spec:
                    rule = spec["first_conv"]
            plan[name] = rule
        elif isinstance(module, (*_ELEMENTWISE, *_BATCH_NORMS)):
            plan[name] = "pass"
        elif isinstance(module, _AVG_POOLS):
            plan[name] = "norm"
    plan.update(rules or {})
    return plan


def _stabilize(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Zennit's stabilizer: ``z + eps * sign(z)`` with ``sign(0) = 1``."""
    return z + ((z == 0).to(z) + z.sign()) * eps


def _forward_with(module: nn.Module, x: torch.Tensor, modify: Callable[[torch.Tensor], torch.Tensor] | None,
                  zero_bias: bool) -> torch.Tensor:
    """``module.forward(x)`` (no hooks) with its weight and bias passed through ``modify`` (the bias
    zeroed with ``zero_bias``), as Zennit's ``ParamMod``."""
    params = module._parameters  # noqa: SLF001 - swapped for one call on the method's private copy
    saved = {key: params[key] for key in ("weight", "bias") if key in params}
    try:
        for key, value in saved.items():
            if value is None:
                continue
            if key == "bias" and zero_bias:
                params[key] = torch.zeros_like(value)
            elif modify is not None:
                params[key] = modify(value)
        return module.forward(x)
    finally:
        params.update(saved)


def _basic_rule(module: nn.Module, inputs: Callable[[torch.Tensor], list[torch.Tensor]],
                mods: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor] | None, bool]],
                mapper: Callable[[list[torch.Tensor], torch.Tensor, torch.Tensor], list[torch.Tensor]],
                reducer: Callable[[list[torch.Tensor], Sequence[torch.Tensor]], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """Zennit's ``BasicHook``: modified inputs through the module with modified parameters, the
    upper relevance mapped onto them (``mapper(outputs, grad, x)``), their gradients reduced to
    the relevance of the input."""
    def rule(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            ins = [t.detach().requires_grad_(True) for t in inputs(x)]
            outs = [_forward_with(module, t, modify, zero) for t, (modify, zero) in zip(ins, mods)]
        grads = torch.autograd.grad(outs, ins, grad_outputs=mapper(outs, grad, x))
        return reducer(ins, grads)

    return rule


def _pos(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def _neg(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


def _pass(x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    return grad


def _lrp_rule(rule: str, module: nn.Module, *, epsilon: float, gamma: float, stabilizer: float,
              bounds: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    """The backward of ``rule`` on ``module`` (Zennit's rule of the same name, same operations)."""
    s = stabilizer
    if rule == "pass":
        return _pass
    if rule == "norm":
        return _basic_rule(module, lambda x: [x], [(None, False)],
                           lambda o, g, x: [g / _stabilize(o[0], s)], lambda i, gr: i[0] * gr[0])
    if rule == "epsilon":
        return _basic_rule(module, lambda x: [x], [(None, False)],
                           lambda o, g, x: [g / _stabilize(o[0], epsilon)], lambda i, gr: i[0] * gr[0])
    if rule == "zplus":
        def zplus_map(o: list[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
            share = g / _stabilize(o[0] + o[1], s)
            return [share, share]
        return _basic_rule(module, lambda x: [_pos(x), _neg(x)], [(_pos, False), (_neg, True)], zplus_map,
                           lambda i, gr: i[0] * gr[0] + i[1] * gr[1])
    if rule in ("alpha1_beta0", "alpha2_beta1"):
        alpha, beta = (1.0, 0.0) if rule == "alpha1_beta0" else (2, 1)
        return _basic_rule(
            module, lambda x: [_pos(x), _neg(x), _pos(x), _neg(x)],
            [(_pos, False), (_neg, True), (_neg, False), (_pos, True)],
            lambda o, g, x: [g / _stabilize(d, s) for d in [o[0] + o[1]] * 2 + [o[2] + o[3]] * 2],
            lambda i, gr: alpha * (i[0] * gr[0] + i[1] * gr[1]) - beta * (i[2] * gr[2] + i[3] * gr[3]),
        )
    if rule == "gamma":
        def more_pos(t: torch.Tensor) -> torch.Tensor:
            return t + gamma * t.clamp(min=0)

        def more_neg(t: torch.Tensor) -> torch.Tensor:
            return t + gamma * t.clamp(max=0)

        def gamma_map(o: list[torch.Tensor], g: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
            with torch.no_grad():
                z = _forward_with(module, x, None, False)  # the unmodified output decides which part explains it
            up, down = (z > 0.0).to(g), (z < 0.0).to(g)
            return [up * g / _stabilize(o[0] + o[1], s)] * 2 + [down * g / _stabilize(o[2] + o[3], s)] * 2

        return _basic_rule(
            module, lambda x: [_pos(x), _neg(x), _pos(x), _neg(x)],
            [(more_pos, False), (more_neg, True), (more_neg, False), (more_pos, True)], gamma_map,
            lambda i, gr: i[0] * gr[0] + i[1] * gr[1] + i[2] * gr[2] + i[3] * gr[3],
        )
    if rule == "zbox":
        def box(x: torch.Tensor) -> list[torch.Tensor]:
            low, high = bounds.get("low"), bounds.get("high")
            if low is None or high is None or low.shape[1:] != x.shape[1:] or low.shape[0] != x.shape[0]:
                raise ValueError(
                    f"the z-box rule's bounds are for the model input, but its layer reads a tensor of shape "
                    f"{tuple(x.shape)}: give that layer another rule (rules={{name: 'epsilon'}}) or use a composite "
                    "without z-box"
                )
            return [x, low.to(x), high.to(x)]

        return _basic_rule(
            module, box, [(None, False), (_pos, False), (_neg, False)],
            lambda o, g, x: [g / _stabilize(o[0] - (o[1] + o[2]), s)] * 3,
            lambda i, gr: i[0] * gr[0] - (i[1] * gr[1] + i[2] * gr[2]),
        )
    if rule == "flat":
        return _basic_rule(module, lambda x: [torch.ones_like(x)], [(torch.ones_like, True)],
                           lambda o, g, x: [g / _stabilize(o[0], s)], lambda i, gr: gr[0])
    if rule == "wsquare":
        return _basic_rule(module, lambda x: [torch.ones_like(x)], [(torch.square, False)],
                           lambda o, g, x: [g / _stabilize(o[0], s)], lambda i, gr: gr[0])
    raise ValueError(f"unknown LRP rule {rule!r}; expected one of {', '.join(LRP_RULES)}")


class _SumRule(torch.autograd.Function):
    """``a + b`` of two activations with Zennit's Norm rule on the sum (its ResNet canonizer):
    each summand gets relevance in proportion to its share of the sum."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, stabilizer: float) -> torch.Tensor:
        ctx.save_for_backward(a, b)
        ctx.stabilizer = stabilizer
        return a + b

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b = ctx.saved_tensors
        share = grad / _stabilize(a + b, ctx.stabilizer)
        return a * share, b * share, None


class _SumRuleInplace(torch.autograd.Function):
    """``a += b`` (``a.add_(b)``) with the rule of :class:`_SumRule`; ``a`` is modified in place."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, b: torch.Tensor, stabilizer: float) -> torch.Tensor:
        before = a.clone()
        ctx.save_for_backward(before, b)
        ctx.stabilizer = stabilizer
        a.add_(b)
        ctx.mark_dirty(a)
        return a

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, b = ctx.saved_tensors
        share = grad / _stabilize(a + b, ctx.stabilizer)
        return a * share, b * share, None


def _lrp_handler(stabilizer: float) -> Callable[..., Any]:
    def handler(watch: _Watch, name: str, func: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
        if name in _ADDITIONS or name in _INPLACE_ADDITIONS:
            if (len(args) == 2 and not kwargs and all(isinstance(t, torch.Tensor) and t.requires_grad for t in args)
                    and args[0].shape == args[1].shape):
                rule = _SumRuleInplace if name in _INPLACE_ADDITIONS else _SumRule
                return rule.apply(args[0], args[1], stabilizer)
            return _SKIP
        kind = ("a product of two activations" if name in _PRODUCTS else
                "a difference of two activations" if name in _SUBTRACTIONS else None)
        if kind is not None and len(_graph_tensors(args, kwargs)) >= 2:
            raise ValueError(
                f"lrp: {watch.where} computes {kind} ({name!r}), which has no LRP rule (gates, attention); use a "
                "gradient method, or pass check_functional=False to let plain gradients through there"
            )
        if name in _NORMALIZING_FUNCTIONS and _graph_tensors(args, kwargs):
            raise ValueError(
                f"lrp: {watch.where} calls {name!r} on an activation, which has no LRP rule; use a gradient method, "
                "or pass check_functional=False to let plain gradients through there"
            )
        return _SKIP

    return handler


class _Seed(torch.autograd.Function):
    """Where the explained feature is read: the relevance of the layer's activation ``a`` is
    ``a * df/da`` for the rows whose feature lives on this layer (for a class logit: the logit
    itself at its class); other rows pass through. Records each row's total seed."""

    @staticmethod
    def forward(ctx: Any, a: torch.Tensor, rows: torch.Tensor, record: dict[str, torch.Tensor]) -> torch.Tensor:
        ctx.save_for_backward(a, rows)
        ctx.record = record
        return a.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        a, rows = ctx.saved_tensors
        seeded = grad * a
        mask = rows.view((-1,) + (1,) * (a.dim() - 1))
        total = (seeded.flatten(1).sum(dim=1) * rows).to(ctx.record["seed"])
        ctx.record["seed"] = ctx.record["seed"] + total
        return torch.where(mask, seeded, grad), None, None


def _through_pre_hooks(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``x`` as the module's forward sees it after its forward pre-hooks (a LoadedModel's
    normalization)."""
    args: tuple[Any, ...] = (x,)
    with torch.no_grad():
        for key, hook in list(module._forward_pre_hooks.items()):  # noqa: SLF001 - replay, not modify
            if key in getattr(module, "_forward_pre_hooks_with_kwargs", {}):
                continue
            out = hook(module, args)
            if out is not None:
                args = out if isinstance(out, tuple) else (out,)
    return args[0]


def _linear_bn_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(linear, batchnorm)`` names of an ``nn.Linear`` followed by a ``BatchNorm1d`` in an
    ``nn.Sequential`` (the convolution pairs come from :func:`fold_batchnorm_pairs`)."""
    pairs = []
    for name, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential):
            continue
        children = list(parent.named_children())
        prefix = f"{name}." if name else ""
        for (a, first), (b, second) in zip(children, children[1:]):
            if type(first) is nn.Linear and type(second) is nn.BatchNorm1d:
                pairs.append((prefix + a, prefix + b))
    return pairs


def _canonize(model: nn.Module, twin: nn.Module, keep: Sequence[str]) -> list[tuple[str, str]]:
    """Merge every eval-mode BatchNorm into the convolution / linear layer feeding it (Zennit's
    ``SequentialMergeBatchNorm``; pairs found by data flow, :func:`fold_batchnorm_pairs`) in
    ``twin`` (a private copy of ``model``) and replace it by ``nn.Identity``. A layer whose own
    output a feature reads keeps its BatchNorm (which then passes relevance on)."""
    named = dict(model.named_modules())
    pairs = [
        (conv, bn) for conv, bn in [*fold_batchnorm_pairs(model), *_linear_bn_pairs(model)]
        if can_fold(named[bn]) and not any(k == conv or k.startswith(conv + ".") for k in keep if k)
    ]
    twin_named = dict(twin.named_modules())
    for conv, bn in pairs:
        fold_into(twin_named[conv], twin_named[bn], channels_last=False)
        parent, _, child = bn.rpartition(".")
        setattr(twin_named[parent] if parent else twin, child, nn.Identity())
    return pairs


def _number(value: Any, what: str, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value > 0 if positive else value >= 0):
        raise ValueError(f"{what} must be a {'positive' if positive else 'non-negative'} number, got {value!r}")
    return float(value)


@register_method("lrp", kind="input", family=_FAMILY, aliases=("layerwise_relevance_propagation",),
                 randomization="epsilon_plus: passes (rho -0.05-0.29, 3 trained models)")
def lrp(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    *,
    composite: str = "epsilon_plus",
    first_rule: str | None = None,
    rules: Mapping[str, str] | None = None,
    epsilon: float = 1e-6,
    gamma: float = 0.25,
    stabilizer: float = 1e-6,
    low: Any = 0.0,
    high: Any = 1.0,
    canonize: bool = True,
    check_functional: bool = True,
    internal_batch_size: int | None = None,
) -> Attribution:
    """Layer-wise Relevance Propagation (Bach et al. 2015) with Zennit's rules and composites
    (``zennit.attribution.Gradient`` with ``zennit.composites.<Composite>``, same names in
    snake case; see :data:`LRP_COMPOSITES` and :func:`lrp_rule_map`).

    ``composite``: ``epsilon_plus`` (z+ on convolutions, epsilon on linear layers), ``epsilon_gamma_box``
    (gamma on convolutions, z-box on the first one), ``epsilon_alpha2_beta1``, ``epsilon_plus_flat``,
    ``epsilon_alpha2_beta1_flat`` (flat on the first layer), or one rule everywhere: ``epsilon``,
    ``gamma``, ``zplus``, ``alpha1_beta0``, ``alpha2_beta1``. ``first_rule`` (``flat``, ``wsquare``,
    ``zbox``, ...) replaces the composite's rule on the first convolution / linear layer; ``rules``
    (``{module name: rule}``) on any. ``epsilon``: the epsilon rule's ``eps``; ``gamma``: the gamma
    rule's; ``stabilizer``: the other rules' denominator shift; ``low`` / ``high``: z-box bounds of
    the model input (numbers or tensors; [0, 1] pixels by default, normalized for a LoadedModel).

    ``canonize`` merges each BatchNorm into the convolution / linear layer before it (a BatchNorm
    left alone passes relevance on unchanged, as in Zennit). The relevance starts at the explained
    feature's layer as ``a * df/da`` (for a class logit: the logit, where Zennit's default starts
    from 1), and the map is the relevance of the model's input ``[B, C, H, W]``.

    Conservation: activations, BatchNorm, max pooling, average pooling and residual sums pass the
    relevance on whole (up to the stabilizer), while a layer with bias ``b`` under the epsilon rule
    keeps ``sum_j R_j (b_j + eps sign z_j) / (z_j + eps sign z_j)`` of it. So for a bias-free network
    (a merged BatchNorm is a bias) ``sum(map) = f(x)`` up to ``eps``; ``extras["relevance_seed"]``
    is the relevance put in and ``extras["conservation_error"]`` ``|sum(map) - seed| / |seed|``.
    """
    composite = _check_choice(composite, list(LRP_COMPOSITES), "LRP composite")
    epsilon = _number(epsilon, "epsilon")
    gamma = _number(gamma, "gamma")
    stabilizer = _number(stabilizer, "stabilizer")
    model = unwrap(model)
    inputs = check_images(inputs).detach()
    target = resolve_target(model, inputs, target)
    lrp_rule_map(model, composite, rules=rules, first_rule=first_rule)  # validates rules / names up front
    batch = inputs.shape[0]
    with eval_mode(model), _private_model(model) as run:
        if run is model and canonize:
            raise ValueError(f"lrp cannot copy {type(model).__name__} to merge its BatchNorm layers; pass canonize=False")
        merged = _canonize(model, run, target.layers) if canonize else []
        _check_modules(run, "lrp")
        plan = lrp_rule_map(run, composite, rules=rules, first_rule=first_rule)
        named = dict(run.named_modules())
        bounds: dict[str, torch.Tensor] = {}
        low_all = high_all = None
        if "zbox" in plan.values():
            low_img, high_img = make_baseline(inputs, low), make_baseline(inputs, high)
            if bool((inputs < low_img).any()) or bool((inputs > high_img).any()):
                raise ValueError(
                    f"the z-box rule needs low <= inputs <= high, but the inputs range over "
                    f"[{float(inputs.min()):.4g}, {float(inputs.max()):.4g}]: pass low= and high=, the bounds of the model "
                    "input (e.g. the normalized range of [0, 1] pixels)"
                )
            low_all, high_all = _through_pre_hooks(run, low_img), _through_pre_hooks(run, high_img)
        state: dict[str, Any] = {}
        record: dict[str, torch.Tensor] = {}
        with HookSet() as hooks:
            for name, rule in plan.items():
                fn = _lrp_rule(rule, named[name], epsilon=epsilon, gamma=gamma, stabilizer=stabilizer, bounds=bounds)

                def rule_hook(mod: nn.Module, args: Any, output: Any, fn: Callable[..., torch.Tensor] = fn) -> Any:
                    x = args[0] if args else None
                    if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor) \
                            or not torch.is_grad_enabled() or not x.requires_grad:
                        return None
                    return _Rule.apply(x, output.detach(), fn)

                hooks.forward(named[name], rule_hook)
            for layer in target.layers:
                def seed_hook(mod: nn.Module, args: Any, output: Any, layer: str = layer) -> Any:
                    rows = state.get("rows", {}).get(layer)
                    if rows is None or not isinstance(output, torch.Tensor) or not output.requires_grad:
                        return None
                    return _Seed.apply(output, rows.to(output.device), record)

                hooks.forward(run if layer == OUTPUT else named[layer], seed_hook)

            def tap(mod: nn.Module, args: Any) -> Any:
                if not torch.is_grad_enabled() or not args or not isinstance(args[0], torch.Tensor):
                    return None
                leaf = args[0].detach().requires_grad_(True)  # relevance of what the network reads
                state["input"] = leaf
                return (leaf, *args[1:])

            hooks.pre(run, tap)
            watch = None
            if check_functional:
                ruled = {id(named[name]) for name in plan}
                watch = _Watch(run, ruled, _lrp_handler(stabilizer), hooks)
                watch.arm(hooks)
            relevance = torch.empty_like(inputs)
            values = inputs.new_empty(batch)
            seeds = inputs.new_zeros(batch)
            for start, stop in chunk_ranges(batch, internal_batch_size):
                chunk_target = target.select(range(start, stop))
                layers_of_rows = [chunk_target.features[int(i)].layer for i in chunk_target.index]
                state["rows"] = {layer: torch.tensor([row == layer for row in layers_of_rows]) for layer in target.layers}
                if low_all is not None:
                    bounds["low"], bounds["high"] = low_all[start:stop], high_all[start:stop]
                record["seed"] = inputs.new_zeros(stop - start)
                with torch.enable_grad():
                    if watch is not None:
                        with watch:
                            value, _ = chunk_target.forward(run, inputs[start:stop], grads=True)
                    else:
                        value, _ = chunk_target.forward(run, inputs[start:stop], grads=True)
                    (rel,) = torch.autograd.grad(value.sum(), state.pop("input"), allow_unused=True)
                if rel is None:
                    raise RuntimeError(
                        f"the feature(s) {', '.join(f.name for f in target.features)} do not depend on the input"
                    )
                if rel.shape != inputs[start:stop].shape:
                    raise ValueError(
                        f"lrp: the model's input hooks turn inputs {tuple(inputs[start:stop].shape)} into "
                        f"{tuple(rel.shape)}; relevance is defined on what the network reads, so resize the inputs first"
                    )
                relevance[start:stop] = rel
                values[start:stop] = value.detach()
                seeds[start:stop] = record["seed"]
    total = relevance.flatten(1).sum(dim=1)
    conservation = (total - seeds).abs() / seeds.abs().clamp_min(torch.finfo(inputs.dtype).tiny)
    return _result(
        "lrp", relevance, target, values, inputs, relevance_seed=seeds.detach(), conservation_error=conservation.detach(),
        composite=composite, rules=plan, canonized=[f"{conv}+{bn}" for conv, bn in merged],
    )
