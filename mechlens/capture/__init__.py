"""Activation capture: scoped forward hooks for interactive use (:func:`capture`).

Capture jobs that stream activations of a whole dataset into the on-disk activation store
live in ``mechlens.capture.job`` and build on the same hooks.
"""
from mechlens.capture.hooks import Capture, LayerNotFiredError, capture

__all__ = ["Capture", "LayerNotFiredError", "capture"]
