"""The one owner of hooks: every forward/backward hook mechlens puts on a model goes through here.

:class:`HookSet` registers hooks for the duration of a ``with`` block and removes them in
``finally`` (also when the forward raises). :func:`unwrap` is the one way to get the
``nn.Module`` out of what a user passes (a module or a ``LoadedModel``); :func:`eval_mode` the
one train/eval policy (eval for the block, then every module gets *its own* flag back, so models
that mix train and eval modules survive). :class:`StopAfter` is the one way to cut a forward
short once the layers a tool needs have run, and :func:`replace_output` the hook point where an
intervention edits a layer's output.

Documented exceptions (not module hooks, so not here): autograd *tensor* hooks
(``Tensor.register_hook``) that implement a method's own backward rule, e.g. Guided
Backpropagation's clamp of negative gradients in :mod:`mechlens.attribution.gradients`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn

from mechlens._context import inferring_layouts
from mechlens.models.layers import get_module

__all__ = ["HookSet", "StopAfter", "StopForward", "eval_mode", "replace_output", "unwrap", "unwrap_with_preprocessing"]


def unwrap(model: Any) -> nn.Module:
    """The ``nn.Module`` behind ``model`` (itself, or a ``LoadedModel``'s ``.model``)."""
    if isinstance(model, nn.Module):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        return inner
    raise TypeError(f"expected an nn.Module or a LoadedModel, got {type(model).__name__}")


def unwrap_with_preprocessing(model: Any, preprocessing: Any = None) -> tuple[nn.Module, Any]:
    """``(module, preprocessing)``: the one given, else a ``LoadedModel``'s own (``None`` for a module)."""
    net = unwrap(model)
    if preprocessing is None and net is not model:
        preprocessing = getattr(model, "preprocessing", None)
    return net, preprocessing


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module.eval()`` for the block; afterwards every submodule gets its own flag back."""
    modes = [(m, m.training) for m in module.modules()]
    try:
        module.eval()
        yield module
    finally:
        for m, training in modes:
            m.training = training


class HookSet:
    """Hooks registered through one object and removed together (``with`` block or :meth:`remove`)."""

    def __init__(self) -> None:
        self._handles: list[Any] = []

    def forward(self, module: nn.Module, fn: Callable[..., Any], *, prepend: bool = False) -> "HookSet":
        """``fn(module, args, output)`` after ``module`` runs; a non-``None`` return replaces the output."""
        self._handles.append(module.register_forward_hook(fn, prepend=prepend))
        return self

    def pre(self, module: nn.Module, fn: Callable[..., Any], *, prepend: bool = False) -> "HookSet":
        """``fn(module, args)`` before ``module`` runs; a non-``None`` return replaces the args."""
        self._handles.append(module.register_forward_pre_hook(fn, prepend=prepend))
        return self

    def layer(self, model: nn.Module, name: str, fn: Callable[..., Any]) -> "HookSet":
        """A forward hook on the module called ``name`` in ``model``."""
        return self.forward(get_module(model, name), fn)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()

    def __len__(self) -> int:
        return len(self._handles)


class StopForward(Exception):
    """Raised from a hook to end a forward once every needed layer has run."""


class StopAfter:
    """Cut a forward short after ``layers`` have all run (the rest of the network is skipped).

    Only valid when each layer runs once per forward; ``armed=False`` lets a first forward show
    that (see :meth:`arm_if_single_calls`) before stopping is switched on.
    """

    def __init__(self, model: nn.Module, layers: Sequence[str], hooks: HookSet, *, armed: bool = True) -> None:
        self.needed = set(layers)
        self.fired: set[str] = set()
        self.armed = armed and bool(self.needed)
        for name in self.needed:
            hooks.layer(model, name, self._hook_for(name))

    def _hook_for(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not self.armed or inferring_layouts():
                return
            self.fired.add(name)
            if self.fired >= self.needed:
                raise StopForward
        return hook

    def run(self, model: nn.Module, *args: Any) -> Any:
        """``model(*args)``; ``None`` when the forward was stopped."""
        self.fired.clear()
        try:
            return model(*args)
        except StopForward:
            return None


@contextmanager
def replace_output(model: Any, layer: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Inside the block, ``layer``'s output is replaced by ``fn(output)`` (the intervention point).
    mechlens' layout probe sees the unedited output."""
    net = unwrap(model)

    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if inferring_layouts():
            return None
        return fn(output)

    with HookSet() as hooks:
        hooks.layer(net, layer, hook)
        yield
