"""The forward engine: the one place that hooks a model (read layers, take gradients w.r.t.
them, stop early, replace outputs), unwraps models and owns the train/eval policy."""
from mechlens.engine.capture import Capture, LayerNotFiredError, capture
from mechlens.engine.outputs import select_output
from mechlens.engine.hooks import (
    HookSet,
    StopAfter,
    StopForward,
    eval_mode,
    replace_output,
    unwrap,
    unwrap_with_preprocessing,
)

__all__ = [
    "Capture",
    "HookSet",
    "LayerNotFiredError",
    "StopAfter",
    "StopForward",
    "capture",
    "eval_mode",
    "replace_output",
    "select_output",
    "unwrap",
    "unwrap_with_preprocessing",
]
