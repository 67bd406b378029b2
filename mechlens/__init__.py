"""mechlens: mechanistic interpretability for vision models, around a chunked activation store.

The two helpers most sessions start with are here; everything else lives in its subpackage
(``mechlens.models``, ``mechlens.capture``, ``mechlens.sae``, ``mechlens.attribution``...).

>>> import mechlens
>>> loaded = mechlens.models.load_model("mechlens:small_cnn_tiny")
>>> x = mechlens.to_input(mechlens.load_image("skimage:astronaut"), loaded)   # [1, 3, 64, 64] pixels
"""
from __future__ import annotations

from typing import Any

__all__ = ["load_image", "to_input"]


def __getattr__(name: str) -> Any:
    # lazy: `import mechlens` stays cheap and imports no layer it does not need
    if name == "load_image":
        from mechlens.data.images import load_image

        return load_image
    if name == "to_input":
        from mechlens.models.loading import to_input

        return to_input
    if name in ("models", "data", "capture", "sae", "attribution", "featvis", "probes", "interventions", "evaluation",
                "atlas", "features", "engine", "experiments", "cli"):
        import importlib

        return importlib.import_module(f"mechlens.{name}")
    raise AttributeError(f"module 'mechlens' has no attribute {name!r}")
