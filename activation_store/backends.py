"""Storage backends. A *segment* is one immutable container of a shard: per layer a
``data`` array ``[rows, dim]`` and an ``index`` array ``[rows, 3]`` (int64 sample id,
position, label), both chunked by the layer's ``chunk_rows``.

* ``zarr`` (default): a zarr v3 group ``seg-NNNNNN.zarr`` with a sub-group per layer.
  Uncompressed arrays use a direct path: a zarr v3 chunk with the sole ``bytes`` codec *is*
  the C-order little-endian chunk, so whole chunks are written and read with one system
  call each, straight from / into the caller's buffer, and each chunk is its own file, so
  several threads write chunks at once. zarr-python's own path costs an event-loop round
  trip and several copies per chunk (~0.4x memmap speed when reading, measured here).
  Compressed arrays go through zarr-python, one chunk at a time. Array metadata is always
  written by zarr-python, so every segment is a plain zarr v3 array for any other tool.
* ``hdf5``: one file ``seg-NNNNNN.h5`` with a group per layer (h5py). A segment is closed
  before it is committed, so a writer killed mid-segment never damages a committed file.
"""
from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
from pathlib import Path
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

import numpy as np

from activation_store.dtypes import disk_dtype
from activation_store.manifest import LayerSpec

INDEX_COLUMNS = ("sample_id", "position", "label")
INDEX_DTYPE = np.dtype("<i8")

ZARR_COMPRESSION = ("zstd", "gzip")
HDF5_COMPRESSION = ("gzip", "lzf")


class ChunkReadError(Exception):
    """A chunk could not be read (missing, truncated, undecodable); the reader adds context."""


class SegmentWriter(Protocol):
    #: True when ``write_chunk`` may run for different chunks on several threads at once;
    #: the store writer serialises calls otherwise (a missing attribute counts as False).
    thread_safe: bool

    def write_chunk(self, layer: str, chunk: int, data: np.ndarray, index: np.ndarray, rows: int) -> None:
        """Write chunk ``chunk`` of ``layer``; ``data``/``index`` hold ``rows`` valid rows (full buffers)."""

    def close(self, rows: Mapping[str, int], durable: bool) -> None:
        """Finalise array shapes to ``rows`` and close; fsync the files if ``durable``."""


class SegmentReader(Protocol):
    def read_chunk(self, layer: str, chunk: int, rows: int, out: np.ndarray, index_out: np.ndarray | None,
                   digest=None) -> None:
        """Read the first ``rows`` rows of chunk ``chunk`` into ``out`` (and ``index_out``).

        When ``digest`` (an ``xxhash.xxh3_64``) is given it is updated with the data bytes,
        then the index bytes, of the rows read.
        """

    def close(self) -> None: ...


def chunk_rows_for(spec: LayerSpec, chunk_bytes: int) -> int:
    """Rows per chunk: the layer's own setting, else as many rows as fit ``chunk_bytes``."""
    if spec.chunk_rows:
        return int(spec.chunk_rows)
    row_bytes = spec.dim * disk_dtype(spec.dtype).itemsize
    return max(1, int(chunk_bytes) // row_bytes)


@dataclass(frozen=True)
class Backend:
    """A storage backend: how one segment is written and read.

    ``suffix``: the segment file's suffix (``seg-000001.<suffix>``); ``compression``: the
    compression names it accepts (besides ``None``); ``create(path, layers, chunk_rows,
    compression)`` returns a :class:`SegmentWriter`, ``open(path, layers, chunk_rows)`` a
    :class:`SegmentReader`. A segment must stay readable once closed: the writer commits it
    only after ``close``.
    """

    name: str
    suffix: str
    compression: tuple[str, ...]
    create: Callable[[Path, Mapping[str, LayerSpec], Mapping[str, int], "str | None"], SegmentWriter]
    open: Callable[[Path, Mapping[str, LayerSpec], Mapping[str, int]], SegmentReader]


_BACKENDS: dict[str, Backend] = {}


def register_backend(backend: Backend) -> Backend:
    """Make ``backend`` available to writers and readers under ``backend.name``."""
    if not backend.name or not backend.name.isidentifier():
        raise ValueError(f"a backend name must be an identifier, got {backend.name!r}")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> list[str]:
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    backend = _BACKENDS.get(name)
    if backend is None:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(repr(n) for n in backend_names())}")
    return backend


def check_compression(backend: str, compression: str | None) -> None:
    allowed = get_backend(backend).compression
    if compression is not None and compression not in allowed:
        raise ValueError(f"backend {backend!r} supports compression {list(allowed)} or None, not {compression!r}")


