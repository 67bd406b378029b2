"""What each layer of a model outputs: shapes, call counts and layouts from one dry forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from mechlens.engine import HookSet, eval_mode
from mechlens.features.layout import infer_layouts
from mechlens.models.layers import Shape, layer_names, resolve_layers

__all__ = ["LayerInfo", "layer_shapes", "output_shape"]


def output_shape(output: Any) -> Shape:
    """Shape of a module output: a tuple for a tensor, nested tuples/dicts for structured
    outputs (``None`` entries kept as ``None``, other objects as their type name)."""
    if isinstance(output, torch.Tensor):
        return tuple(output.shape)
    if isinstance(output, (tuple, list)):
        return tuple(output_shape(o) for o in output)
    if isinstance(output, dict):
        return {k: output_shape(v) for k, v in output.items()}
    if output is None:
        return None
    return type(output).__name__


@dataclass(frozen=True)
class LayerInfo:
    """One layer of a model: its name, module type, output shape during the dry forward (with the
    batch dimension; ``None`` if it never ran), how often it ran, and its parameter count
    (including submodules), and its layout as :func:`mechlens.features.infer_layouts` knows it."""

    name: str
    type: str
    output_shape: Shape
    calls: int
    num_params: int
    layout: str = ""  # "nchw", "nhwc", "nlc", ... as the model states it; "" when it does not
    num_prefix_tokens: int | None = None  # CLS/register tokens of a token map, where known


def layer_shapes(
    model: nn.Module,
    input_size: Sequence[int],
    layers: str | Sequence[str] | None = None,
    *,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    seed: int = 0,
) -> list[LayerInfo]:
    """Run one dry forward pass (``torch.no_grad``, eval mode, seeded random input of shape
    ``[batch_size, *input_size]``) and report the output shape of each layer (all layers, or
    the names/patterns in ``layers``). Hooks are removed and ``model.training`` restored even if
    the forward raises. A module called several times reports its last call."""
    names = resolve_layers(model, layers) if layers is not None else layer_names(model)
    modules = dict(model.named_modules())
    first = next(model.parameters(), None)
    if device is None:
        device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else torch.float32
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand((batch_size, *tuple(input_size)), generator=generator).to(device=device, dtype=dtype)
    shapes: dict[str, Shape] = {}
    calls: dict[str, int] = {name: 0 for name in names}

    def make_hook(name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            shapes[name] = output_shape(output)
            calls[name] += 1

        return hook

    with HookSet() as hooks, eval_mode(model), torch.no_grad():
        for name in names:
            hooks.forward(modules[name], make_hook(name))
        try:
            model(x)
        except Exception as error:
            raise RuntimeError(
                f"dry forward of {type(model).__name__} on an input of shape {tuple(x.shape)} "
                f"failed: {error}. Is input_size {tuple(input_size)} right for this model?"
            ) from error
    tensors = [name for name in names if isinstance(shapes.get(name), tuple) and all(isinstance(v, int) for v in shapes[name])]
    known = infer_layouts(model, tensors, x, strict=False) if tensors else {}
    return [
        LayerInfo(
            name=name,
            type=type(modules[name]).__name__,
            output_shape=shapes.get(name),
            calls=calls[name],
            num_params=sum(p.numel() for p in modules[name].parameters()),
            layout=known[name].layout if name in known else "",
            num_prefix_tokens=known[name].num_prefix_tokens if name in known else None,
        )
        for name in names
    ]
