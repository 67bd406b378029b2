"""The model side of feature visualization: which module, which normalization, which device, and
a scoped forward that returns the activations an objective reads.

:func:`model_session` registers every hook for the whole optimization (not once per step) and
removes them in ``finally``; it puts the model in eval mode and restores every module's
``training`` flag afterwards.
With ``stop_early`` the forward stops once every needed layer has run (the head and any later
stage are never computed). In ``"auto"`` mode the first forward runs in full and checks that
each hooked module ran exactly once; only then is stopping switched on (a module called twice
per forward, like torchvision's shared ``relu``, must not stop at its first call).
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from mechlens.engine import HookSet, StopAfter, capture, eval_mode, unwrap
from mechlens.features.base import OUTPUT
from mechlens.features.layout import LayerLayout, infer_layouts, layout_scope

__all__ = ["ModelSession", "declared_input_size", "model_device", "model_session", "resolve_model"]


def declared_input_size(module: nn.Module) -> tuple[int, int] | None:
    """The one input size ``(H, W)`` a model says it takes, or ``None`` when it does not say."""
    embed = getattr(module, "patch_embed", None)
    size = getattr(embed, "img_size", None)
    if size is not None and getattr(embed, "strict_img_size", False) and not getattr(module, "dynamic_img_size", False):
        return (int(size[0]), int(size[1])) if not isinstance(size, int) else (size, size)
    if type(module).__name__ == "VisionTransformer" and isinstance(getattr(module, "image_size", None), int):
        return (module.image_size, module.image_size)  # torchvision's ViT asserts this size
    return None

Normalize = Callable[[torch.Tensor], torch.Tensor]


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def resolve_model(model: Any, preprocessing: Any = None) -> tuple[nn.Module, Normalize]:
    """``(module, normalize)`` from an ``nn.Module`` or a :class:`~mechlens.models.LoadedModel`.

    ``preprocessing``: ``None`` uses the LoadedModel's own normalization (identity for a bare
    module); a :class:`~mechlens.models.Preprocessing` or anything with ``.normalize``; any
    callable ``images in [0,1] -> model input``; ``False`` for none.
    """
    module = unwrap(model)
    if module is not model and preprocessing is None:
        preprocessing = getattr(model, "preprocessing", None)
    if preprocessing is None or preprocessing is False:
        return module, _identity
    normalize = getattr(preprocessing, "normalize", None)
    if callable(normalize):
        return module, normalize
    if callable(preprocessing):
        return module, preprocessing
    raise TypeError(
        f"preprocessing must be a Preprocessing, a callable or False, got {type(preprocessing).__name__}"
    )


def model_device(module: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); CPU for a parameter-free model."""
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device("cpu")


def model_dtype(module: nn.Module) -> torch.dtype:
    for tensor in module.parameters():
        if tensor.is_floating_point():
            return tensor.dtype
    return torch.float32


class ModelSession:
    """Runs the model and returns ``{layer: activation}`` (``""`` = the output) on the graph."""

    def __init__(self, module: nn.Module, cap: Any, hooked: list[str], needs_output: bool,
                 stopper: StopAfter | None, auto: bool) -> None:
        self.module = module
        self.cap = cap
        self.hooked = hooked
        self.needs_output = needs_output
        self.stopper = stopper
        self.auto = auto
        self.forwards = 0
        self.layouts: dict[str, LayerLayout] = {}  # filled on the first forward; the session's layout scope

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.hooked and not self.needs_output:
            return {}  # the objective reads no activation (image penalties only): skip the model
        if self.hooked and not self.layouts:
            self.layouts.update(infer_layouts(self.module, self.hooked, x.detach(), strict=False))
        stopper = self.stopper
        output = stopper.run(self.module, x) if stopper is not None else self.module(x)
        self.forwards += 1
        activations: dict[str, torch.Tensor] = {}
        if self.cap is not None:
            self.cap.check_all_fired()
            activations = {name: self.cap[name] for name in self.hooked}
            if stopper is not None and not stopper.armed and self.auto:
                # arm only if every hooked module ran exactly once (its output is the one we want)
                stopper.armed = all(self.cap.calls(name) == 1 for name in self.hooked)
        if self.needs_output:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"the model output is a {type(output).__name__}, not a logits tensor; a feature on the "
                    "output needs model(x) to return [B, classes]: say which output that is with "
                    "mechlens.engine.select_output(model, 'logits' | KEY | INDEX)"
                )
            activations[OUTPUT] = output
        return activations

    @property
    def stops_early(self) -> bool:
        return self.stopper is not None and self.stopper.armed


@contextmanager
def model_session(module: nn.Module, layers: Sequence[str], *, stop_early: bool | None = None) -> Iterator[ModelSession]:
    """Hook ``layers`` of ``module`` for the ``with`` block (see the module docstring).

    ``stop_early``: ``None`` = auto (stop after the last needed layer once the first forward
    showed it is safe), ``True`` = from the first forward, ``False`` = never.
    """
    hooked = [name for name in dict.fromkeys(layers) if name != OUTPUT]
    needs_output = OUTPUT in layers
    use_stop = bool(hooked) and not needs_output and stop_early is not False
    with eval_mode(module), HookSet() as hooks, \
            capture(module, hooked, grads=True) if hooked else nullcontext() as cap:
        stopper = StopAfter(module, hooked, hooks, armed=stop_early is True) if use_stop else None
        session = ModelSession(module, cap, hooked, needs_output, stopper, auto=stop_early is None)
        with layout_scope(session.layouts):
            yield session