def segment_file_name(backend: str, segment_id: int) -> str:
    return f"seg-{segment_id:06d}.{get_backend(backend).suffix}"


def create_segment(backend: str, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int],
                   compression: str | None) -> SegmentWriter:
    return get_backend(backend).create(path, layers, chunk_rows, compression)


def open_segment(backend: str, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int]) -> SegmentReader:
    return get_backend(backend).open(path, layers, chunk_rows)


def _load_fallocate():
    """Linux ``fallocate(2)`` from the C library, or None elsewhere.

    Python only has ``os.posix_fallocate``, which glibc emulates on filesystems without
    fallocate by writing a byte into every block: slower than no preallocation at all.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = getattr(libc, "fallocate64", None) or libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    function.restype = ctypes.c_int
    return function


_FALLOCATE = _load_fallocate()
_NO_FALLOCATE = {errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}


def _preallocate(fd: int, size: int, path: Path) -> None:
    """Allocate ``size`` bytes of ``fd`` up front, where the filesystem can.

    On ext4, writing into preallocated blocks costs ~30% less CPU than delayed allocation at
    every page (measured here), and a full disk fails here, before any byte is copied.
    """
    if _FALLOCATE is None or not size or _FALLOCATE(fd, 0, 0, size) == 0:
        return
    code = ctypes.get_errno()
    if code not in _NO_FALLOCATE:  # unsupported: write without the hint; anything else is real
        raise OSError(code, os.strerror(code), str(path))


def _write_chunk_file(path: Path, view: memoryview, size: int) -> None:
    """Create ``path`` holding ``view`` extended with zeros to ``size`` bytes.

    The zeros are a sparse hole left by ftruncate: they read back as zeros and take no disk
    blocks. ``os.write`` may write less than asked (signals, some filesystems), hence the loop.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        _preallocate(fd, len(view), path)
        done = 0
        while done < len(view):
            done += os.write(fd, view[done:])
        if len(view) < size:
            os.ftruncate(fd, size)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# Reading and hashing in pieces that fit the CPU cache hashes each piece while it is still
# cached: ~5 GB/s here against ~4 GB/s for reading a whole chunk and hashing it afterwards.
_READ_PIECE = 1 << 19


def _read_hashing(handle, view: memoryview, digest, what: str) -> None:
    got = 0
    while got < len(view):
        piece = view[got:got + _READ_PIECE]
        count = handle.readinto(piece)
        if not count:
            raise ChunkReadError(f"{what} chunk ended after {got} bytes")
        if digest is not None:
            digest.update(piece[:count])
        got += count


# ----------------------------------------------------------------------------- zarr
def _zarr_codec(compression: str | None):
    import zarr.codecs

    if compression is None:
        return None
    return {"zstd": zarr.codecs.ZstdCodec(level=3), "gzip": zarr.codecs.GzipCodec(level=5)}[compression]


def _is_raw_bytes_array(array) -> bool:
    """True when the array's only codec is little-endian ``bytes`` (the direct path applies)."""
    from zarr.codecs import BytesCodec

    codecs = tuple(getattr(array.metadata, "codecs", ()))
    return (len(codecs) == 1 and isinstance(codecs[0], BytesCodec)
            and (codecs[0].endian is None or codecs[0].endian.value == "little"))


