"""Exceptions of the activation store; every one says what to do about it."""
from __future__ import annotations


class StoreError(Exception):
    """Base class of every error raised by :mod:`activation_store`."""


class NotAStoreError(StoreError, FileNotFoundError):
    """The path is not an activation store (no ``store.json``)."""


class IncompatibleStoreError(StoreError):
    """A store was reopened with a different model, layer set, width or dtype."""


class InvalidNameError(StoreError, ValueError):
    """A name that would become a file or directory name (a layer, shard, concept, output
    name, ...) is not a safe single path component (see :func:`activation_store.manifest.check_name`)."""


class InvalidRowsError(StoreError, ValueError):
    """Rows handed to a writer have the wrong width, dtype, length or values."""


class CorruptChunkError(StoreError):
    """A committed chunk failed its checksum or could not be decoded."""

    def __init__(self, layer: str, shard: str, segment: int, chunk: int, reason: str):
        self.layer, self.shard, self.segment, self.chunk, self.reason = layer, shard, segment, chunk, reason
        super().__init__(
            f"corrupt chunk: layer {layer!r}, shard {shard!r}, segment {segment}, chunk {chunk}: {reason}"
        )


class WriterClosedError(StoreError):
    """The writer was closed, or its background thread failed (see the chained cause)."""
