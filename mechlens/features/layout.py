"""Activation layouts: how a layer's output maps onto rows of channel vectors.

Every tool that reads features (the capture job, SAEs, CAVs, attribution, feature
visualisation) sees an activation as ``[B, P, C]``: ``B`` samples, ``P`` positions (pixels of a
conv map, tokens of a transformer, or 1 for a flat vector) and ``C`` channels. One store row is
one ``C``-vector at one position (or one pooled vector per sample).

Layouts
    ``"nchw"``  conv maps ``[B, C, H, W]`` (positions are ``y * W + x``)
    ``"nhwc"``  channels-last maps ``[B, H, W, C]`` (Swin stages, ConvNeXt block internals)
    ``"nlc"``   token maps ``[B, T, D]`` (positions are token indices; CLS / register /
                distillation tokens first, their count is ``num_prefix_tokens``)
    ``"ncl"``   channels-first sequences ``[B, C, L]`` (Conv1d-style)
    ``"nc"``    flat vectors ``[B, C]``

A 4-d tensor may be ``nchw`` or ``nhwc`` and a 3-d one ``nlc`` or ``ncl``: the rank does not
say which, so mechlens never decides by rank. :func:`infer_layouts` takes the layout from the
model — the module type (``Conv2d`` writes ``nchw``, ``Linear``/``LayerNorm`` act on the last
dim), the tensor a container returns (a ``Sequential`` returns its last child's output), blocks
of torchvision/timm whose layout is documented (Swin blocks are ``nhwc``), timm's
``feature_info``/``output_fmt`` — or measures it (a forward at twice the input size: the dims
that grow are positions), and otherwise refuses with an :class:`AmbiguousLayoutError` that says
to pass ``layout=``. Entry points run their reads inside :func:`layout_scope`, so a feature
built with ``layout="auto"`` reads its layer's known layout.
"""
from __future__ import annotations

import collections
import contextlib
import contextvars
import weakref
from dataclasses import asdict, dataclass
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mechlens._context import INFERRING_LAYOUTS, inferring_layouts
from mechlens.engine import HookSet, eval_mode, unwrap

__all__ = [
    "LAYOUTS",
    "POOLINGS",
    "AmbiguousLayoutError",
    "Layout",
    "LayerLayout",
    "Pooling",
    "as_position_rows",
    "current_layouts",
    "infer_layouts",
    "inferring_layouts",
    "layout_scope",
    "parse_layout_option",
    "pool_positions",
    "positions_to_map",
    "resolve_layout",
    "rows_to_layout",
]

Layout = Literal["auto", "nchw", "nhwc", "nlc", "ncl", "nc"]
Pooling = Literal["all", "mean", "max", "cls"]
LAYOUTS: tuple[str, ...] = ("auto", "nchw", "nhwc", "nlc", "ncl", "nc")
POOLINGS: tuple[str, ...] = ("all", "mean", "max", "cls")
_RANK_OF = {"nchw": 4, "nhwc": 4, "nlc": 3, "ncl": 3, "nc": 2}
_CHOICES = {4: "layout='nchw' ([B, C, H, W]) or layout='nhwc' ([B, H, W, C])",
            3: "layout='nlc' (tokens [B, T, D]) or layout='ncl' ([B, C, L])"}


class AmbiguousLayoutError(ValueError):
    """The layout of a layer's activation is not known and cannot be read off its rank."""


@dataclass(frozen=True)
class LayerLayout:
    """What mechlens knows about one layer's output: its ``layout``, the number of prefix
    (CLS / register / distillation) tokens of a token map (``None``: not known) and where the
    layout came from (``source``: "explicit", "Conv2d", "same tensor as 'x'", "measured", ...)."""

    layout: str
    num_prefix_tokens: int | None = None
    source: str = "explicit"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


_SCOPE: contextvars.ContextVar[Mapping[str, LayerLayout]] = contextvars.ContextVar("mechlens_layouts", default={})


def current_layouts() -> Mapping[str, LayerLayout]:
    """The layouts of the innermost :func:`layout_scope` (layer name -> :class:`LayerLayout`)."""
    return _SCOPE.get()


