"""Process-wide flags shared by modules that must not import each other."""
from __future__ import annotations

import contextvars

# True while mechlens.features.layout runs its layout probe forward: mechlens' own hooks
# (captures, splices, stoppers) ignore that forward, since it is not one of the user's.
INFERRING_LAYOUTS: contextvars.ContextVar[bool] = contextvars.ContextVar("mechlens_inferring_layouts", default=False)


def inferring_layouts() -> bool:
    """True while :func:`mechlens.features.layout.infer_layouts` runs its probe forward."""
    return INFERRING_LAYOUTS.get()
