"""Layer names: resolve names and glob patterns, list layers with their output shapes.

Layer names are the dotted paths of ``model.named_modules()`` (``"layer4.1.conv2"``,
``"blocks.3.mlp"``). Patterns are globs matched one dotted segment at a time:

``*``   any characters within one segment: ``layer4.*`` is ``layer4.0``, ``layer4.1``, ... (the
        children of ``layer4``, not their descendants); ``blocks.*.mlp`` is every block's mlp
``**``  any number of segments (including none): ``layer4.**`` is ``layer4`` and everything below
        it, ``**.relu`` every module named ``relu``
``?``, ``[abc]``  as in :mod:`fnmatch`, within a segment

An unknown name or a pattern matching nothing is an error that lists the closest names.
"""
from __future__ import annotations

import difflib
import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

__all__ = [
    "LayerNotFoundError",
    "is_pattern",
    "match_layer_pattern",
    "layer_names",
    "resolve_layers",
    "get_module",
]

_GLOB_CHARS = re.compile(r"[*?\[]")


class LayerNotFoundError(LookupError):
    """A requested layer name or pattern does not exist in the model."""


def is_pattern(name: str) -> bool:
    """Whether ``name`` contains glob characters (``*``, ``?``, ``[``)."""
    return bool(_GLOB_CHARS.search(name))


def match_layer_pattern(pattern: str, name: str) -> bool:
    """Segment-wise glob match of a dotted layer ``name`` (see the module docstring)."""
    return _match(pattern.split("."), name.split(".") if name else [])


def _match(pattern: list[str], parts: list[str]) -> bool:
    if not pattern:
        return not parts
    head, rest = pattern[0], pattern[1:]
    if head == "**":
        return any(_match(rest, parts[k:]) for k in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], head) and _match(rest, parts[1:])


def layer_names(model: nn.Module) -> list[str]:
    """Every named submodule path of ``model`` in definition order (the root ``""`` excluded)."""
    return [name for name, _ in model.named_modules() if name]


def _closest(query: str, names: Sequence[str], n: int = 5) -> list[str]:
    close = difflib.get_close_matches(query, names, n=n, cutoff=0.55)
    if len(close) < n:  # names sharing the query's first segment help with typos deeper down
        head = query.split(".")[0]
        close += [c for c in names if c.split(".")[0] == head and c not in close][: n - len(close)]
    return close


def _not_found(query: str, model: nn.Module, names: Sequence[str], *, pattern: bool) -> LayerNotFoundError:
    probe = query.replace("**.", "").replace(".**", "").replace("*", "0").replace("?", "0")
    close = _closest(probe if pattern else query, names)
    what = f"pattern {query!r} matches no layer" if pattern else f"no layer named {query!r}"
    hint = f" Closest: {', '.join(close)}." if close else ""
    top = [n for n in names if "." not in n]
    return LayerNotFoundError(
        f"{what} in {type(model).__name__}.{hint} Top-level layers: {', '.join(top[:12])}"
        f"{' ...' if len(top) > 12 else ''}. List all {len(names)} with `mechlens layers MODEL` "
        "or mechlens.models.layer_names(model)."
    )


def resolve_layers(model: nn.Module, layers: str | Sequence[str]) -> list[str]:
    """Expand names and glob patterns into existing layer names, in the order given (pattern
    matches in module order), without duplicates. Raises :class:`LayerNotFoundError` listing
    the closest names for an unknown name or a pattern that matches nothing."""
    if isinstance(layers, str):
        layers = [layers]
    layers = list(layers)
    if not layers:
        raise ValueError("no layers requested (got an empty list)")
    names = layer_names(model)
    known = set(names)
    resolved: list[str] = []
    seen: set[str] = set()
    for query in layers:
        if not isinstance(query, str):
            raise TypeError(f"layer names must be strings, got {type(query).__name__}: {query!r}")
        if is_pattern(query):
            matches = [n for n in names if match_layer_pattern(query, n)]
            if not matches:
                raise _not_found(query, model, names, pattern=True)
        elif query in known:
            matches = [query]
        else:
            raise _not_found(query, model, names, pattern=False)
        for match in matches:
            if match not in seen:
                seen.add(match)
                resolved.append(match)
    return resolved


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule at dotted path ``name`` (error with close matches if absent)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise _not_found(name, model, layer_names(model), pattern=False) from None


Shape = Any  # tuple[int, ...] for a tensor; a tuple/dict of shapes for structured outputs
