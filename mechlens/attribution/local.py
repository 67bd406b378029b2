"""Receptive-field-local recomputation for occlusion.

Occluding a window changes the early layers of a CNN only near the window: a convolution, a
pooling or a pointwise op moves a change by at most its receptive field. So instead of running
the whole network on every occluded image, :class:`LocalSplit` cuts the model (traced with
``torch.fx``) at a node that everything after it reads alone (a *cut*), runs the part before the
cut (the *prefix*, local ops only) on a crop around each window just large enough to hold the
receptive field of the changed region, pastes the changed region into the clean image's cut
activation, and runs only the rest (the *suffix*) in full. The result is the same function
(up to float rounding); the saving is the prefix's work outside each crop.

The prefix is a chain of segments (one per residual block or so), each run on a crop of the
previous segment's (pasted) output around the changed region, so crops stay as tight as each
segment's own receptive field allows; the chain stops where a crop would cover most of its map.
Splitting is skipped unless it saves at least ``MIN_SAVED_FRACTION`` of the network's
convolution work for a central window. Crops start on multiples of their segment's total stride
so their grids align with the full image's, and they are clipped at the image border (where the
network's own zero padding then applies, exactly as in the full forward). Models that ``torch.fx`` cannot trace, or with no local prefix, are not split
(:func:`local_split` returns None) and occlusion runs the plain forward.
"""
from __future__ import annotations

import copy
import logging
import math
import operator
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from mechlens.engine import HookSet
from mechlens.attribution.execution import can_fold, fold_into, optimizing

__all__ = ["MIN_SAVED_FRACTION", "LocalSplit", "local_split"]

logger = logging.getLogger(__name__)

_POINTWISE_MODULES = (
    nn.BatchNorm2d, nn.Identity, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.GELU, nn.SiLU, nn.Hardswish,
    nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.ELU, nn.Dropout, nn.Dropout2d,
)
_POINTWISE_FUNCTIONS = {operator.add, operator.mul, operator.iadd, torch.add, torch.mul, torch.relu, F.relu, F.gelu, F.silu}
_POINTWISE_METHODS = {"relu", "relu_", "add", "add_", "mul", "mul_", "contiguous"}

Interval = tuple[int, int]  # [start, stop) along one spatial dimension
# Below this share of the network's convolution work saved, the crops' copies and the smaller,
# less efficient convolutions eat the gain (measured on resnet18 at 96 and 224 px, one CPU thread).
MIN_SAVED_FRACTION = 0.25


