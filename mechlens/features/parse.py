"""Feature specs as strings, for the CLI and for JSON results.

    class:3                      ClassLogit(3)
    class:3:log_softmax          ClassLogit(3, normalize="log_softmax")
    channel:layer4:17            Channel("layer4", 17)
    neuron:layer4:17:3,4         Neuron("layer4", 17, (3, 4))
    layer:layer3                 LayerEnergy("layer3")   (DeepDream objective)
    sae:PATH:123                 latent 123 of the SAE saved at PATH (mechlens.sae)
    cav:PATH                     the CAV saved at PATH as a Direction (mechlens.probes)

Kinds provided by other subpackages are imported lazily, so ``mechlens.features`` stays light.
"""
from __future__ import annotations

import importlib
from typing import Callable

from mechlens.features.base import Channel, ClassLogit, Feature, LayerEnergy, Neuron

__all__ = ["FEATURE_KINDS", "parse_feature", "register_feature_kind"]

_PARSERS: dict[str, Callable[[str], Feature]] = {}
# kind -> "module:function" taking the text after "kind:"; imported on first use.
_LAZY: dict[str, str] = {"sae": "mechlens.sae:feature_from_spec", "cav": "mechlens.probes:feature_from_spec"}


def register_feature_kind(kind: str, parser: Callable[[str], Feature]) -> None:
    """Make ``kind:...`` specs parse with ``parser(rest)``."""
    _PARSERS[kind] = parser


def _int(text: str, what: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"feature spec {spec!r}: {what} must be an integer, got {text!r}") from None


def _class(rest: str, spec: str) -> Feature:
    parts = rest.split(":")
    if len(parts) > 2:
        raise ValueError(f"feature spec {spec!r}: expected class:INDEX[:log_softmax|softmax]")
    normalize = parts[1] if len(parts) == 2 else None
    if normalize not in (None, "log_softmax", "softmax"):
        raise ValueError(f"feature spec {spec!r}: unknown normalization {normalize!r}; expected class:INDEX, "
                         f"class:INDEX:log_softmax or class:INDEX:softmax")
    return ClassLogit(_int(parts[0], "class index", spec), normalize=normalize)


def _channel(rest: str, spec: str) -> Feature:
    layer, sep, index = rest.rpartition(":")
    if not sep or not layer:
        raise ValueError(f"feature spec {spec!r}: expected channel:LAYER:INDEX")
    return Channel(layer, _int(index, "channel index", spec))


def _neuron(rest: str, spec: str) -> Feature:
    parts = rest.split(":")
    if len(parts) != 3:
        raise ValueError(f"feature spec {spec!r}: expected neuron:LAYER:CHANNEL:Y,X (or :T for tokens)")
    position = tuple(_int(p, "position", spec) for p in parts[2].split(","))
    return Neuron(parts[0], _int(parts[1], "channel index", spec), position)


def _layer(rest: str, spec: str) -> Feature:
    if not rest:
        raise ValueError(f"feature spec {spec!r}: expected layer:LAYER")
    return LayerEnergy(rest)


_BUILTIN = {"class": _class, "channel": _channel, "neuron": _neuron, "layer": _layer}
FEATURE_KINDS: tuple[str, ...] = (*_BUILTIN, *_LAZY)


def parse_feature(spec: str) -> Feature:
    """Parse a feature spec string (see the module docstring). Errors are ``ValueError`` with a
    one-line message."""
    if not isinstance(spec, str):
        raise ValueError(f"a feature spec is a string such as class:3, got {type(spec).__name__}")
    if not spec.isprintable():  # a newline or NUL is never part of a layer name, index or path
        raise ValueError(f"feature spec {spec!r} contains control characters; expected e.g. class:3 or channel:layer4:17")
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"feature spec {spec!r} has no kind; expected one of {', '.join(FEATURE_KINDS)} (e.g. class:3)")
    if kind in _BUILTIN:
        return _BUILTIN[kind](rest, spec)
    if kind not in _PARSERS and kind in _LAZY:
        module_name, func = _LAZY[kind].split(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"feature kind {kind!r} needs {module_name}, which failed to import: {exc}") from exc
        _PARSERS[kind] = getattr(module, func)
    if kind in _PARSERS:
        return _PARSERS[kind](rest)
    raise ValueError(f"unknown feature kind {kind!r} in {spec!r}; expected one of {', '.join(sorted({*FEATURE_KINDS, *_PARSERS}))}")
