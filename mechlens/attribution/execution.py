"""How the attribution methods run the model: an inference copy that computes the same function
with less work.

Attribution methods run the model hundreds to thousands of times (IG steps, noise samples,
occlusion windows, Score-CAM masks), always in eval mode, never needing gradients w.r.t. the
weights. For methods that backpropagate, :func:`inference_model` hands them a copy of the model
that

* folds every eval-mode BatchNorm into the convolution that feeds it (``W' = W * g / sqrt(v + eps)``,
  ``b' = (b - m) * g / sqrt(v + eps) + beta``) and replaces the BatchNorm by ``nn.Identity``: one
  pass over each activation instead of two, and no BatchNorm input saved for the backward pass;
* stores convolution weights channels-last on CPU, so oneDNN runs its native NHWC kernels
  without reordering every activation.

Most forward-only methods get the model itself, fed channels-last inputs on CPU (folding would
save them little and cost a second copy of the weights); Score-CAM, which runs thousands of
masked forwards, takes the copy (11 % faster per forward on resnet18).

Mathematically the copy is the original function; numerically it differs by float rounding
(about 1e-6 relative on the outputs). Gradient maps of ReLU networks can differ more at single
pixels where a pre-activation within rounding of zero flips side; pass ``optimize=False`` (or set
:func:`exact_execution`) for bit-for-bit agreement with a peer running the unmodified model.

The copy shares every tensor it does not change with the original (no second copy of the
weights); modules whose outputs a method observes (the target's layers, a CAM layer) are kept
unfolded so that hooks on them see exactly the original module's output. Making the copy costs
tens of milliseconds (resnet18: ~30 ms); for many small calls make it once,
``fast = inference_copy(model)``, and pass ``fast`` to the methods (they reuse a copy instead of
copying it again, and refuse a target layer the copy has folded). Only exact ``nn.ConvNd`` /
``nn.BatchNormNd`` pairs are folded (subclasses such as timm's ``BatchNormAct2d`` or
``StdConv2d`` do more than their base class); a parent module that ``torch.fx`` cannot trace keeps
its pairs. Models carrying hooks of their own run unmodified.
"""
from __future__ import annotations

import copy
import logging
import weakref
from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import nn

from mechlens.engine import HookSet, eval_mode

__all__ = ["can_fold", "exact_execution", "fold_batchnorm_pairs", "fold_into", "has_hooks", "inference_copy", "inference_model", "optimizing", "prefer_channels_last"]

logger = logging.getLogger(__name__)

# exact types only: subclasses may transform the weight (timm's StdConv2d standardises it) or do
# more than normalise (timm's BatchNormAct2d applies an activation), which a fold would break
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _is_conv(module: object) -> bool:
    return type(module) in _CONV_TYPES


def _is_norm(module: object) -> bool:
    return type(module) in _NORM_TYPES
_OPTIMIZE_DEFAULT = [True]
# model -> (ids of its modules when traced, [(conv name, bn name)]): tracing costs more than folding
_PAIR_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple[int, ...], list[tuple[str, str]]]]" = weakref.WeakKeyDictionary()


@contextmanager
def exact_execution() -> Iterator[None]:
    """Within this block every attribution method runs the model exactly as given (no BatchNorm
    folding, no layout change): for bit-for-bit comparisons with other libraries."""
    previous = _OPTIMIZE_DEFAULT[0]
    _OPTIMIZE_DEFAULT[0] = False
    try:
        yield
    finally:
        _OPTIMIZE_DEFAULT[0] = previous


class _OwnForwardTracer(torch.fx.Tracer):
    """Traces one module's own ``forward`` with every child module as a leaf, so a check or
    control flow anywhere else in the model does not stop the search."""

    def __init__(self, root: nn.Module) -> None:
        super().__init__()
        self._root_module = root

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return m is not self._root_module


def _pairs_in(module: nn.Module) -> list[tuple[str, str]]:
    """``(conv, bn)`` child names of ``module`` whose BatchNorm reads only that conv's output."""
    children = dict(module.named_children())
    if isinstance(module, nn.Sequential):  # each child feeds the next and nothing else
        names = list(children)
        return [(a, b) for a, b in zip(names, names[1:])
                if _is_conv(children[a]) and _is_norm(children[b])]
    if not any(_is_norm(c) for c in children.values()):
        return []
    try:
        graph = _OwnForwardTracer(module).trace(module)
    except Exception as error:  # any tracing failure only means "nothing folded in this module"
        logger.debug("torch.fx could not trace %s (%s)", type(module).__name__, error)
        return []
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_norm(children.get(str(node.target))):
            continue
        source = node.args[0] if node.args else None
        if (
            isinstance(source, torch.fx.Node) and source.op == "call_module"
            and _is_conv(children.get(str(source.target))) and len(source.users) == 1
            and len(node.args) == 1 and not node.kwargs
            and calls[str(source.target)] == 1 and calls[str(node.target)] == 1  # a module called twice stays
        ):
            pairs.append((str(source.target), str(node.target)))
    return pairs


