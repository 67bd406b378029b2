"""Models whose forward returns several outputs: say which one is the logits.

mechlens reads a class feature from ``model(x)`` as a ``[B, classes]`` tensor. A model that
returns a dict, a tuple or an output object (Hugging Face's ``.logits``) is told which output
that is with :func:`select_output`; mechlens never picks one for you.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mechlens.engine.hooks import HookSet, unwrap

__all__ = ["select_output"]

_ATTRIBUTE = "_mechlens_output_selector"


class _SelectOutput:
    """Root forward hook replacing the output by ``output[key]`` (or ``getattr(output, key)``)."""

    def __init__(self, key: str | int) -> None:
        self.key = key

    def __call__(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        key = self.key
        if isinstance(output, dict) or (isinstance(key, str) and hasattr(output, "keys") and not hasattr(output, key)):
            if key not in output:
                raise KeyError(f"select_output({key!r}): the model's output has keys {', '.join(map(str, output.keys()))}")
            chosen = output[key]
        elif isinstance(key, int):
            if not isinstance(output, (tuple, list)) or not -len(output) <= key < len(output):
                raise IndexError(f"select_output({key}): the model returned a {type(output).__name__}, not a sequence "
                                 f"with an item {key}")
            chosen = output[key]
        elif hasattr(output, key):
            chosen = getattr(output, key)
        else:
            raise KeyError(f"select_output({key!r}): the model's {type(output).__name__} output has no {key!r}")
        if not isinstance(chosen, torch.Tensor):
            raise TypeError(f"select_output({key!r}) gave a {type(chosen).__name__}, not a logits tensor")
        return chosen


def select_output(model: Any, key: str | int) -> Any:
    """Make ``model(x)`` return ``output[key]`` (a dict key, a tuple index or an attribute such as
    Hugging Face's ``"logits"``), so class features read the logits. Returns ``model`` (a
    ``LoadedModel`` or ``nn.Module``) with the choice attached; calling it again replaces it."""
    net = unwrap(model)
    if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise TypeError(f"select_output: key must be a str (dict key / attribute) or an int (tuple index), got {key!r}")
    previous = getattr(net, _ATTRIBUTE, None)
    if previous is not None:
        previous.remove()
    hooks = HookSet().forward(net, _SelectOutput(key))  # kept for the model's lifetime (or the next call)
    object.__setattr__(net, _ATTRIBUTE, hooks)
    return model