@dataclass(frozen=True)
class _Window:
    """A sliding op's geometry along one dimension."""

    kernel: int
    stride: int
    padding: int
    dilation: int

    def forward(self, changed: Interval, out_size: int) -> Interval:
        """Outputs reading any input in ``changed``."""
        a, b = changed
        reach = self.dilation * (self.kernel - 1)
        lo = max(0, -((-(a + self.padding - reach)) // self.stride))
        hi = min(out_size, (b - 1 + self.padding) // self.stride + 1)
        return (lo, max(lo, hi))

    def backward(self, needed: Interval, in_size: int) -> Interval:
        """Inputs that outputs ``needed`` read."""
        c, e = needed
        lo = max(0, c * self.stride - self.padding)
        hi = min(in_size, (e - 1) * self.stride - self.padding + self.dilation * (self.kernel - 1) + 1)
        return (lo, max(lo, hi))

    def out_size(self, in_size: int) -> int:
        return (in_size + 2 * self.padding - self.dilation * (self.kernel - 1) - 1) // self.stride + 1


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _sliding(module: nn.Module) -> tuple[_Window, _Window] | None:
    """The per-dimension geometry of an exact ``Conv2d`` / ``MaxPool2d`` / ``AvgPool2d`` whose
    output is a local function of its input; None for anything else."""
    if type(module) is nn.Conv2d:
        if module.padding_mode != "zeros" or isinstance(module.padding, str):
            return None
        k, s, p, d = (_pair(v) for v in (module.kernel_size, module.stride, module.padding, module.dilation))
    elif type(module) in (nn.MaxPool2d, nn.AvgPool2d):
        if module.ceil_mode or getattr(module, "return_indices", False):
            return None
        k, s, p = (_pair(v) for v in (module.kernel_size, module.stride or module.kernel_size, module.padding))
        d = _pair(getattr(module, "dilation", 1))
    else:
        return None
    return _Window(k[0], s[0], p[0], d[0]), _Window(k[1], s[1], p[1], d[1])


class _Tracer(fx.Tracer):
    """Standard tracing, with the modules a feature reads kept whole (so hooks on them fire)."""

    def __init__(self, leaves: Iterable[str]) -> None:
        super().__init__()
        self._leaves = set(leaves)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_qualified_name in self._leaves or super().is_leaf_module(m, module_qualified_name)


class _Segment:
    """One stretch of local ops between two cuts: ``module`` maps the previous cut activation (or
    the input) to the next; ``nodes[0]`` stands for its input."""

    def __init__(self, module: fx.GraphModule, nodes: list[fx.Node], windows: dict[str, tuple[_Window, _Window]],
                 sizes: dict[str, tuple[int, int]], strides: dict[str, int]) -> None:
        self.module = module
        self.nodes = nodes
        self.windows = windows
        self.sizes = sizes
        self.name = nodes[-1].name
        base = strides[nodes[0].name]
        # crops start on multiples of ``align`` (input positions) so every grid inside aligns
        self.align = math.lcm(*[strides[n.name] // base for n in nodes])
        self.out_stride = strides[nodes[-1].name] // base

    def changed(self, box: tuple[Interval, Interval]) -> tuple[Interval, Interval]:
        """The region of the output that a change of the input inside ``box`` can alter."""
        changed = {self.nodes[0].name: box}
        for node in self.nodes[1:]:
            parents = [changed[a.name] for a in node.all_input_nodes if a.name in changed]
            hull = tuple((min(p[d][0] for p in parents), max(p[d][1] for p in parents)) for d in range(2))
            geometry = self.windows.get(node.name)
            if geometry is not None:
                hull = tuple(geometry[d].forward(hull[d], self.sizes[node.name][d]) for d in range(2))
            changed[node.name] = hull  # type: ignore[assignment]
        return changed[self.name]

    def crop_for(self, needed: tuple[Interval, Interval]) -> tuple[Interval, Interval]:
        """The input region whose output is exact on ``needed``, aligned to :attr:`align`."""
        required: dict[str, tuple[Interval, Interval]] = {self.name: needed}
        for node in reversed(self.nodes[1:]):
            if node.name not in required:
                continue
            box = required[node.name]
            geometry = self.windows.get(node.name)
            if geometry is not None:
                in_size = self.sizes[node.all_input_nodes[0].name]
                box = tuple(geometry[d].backward(box[d], in_size[d]) for d in range(2))  # type: ignore[assignment]
            for parent in node.all_input_nodes:
                old = required.get(parent.name)
                required[parent.name] = box if old is None else tuple(
                    (min(old[d][0], box[d][0]), max(old[d][1], box[d][1])) for d in range(2)
                )  # type: ignore[assignment]
        (y0, y1), (x0, x1) = required[self.nodes[0].name]
        return ((y0 // self.align) * self.align, y1), ((x0 // self.align) * self.align, x1)

    def work(self, modules: dict[str, nn.Module], crop: tuple[Interval, Interval] | None = None) -> float:
        """Convolution multiply-adds on the whole input, or on ``crop`` of it."""
        extent: dict[str, tuple[int, int]] = {}
        total = 0.0
        for node in self.nodes:
            if node is self.nodes[0]:
                extent[node.name] = self.sizes[node.name] if crop is None else (crop[0][1] - crop[0][0], crop[1][1] - crop[1][0])
                continue
            parent = extent[node.all_input_nodes[0].name]
            geometry = self.windows.get(node.name)
            extent[node.name] = parent if geometry is None else (geometry[0].out_size(parent[0]), geometry[1].out_size(parent[1]))
            module = modules.get(str(node.target)) if node.op == "call_module" else None
            if isinstance(module, nn.Conv2d):
                total += module.weight.numel() * max(extent[node.name][0], 0) * max(extent[node.name][1], 0)
        return total


Plan = list[tuple[tuple[Interval, Interval], tuple[Interval, Interval]]]


class LocalSplit:
    """A model cut into local ``segments`` (input -> cut 1 -> ... -> cut n) and a ``suffix``
    (cut n -> output), with the geometry to crop and paste per occlusion window."""

    def __init__(self, segments: list[_Segment], suffix: fx.GraphModule, saved_fraction: float) -> None:
        self.segments = segments
        self.suffix = suffix
        self.saved_fraction = saved_fraction  # of the whole network's convolution work, central window

    @property
    def cuts(self) -> list[str]:
        return [segment.name for segment in self.segments]

    def plan(self, box: tuple[Interval, Interval]) -> Plan:
        """Per segment, for an occluded input ``box``: (the crop of its input to run, the changed
        region of its output)."""
        steps = []
        for segment in self.segments:
            box = segment.changed(box)
            steps.append((segment.crop_for(box), box))
        return steps

    def uniform_plans(self, boxes: Sequence[tuple[Interval, Interval]]) -> list[Plan]:
        """:meth:`plan` for every box, with each segment's crops widened to one common size (the
        largest, shifted inward at the far border), so every window stacks into one batch and
        every pass allocates the same sizes (a mix of shapes fragments the heap: measured +60%
        peak memory). A crop only ever grows, stays aligned and inside its map, so it still holds
        everything its changed region reads."""
        plans = [self.plan(box) for box in boxes]
        for level, segment in enumerate(self.segments):
            size = segment.sizes[segment.nodes[0].name]
            extents = [_uniform_extent(max(p[level][0][d][1] - p[level][0][d][0] for p in plans), size[d], segment.align)
                       for d in range(2)]
            for p in plans:
                crop, changed = p[level]
                starts = [min(crop[d][0], size[d] - extents[d]) for d in range(2)]
                p[level] = (tuple((starts[d], starts[d] + extents[d]) for d in range(2)), changed)  # type: ignore[assignment]
        return plans


def _uniform_extent(extent: int, size: int, align: int) -> int:
    """The smallest crop extent >= ``extent`` whose far-border position ``size - extent`` is a
    multiple of ``align`` (the whole map when none is smaller)."""
    if extent >= size:
        return size
    return size - ((size - extent) // align) * align


def _is_local(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        module = modules.get(str(node.target))
        if module is None:
            return False
        return type(module) in _POINTWISE_MODULES or _sliding(module) is not None  # exact types: subclasses may not be local
    if node.op == "call_function":
        if node.target not in _POINTWISE_FUNCTIONS:
            return False
    elif node.op == "call_method":
        if node.target not in _POINTWISE_METHODS:
            return False
    else:
        return False
    # operands: prefix nodes (local) or Python scalars; never a stored tensor (a positional
    # constant would not crop)
    def scalar_or_node(value: object) -> bool:
        return isinstance(value, (fx.Node, int, float, bool)) or value is None
    return all(scalar_or_node(a) for a in node.args) and all(scalar_or_node(v) for v in node.kwargs.values())


def _subgraph(gm: fx.GraphModule, nodes: list[fx.Node], source: fx.Node | None, sink: fx.Node | None) -> fx.GraphModule:
    """``nodes`` as a module: ``source`` (or the graph's own placeholder when None) becomes the
    input; ``sink``'s value (or the graph's output when None) the output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if source is not None:
        env[source] = graph.placeholder("x")
    for node in nodes:
        if node is source:
            continue
        env[node] = graph.node_copy(node, lambda n: env[n])
    if sink is not None:
        graph.output(env[sink])
    return fx.GraphModule(gm, graph)


def local_split(
    model: nn.Module, example: torch.Tensor, window: tuple[int, int], *, keep: Iterable[str] = (), fold: bool | None = None,
) -> LocalSplit | None:
    """Cut ``model`` for occlusion windows of spatial size ``window`` on inputs like ``example``
    (``[B, C, H, W]``); modules named in ``keep`` (the layers a feature reads) stay whole and
    after the cuts. None when the model cannot be traced or no cut saves work. ``fold`` (default:
    on unless inside :func:`~mechlens.attribution.exact_execution`): each segment's eval
    BatchNorms are folded into the convolutions feeding them (copies of the prefix's few weights:
    the crops then skip a pass over, and an allocation of, every BatchNorm's output)."""
    fold = optimizing() if fold is None else fold
    keep = [k for k in keep if k]
    try:
        gm = fx.GraphModule(model, _Tracer(keep).trace(model))
    except Exception as error:  # any tracing failure only means "no local recompute"
        logger.debug("torch.fx could not trace %s (%s): occlusion runs the full forward", type(model).__name__, error)
        return None
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    if not nodes or nodes[0].op != "placeholder" or sum(n.op == "placeholder" for n in nodes) != 1:
        return None
    position = {n: i for i, n in enumerate(nodes)}
    last_use = [max((position[u] for u in n.users), default=-1) for n in nodes]
    cuts: list[int] = []
    reach = 0  # the latest use of any node so far
    for i, node in enumerate(nodes[1:], start=1):
        if not _is_local(node, modules) or (node.op == "call_module" and str(node.target) in keep):
            break
        reach = max(reach, last_use[i - 1])
        if reach <= i:  # everything after reads this node alone
            cuts.append(i)
    if not cuts:
        return None
    from torch.fx.passes.shape_prop import ShapeProp

    probe = _subgraph(gm, nodes[: cuts[-1] + 1], None, nodes[cuts[-1]])
    try:
        ShapeProp(probe).propagate(example[:1])
    except Exception as error:
        logger.debug("shape propagation failed (%s): occlusion runs the full forward", error)
        return None
    sizes: dict[str, tuple[int, int]] = {}
    windows: dict[str, tuple[_Window, _Window]] = {}
    strides: dict[str, int] = {}
    for node in probe.graph.nodes:
        if node.op == "output":
            continue
        meta = node.meta.get("tensor_meta")
        if meta is None or len(meta.shape) != 4:
            return None
        sizes[node.name] = (int(meta.shape[2]), int(meta.shape[3]))
        module = modules.get(str(node.target)) if node.op == "call_module" else None
        geometry = _sliding(module) if module is not None else None
        base = max((strides[p.name] for p in node.all_input_nodes if p.name in strides), default=1)
        if geometry is not None:
            if geometry[0].stride != geometry[1].stride:
                return None
            windows[node.name] = geometry
            base *= geometry[0].stride
        strides[node.name] = base
    # one segment per cut while a window's crop still saves work; the rest is the suffix
    height, width = int(example.shape[-2]), int(example.shape[-1])
    cy, cx = max(0, (height - window[0]) // 2), max(0, (width - window[1]) // 2)
    box = ((cy, cy + window[0]), (cx, cx + window[1]))
    segments: list[_Segment] = []
    saved = 0.0
    start = 0
    for cut in cuts:
        if sum(type(modules.get(str(n.target))) is nn.Conv2d for n in nodes[start + 1 : cut + 1] if n.op == "call_module") < 2:
            # extend short segments to the next cut: each boundary keeps a clean activation and
            # costs a paste (a stem conv alone would keep the largest activation of the network)
            continue
        segment = _Segment(_subgraph(gm, nodes[start : cut + 1], nodes[start] if start else None, nodes[cut]),
                           nodes[start : cut + 1], windows, sizes, strides)
        changed = segment.changed(box)
        full, local = segment.work(modules), segment.work(modules, segment.crop_for(changed))
        if local > 0.8 * full:  # cropping no longer pays for its copies
            break
        if fold:
            segment.module = _fold_batchnorms(segment.module)
        segments.append(segment)
        saved += full - local
        box, start = changed, cut
    whole = _whole_work(gm, modules, example)
    if not segments or saved < MIN_SAVED_FRACTION * whole:
        return None
    suffix = _subgraph(gm, nodes[start:], nodes[start], None)
    return LocalSplit(segments, suffix, saved / max(whole, 1e-12))


def _fold_batchnorms(gm: fx.GraphModule) -> fx.GraphModule:
    """``gm`` with every eval BatchNorm whose only input is an ``nn.Conv2d``'s output (used by
    nothing else) folded into a copy of that convolution; the model's own modules are untouched."""
    modules = dict(gm.named_modules())
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module" or not can_fold(modules.get(str(node.target))):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and type(modules.get(str(source.target))) is nn.Conv2d):
            continue
        original = modules[str(source.target)]
        conv = copy.deepcopy(original, memo={id(t): t for t in (*original.parameters(), *original.buffers())})
        fold_into(conv, modules[str(node.target)], channels_last=original.weight.device.type == "cpu")
        name = f"mechlens_folded_{folded}"
        folded += 1
        gm.add_submodule(name, conv)
        source.target = name
        node.replace_all_uses_with(source)
        gm.graph.erase_node(node)
    if folded:
        gm.graph.lint()
        gm.delete_all_unused_submodules()
        gm.recompile()
    return gm


def _whole_work(gm: fx.GraphModule, modules: dict[str, nn.Module], example: torch.Tensor) -> float:
    """Convolution multiply-adds of one full forward (for the reported saved fraction)."""
    work = [0.0]

    def count(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        work[0] += module.weight.numel() * output.shape[-1] * output.shape[-2]

    with HookSet() as hooks, torch.no_grad():
        for m in modules.values():
            if isinstance(m, nn.Conv2d):
                hooks.forward(m, count)
        gm(example[:1])
    return work[0]
