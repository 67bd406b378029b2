"""Scoped activation capture for interactive use.

>>> with capture(model, ["stage2", "stage3.*"]) as cap:
...     logits = model(images)
>>> cap["stage2"].shape          # the latest output of that layer (detached copy)

Semantics, decided once for every tool built on this:

* **Scope.** Forward hooks are registered on entry and removed in ``finally`` on exit, also when
  the forward (or anything else in the block) raises. The :class:`Capture` stays readable after
  the block.
* **Which output.** ``cap[name]`` is the layer's latest output. A module can run several times per
  forward (torchvision ResNet blocks call one ``relu`` module two or three times);
  :meth:`Capture.outputs` lists every call of the latest forward of ``model`` in call order.
  Outputs are reset each time ``model``'s own forward starts, so memory stays bounded by one
  forward pass (when you call submodules directly, they accumulate until :meth:`Capture.clear`).
  Structured outputs (tuples, dicts) are stored with the same structure.
* **Detached copies by default.** Without ``grads`` each output is stored as a detached copy
  (``to_cpu=True`` copies straight to host memory).
* **``grads=True``.** The stored tensor is the module's real output, attached to the graph, so
  ``torch.autograd.grad(logit, cap["stage3"])`` (or :meth:`Capture.gradients`) works. Downstream
  layers receive a clone instead, so later in-place operations cannot change what was stored.
* **In-place operations.** With ``nn.ReLU(inplace=True)`` right after a hooked layer (``bn`` in
  ``conv -> bn -> relu``), the tensor the hook sees is overwritten by the ReLU a moment later.
  Holding a reference is therefore not enough: without ``grads`` we copy it in the hook; with
  ``grads`` we keep the original and hand the clone downstream (the clone is what the ReLU
  overwrites; the original stays on the autograd path through ``CloneBackward``).
* **Layers that never ran.** Reading such a layer raises :class:`LayerNotFiredError` (a layer on a
  branch the forward skipped, a typo-free name of an unused module); :meth:`Capture.check_all_fired`
  checks all of them at once.
"""
from __future__ import annotations

import difflib
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from mechlens._context import inferring_layouts
from mechlens.engine.hooks import HookSet, unwrap
from mechlens.models.layers import get_module, resolve_layers

__all__ = ["Capture", "LayerNotFiredError", "capture"]


class LayerNotFiredError(RuntimeError):
    """A hooked layer produced no output during the forward pass."""


