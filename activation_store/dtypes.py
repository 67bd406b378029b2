"""Stored dtypes: float16, float32 and bfloat16 (kept losslessly as its 16-bit pattern)."""
from __future__ import annotations

import numpy as np

STORED_DTYPES = ("float16", "bfloat16", "float32")

# What each stored dtype occupies on disk. numpy has no bfloat16, so its bit pattern is
# stored as little-endian uint16 and widened to float32 (exactly) when read.
_DISK_DTYPE = {"float16": np.dtype("<f2"), "bfloat16": np.dtype("<u2"), "float32": np.dtype("<f4")}


def check_stored_dtype(name: str) -> str:
    """Return ``name`` if it is a supported stored dtype, else raise ``ValueError``."""
    name = str(name)
    if name not in _DISK_DTYPE:
        raise ValueError(f"unsupported store dtype {name!r}; choose one of {', '.join(STORED_DTYPES)}")
    return name


def disk_dtype(name: str) -> np.dtype:
    """The numpy dtype of the bytes on disk for a stored dtype name."""
    return _DISK_DTYPE[check_stored_dtype(name)]


def read_dtype(name: str) -> np.dtype:
    """The numpy dtype a reader returns by default (bfloat16 widens to float32)."""
    return np.dtype("float32") if name == "bfloat16" else disk_dtype(name)


def float_to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """Round float32 (or float16/float64) values to bfloat16, nearest-even, as uint16 bits.

    NaN stays NaN (a quiet NaN pattern), infinities stay infinite.
    """
    as_f32 = np.ascontiguousarray(values, dtype=np.float32)
    bits = as_f32.view(np.uint32)
    rounding_bias = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding_bias) >> 16).astype(np.uint16)
    nan = np.isnan(as_f32)
    if nan.any():
        rounded[nan] = np.uint16(0x7FC0)
    return rounded


def bfloat16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Widen bfloat16 bit patterns (uint16) to float32; exact."""
    return (np.ascontiguousarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def to_stored(values: np.ndarray, stored: str, *, allow_cast: bool) -> np.ndarray:
    """Convert a batch to the on-disk dtype of ``stored`` or raise ``TypeError``.

    Accepted without a cast: the stored dtype itself; for bfloat16 also uint16 bit patterns
    and ``ml_dtypes.bfloat16`` arrays. Other floating dtypes need ``allow_cast=True``,
    because a silent float32→float16 cast can overflow to inf.
    """
    target = disk_dtype(stored)
    kind = values.dtype
    if stored == "bfloat16":
        if kind == np.uint16:
            return values
        if kind.name == "bfloat16":  # ml_dtypes / jax arrays
            return values.view(np.uint16)
        if kind.kind == "f" and allow_cast:
            return float_to_bfloat16_bits(values)
    else:
        if kind == target or (kind.kind == "f" and kind.itemsize == target.itemsize and kind.name == target.name):
            return values
        if kind.kind == "f" and allow_cast:
            return values.astype(target)
    hint = "uint16 bfloat16 bit patterns or " if stored == "bfloat16" else ""
    raise TypeError(
        f"rows of dtype {kind} cannot be stored as {stored}: pass {hint}{stored} arrays, "
        f"or open the writer with allow_cast=True to convert floating-point rows"
    )


def from_disk(values: np.ndarray, stored: str, raw: bool) -> np.ndarray:
    """Turn on-disk values into what readers return (bfloat16 → float32 unless ``raw``)."""
    if stored == "bfloat16" and not raw:
        return bfloat16_bits_to_float32(values)
    return values