class _ZarrSegmentWriter:
    def __init__(self, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int],
                 compression: str | None):
        import zarr

        self.path = Path(path)
        self._group = zarr.open_group(str(self.path), mode="w-")
        self._arrays: dict[str, tuple] = {}
        self._written: list[Path] = []
        codec = _zarr_codec(compression)
        for name, spec in layers.items():
            group = self._group.create_group(name)
            rows = chunk_rows[name]
            common = dict(compressors=codec, fill_value=0, config={"write_empty_chunks": True})
            # attributes given at creation: each later attrs.update would rewrite zarr.json
            data = group.create_array("data", shape=(0, spec.dim), chunks=(rows, spec.dim), dtype=disk_dtype(spec.dtype),
                                      attributes={"mechlens_dtype": spec.dtype}, **common)
            index = group.create_array("index", shape=(0, len(INDEX_COLUMNS)), chunks=(rows, len(INDEX_COLUMNS)),
                                       dtype=INDEX_DTYPE, attributes={"columns": list(INDEX_COLUMNS)}, **common)
            self._arrays[name] = (data, index, rows, _is_raw_bytes_array(data) and _is_raw_bytes_array(index))
        # Raw chunks are separate files written with plain system calls; zarr-python's codec
        # path resizes shared array metadata per chunk, so it takes one chunk at a time.
        self.thread_safe = all(raw for *_, raw in self._arrays.values())

    def write_chunk(self, layer: str, chunk: int, data: np.ndarray, index: np.ndarray, rows: int) -> None:
        data_array, index_array, chunk_rows, raw = self._arrays[layer]
        if raw:
            # zarr v3 stores edge chunks full-size, padded with the fill value (0): only the
            # valid rows are written (a segment's last chunk is usually partial).
            for array, buffer in ((data_array, data), (index_array, index)):
                target = self.path / layer / array.basename / array.metadata.encode_chunk_key((chunk, 0))
                target.parent.mkdir(parents=True, exist_ok=True)
                _write_chunk_file(target, memoryview(np.ascontiguousarray(buffer[:rows])).cast("B"),
                                  buffer.nbytes)
                self._written.append(target)
        else:
            start = chunk * chunk_rows
            for array, buffer in ((data_array, data), (index_array, index)):
                if array.shape[0] < start + rows:
                    array.resize((start + rows, array.shape[1]))
                array[start:start + rows] = buffer[:rows]

    def close(self, rows: Mapping[str, int], durable: bool) -> None:
        for name, (data_array, index_array, _, _) in self._arrays.items():
            for array in (data_array, index_array):
                if array.shape[0] != rows.get(name, 0):
                    array.resize((rows.get(name, 0), array.shape[1]))
        if durable:
            for path in self._written:
                _fsync_file(path)
            for path in self.path.rglob("zarr.json"):
                _fsync_file(path)


