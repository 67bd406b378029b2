"""Activation capture: scoped forward hooks for interactive use (:func:`capture`) and capture
jobs that stream a whole dataset's activations into the on-disk store (:func:`capture_to_store`,
``mechlens capture``)."""
from mechlens.engine.capture import Capture, LayerNotFiredError, capture
from mechlens.capture.config import CaptureConfig
from mechlens.capture.job import (
    SPATIAL_MODES,
    CaptureResult,
    SkippedSample,
    capture_to_store,
    captured_dataset,
    model_fingerprint,
    random_positions,
)

__all__ = [
    "SPATIAL_MODES",
    "Capture",
    "CaptureConfig",
    "CaptureResult",
    "LayerNotFiredError",
    "SkippedSample",
    "capture",
    "capture_to_store",
    "captured_dataset",
    "model_fingerprint",
    "random_positions",
]