def fold_batchnorm_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """``(conv, batchnorm)`` module names (dotted, from ``model``) where the BatchNorm's only input
    is the convolution's output and that output goes nowhere else: consecutive children of an
    ``nn.Sequential``, or found by tracing each parent module's own ``forward`` with ``torch.fx``
    (a parent that cannot be traced contributes none). Modules used at more than one place in
    the model are never paired."""
    modules = tuple(id(m) for m in model.modules())
    cached = _PAIR_CACHE.get(model)
    if cached is not None and cached[0] == modules:
        return list(cached[1])
    uses: dict[int, int] = {}
    for _, m in model.named_modules(remove_duplicate=False):
        uses[id(m)] = uses.get(id(m), 0) + 1
    pairs = []
    for name, parent in model.named_modules():
        prefix = f"{name}." if name else ""
        for conv, bn in _pairs_in(parent):
            conv_module, bn_module = getattr(parent, conv), getattr(parent, bn)
            if uses[id(conv_module)] == 1 and uses[id(bn_module)] == 1:
                pairs.append((prefix + conv, prefix + bn))
    try:
        _PAIR_CACHE[model] = (modules, pairs)
    except TypeError:  # not weak-referenceable
        pass
    return pairs


def _has_hooks(model: nn.Module) -> bool:
    return any(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
        or getattr(m, "_backward_pre_hooks", None)
        for m in model.modules()
    )


def _covers(names: Iterable[str], module_name: str) -> bool:
    """Whether observing layer ``names`` depends on ``module_name``'s own output (the module itself
    or one of its submodules is observed)."""
    return any(name == module_name or name.startswith(module_name + ".") for name in names)


def can_fold(bn: nn.Module) -> bool:
    """Whether ``bn`` is an exact BatchNorm in eval mode with running statistics (an affine map)."""
    return _is_norm(bn) and not bn.training and bn.track_running_stats and bn.running_mean is not None


@torch.no_grad()
def fold_into(conv: nn.Module, bn: nn.Module, *, channels_last: bool) -> None:
    """Replace ``conv``'s weight and bias (new tensors; the old ones are not touched) by those of
    ``bn(conv(x))`` for eval-mode ``bn``: ``W * g / sqrt(v + eps)``, ``(b - m) * g / sqrt(v + eps) + beta``."""
    scale = bn.running_var.add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight
    shape = (-1,) + (1,) * (conv.weight.dim() - 1)
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = (bias - bn.running_mean) * scale
    if bn.bias is not None:
        new_bias = new_bias + bn.bias
    layout = torch.channels_last if channels_last and conv.weight.dim() == 4 else torch.contiguous_format
    folded = torch.empty_like(conv.weight, memory_format=layout)
    torch.mul(conv.weight, scale.view(shape).to(conv.weight.dtype), out=folded)  # one pass, in its final layout
    conv.weight = nn.Parameter(folded, requires_grad=False)
    conv.bias = nn.Parameter(new_bias.to(conv.weight.dtype), requires_grad=False)


def _copy_plan(model: nn.Module, keep: Iterable[str], channels_last: bool | None) -> tuple[list[tuple[str, str]], bool]:
    """What :func:`inference_copy` changes: the (conv, BatchNorm) pairs it folds and whether it
    makes conv weights channels-last (default: on CPU)."""
    keep = [k for k in keep if k]
    named = dict(model.named_modules())
    pairs = [(conv, bn) for conv, bn in fold_batchnorm_pairs(model) if not _covers(keep, conv) and can_fold(named[bn])]
    if channels_last is None:
        first = next(iter(model.parameters()), None)
        channels_last = first is not None and first.device.type == "cpu"
    return pairs, channels_last


