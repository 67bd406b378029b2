"""Feature specs as strings, for the CLI and for JSON results.

    class:3                      ClassLogit(3)
    class:3:log_softmax          ClassLogit(3, normalize="log_softmax")
    channel:layer4:17            Channel("layer4", 17)
    neuron:layer4:17:3,4         Neuron("layer4", 17, (3, 4))
    layer:layer3                 LayerEnergy("layer3")   (DeepDream objective)
    sae:PATH:123                 latent 123 of the SAE saved at PATH (mechlens.sae)
    cav:PATH                     the CAV saved at PATH as a Direction (mechlens.probes)

:func:`as_feature` is the one reader every entry point (attribution, TCAV, feature
visualisation, evaluation, the CLI) applies to a feature or target argument: a Feature as it
is, a spec string through :func:`parse_feature`, an ``int`` as a class logit. :func:`as_features`
does the same for "one feature or a list of them".

Kinds provided by other subpackages are imported lazily, so ``mechlens.features`` stays light.
"""
from __future__ import annotations

import importlib
import numbers
from typing import Any, Callable

from mechlens.features.base import Channel, ClassLogit, Feature, LayerEnergy, Neuron

__all__ = ["FEATURE_KINDS", "SPEC_FORMS", "as_feature", "as_features", "parse_feature", "register_feature_kind"]

_PARSERS: dict[str, Callable[[str], Feature]] = {}
# kind -> "module:function" taking the text after "kind:"; imported on first use.
_LAZY: dict[str, str] = {"sae": "mechlens.sae:feature_from_spec", "cav": "mechlens.probes:feature_from_spec"}


def register_feature_kind(kind: str, parser: Callable[[str], Feature]) -> None:
    """Make ``kind:...`` specs parse with ``parser(rest)``."""
    _PARSERS[kind] = parser


def _int(text: str, what: str, spec: str, form: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"feature spec {spec!r}: {what} must be an integer, got {text!r}; expected {form}") from None


def _class(rest: str, spec: str) -> Feature:
    parts = rest.split(":")
    if len(parts) > 2:
        raise ValueError(f"feature spec {spec!r}: expected class:INDEX[:log_softmax|softmax]")
    normalize = parts[1] if len(parts) == 2 else None
    if normalize not in (None, "log_softmax", "softmax"):
        raise ValueError(f"feature spec {spec!r}: unknown normalization {normalize!r}; expected class:INDEX, "
                         f"class:INDEX:log_softmax or class:INDEX:softmax")
    return ClassLogit(_int(parts[0], "class index", spec, "class:INDEX"), normalize=normalize)


def _channel(rest: str, spec: str) -> Feature:
    layer, sep, index = rest.rpartition(":")
    if not sep or not layer:
        raise ValueError(f"feature spec {spec!r}: expected channel:LAYER:INDEX")
    return Channel(layer, _int(index, "channel index", spec, "channel:LAYER:INDEX"))


def _neuron(rest: str, spec: str) -> Feature:
    parts = rest.split(":")
    if len(parts) != 3:
        raise ValueError(f"feature spec {spec!r}: expected neuron:LAYER:CHANNEL:Y,X (or :T for tokens)")
    position = tuple(_int(p, "position", spec, "neuron:LAYER:CHANNEL:Y,X") for p in parts[2].split(","))
    return Neuron(parts[0], _int(parts[1], "channel index", spec, "neuron:LAYER:CHANNEL:Y,X"), position)


def _layer(rest: str, spec: str) -> Feature:
    if not rest:
        raise ValueError(f"feature spec {spec!r}: expected layer:LAYER")
    return LayerEnergy(rest)


_BUILTIN = {"class": _class, "channel": _channel, "neuron": _neuron, "layer": _layer}
FEATURE_KINDS: tuple[str, ...] = (*_BUILTIN, *_LAZY)
# the accepted forms, for error messages
SPEC_FORMS = "class:INDEX, channel:LAYER:INDEX, neuron:LAYER:CHANNEL:Y,X, layer:LAYER, sae:PATH:INDEX, cav:PATH"


def parse_feature(spec: str) -> Feature:
    """Parse a feature spec string (see the module docstring). Errors are ``ValueError`` with a
    one-line message."""
    if not isinstance(spec, str):
        raise ValueError(f"a feature spec is a string such as class:3, got {type(spec).__name__}")
    if not spec.isprintable():  # a newline or NUL is never part of a layer name, index or path
        raise ValueError(f"feature spec {spec!r} contains control characters; expected e.g. class:3 or channel:layer4:17")
    kind, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"feature spec {spec!r} has no kind; expected one of {SPEC_FORMS}")
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
    extra = "".join(f", {k}:..." for k in sorted(set(_PARSERS) - set(FEATURE_KINDS)))
    raise ValueError(f"unknown feature kind {kind!r} in {spec!r}; expected one of {SPEC_FORMS}{extra}")


# Classes whose instances passed the Feature protocol check: a runtime Protocol isinstance costs
# ~80 us, paid per sample by per-sample targets. The protocol's members are methods and
# properties of the class except ``layer``, which the dataclasses set on every instance.
_FEATURE_TYPES: set[type] = set()


def as_feature(spec: Any) -> Feature:
    """The feature an entry point's ``feature`` / ``target`` argument names: a :class:`Feature`
    as it is, a spec string (``"class:4"``, ``"channel:layer4:17"``, ...) through
    :func:`parse_feature`, an integer as ``ClassLogit(index)``. A bad spec is a one-line
    ``ValueError``; anything else a ``TypeError``."""
    if isinstance(spec, str):
        return parse_feature(spec)
    if isinstance(spec, bool):
        raise TypeError("a feature cannot be a bool; expected a Feature, a class index or a spec such as 'class:3'")
    if isinstance(spec, numbers.Integral):  # int and numpy integers
        return ClassLogit(int(spec))
    if type(spec) in _FEATURE_TYPES or isinstance(spec, Feature):
        _FEATURE_TYPES.add(type(spec))
        return spec
    raise TypeError(f"cannot use {type(spec).__name__} {spec!r} as a feature: expected a Feature, a class index "
                    f"or a spec string ({SPEC_FORMS})")


def as_features(specs: Any) -> list[Feature]:
    """One feature (anything :func:`as_feature` takes) or a list / tuple of them -> a list of
    Features, so ``"class:1"``, ``["class:1", "channel:layer4:3"]`` and Feature objects mix."""
    if isinstance(specs, (list, tuple)):
        return [as_feature(s) for s in specs]
    return [as_feature(specs)]