def _map_tensors(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
        return type(obj)(*(_map_tensors(o, fn) for o in obj))
    if isinstance(obj, (tuple, list)):
        return type(obj)(_map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    return obj


class _OutputHook:
    """Forward hook of one layer; a small callable object rather than a closure."""

    def __init__(self, capture: "Capture", name: str) -> None:
        self.capture = capture
        self.name = name

    def __call__(self, module: nn.Module, args: Any, output: Any) -> Any:
        if inferring_layouts():  # the layout probe's forward is not one of the user's
            return None
        return self.capture._record(self.name, output)


class _ForwardStart:
    """Pre-hook on the root model: a new forward pass starts, forget the previous one."""

    def __init__(self, capture: "Capture") -> None:
        self.capture = capture

    def __call__(self, module: nn.Module, args: Any) -> None:
        if not inferring_layouts():
            self.capture._new_forward()


class Capture(Mapping[str, Any]):
    """Layer name -> latest output, filled by :func:`capture`'s hooks (see the module docstring).

    Iterating yields the resolved layer names; reading a layer that did not run raises
    :class:`LayerNotFiredError`.
    """

    def __init__(self, model: nn.Module, layers: list[str], *, grads: bool, detach: bool, to_cpu: bool) -> None:
        self.model_name = type(model).__name__
        self.layers = list(layers)
        self.grads = grads
        self.detach = detach
        self.to_cpu = to_cpu
        self.forward_passes = 0
        self.active = False
        self._outputs: dict[str, list[Any]] = {name: [] for name in self.layers}

    # -- Mapping protocol
    def __getitem__(self, name: str) -> Any:
        return self.outputs(name)[-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name: object) -> bool:
        return name in self._outputs

    def __repr__(self) -> str:
        fired = sum(1 for n in self.layers if self._outputs[n])
        state = "active" if self.active else "closed"
        return (
            f"Capture({self.model_name}, {len(self.layers)} layers, {fired} fired, "
            f"forward_passes={self.forward_passes}, grads={self.grads}, {state})"
        )

    # -- reading
    def outputs(self, name: str) -> list[Any]:
        """Every output of layer ``name`` during the latest forward, in call order."""
        if name not in self._outputs:
            close = difflib.get_close_matches(name, self.layers, n=5, cutoff=0.5)
            hint = f" Closest captured: {', '.join(close)}." if close else ""
            raise KeyError(
                f"layer {name!r} was not requested in this capture.{hint} Captured layers: "
                f"{', '.join(self.layers[:12])}{' ...' if len(self.layers) > 12 else ''}"
            )
        stored = self._outputs[name]
        if not stored:
            raise LayerNotFiredError(self._not_fired_message([name]))
        return list(stored)

    def calls(self, name: str) -> int:
        """How many times layer ``name`` ran in the latest forward."""
        if name not in self._outputs:
            self.outputs(name)  # raises the KeyError with close names
        return len(self._outputs[name])

    @property
    def fired(self) -> list[str]:
        """Layers that produced at least one output in the latest forward."""
        return [n for n in self.layers if self._outputs[n]]

    def check_all_fired(self) -> None:
        """Raise :class:`LayerNotFiredError` naming every requested layer that did not run."""
        silent = [n for n in self.layers if not self._outputs[n]]
        if silent:
            raise LayerNotFiredError(self._not_fired_message(silent))

    def clear(self) -> None:
        """Drop every stored output (hooks stay registered while the block is active)."""
        for stored in self._outputs.values():
            stored.clear()

    def gradients(
        self,
        outputs: torch.Tensor | Sequence[torch.Tensor],
        layers: str | Sequence[str] | None = None,
        *,
        grad_outputs: torch.Tensor | Sequence[torch.Tensor] | None = None,
        retain_graph: bool | None = None,
        create_graph: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Gradients of ``outputs`` w.r.t. the latest output of each layer (all captured layers by
        default), via ``torch.autograd.grad``. Needs ``capture(..., grads=True)`` and a forward
        run with gradients enabled."""
        if not self.grads:
            raise ValueError(
                "gradients w.r.t. activations need capture(model, layers, grads=True): without it the "
                "stored activations are detached copies that are not part of the graph"
            )
        names = self.layers if layers is None else ([layers] if isinstance(layers, str) else list(layers))
        tensors = []
        for name in names:
            value = self[name]
            if not isinstance(value, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} returned a {type(value).__name__}, not a tensor; take the "
                    "gradient w.r.t. the element you need with torch.autograd.grad directly"
                )
            if not value.requires_grad:
                raise RuntimeError(
                    f"the captured output of {name!r} does not require grad: run the forward with "
                    "gradients enabled (not under torch.no_grad / inference_mode) and with inputs or "
                    "parameters that require grad"
                )
            tensors.append(value)
        grads = torch.autograd.grad(
            outputs, tensors, grad_outputs=grad_outputs, retain_graph=retain_graph,
            create_graph=create_graph, allow_unused=True,
        )
        unused = [n for n, g in zip(names, grads) if g is None]
        if unused:
            raise RuntimeError(f"outputs do not depend on the captured output of: {', '.join(unused)}")
        return dict(zip(names, grads))

    # -- hook side
    def _new_forward(self) -> None:
        self.forward_passes += 1
        self.clear()

    def _snapshot(self, tensor: torch.Tensor) -> torch.Tensor:
        source = tensor if not self.detach else tensor.detach()
        if self.to_cpu and source.device.type != "cpu":
            return source.to("cpu")  # a copy already
        # A copy even on the same device: a following in-place op (ReLU(inplace=True), `+=` in a
        # residual block) would otherwise overwrite the values we hold a reference to.
        return source.clone()

    def _record(self, name: str, output: Any) -> Any:
        if self.grads:
            # Keep the real output (on the autograd path) and hand downstream layers a clone,
            # which is what later in-place ops modify; gradients flow back through the clone.
            self._outputs[name].append(output)
            return _map_tensors(output, torch.Tensor.clone)
        self._outputs[name].append(_map_tensors(output, self._snapshot))
        return None

    def _not_fired_message(self, names: list[str]) -> str:
        if self.forward_passes == 0 and not any(self._outputs.values()):
            return (
                f"no output captured for {', '.join(names)}: the model has not been run inside the "
                "capture block yet (call model(x) inside `with capture(...)`)"
            )
        ran = self.fired
        return (
            f"layer(s) {', '.join(names)} of {self.model_name} did not run during the latest forward "
            f"pass, so there is nothing to read (layers that ran: {', '.join(ran[:8]) or 'none'}"
            f"{' ...' if len(ran) > 8 else ''}). The module exists but the forward never calls it "
            "(an unused module, a skipped branch, or a module the forward bypasses)."
        )


@contextmanager
def capture(
    model: nn.Module,
    layers: str | Sequence[str],
    *,
    grads: bool = False,
    detach: bool | None = None,
    to_cpu: bool = False,
) -> Iterator[Capture]:
    """Hook ``layers`` (names or glob patterns, see :mod:`mechlens.models.layers`) of ``model``
    for the duration of the ``with`` block and yield a :class:`Capture`.

    ``grads=True`` keeps activations on the autograd graph (gradients w.r.t. them can be taken);
    otherwise ``detach`` defaults to True and outputs are stored as detached copies
    (``detach=False`` without ``grads`` stores attached copies: you can backpropagate *from* them,
    e.g. a feature-visualisation objective, but not differentiate *w.r.t.* them). ``to_cpu``
    moves detached copies to host memory. ``model`` may also be a ``LoadedModel``.
    """
    model = unwrap(model)
    if detach is None:
        detach = not grads
    if grads and detach:
        raise ValueError("grads=True keeps activations attached to the graph; it cannot be combined with detach=True")
    if grads and to_cpu:
        raise ValueError("to_cpu=True copies activations off the graph; it cannot be combined with grads=True")
    names = resolve_layers(model, layers)
    cap = Capture(model, names, grads=grads, detach=detach, to_cpu=to_cpu)
    hooks = HookSet()
    try:
        hooks.pre(model, _ForwardStart(cap))
        for name in names:
            hooks.forward(get_module(model, name), _OutputHook(cap, name))
        cap.active = True
        yield cap
    finally:
        hooks.remove()
        cap.active = False

