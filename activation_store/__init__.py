"""activation_store: a chunked, sharded, crash-safe on-disk store of layer activations.

numpy + zarr (v3) + h5py only; it knows nothing about models. See ``docs/store-format.md``.
"""
from __future__ import annotations

__version__ = "0.1.0"

from activation_store.backends import Backend, SegmentReader, SegmentWriter, backend_names, register_backend
from activation_store.dtypes import STORED_DTYPES, bfloat16_bits_to_float32, float_to_bfloat16_bits
from activation_store.errors import (
    CorruptChunkError, IncompatibleStoreError, InvalidNameError, InvalidRowsError, NotAStoreError, StoreError,
    WriterClosedError,
)
from activation_store.manifest import LayerSpec, check_name, safe_join
from activation_store.reader import (
    ActivationStore, BadChunk, Batch, LayerStatistics, LayerView, RowIndex, StoreInfo, VerifyReport,
)
from activation_store.stats import RunningMoments
from activation_store.writer import CommitPolicy, Rows, StoreWriter

__all__ = [
    "Backend",
    "SegmentReader",
    "SegmentWriter",
    "backend_names",
    "register_backend",
    "ActivationStore", "BadChunk", "Batch", "CommitPolicy", "CorruptChunkError", "IncompatibleStoreError", "InvalidNameError",
    "InvalidRowsError",
    "LayerSpec", "LayerStatistics", "LayerView", "NotAStoreError", "RowIndex", "Rows", "RunningMoments",
    "STORED_DTYPES", "StoreError", "StoreInfo", "StoreWriter", "VerifyReport", "WriterClosedError",
    "bfloat16_bits_to_float32", "check_name", "float_to_bfloat16_bits", "open_store", "safe_join",
]


def open_store(path, *, verify_reads: bool = True, memory_map: bool = True) -> ActivationStore:
    """Open a store for reading (committed rows only)."""
    return ActivationStore(path, verify_reads=verify_reads, memory_map=memory_map)
