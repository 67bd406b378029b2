"""Strict JSON for every file and line the project writes.

Python's ``json`` writes ``NaN`` / ``Infinity`` by default, which is not JSON: strict parsers
(browsers, ``jq``, most languages) refuse the whole document. :func:`dumps` converts first
(:func:`json_safe`: non-finite floats become ``null``; numpy / torch scalars and arrays become
numbers and lists) and then serialises with ``allow_nan=False``, so a value it missed is an
error here rather than a file nobody can read.

>>> dumps({"loss": float("nan"), "score": 0.5})
'{"loss": null, "score": 0.5}'
"""
from __future__ import annotations

import json
import math
from typing import Any

__all__ = ["dumps", "json_safe"]


def json_safe(value: Any) -> Any:
    """``value`` with every NaN / infinity replaced by ``None``, numpy and torch scalars and
    arrays turned into Python numbers and (nested) lists, tuples into lists. Anything else is
    returned as it is (``json.dumps``'s ``default=`` still sees it)."""
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if hasattr(value, "detach") and hasattr(value, "tolist"):  # a torch tensor (torch is not imported here)
        return json_safe(value.detach().cpu().tolist())
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy arrays and scalars
        return json_safe(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """``json.dumps(json_safe(value), allow_nan=False, **kwargs)``: always strict JSON."""
    kwargs.pop("allow_nan", None)
    return json.dumps(json_safe(value), allow_nan=False, **kwargs)


def check_fields(cls: type, data: Any, what: str, error: type[Exception] = ValueError) -> None:
    """Refuse, in one line, keys of ``data`` that are not fields of the dataclass ``cls``
    (a config read from JSON or built from keywords), with a "did you mean" hint each."""
    import dataclasses
    import difflib

    known = [f.name for f in dataclasses.fields(cls)]
    unknown = [key for key in data if key not in known]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), known, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise error(f"unknown {what}(s): {', '.join(hints)}; valid: {', '.join(known)}")
