"""Which layer a CAM reads when none is named: the last top-level module with a spatial map (a
ViT's last block norm). One rule for the CLI and the Python API; imports nothing of the methods."""
from __future__ import annotations

from torch import nn

from mechlens.engine import unwrap

__all__ = ["suggest_cam_layer", "vit_cam_layer"]


def vit_cam_layer(model: nn.Module) -> str:
    """A timm ViT's usual Grad-CAM layer: the first norm of the last block (its patch tokens still
    reach the output through the last attention)."""
    model = unwrap(model)
    blocks = getattr(model, "blocks", None)
    if blocks is None or len(blocks) == 0 or not hasattr(blocks[-1], "norm1"):
        raise ValueError(f"{type(model).__name__} has no timm-style blocks[-1].norm1; pass layer= explicitly")
    return f"blocks.{len(blocks) - 1}.norm1"


def suggest_cam_layer(model: nn.Module, input_size: tuple[int, ...]) -> str:
    """The last top-level module whose output is a spatial map (conv stage, or ViT tokens via
    :func:`vit_cam_layer`): a reasonable default ``layer=`` for CAMs."""
    from mechlens.features.shapes import layer_shapes

    model = unwrap(model)
    if hasattr(model, "blocks") and hasattr(model, "patch_embed"):
        return vit_cam_layer(model)
    top = [name for name, _ in model.named_children()]
    infos = layer_shapes(model, input_size, top)
    spatial = [
        info.name for info in infos
        if isinstance(info.output_shape, tuple) and len(info.output_shape) == 4
        and all(isinstance(s, int) for s in info.output_shape) and info.output_shape[2] * info.output_shape[3] > 1
    ]
    if not spatial:
        raise ValueError(f"no top-level module of {type(model).__name__} outputs a spatial map; pass layer= explicitly")
    return spatial[-1]
