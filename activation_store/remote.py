"""Reading a store at an fsspec URL (``s3://``, ``gs://``, ``az://``, or a chained
``simplecache::s3://...``): manifests and chunk objects are fetched through fsspec, and every
chunk is checked against its committed XXH3-64 checksum exactly as a local read is.

Writing stays local or NFS: a commit is an atomic rename of the shard manifest, which object
stores do not offer (a reader could see a torn or half-listed commit), so writers refuse URLs
(:func:`refuse_remote_write`). Write locally, upload the finished store, read it by URL.
"""
from __future__ import annotations

import os
import posixpath
import re
import threading
from pathlib import Path, PurePosixPath
from typing import Any, Mapping
from urllib.parse import urlparse

import numpy as np

from activation_store import backends
from activation_store.errors import NotAStoreError, StoreError
from activation_store.manifest import (
    SHARD_MANIFEST, SHARDS_DIR, STORE_FILE, LayerSpec, ShardManifest, StoreManifest, parse_shard_manifest,
    parse_store_manifest,
)

# ``scheme://`` or a chained ``proto::`` prefix; a Windows drive (``C:\\``) has neither.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*(://|::)")


def is_url(location: str | os.PathLike) -> bool:
    """True for a URL read through fsspec; plain paths and ``file://`` URLs are local."""
    return isinstance(location, str) and bool(_URL.match(location)) and not location.startswith("file://")


def local_path(location: str | os.PathLike) -> Path:
    """The local path of a plain path or a ``file://`` URL."""
    if isinstance(location, str) and location.startswith("file://"):
        parsed = urlparse(location)
        if parsed.netloc not in ("", "localhost"):
            raise ValueError(f"{location}: a file:// URL must name a local path (file:///abs/path), "
                             f"not host {parsed.netloc!r}")
        return Path(parsed.path)
    return Path(location)


def refuse_remote_write(location: str | os.PathLike, what: str = "StoreWriter") -> None:
    """Raise :class:`StoreError` (one line) when ``location`` is a URL: writing is local / NFS only."""
    if is_url(location):
        raise StoreError(f"{what} cannot write to {location}: writing a store is local or NFS only (a commit is an "
                         f"atomic manifest rename, which object stores lack); write to a local path, upload the "
                         f"finished store (e.g. s3fs put(..., recursive=True)), then read it by URL")