def _copy_changes_nothing(model: nn.Module, keep: Iterable[str]) -> bool:
    """Whether :func:`inference_copy` would compute with exactly ``model``'s modules and tensors
    (nothing to fold, no conv weight to lay out): then a copy only costs its deep copy (13 ms per
    call for a small ViT on a GPU, whose one conv is the patch embedding)."""
    pairs, channels_last = _copy_plan(model, keep, None)
    if pairs:
        return False
    return not channels_last or all(
        module.weight.is_contiguous(memory_format=torch.channels_last)
        for module in model.modules() if isinstance(module, nn.Conv2d) and module.weight.dim() == 4
    )


def inference_copy(model: nn.Module, *, keep: Iterable[str] = (), channels_last: bool | None = None) -> nn.Module:
    """A copy of eval-mode ``model`` that computes the same function with BatchNorm folded into
    the preceding convolutions and (``channels_last``; default: on CPU) channels-last convolution
    weights. Tensors it does not change are shared with ``model``; modules named in ``keep`` are
    left as they are, so hooks on them observe the original outputs."""
    pairs, channels_last = _copy_plan(model, keep, channels_last)
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    twin = copy.deepcopy(model, memo=dict(tensors))  # modules copied, tensors shared
    twin_named = dict(twin.named_modules())
    with torch.no_grad():
        for conv_name, bn_name in pairs:
            fold_into(twin_named[conv_name], twin_named[bn_name], channels_last=channels_last)
            parent_name, _, child = bn_name.rpartition(".")
            setattr(twin_named[parent_name] if parent_name else twin, child, nn.Identity())
        if channels_last:
            for module in twin.modules():
                if isinstance(module, nn.Conv2d) and module.weight.dim() == 4 and not module.weight.is_contiguous(memory_format=torch.channels_last):
                    module.weight = nn.Parameter(
                        module.weight.detach().contiguous(memory_format=torch.channels_last), requires_grad=False,
                    )
    twin._mechlens_inference_copy = True  # noqa: SLF001 - nested methods (SmoothGrad's base) reuse it
    twin._mechlens_folded = frozenset(conv for conv, _ in pairs)  # noqa: SLF001 - their outputs changed
    return twin.eval()


def optimizing() -> bool:
    """Whether methods may run an optimized equivalent of the model (False inside :func:`exact_execution`)."""
    return _OPTIMIZE_DEFAULT[0]


def prefer_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout attribution methods feed CPU convolutions (channels-last for a 4-d CPU
    tensor, unless inside :func:`exact_execution`)."""
    if _OPTIMIZE_DEFAULT[0] and x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


def has_hooks(model: nn.Module) -> bool:
    """Whether any module of ``model`` carries a forward / backward hook."""
    return _has_hooks(model)


def _channels_last_input(module: nn.Module, args: tuple) -> tuple | None:
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
    return None


@contextmanager
def inference_model(
    model: nn.Module, *, keep: Iterable[str] = (), optimize: bool | None = None, gradients: bool = True,
) -> Iterator[nn.Module]:
    """The model an attribution method should run, in eval mode, and the original's ``training``
    flags restored afterwards.

    With ``gradients`` (the method backpropagates): :func:`inference_copy` of ``model``
    (``optimize``; default on, off inside :func:`exact_execution`), or ``model`` itself when it has
    no convolutions, carries hooks, or cannot be copied. Without (forward passes only): ``model``
    itself, fed channels-last inputs on CPU through a temporary pre-hook. Forward-only, folding
    saves nothing measurable while the folded weights would cost a second copy of them; with
    gradients it also drops the BatchNorm inputs autograd would keep."""
    optimize = _OPTIMIZE_DEFAULT[0] if optimize is None else optimize
    with eval_mode(model):
        if not gradients:
            first = next(iter(model.parameters()), None)
            with HookSet() as hooks:
                if optimize and first is not None and first.device.type == "cpu" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
                    hooks.pre(model, _channels_last_input)
                yield model
            return
        folded = getattr(model, "_mechlens_folded", frozenset())
        observed = [name for name in keep if name and any(_covers([name], conv) for conv in folded)]
        if observed:
            raise ValueError(
                f"layer(s) {observed} of this inference copy were folded with their BatchNorm, so their outputs are "
                "not the original model's: make the copy with inference_copy(model, keep=[...]) naming them"
            )
        run = model
        if (optimize and not getattr(model, "_mechlens_inference_copy", False) and not _has_hooks(model)
                and any(isinstance(m, _CONV_TYPES) for m in model.modules()) and not _copy_changes_nothing(model, keep)):
            try:
                run = inference_copy(model, keep=keep)
            except (copy.Error, TypeError, RuntimeError) as error:  # uncopyable model: run it as it is
                logger.debug("no inference copy of %s (%s)", type(model).__name__, error)
        yield run