@contextlib.contextmanager
def layout_scope(layouts: Mapping[str, LayerLayout]) -> Iterator[Mapping[str, LayerLayout]]:
    """Make ``layouts`` the known layouts of their layers inside the ``with`` block (nested
    scopes add to and override the outer ones)."""
    merged = collections.ChainMap(layouts, _SCOPE.get())  # type: ignore[arg-type]  # sees later additions
    token = _SCOPE.set(merged)
    try:
        yield merged
    finally:
        _SCOPE.reset(token)


def _check_layout_name(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {', '.join(LAYOUTS)}")


def resolve_layout(activation: torch.Tensor, layout: str = "auto", *, layer: str | None = None) -> str:
    """The concrete layout of ``activation``: ``layout`` when given (checked against the rank),
    else the layout known for ``layer`` in the current :func:`layout_scope`; a 2-d activation is
    always ``"nc"``. Anything else is an :class:`AmbiguousLayoutError` (never a guess by rank)."""
    _check_layout_name(layout)
    if not isinstance(activation, torch.Tensor):
        raise TypeError(
            f"a feature reads a tensor activation, got {type(activation).__name__} (a layer that "
            "returns a tuple/dict: hook the submodule that produces the tensor you want)"
        )
    if layout == "auto":
        if activation.dim() == 2:
            return "nc"
        known = _SCOPE.get().get(layer) if layer is not None else None
        if known is None:
            where = f"layer {layer!r}" if layer is not None else "this activation"
            choices = _CHOICES.get(activation.dim(), "a 2-, 3- or 4-d activation")
            raise AmbiguousLayoutError(
                f"the layout of {where} {tuple(activation.shape)} is not known (mechlens does not guess it "
                f"from the rank); pass {choices}, or read it through an entry point that has the model"
            )
        if not known.layout:
            raise AmbiguousLayoutError(known.source)
        layout = known.layout
    if activation.dim() != _RANK_OF[layout]:
        raise ValueError(
            f"layout {layout!r} expects a {_RANK_OF[layout]}-d activation, got shape {tuple(activation.shape)}"
            + (f" at layer {layer!r}" if layer is not None else "")
        )
    return layout


def as_position_rows(
    activation: torch.Tensor, layout: str = "auto", *, layer: str | None = None
) -> tuple[torch.Tensor, tuple[int, ...]]:
    """``activation`` as ``[B, P, C]`` plus its spatial shape (``(H, W)``, ``(T,)`` or ``()``).

    A view where the layout allows it (``nhwc``, ``nlc``, ``nc``); ``nchw``/``ncl`` are
    permuted (no copy until the caller needs contiguous memory). ``layout="auto"`` reads the
    layout known for ``layer`` (see :func:`resolve_layout`).
    """
    layout = resolve_layout(activation, layout, layer=layer)
    if layout == "nchw":
        b, c, h, w = activation.shape
        return activation.flatten(2).transpose(1, 2), (h, w)
    if layout == "nhwc":
        b, h, w, c = activation.shape
        return activation.reshape(b, h * w, c), (h, w)
    if layout == "nlc":
        return activation, (activation.shape[1],)
    if layout == "ncl":
        return activation.transpose(1, 2), (activation.shape[2],)
    return activation.unsqueeze(1), ()


def rows_to_layout(rows: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Inverse of :func:`as_position_rows`: ``[B, P, C]`` rows to the layer's own layout, in the
    memory format of ``like`` (a channels-last view handed to the next conv would make it take
    another kernel, and the spliced run would differ from the clean one by round-off)."""
    if layout == "ncl":
        return rows.transpose(1, 2).reshape(like.shape)
    if layout != "nchw":
        return rows.reshape(like.shape)
    b, c, h, w = like.shape
    out = rows.transpose(1, 2).reshape(b, c, h, w)  # a channels-last view of the rows
    if like.is_contiguous():
        return out.contiguous()
    if like.is_contiguous(memory_format=torch.channels_last):
        return out.contiguous(memory_format=torch.channels_last)
    return out


def positions_to_map(values: torch.Tensor, spatial: tuple[int, ...]) -> torch.Tensor:
    """Per-position values ``[B, P]`` back to ``[B, *spatial]`` (``[B]`` for flat layers)."""
    if not spatial:
        return values.reshape(values.shape[0])
    return values.reshape(values.shape[0], *spatial)


def pool_positions(rows: torch.Tensor, pooling: str, *, layer: str | None = None) -> torch.Tensor:
    """Pool ``[B, P, C]`` rows over positions: ``all`` keeps them, ``mean``/``max`` reduce to one
    row per sample, ``cls`` keeps the first token — only for a token map whose prefix tokens are
    known to include one (timm and torchvision ViTs put CLS first)."""
    if pooling == "all":
        return rows
    if pooling == "mean":
        return rows.mean(dim=1, keepdim=True)
    if pooling == "max":
        return rows.amax(dim=1, keepdim=True)
    if pooling == "cls":
        if layer is not None:
            check_cls_token(layer)
        return rows[:, :1]
    raise ValueError(f"unknown pooling {pooling!r}; expected one of {', '.join(POOLINGS)}")


def check_cls_token(layer: str, known: LayerLayout | None = None) -> None:
    """Refuse ``pooling='cls'`` unless ``layer`` is a token map known to start with a CLS token."""
    known = known if known is not None else _SCOPE.get().get(layer)
    if known is None or not known.layout:
        return  # read outside an entry point with an explicit layout: the caller vouched for it
    if known.layout != "nlc":
        raise ValueError(f"'cls' pooling needs token maps [B, T, D]; layer {layer!r} is {known.layout}")
    if not known.num_prefix_tokens:
        what = "has no prefix tokens" if known.num_prefix_tokens == 0 else "has no known CLS token"
        raise ValueError(
            f"pooling 'cls' needs a CLS token, but layer {layer!r} {what} (the model declares no "
            "num_prefix_tokens); pass num_prefix_tokens= or pool with 'mean'"
        )


# --- what the model says -------------------------------------------------------------------

# Leaf modules whose output layout follows from what they compute.
_NCHW_MODULES: tuple[type, ...] = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.MaxPool2d, nn.AvgPool2d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.LPPool2d, nn.FractionalMaxPool2d, nn.Upsample,
    nn.PixelShuffle, nn.PixelUnshuffle, nn.Dropout2d, nn.LocalResponseNorm,
)
_NCL_MODULES: tuple[type, ...] = (
    nn.Conv1d, nn.ConvTranspose1d, nn.BatchNorm1d, nn.InstanceNorm1d, nn.MaxPool1d, nn.AvgPool1d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d,
)
_CHANNEL_FIRST_NORMS: tuple[type, ...] = (nn.GroupNorm, nn.SyncBatchNorm)  # [N, C, *]
_LAST_DIM_MODULES: tuple[type, ...] = (nn.Linear, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
# Modules that keep the layout of their input (elementwise, or padding of the trailing dims).
_KEEP_LAYOUT_MODULES: tuple[type, ...] = (
    nn.Identity, nn.Dropout, nn.AlphaDropout, nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Mish,
    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU,
    nn.Softplus, nn.PReLU, nn.Hardtanh, nn.Softsign, nn.Tanhshrink, nn.LogSigmoid,
)
# Blocks of torchvision and timm whose output layout their documentation and code state, by
# qualified class name (no import of timm needed to recognise them).
_KNOWN_BLOCKS: dict[str, str] = {
    **dict.fromkeys([
        "torchvision.models.resnet.BasicBlock", "torchvision.models.resnet.Bottleneck",
        "torchvision.models.densenet._DenseLayer", "torchvision.models.densenet._DenseBlock",
        "torchvision.models.densenet._Transition", "torchvision.models.convnext.CNBlock",
        "torchvision.models.efficientnet.MBConv", "torchvision.models.efficientnet.FusedMBConv",
        "torchvision.models.mobilenetv2.InvertedResidual", "torchvision.models.mobilenetv3.InvertedResidual",
        "torchvision.ops.misc.SqueezeExcitation", "torchvision.ops.misc.Conv2dNormActivation",
        "torchvision.models.regnet.ResBottleneckBlock", "torchvision.models.regnet.AnyStage",
        "torchvision.models.googlenet.Inception", "torchvision.models.inception.InceptionA",
        "torchvision.models.squeezenet.Fire", "torchvision.models.shufflenetv2.InvertedResidual",
        "torchvision.models.maxvit.MaxVitBlock", "torchvision.models.maxvit.MaxVitLayer",
        "torchvision.models.maxvit.MBConv",
        "timm.models.resnet.BasicBlock", "timm.models.resnet.Bottleneck",
        "timm.models.convnext.ConvNeXtBlock", "timm.models.convnext.ConvNeXtStage",
        "timm.models.regnet.Bottleneck", "timm.models.regnet.RegStage",
        "timm.models._efficientnet_blocks.SqueezeExcite", "timm.models._efficientnet_blocks.ConvBnAct",
        "timm.models._efficientnet_blocks.DepthwiseSeparableConv",
        "timm.models._efficientnet_blocks.InvertedResidual", "timm.models._efficientnet_blocks.EdgeResidual",
        "timm.models._efficientnet_blocks.CondConvResidual",
        "timm.models._efficientnet_blocks.UniversalInvertedResidual",
        "timm.models.maxxvit.MbConvBlock", "timm.models.maxxvit.ConvNeXtBlock",
        "timm.models.maxxvit.MaxxVitBlock", "timm.models.maxxvit.ParallelMaxxVitBlock",
        "timm.models.maxxvit.TransformerBlock2d", "timm.models.maxxvit.PartitionAttention2d",
        "timm.models.maxxvit.MaxxVitStage", "timm.models.maxxvit.Stem",
        "timm.layers.norm.LayerNorm2d", "timm.layers.layer_scale.LayerScale2d",
        "torchvision.models.convnext.LayerNorm2d",
        "timm.layers.squeeze_excite.SEModule", "timm.layers.conv_bn_act.ConvNormAct",
        "timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.GroupNormAct",
        "timm.layers.norm_act.LayerNormAct2d",
    ], "nchw"),
    **dict.fromkeys([
        "torchvision.models.swin_transformer.SwinTransformerBlock",
        "torchvision.models.swin_transformer.SwinTransformerBlockV2",
        "torchvision.models.swin_transformer.PatchMerging", "torchvision.models.swin_transformer.PatchMergingV2",
        "timm.models.swin_transformer.SwinTransformerBlock", "timm.models.swin_transformer.SwinTransformerStage",
        "timm.models.swin_transformer.PatchMerging",
        "timm.models.swin_transformer_v2.SwinTransformerV2Block",
        "timm.models.swin_transformer_v2.SwinTransformerV2Stage", "timm.models.swin_transformer_v2.PatchMerging",
        "timm.models.maxxvit.PartitionAttentionCl", "timm.layers.norm_act.LayerNormAct",
    ], "nhwc"),
    **dict.fromkeys([
        "torchvision.models.vision_transformer.EncoderBlock", "torchvision.models.vision_transformer.Encoder",
        "timm.models.vision_transformer.Block", "timm.models.vision_transformer.ResPostBlock",
        "timm.models.vision_transformer.ParallelScalingBlock", "timm.models.vision_transformer.ParallelThingsBlock",
        "timm.models.eva.EvaBlock", "timm.models.eva.Block", "timm.models.beit.Block",
        "timm.models.deit.Block", "timm.models.cait.LayerScaleBlock",
    ], "nlc"),
}
_LAST_DIM_NAMES = {"LayerNorm", "RmsNorm", "SimpleNorm", "LayerNormFp32", "RmsNormFp32", "LayerNormAct"}
_KEEP_LAYOUT_NAMES = {"DropPath", "StochasticDepth", "LayerScale", "GELUTanh", "QuickGELU", "Swish", "HardSwish",
                      "HardSigmoid", "HardMish", "GELU", "SiLU", "Dropout", "Identity"}


def _qualname(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def _last_dim(rank: int) -> str | None:
    return {4: "nhwc", 3: "nlc"}.get(rank)


def _first_dim(rank: int) -> str | None:
    return {4: "nchw", 3: "ncl"}.get(rank)


def _by_module_type(module: nn.Module, output: torch.Tensor) -> tuple[str, str] | None:
    rank, shape, name = output.dim(), output.shape, type(module).__name__
    qualified = _qualname(module)
    if qualified in _KNOWN_BLOCKS and _RANK_OF[_KNOWN_BLOCKS[qualified]] == rank:
        return _KNOWN_BLOCKS[qualified], name
    if isinstance(module, _NCHW_MODULES) and rank == 4:
        return "nchw", name
    if isinstance(module, _NCL_MODULES) and rank == 3:
        return "ncl", name
    if isinstance(module, _CHANNEL_FIRST_NORMS + (nn.modules.batchnorm._BatchNorm,)):
        channels = getattr(module, "num_channels", None) or getattr(module, "num_features", None)
        if channels == shape[1] and _first_dim(rank):
            return _first_dim(rank), name  # type: ignore[return-value]
    if isinstance(module, nn.Linear) and shape[-1] == module.out_features and _last_dim(rank):
        return _last_dim(rank), name  # type: ignore[return-value]
    normalized = tuple(getattr(module, "normalized_shape", ()) or ())
    if name.endswith("2d") and "Norm" in name and len(normalized) == 1 and rank == 4:
        # channels-first norms of timm/torchvision (LayerNorm2d, RmsNorm2d, ...): they normalise dim 1
        return ("nchw", name) if normalized == (shape[1],) else None
    if (isinstance(module, _LAST_DIM_MODULES) or name in _LAST_DIM_NAMES) and not isinstance(module, nn.Linear):
        if normalized == (shape[-1],) and _last_dim(rank):
            return _last_dim(rank), name  # type: ignore[return-value]
    if name == "PatchEmbed" and hasattr(module, "flatten"):
        if getattr(module, "flatten", False) and rank == 3:
            return "nlc", "PatchEmbed(flatten=True)"
        fmt = str(getattr(getattr(module, "output_fmt", None), "value", getattr(module, "output_fmt", ""))).lower()
        if fmt in ("nchw", "nhwc") and rank == 4:
            return fmt, f"PatchEmbed(output_fmt={fmt.upper()})"
    return None


def _from_input(module: nn.Module, input_layout: str, output: torch.Tensor) -> tuple[str, str] | None:
    """Layout of a module's output derived from its input's (layout-keeping and permuting modules)."""
    name = type(module).__name__
    if isinstance(module, _KEEP_LAYOUT_MODULES) or name in _KEEP_LAYOUT_NAMES:
        if _RANK_OF[input_layout] == output.dim():
            return input_layout, f"{name} keeps its input's layout"
    dims = getattr(module, "dims", None)
    if name == "Permute" and isinstance(dims, (list, tuple)) and len(dims) == len(input_layout) == output.dim():
        permuted = "".join(input_layout[d] for d in dims)
        if permuted in _RANK_OF:
            return permuted, f"Permute{tuple(dims)} of {input_layout}"
    return None


def _timm_declared(model: nn.Module) -> dict[str, tuple[str | None, int | None]]:
    """timm's own statement of its feature maps: module -> (format, channels)."""
    info = getattr(model, "feature_info", None)
    if not isinstance(info, (list, tuple)):
        return {}
    fmt = getattr(model, "output_fmt", None)
    fmt = str(getattr(fmt, "value", fmt)).lower() if fmt is not None else None
    declared: dict[str, tuple[str | None, int | None]] = {}
    for entry in info:
        if isinstance(entry, dict) and isinstance(entry.get("module"), str):
            declared[entry["module"]] = (fmt, entry.get("num_chs"))
    return declared


def _from_timm(declared: Mapping[str, tuple[str | None, int | None]], name: str, output: torch.Tensor) -> tuple[str, str] | None:
    if name not in declared:
        return None
    fmt, channels = declared[name]
    rank = output.dim()
    if rank == 3 and fmt in (None, "nlc") and channels in (None, output.shape[-1]):
        return "nlc", "timm feature_info (token map)"
    if rank == 4:
        fmt = fmt or "nchw"  # timm's feature maps are NCHW unless the model says output_fmt
        if fmt in ("nchw", "nhwc"):
            dim = 1 if fmt == "nchw" else 3
            if channels in (None, output.shape[dim]):
                return fmt, f"timm feature_info (output_fmt {fmt.upper()})"
    return None


class _Trace:
    """One forward with a hook on every module: each output's layout, from what is known."""

    def __init__(self, model: nn.Module, inputs: torch.Tensor) -> None:
        self.declared = _timm_declared(model)
        self.known: dict[int, tuple[str, torch.Tensor, str]] = {}  # id -> (layout, tensor kept alive, why)
        self.decided: dict[str, list[tuple[str | None, str]]] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.pending: dict[int, tuple[torch.Tensor, list[str]]] = {}  # undecided outputs, by tensor
        if inputs.dim() == 4:
            self.known[id(inputs)] = ("nchw", inputs, "the model input")

    def hook(self, name: str):
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                return
            self.shapes.setdefault(name, tuple(output.shape))
            decision = self._decide(name, module, args, output)
            self.decided.setdefault(name, []).append(decision or (None, ""))
            if decision is not None:
                carried = decision[1].startswith("the output of ")
                self.known[id(output)] = (decision[0], output, decision[1] if carried else f"{decision[1]} {name!r}")
            else:
                entry = self.pending.setdefault(id(output), (output, []))
                if entry[0] is output:
                    entry[1].append(name)
            self._backfill(name, module, args, decision)
        return record

    def _backfill(self, name: str, module: nn.Module, args: Any, decision: tuple[str, str] | None) -> None:
        """A leaf module that reads its input in a known layout (a ``Conv2d`` reads ``nchw``, a
        ``Linear`` its last dim) also tells the layout of the undecided modules that produced it."""
        first = args[0] if isinstance(args, tuple) and args else None
        if decision is None or not isinstance(first, torch.Tensor) or first.dim() != _RANK_OF[decision[0]]:
            return
        if not isinstance(module, _NCHW_MODULES + _NCL_MODULES + _LAST_DIM_MODULES + _CHANNEL_FIRST_NORMS):
            return
        pending = self.pending.pop(id(first), None)
        if pending is None or pending[0] is not first:
            return
        self.known[id(first)] = (decision[0], first, f"read as {decision[0]} by {name!r}")
        for producer in pending[1]:
            calls = self.decided[producer]
            calls[-1] = (decision[0], f"read as {decision[0]} by {name!r} ({type(module).__name__})")

    def _decide(self, name: str, module: nn.Module, args: Any, output: torch.Tensor) -> tuple[str, str] | None:
        if output.dim() == 2:
            return "nc", "rank 2"
        if output.dim() not in (3, 4):
            return None
        same = self.known.get(id(output))
        if same is not None and same[1] is output:
            return same[0], same[2] if same[2].startswith("the output of ") else f"the output of {same[2]}"
        by_type = _by_module_type(module, output)
        if by_type is not None:
            return by_type
        first = args[0] if isinstance(args, tuple) and args else None
        if isinstance(first, torch.Tensor):
            seen = self.known.get(id(first))
            if seen is not None and seen[1] is first:
                derived = _from_input(module, seen[0], output)
                if derived is not None:
                    return derived
        return _from_timm(self.declared, name, output)


@contextlib.contextmanager
def _probe_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode, no grad and mechlens' own hooks muted, restored afterwards."""
    token = INFERRING_LAYOUTS.set(True)
    try:
        with eval_mode(model), torch.no_grad():
            yield
    finally:
        INFERRING_LAYOUTS.reset(token)


def _run_probe(model: nn.Module, inputs: torch.Tensor, names: Sequence[str], trace: _Trace | None) -> dict[str, tuple[int, ...]]:
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    with HookSet() as hooks:
        if trace is not None:
            for name, module in modules.items():
                hooks.forward(module, trace.hook(name))
        else:
            for name in names:
                def keep(module, args, output, name=name):
                    if isinstance(output, torch.Tensor):
                        shapes.setdefault(name, tuple(output.shape))
                hooks.forward(modules[name], keep)
        with _probe_mode(model):
            model(inputs)
    return trace.shapes if trace is not None else shapes


def _measured(small: tuple[int, ...], large: tuple[int, ...]) -> str | None:
    """Layout from how a layer's shape moves when the input doubles: positions grow, channels don't."""
    if len(small) != len(large):
        return None
    grows = tuple(a != b for a, b in zip(small[1:], large[1:]))
    return {(False, True, True): "nchw", (True, True, False): "nhwc",
            (True, False): "nlc", (False, True): "ncl"}.get(grows)


def _declared_prefix(model: nn.Module) -> int | None:
    count = getattr(model, "num_prefix_tokens", None)
    if isinstance(count, int):
        return count
    if _qualname(model) == "torchvision.models.vision_transformer.VisionTransformer":
        return 1  # torchvision's ViT prepends one class token
    return None


def _patch_positions(model: nn.Module, image_hw: tuple[int, int]) -> int | None:
    """How many patch tokens the model's patch embedding makes of an image of size ``image_hw``."""
    embed = getattr(model, "patch_embed", None)
    if embed is not None:
        size = getattr(embed, "patch_size", None)
        if size is not None:
            ph, pw = (size, size) if isinstance(size, int) else tuple(size)
            return (image_hw[0] // ph) * (image_hw[1] // pw)
    patch = getattr(model, "patch_size", None)
    if isinstance(patch, int) and hasattr(model, "conv_proj"):  # torchvision ViT
        return (image_hw[0] // patch) * (image_hw[1] // patch)
    return None


def _prefix_of(model: nn.Module, tokens: int, image_hw: tuple[int, int] | None,
               measured: tuple[int, int] | None) -> int | None:
    """Prefix tokens of a ``tokens``-long map: the model's declared count where the patch grid
    confirms it, else measured from the two probe sizes (``tokens = prefix + k * area``)."""
    declared = _declared_prefix(model)
    patches = _patch_positions(model, image_hw) if image_hw is not None else None
    if declared is not None and patches is not None:
        if tokens == declared + patches:
            return declared
        if tokens == patches:
            return 0  # before the class/register tokens are prepended (the patch embedding)
    if measured is not None:
        small, large = measured  # token counts at 1x and 2x input side (4x area)
        per_area, rest = divmod(large - small, 3)
        if rest == 0 and 0 <= small - per_area < small:
            return small - per_area
    return None


_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, LayerLayout]]" = weakref.WeakKeyDictionary()


def infer_layouts(
    model: nn.Module,
    layers: Sequence[str],
    inputs: torch.Tensor,
    *,
    layout: str | Mapping[str, str] | None = None,
    num_prefix_tokens: int | None = None,
    strict: bool = True,
) -> dict[str, LayerLayout]:
    """The :class:`LayerLayout` of each of ``layers`` when ``model`` reads ``inputs``.

    ``layout`` (one string for all layers, or a per-layer mapping) is taken as given; other
    layers get theirs from the model (see the module docstring), from one probe forward of one
    sample in eval mode and without gradients (cached per model, layer and input shape). A
    layer whose layout the model does not state is measured at twice the input size where the
    model accepts it; otherwise an :class:`AmbiguousLayoutError` names the layer and what to pass.
    ``num_prefix_tokens`` overrides the prefix-token count of token maps. ``strict=False``
    returns ambiguous layers with layout ``""`` instead of raising (a later read of them raises
    with the reason).
    """
    net = unwrap(model)
    wanted = [name for name in dict.fromkeys(layers) if name != ""]
    explicit: dict[str, str] = {}
    if isinstance(layout, str) and layout != "auto":
        _check_layout_name(layout)
        explicit = dict.fromkeys(wanted, layout)
    elif isinstance(layout, Mapping):
        for name, value in layout.items():
            _check_layout_name(value)
            if value != "auto":
                explicit[name] = value
    if num_prefix_tokens is not None and (not isinstance(num_prefix_tokens, int) or num_prefix_tokens < 0):
        raise ValueError(f"num_prefix_tokens must be a non-negative int, got {num_prefix_tokens!r}")
    sample = inputs[:1]
    key_shape = tuple(sample.shape[1:])
    cache = _CACHE.setdefault(net, {})
    modules = dict(net.named_modules())
    keys = {name: (name, id(modules.get(name)), key_shape) for name in wanted}
    missing = [name for name in wanted if keys[name] not in cache]
    if missing:
        trace = _Trace(net, sample)
        _run_probe(net, sample, missing, trace)
        for name in trace.shapes:  # one probe decides every module: later calls for other layers are free
            if name not in wanted and _consistent(trace.decided.get(name, [])):
                found, source = trace.decided[name][0]
                prefix = _prefix_of(net, trace.shapes[name][1], tuple(sample.shape[-2:]) if sample.dim() == 4 else None, None) if found == "nlc" else None
                cache[(name, id(modules.get(name)), key_shape)] = LayerLayout(found, prefix, source)
        image_hw = tuple(sample.shape[-2:]) if sample.dim() == 4 else None
        unknown = [n for n in missing if n in trace.shapes and not _consistent(trace.decided.get(n, []))]
        large_shapes: dict[str, tuple[int, ...]] = {}
        token_layers = [n for n in missing if n in trace.shapes and len(trace.shapes[n]) == 3]
        if (unknown or token_layers) and sample.dim() == 4:
            try:
                large = F.interpolate(sample, scale_factor=2.0, mode="nearest")
                large_shapes = _run_probe(net, large, [*unknown, *token_layers], None)
            except Exception:  # noqa: BLE001 - a model that takes one input size: no measurement
                large_shapes = {}
        for name in missing:
            if name not in trace.shapes:
                continue  # did not fire or not a tensor: the reader reports that
            decisions = trace.decided.get(name, [])
            if _consistent(decisions):
                found, source = decisions[0]
            else:
                found = _measured(trace.shapes[name], large_shapes.get(name, ())) if name in large_shapes else None
                source = "measured (positions grow with the input size)"
            if found is None:
                cache[keys[name]] = LayerLayout("", None, _ambiguous_reason(name, modules.get(name), trace.shapes[name], decisions))
                continue
            prefix = None
            if found == "nlc":
                measured_tokens = (trace.shapes[name][1], large_shapes[name][1]) if len(large_shapes.get(name, ())) == 3 else None
                prefix = _prefix_of(net, trace.shapes[name][1], image_hw, measured_tokens)  # type: ignore[arg-type]
            cache[keys[name]] = LayerLayout(found, prefix, source)
    result: dict[str, LayerLayout] = {}
    for name in wanted:
        known = cache.get(keys[name])
        if name in explicit:
            result[name] = _explicit(name, explicit[name], known, num_prefix_tokens)
            continue
        if known is None:
            continue
        if not known.layout:
            if not strict:
                result[name] = known  # layout "": a read of this layer raises with the reason
                continue
            raise AmbiguousLayoutError(known.source)
        if num_prefix_tokens is not None and known.layout == "nlc":
            known = LayerLayout(known.layout, num_prefix_tokens, known.source + "; num_prefix_tokens given")
        result[name] = known
    return result


def _consistent(decisions: Sequence[tuple[str | None, str]]) -> bool:
    found = {layout for layout, _ in decisions}
    return len(found) == 1 and None not in found


def _explicit(name: str, layout: str, known: LayerLayout | None, num_prefix_tokens: int | None) -> LayerLayout:
    if known is not None and known.layout and known.layout != layout:
        raise ValueError(
            f"layout={layout!r} contradicts layer {name!r}, whose output is {known.layout} ({known.source}); "
            "drop layout= or name the layer you meant"
        )
    prefix = num_prefix_tokens if num_prefix_tokens is not None else (known.num_prefix_tokens if known is not None and known.layout == layout else None)
    return LayerLayout(layout, prefix if layout == "nlc" else None, "explicit")


def _ambiguous_reason(name: str, module: nn.Module | None, shape: tuple[int, ...],
                      decisions: Sequence[tuple[str | None, str]]) -> str:
    rank = len(shape)
    kind = type(module).__name__ if module is not None else "?"
    found = sorted({layout for layout, _ in decisions if layout})
    why = (f"it runs {len(decisions)} times with different layouts ({', '.join(found)})" if len(found) > 1 else
           f"the model does not say it ({kind} is not a module mechlens knows) and it could not be measured "
           "at another input size")
    choices = _CHOICES.get(rank, "a 2-, 3- or 4-d activation")
    return f"cannot tell the layout of layer {name!r} {shape}: {why}; pass {choices} (CLI: --layout)"


def parse_layout_option(text: str | None) -> str | dict[str, str] | None:
    """The CLI's ``--layout``: ``"nhwc"`` (every layer) or ``"layers.2=nhwc,norm=nlc"`` (per layer)."""
    if text is None or not text.strip():
        return None
    if "=" not in text:
        _check_layout_name(text.strip())
        return text.strip()
    per_layer: dict[str, str] = {}
    for part in text.split(","):
        layer, sep, value = part.partition("=")
        if not sep or not layer.strip():
            raise ValueError(f"--layout {text!r}: expected LAYOUT or LAYER=LAYOUT[,LAYER=LAYOUT...], got {part!r}")
        _check_layout_name(value.strip())
        per_layer[layer.strip()] = value.strip()
    return per_layer