class _ZarrSegmentReader:
    def __init__(self, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int]):
        import zarr

        self.path = Path(path)
        try:
            self._group = zarr.open_group(str(self.path), mode="r")
        except Exception as error:  # noqa: BLE001 - any failure to open is reported per chunk
            raise ChunkReadError(f"cannot open segment {self.path.name}: {error}") from error
        self._layers = layers
        self._chunk_rows = chunk_rows
        self._arrays: dict[str, tuple] = {}

    def _layer_arrays(self, layer: str):
        if layer not in self._arrays:
            try:
                data, index = self._group[f"{layer}/data"], self._group[f"{layer}/index"]
            except Exception as error:  # noqa: BLE001
                raise ChunkReadError(f"layer arrays missing in segment {self.path.name}: {error}") from error
            self._arrays[layer] = (data, index, _is_raw_bytes_array(data) and _is_raw_bytes_array(index))
        return self._arrays[layer]

    def read_chunk(self, layer: str, chunk: int, rows: int, out: np.ndarray, index_out: np.ndarray | None,
                   digest=None) -> None:
        data, index, raw = self._layer_arrays(layer)
        # out=None reads only the index (the data came from map_chunk, hashed in the same order)
        targets = ([(data, out)] if out is not None else []) + ([(index, index_out)] if index_out is not None else [])
        chunk_rows = self._chunk_rows[layer]
        for array, buffer in targets:
            if raw:
                path = self.path / layer / array.basename / array.metadata.encode_chunk_key((chunk, 0))
                expected = chunk_rows * array.shape[1] * array.dtype.itemsize
                try:
                    with open(path, "rb", buffering=0) as handle:
                        size = os.fstat(handle.fileno()).st_size
                        if size != expected:
                            raise ChunkReadError(f"{array.basename} chunk file {path.name} has {size} bytes, "
                                                 f"expected {expected} (truncated or overwritten)")
                        _read_hashing(handle, memoryview(buffer[:rows]).cast("B"), digest, array.basename)
                except FileNotFoundError as error:
                    raise ChunkReadError(f"{array.basename} chunk file missing: {path}") from error
            else:
                start = chunk * chunk_rows
                try:
                    buffer[:rows] = array[start:start + rows]
                except Exception as error:  # noqa: BLE001 - decoder errors of any codec
                    raise ChunkReadError(f"cannot decode {array.basename} chunk: {error}") from error
                if digest is not None:
                    digest.update(memoryview(np.ascontiguousarray(buffer[:rows])).cast("B"))

    def map_chunk(self, layer: str, chunk: int, rows: int, dtype: np.dtype, digest=None) -> np.ndarray | None:
        """The chunk's data as a read-only ``[rows, dim]`` view of the memory-mapped chunk file,
        hashed into ``digest``; ``None`` when the array is encoded (compressed) and must be decoded.

        Zero-copy: the page cache is mapped instead of copied into the process, so a
        verified read costs one pass over the bytes (the hash), no more than a memmap copy.
        """
        data, _, raw = self._layer_arrays(layer)
        if not raw:
            return None
        path = self.path / layer / data.basename / data.metadata.encode_chunk_key((chunk, 0))
        expected = self._chunk_rows[layer] * data.shape[1] * data.dtype.itemsize
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError as error:
            raise ChunkReadError(f"{data.basename} chunk file missing: {path}") from error
        try:
            size = os.fstat(fd).st_size
            if size != expected:
                raise ChunkReadError(f"{data.basename} chunk file {path.name} has {size} bytes, "
                                     f"expected {expected} (truncated or overwritten)")
            mapped = mmap.mmap(fd, expected, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        view = np.frombuffer(mapped, dtype=dtype, count=rows * data.shape[1]).reshape(rows, data.shape[1])
        if digest is not None:
            digest.update(view)
        return view

    def close(self) -> None:
        self._arrays.clear()


# ----------------------------------------------------------------------------- hdf5
class _Hdf5SegmentWriter:
    thread_safe = False  # one HDF5 file: chunks are written one at a time

    def __init__(self, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int],
                 compression: str | None):
        import h5py

        self.path = Path(path)
        self._file = h5py.File(self.path, "w-")
        self._datasets: dict[str, tuple] = {}
        for name, spec in layers.items():
            group = self._file.create_group(name)
            rows = chunk_rows[name]
            data = group.create_dataset("data", shape=(0, spec.dim), maxshape=(None, spec.dim),
                                        chunks=(rows, spec.dim), dtype=disk_dtype(spec.dtype), compression=compression)
            index = group.create_dataset("index", shape=(0, len(INDEX_COLUMNS)), maxshape=(None, len(INDEX_COLUMNS)),
                                         chunks=(rows, len(INDEX_COLUMNS)), dtype=INDEX_DTYPE, compression=compression)
            data.attrs["mechlens_dtype"] = spec.dtype
            index.attrs["columns"] = list(INDEX_COLUMNS)
            self._datasets[name] = (data, index, rows)

    def write_chunk(self, layer: str, chunk: int, data: np.ndarray, index: np.ndarray, rows: int) -> None:
        data_set, index_set, chunk_rows = self._datasets[layer]
        start = chunk * chunk_rows
        for dataset, buffer in ((data_set, data), (index_set, index)):
            if dataset.shape[0] < start + rows:
                dataset.resize(start + rows, axis=0)
            dataset.write_direct(np.ascontiguousarray(buffer[:rows]), dest_sel=np.s_[start:start + rows])

    def close(self, rows: Mapping[str, int], durable: bool) -> None:
        self._file.close()
        if durable:
            _fsync_file(self.path)


class _Hdf5SegmentReader:
    def __init__(self, path: Path, layers: Mapping[str, LayerSpec], chunk_rows: Mapping[str, int]):
        import h5py

        self.path = Path(path)
        try:
            self._file = h5py.File(self.path, "r")
        except Exception as error:  # noqa: BLE001 - truncated / damaged files
            raise ChunkReadError(f"cannot open segment file {self.path.name}: {error}") from error
        self._chunk_rows = chunk_rows

    def read_chunk(self, layer: str, chunk: int, rows: int, out: np.ndarray, index_out: np.ndarray | None,
                   digest=None) -> None:
        start = chunk * self._chunk_rows[layer]
        try:
            self._file[f"{layer}/data"].read_direct(out, source_sel=np.s_[start:start + rows], dest_sel=np.s_[:rows])
            if index_out is not None:
                self._file[f"{layer}/index"].read_direct(index_out, source_sel=np.s_[start:start + rows],
                                                         dest_sel=np.s_[:rows])
        except Exception as error:  # noqa: BLE001
            raise ChunkReadError(f"cannot read chunk from {self.path.name}: {error}") from error
        if digest is not None:
            digest.update(memoryview(out[:rows]).cast("B"))
            if index_out is not None:
                digest.update(memoryview(index_out[:rows]).cast("B"))

    def close(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a damaged file must not mask the real error
            pass


register_backend(Backend("zarr", "zarr", ZARR_COMPRESSION, _ZarrSegmentWriter, _ZarrSegmentReader))
register_backend(Backend("hdf5", "h5", HDF5_COMPRESSION, _Hdf5SegmentWriter, _Hdf5SegmentReader))