def _cause(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class RemoteLocation:
    """The root of a store at an fsspec URL, opened read-only.

    The filesystem objects are re-created after a fork and are not pickled (DataLoader
    workers reconnect from the URL and ``storage_options``).
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None):
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise TypeError(f"storage_options must be a dict of fsspec options, got {type(storage_options).__name__}")
        self.url = url.rstrip("/")
        self.storage_options: dict[str, Any] = dict(storage_options or {})
        self._lock = threading.Lock()
        self._pid = -1
        self._fs: Any = None
        self._zarr_store: Any = None
        self.root: str = self._connect()[1]

    def _connect(self) -> tuple[Any, str]:
        try:
            from fsspec.core import url_to_fs
        except ImportError as error:
            raise StoreError(f"reading {self.url} needs fsspec: pip install fsspec (and s3fs for s3://, "
                             f"gcsfs for gs://)") from error
        try:
            fs, root = url_to_fs(self.url, **self.storage_options)
        except (ImportError, ValueError, TypeError) as error:
            # unknown protocol, a filesystem package not installed, or an option it does not take
            raise StoreError(f"cannot open {self.url} with fsspec: {_cause(error)}") from error
        self._fs, self._zarr_store, self._pid = fs, None, os.getpid()
        return fs, root.rstrip("/")

    @property
    def fs(self) -> Any:
        """The fsspec filesystem (a fresh one in a forked child: never share connections)."""
        with self._lock:
            if self._pid != os.getpid():
                self._connect()
            return self._fs

    def zarr_store(self) -> Any:
        """A read-only zarr ``FsspecStore`` at the root on which a missing object raises instead of
        reading as the fill value (zarr's default), so a lost chunk is reported, not zero-filled."""
        with self._lock:
            if self._pid != os.getpid():
                self._connect()
            if self._zarr_store is None:
                from zarr.storage import FsspecStore

                # zarr needs an asynchronous filesystem instance of its own
                self._zarr_store = FsspecStore.from_url(self.url, storage_options=self.storage_options,
                                                        read_only=True, allowed_exceptions=())
            return self._zarr_store

    def path(self, *parts: str) -> str:
        """The filesystem path of ``parts`` under the root (parts are validated names)."""
        return posixpath.join(self.root, *parts)

    def display(self, path: str) -> str:
        """A path as a URL for messages."""
        try:
            return self.fs.unstrip_protocol(path)
        except Exception:  # noqa: BLE001 - a message must never fail
            return path

    # ------------------------------------------------------------------ manifests
    def read_store_manifest(self) -> StoreManifest:
        path = self.path(STORE_FILE)
        fs = self.fs
        try:
            text = fs.cat_file(path)
        except FileNotFoundError:
            if not _exists(fs, self.root):
                raise NotAStoreError(f"{self.url} does not exist (nothing under that URL)") from None
            raise NotAStoreError(f"{self.url} is not an activation store (no {STORE_FILE}); write one locally "
                                 f"with a writer or a capture job, then upload it") from None
        except Exception as error:  # noqa: BLE001 - each fsspec backend raises its own types (botocore, aiohttp)
            raise StoreError(f"cannot read {self.display(path)}: {_cause(error)}") from error
        return parse_store_manifest(text, self.display(path))

    def read_shard_manifests(self) -> dict[str, ShardManifest]:
        """Every shard that has a manifest, by name (in name order, as a local listing)."""
        fs = self.fs
        shards_dir = self.path(SHARDS_DIR)
        fs.invalidate_cache(shards_dir)  # a refresh() must see shards created since the last listing
        try:
            entries = fs.ls(shards_dir, detail=False)
        except FileNotFoundError:
            return {}
        except Exception as error:  # noqa: BLE001
            raise StoreError(f"cannot list {self.display(shards_dir)}: {_cause(error)}") from error
        names = sorted({posixpath.basename(entry.rstrip("/")) for entry in entries} - {""})
        paths = [self.path(SHARDS_DIR, name, SHARD_MANIFEST) for name in names]
        # fetched concurrently (one round trip for many ranks), in order
        texts = fs.cat_ranges(paths, [None] * len(paths), [None] * len(paths), on_error="return") if paths else []
        manifests = {}
        for name, path, text in zip(names, paths, texts):
            if isinstance(text, (FileNotFoundError, NotADirectoryError)):
                continue  # a shard directory whose writer has not committed yet, or a stray file
            if isinstance(text, BaseException):
                raise StoreError(f"cannot read {self.display(path)}: {_cause(text)}") from text
            manifests[name] = parse_shard_manifest(text, self.display(path), name)
        return manifests

    def read_optional(self, *parts: str) -> bytes | None:
        """The bytes of an object under the root, or None when it does not exist."""
        path = self.path(*parts)
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None
        except Exception as error:  # noqa: BLE001
            raise StoreError(f"cannot read {self.display(path)}: {_cause(error)}") from error

    def size_bytes(self) -> int:
        """Total size of the objects under the root."""
        try:
            return int(self.fs.du(self.root, total=True))
        except Exception as error:  # noqa: BLE001
            raise StoreError(f"cannot list {self.url}: {_cause(error)}") from error

    # ------------------------------------------------------------------ segments
    def open_segment(self, backend: str, shard: str, file: str, layers: Mapping[str, LayerSpec],
                     chunk_rows: Mapping[str, int]) -> backends.SegmentReader:
        if backend == "zarr":
            return _RemoteZarrSegmentReader(self, shard, file, chunk_rows)
        if backend == "hdf5":
            return _RemoteHdf5SegmentReader(self, shard, file, chunk_rows)
        raise StoreError(f"the store at {self.url} uses backend {backend!r}, which cannot be read from a URL "
                         f"(zarr and hdf5 can); copy the store to a local path to read it")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_fs=None, _zarr_store=None, _pid=-1, _lock=None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _exists(fs: Any, path: str) -> bool:
    try:
        return bool(fs.exists(path))
    except Exception:  # noqa: BLE001 - only chooses between two messages
        return True


class _RemoteZarrSegmentReader:
    """A zarr segment read through fsspec. Uncompressed chunks (the sole ``bytes`` codec) are
    fetched as whole objects with ranged GETs (data and index concurrently) and hashed as they
    are copied; compressed chunks are decoded by zarr. Array metadata comes from zarr."""

    def __init__(self, location: RemoteLocation, shard: str, file: str, chunk_rows: Mapping[str, int]):
        import zarr

        self._location = location
        self._relative = f"{SHARDS_DIR}/{shard}/{file}"
        self._root = location.path(SHARDS_DIR, shard, file)
        self.name = file
        self._chunk_rows = chunk_rows
        self._arrays: dict[str, tuple] = {}
        try:
            self._group = zarr.open_group(location.zarr_store(), path=self._relative, mode="r", zarr_format=3)
        except FileNotFoundError as error:
            raise backends.ChunkReadError(f"segment {file} is missing: {location.display(self._root)}") from error
        except Exception as error:  # noqa: BLE001 - any failure to open is reported per chunk, as locally
            raise backends.ChunkReadError(f"cannot open segment {file}: {_cause(error)}") from error

    def _layer_arrays(self, layer: str):
        if layer not in self._arrays:
            try:
                data, index = self._group[f"{layer}/data"], self._group[f"{layer}/index"]
            except Exception as error:  # noqa: BLE001
                raise backends.ChunkReadError(f"layer arrays missing in segment {self.name}: "
                                              f"{_cause(error)}") from error
            self._arrays[layer] = (data, index, backends._is_raw_bytes_array(data)
                                   and backends._is_raw_bytes_array(index))
        return self._arrays[layer]

    def read_chunk(self, layer: str, chunk: int, rows: int, out: np.ndarray | None, index_out: np.ndarray | None,
                   digest=None) -> None:
        data, index, raw = self._layer_arrays(layer)
        # hashed in the committed order: the data bytes, then the index bytes
        targets = ([(data, out)] if out is not None else []) + ([(index, index_out)] if index_out is not None else [])
        chunk_rows = self._chunk_rows[layer]
        if not targets:
            return
        if raw:
            self._read_raw(layer, chunk, rows, chunk_rows, targets, digest)
            return
        start = chunk * chunk_rows
        for array, buffer in targets:
            try:
                buffer[:rows] = array[start:start + rows]
            except FileNotFoundError as error:
                raise backends.ChunkReadError(f"{array.basename} chunk object missing: "
                                              f"{self._location.display(self._root)}/{layer}/{array.basename} "
                                              f"(chunk {chunk})") from error
            except OSError as error:  # the network or the credentials, not the chunk's bytes
                raise StoreError(f"cannot read chunk {chunk} of {self._location.display(self._root)}/{layer}: "
                                 f"{_cause(error)}") from error
            except Exception as error:  # noqa: BLE001 - decoder errors of any codec
                raise backends.ChunkReadError(f"cannot decode {array.basename} chunk: {error}") from error
            if digest is not None:
                digest.update(memoryview(np.ascontiguousarray(buffer[:rows])).cast("B"))

    def _read_raw(self, layer: str, chunk: int, rows: int, chunk_rows: int, targets, digest) -> None:
        fs = self._location.fs
        paths, sizes = [], []
        for array, _ in targets:
            paths.append(posixpath.join(self._root, layer, array.basename, array.metadata.encode_chunk_key((chunk, 0))))
            sizes.append(chunk_rows * array.shape[1] * array.dtype.itemsize)
        # A ranged GET of one byte more than expected: no HEAD request per chunk, and an object
        # that grew is still caught by its length.
        blobs = fs.cat_ranges(paths, [0] * len(paths), [size + 1 for size in sizes], on_error="return")
        for (array, buffer), path, size, blob in zip(targets, paths, sizes, blobs):
            where = self._location.display(path)
            if isinstance(blob, FileNotFoundError):
                raise backends.ChunkReadError(f"{array.basename} chunk object missing: {where}")
            if isinstance(blob, BaseException):
                actual = _size_or_none(fs, path)  # an empty object fails a ranged GET: tell damage from the network
                if actual is not None and actual != size:
                    raise backends.ChunkReadError(f"{array.basename} chunk object {where} has {actual} bytes, "
                                                  f"expected {size} (truncated or overwritten)")
                raise StoreError(f"cannot read {where}: {_cause(blob)}") from blob
            if len(blob) != size:
                got = f"{len(blob)}" if len(blob) <= size else f"more than {size}"
                raise backends.ChunkReadError(f"{array.basename} chunk object {where} has {got} bytes, "
                                              f"expected {size} (truncated or overwritten)")
            valid = memoryview(blob)[:rows * array.shape[1] * array.dtype.itemsize]
            if digest is not None:
                digest.update(valid)
            memoryview(buffer[:rows]).cast("B")[:] = valid

    def close(self) -> None:
        self._arrays.clear()


def _size_or_none(fs: Any, path: str) -> int | None:
    try:
        return int(fs.size(path))
    except Exception:  # noqa: BLE001 - only refines an error message
        return None


class _RemoteHdf5SegmentReader(backends._Hdf5SegmentReader):
    """An HDF5 segment read through an fsspec file object (h5py reads file-like objects; its
    global lock serialises the reads). Chunk reads are the local reader's."""

    def __init__(self, location: RemoteLocation, shard: str, file: str, chunk_rows: Mapping[str, int]):
        import h5py

        path = location.path(SHARDS_DIR, shard, file)
        self.path = PurePosixPath(path)
        self._chunk_rows = chunk_rows
        self._handle = None
        try:
            # 4 MiB blocks kept in an LRU: chunk-sized reads, not the 50 MiB read-ahead of s3fs's default
            self._handle = location.fs.open(path, "rb", block_size=4 << 20, cache_type="blockcache")
            self._file = h5py.File(self._handle, "r")
        except FileNotFoundError as error:
            raise backends.ChunkReadError(f"segment file missing: {location.display(path)}") from error
        except Exception as error:  # noqa: BLE001 - truncated / damaged files, as locally
            if self._handle is not None:
                self._handle.close()
            raise backends.ChunkReadError(f"cannot open segment file {file}: {_cause(error)}") from error

    def close(self) -> None:
        super().close()
        if self._handle is not None:
            self._handle.close()
