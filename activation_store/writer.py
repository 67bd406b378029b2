"""Writing a shard of an activation store.

The calling thread validates a batch and copies its rows into per-layer chunk buffers;
full chunks go through a bounded queue to a background thread that hands them to
``write_threads`` threads, which checksum and write chunks side by side (hashing and file
writes release the GIL; a slow disk blocks the caller: back-pressure, bounded memory).
Whenever the ``commit_every`` policy is reached (seconds, rows or bytes since the last
commit, whichever comes first), and on ``flush()`` / ``close()``, the background thread
waits until every chunk of the segment is written, writes the partial chunks, closes the
segment and atomically replaces the shard manifest: only then do those rows exist for
readers. A failed chunk write stops the writer before that commit. The next rows go to a
new segment, so committed files are never modified again.
"""
from __future__ import annotations

import dataclasses
import os
import platform
import queue
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import xxhash

from activation_store import backends
from activation_store.dtypes import disk_dtype, to_stored
from activation_store.errors import IncompatibleStoreError, InvalidRowsError, StoreError, WriterClosedError
from activation_store.manifest import (
    SHARD_MANIFEST, SHARDS_DIR, STORE_FILE, LayerSpec, SegmentLayerRecord, SegmentRecord, ShardManifest,
    StoreManifest, check_name, create_json_exclusive, read_shard_manifest, read_store_manifest,
    write_json_atomic,
)
from activation_store.remote import local_path, refuse_remote_write

DEFAULT_CHUNK_BYTES = 8 << 20
NONFINITE_POLICIES = ("count", "error")
_COMMIT_UNITS = {"s": ("seconds", 1.0), "sec": ("seconds", 1.0), "min": ("seconds", 60.0), "h": ("seconds", 3600.0), "rows": ("rows", 1),
                 "b": ("bytes", 1), "kb": ("bytes", 10**3), "mb": ("bytes", 10**6), "gb": ("bytes", 10**9),
                 "kib": ("bytes", 1 << 10), "mib": ("bytes", 1 << 20), "gib": ("bytes", 1 << 30)}


@dataclass(frozen=True)
class CommitPolicy:
    """When a writer commits on its own: after ``seconds``, ``rows`` (of the layer with the most
    rows) or ``bytes`` (all layers) written since the last commit, whichever comes first; ``None``
    disables that trigger. A kill loses at most what was written since the last commit.

    The default, every 64 MiB of rows, is a few seconds of work or less on a GPU box (tens to
    hundreds of MB/s of activations) and keeps segments (one per commit) large. It depends on the
    rows only, so the same capture gives the same segments, the same store bytes and the same
    shuffled batches on any machine. A time trigger (``"64MiB,10s"``) also bounds the loss on a
    slow machine, at the price of segment boundaries that depend on the machine's speed.
    """

    seconds: float | None = None
    rows: int | None = None
    bytes: int | None = 64 << 20

    def __post_init__(self) -> None:
        for name in ("seconds", "rows", "bytes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"commit every {name}: must be > 0 (or None to disable), got {value!r}")
        if self.seconds is None and self.rows is None and self.bytes is None:
            raise ValueError("a commit policy needs at least one of seconds, rows or bytes (else nothing is "
                             "committed before close and a kill loses everything)")

    @classmethod
    def parse(cls, spec: "CommitPolicy | str | float | int") -> "CommitPolicy":
        """``"5s"``, ``"2000rows"``, ``"256MB"``, ``"1min"`` or several joined by commas
        (``"10s,512MiB"``); a plain number is seconds. Triggers not named are off."""
        if isinstance(spec, CommitPolicy):
            return spec
        if isinstance(spec, (int, float)) and not isinstance(spec, bool):
            return cls(seconds=float(spec), rows=None, bytes=None)
        if not isinstance(spec, str):
            raise TypeError(f"commit_every must be a CommitPolicy, a number of seconds or a string, got {type(spec).__name__}")
        fields: dict[str, float | int | None] = {"seconds": None, "rows": None, "bytes": None}
        for part in (p.strip() for p in spec.split(",")):
            match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)", part)
            unit = match.group(2).lower() if match else ""
            if not match or (unit or "s") not in _COMMIT_UNITS:
                raise ValueError(f"cannot read commit spec {part!r} in {spec!r}: expected e.g. '5s', '1min', '1h', "
                                 f"'2000rows', '256MB' or '512MiB', joined by commas")
            field, scale = _COMMIT_UNITS[unit or "s"]
            if fields[field] is not None:
                raise ValueError(f"commit spec {spec!r} gives {field} twice")
            value = float(match.group(1)) * scale
            fields[field] = value if field == "seconds" else int(value)
        return cls(**fields)

    def __str__(self) -> str:
        parts = [f"{self.seconds:g}s" if self.seconds is not None else None,
                 f"{self.rows}rows" if self.rows is not None else None,
                 (f"{self.bytes >> 20}MiB" if self.bytes % (1 << 20) == 0 else f"{self.bytes}B")
                 if self.bytes is not None else None]
        return ",".join(p for p in parts if p)


@dataclass
class Rows:
    """Rows of one layer with their row index.

    ``positions`` is the flat spatial position or token index (-1 for a pooled row),
    ``labels`` the class label (-1 for none).
    """

    data: np.ndarray
    sample_ids: np.ndarray | Sequence[int]
    positions: np.ndarray | Sequence[int] | None = None
    labels: np.ndarray | Sequence[int] | None = None


def shard_name(shard: int | str) -> str:
    """The directory name of a shard: ``rank-00003`` for an int, else the validated name."""
    if isinstance(shard, (int, np.integer)):
        if shard < 0:
            raise ValueError(f"shard number must be >= 0, got {shard}")
        return f"rank-{int(shard):05d}"
    return check_name(str(shard), "shard")


def nonfinite_row_mask(data: np.ndarray, stored: str) -> np.ndarray:
    """Boolean mask of rows holding a NaN or an infinity (``data`` in its on-disk dtype)."""
    if stored == "bfloat16":
        return ((data & np.uint16(0x7F80)) == np.uint16(0x7F80)).any(axis=1)
    if stored == "float16":
        bits = np.asarray(data, dtype=disk_dtype(stored)).view("<u2")  # by value, whatever the byte order
        return ((bits & np.uint16(0x7C00)) == np.uint16(0x7C00)).any(axis=1)
    return ~np.isfinite(data).all(axis=1)


# Per stored dtype: little-endian signed and unsigned views of the bits and the +inf / -inf
# patterns. An IEEE value is NaN or infinite iff its exponent bits are all ones, i.e. iff its
# bits are >= +inf's as a signed integer (positive values) or >= -inf's as unsigned (negative).
_NONFINITE_BOUNDS = {"float16": ("<i2", "<u2", 0x7C00, 0xFC00), "bfloat16": ("<i2", "<u2", 0x7F80, 0xFF80),
                     "float32": ("<i4", "<u4", 0x7F800000, 0xFF800000)}


def _all_finite(bits: np.ndarray, stored: str) -> bool:
    """True when no value of the flat on-disk array ``bits`` is NaN or infinite: two
    max-reductions, ~20 GB/s each, against ~8 GB/s for :func:`nonfinite_row_mask`."""
    signed, unsigned, positive_inf, negative_inf = _NONFINITE_BOUNDS[stored]
    return bool(bits.view(signed).max() < positive_inf and bits.view(unsigned).max() < negative_inf)


def count_nonfinite_rows(data: np.ndarray, stored: str) -> int:
    """Number of rows holding a NaN or an infinity (``data`` in its on-disk dtype); only data
    that fails the fast all-finite test pays for the row mask."""
    # the bit tests read little-endian patterns: a big-endian float16 batch is converted first
    if data.size == 0 or _all_finite(np.ascontiguousarray(data, dtype=disk_dtype(stored)).reshape(-1), stored):
        return 0
    return int(np.count_nonzero(nonfinite_row_mask(data, stored)))


# A chunk is hashed and range-checked piece by piece, so the checks read each piece from the
# CPU cache right after the hash brought it in: one pass over memory instead of three.
_INSPECT_PIECE = 1 << 20


def inspect_chunk(data: np.ndarray, index: np.ndarray, stored: str, count_nonfinite: bool) -> tuple[int, int]:
    """``(chunk_checksum(data, index), non-finite rows of data or 0 unless count_nonfinite)``."""
    digest = xxhash.xxh3_64()
    flat = np.ascontiguousarray(data, dtype=disk_dtype(stored)).reshape(-1)
    step = max(1, _INSPECT_PIECE // flat.itemsize)
    finite = True
    for start in range(0, flat.size, step):
        piece = flat[start:start + step]
        digest.update(piece)
        if count_nonfinite and finite:
            finite = _all_finite(piece, stored)
    digest.update(np.ascontiguousarray(index))
    nonfinite = 0 if finite else int(np.count_nonzero(nonfinite_row_mask(data, stored)))
    return digest.intdigest(), nonfinite


def chunk_checksum(data: np.ndarray, index: np.ndarray) -> int:
    """XXH3-64 (seed 0) of a chunk's committed data bytes followed by its index bytes.

    XXH3 runs at memory speed (~20 GB/s here; zlib's CRC-32 ~3 GB/s would halve read
    throughput), so every read can be verified.
    """
    digest = xxhash.xxh3_64()
    digest.update(memoryview(np.ascontiguousarray(data)).cast("B"))
    digest.update(memoryview(np.ascontiguousarray(index)).cast("B"))
    return digest.intdigest()


def _cause(error: BaseException) -> str:
    """``Type: message`` of the error that stopped the background thread, on one line (a disk
    full reads ``OSError: [Errno 28] No space left on device: '<file>'``)."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _provenance(extra: Mapping[str, Any] | None) -> dict[str, Any]:
    from activation_store import __version__

    info = {"writer": f"activation_store {__version__}", "host": platform.node(), "python": platform.python_version(),
            "numpy": np.__version__}
    info.update(dict(extra or {}))
    return info


@dataclass
class _LayerBuffer:
    data: np.ndarray
    index: np.ndarray
    fill: int = 0


@dataclass
class _ChunkJob:
    segment: int
    layer: str
    chunk: int
    buffer: _LayerBuffer
    rows: int


@dataclass
class _CommitJob:
    segment: int
    partials: list[tuple[str, int, _LayerBuffer]]  # (layer, chunk number, buffer)
    rows: dict[str, int]
    cursor: Any
    done: threading.Event


@dataclass
class _Segment:
    """The open segment of the background thread; chunk results land here from the write threads."""

    id: int
    writer: Any  # a backends.SegmentWriter
    checksums: dict[str, dict[int, int]]  # layer -> chunk number -> XXH3-64
    nonfinite: dict[str, dict[int, int]]  # layer -> chunk number -> non-finite rows
    lock: threading.Lock  # serialises write_chunk for segment writers that are not thread-safe


class StoreWriter:
    """Appends rows of several layers to one shard of a store (creating the store if needed).

    Reopening a shard resumes it: rows committed before a crash are kept, uncommitted
    segment files are deleted, and :attr:`cursor` returns the progress marker committed
    with the last rows. Use as a context manager; leaving the block commits.

    ``write_threads`` threads checksum and write full chunks side by side (each chunk of an
    uncompressed zarr segment is its own file; other backends serialise the file writes and
    still hash in parallel). At most ``max_queued_chunks`` full chunks wait in the queue,
    plus one per write thread being written: that, times the chunk size, bounds the memory.

    Example::

        with StoreWriter("acts", model="timm:resnet18", layers={"layer4": LayerSpec(512)}) as writer:
            writer.write({"layer4": feats}, sample_ids=ids, labels=labels, cursor={"next": 1024})
    """

    def __init__(self, path: str | os.PathLike, *, model: str, layers: Mapping[str, LayerSpec | int],
                 shard: int | str = 0, backend: str = "zarr", compression: str | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, nonfinite: str = "count", allow_cast: bool = False,
                 commit_every: CommitPolicy | str | float = CommitPolicy(), max_queued_chunks: int = 8,
                 write_threads: int = 2, durable: bool = False,
                 provenance: Mapping[str, Any] | None = None):
        refuse_remote_write(path)  # a commit is an atomic rename: local or NFS only
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"nonfinite must be one of {NONFINITE_POLICIES}, got {nonfinite!r}")
        if not layers:
            raise ValueError("a store needs at least one layer")
        backends.check_compression(backend, compression)
        if isinstance(write_threads, bool) or not isinstance(write_threads, (int, np.integer)) or write_threads < 1:
            raise ValueError(f"write_threads must be an integer >= 1 (threads that checksum and write chunks), "
                             f"got {write_threads!r}")
        specs = {check_name(name, "layer"): spec if isinstance(spec, LayerSpec) else LayerSpec(dim=int(spec))
                 for name, spec in layers.items()}
        self.root = local_path(path)
        self.shard = shard_name(shard)
        self.nonfinite = nonfinite
        self.allow_cast = allow_cast
        self.commit_every = CommitPolicy.parse(commit_every)
        self.durable = durable

        self.manifest = self._open_or_create(model, specs, backend, compression, chunk_bytes, provenance)
        self.layers: dict[str, LayerSpec] = dict(self.manifest.layers)
        self._chunk_rows = {name: int(spec.chunk_rows) for name, spec in self.layers.items()}
        self.shard_dir = self.root / SHARDS_DIR / self.shard
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._lock_handle = self._lock_shard()
        try:
            self._shard_manifest = self._resume_shard()
        except BaseException:
            self._release_lock()
            raise

        self._buffers = {name: self._new_buffer(name) for name in self.layers}
        self._free: dict[str, queue.SimpleQueue] = {name: queue.SimpleQueue() for name in self.layers}
        self._segment = (max((s.id for s in self._shard_manifest.segments), default=-1) + 1)
        self._segment_chunks = dict.fromkeys(self.layers, 0)
        self._segment_rows = dict.fromkeys(self.layers, 0)
        self._pending_cursor: Any = self._shard_manifest.cursor
        self._rows_written = {name: self._shard_manifest.rows(name) for name in self.layers}
        self._last_commit = time.monotonic()
        self._uncommitted_rows = dict.fromkeys(self.layers, 0)
        self._uncommitted_bytes = 0
        self._error: BaseException | None = None
        self._error_lock = threading.Lock()
        self._closed = False
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, int(max_queued_chunks)))
        # A free write thread is claimed before a job leaves the queue, so the chunks held by the
        # background are at most the queue plus one per write thread.
        self._slots = threading.Semaphore(int(write_threads))
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._in_flight = 0
        self._idle = threading.Condition()
        # All threads carry the shard's writer name: they are one writer to anyone listing threads.
        name = f"store-writer-{self.shard}"
        self._workers = [threading.Thread(target=self._work, name=name, daemon=True) for _ in range(int(write_threads))]
        for worker in self._workers:
            worker.start()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ opening
    def _open_or_create(self, model: str, specs: dict[str, LayerSpec], backend: str, compression: str | None,
                        chunk_bytes: int, provenance: Mapping[str, Any] | None) -> StoreManifest:
        if self.root.exists() and not self.root.is_dir():
            raise StoreError(f"{self.root} exists and is not a directory")
        # Another rank may be creating the store right now: its shards/ dir and the temp file of
        # store.json's exclusive create are not foreign content.
        if self.root.is_dir() and not (self.root / STORE_FILE).exists() and any(
                p.name not in (SHARDS_DIR, STORE_FILE) and not p.name.startswith(f".{STORE_FILE}.new-")
                for p in self.root.iterdir()):  # store.json itself may appear between the two checks
            raise StoreError(f"{self.root} is a non-empty directory that is not an activation store; "
                             f"choose an empty or new path so nothing there is overwritten")
        if not (self.root / STORE_FILE).exists():
            self.root.mkdir(parents=True, exist_ok=True)
            sized = {name: dataclasses.replace(spec, chunk_rows=backends.chunk_rows_for(spec, chunk_bytes))
                     for name, spec in specs.items()}
            fresh = StoreManifest(model=str(model), layers=sized, backend=backend, compression=compression,
                                  provenance=_provenance(provenance))
            create_json_exclusive(self.root / STORE_FILE, fresh.to_json())  # another rank may win the race
        existing = read_store_manifest(self.root)
        existing.check_compatible(str(model), specs)
        if existing.backend != backend or existing.compression != compression:
            raise IncompatibleStoreError(
                f"{self.root} uses backend {existing.backend!r} with compression {existing.compression!r}; "
                f"it cannot be resumed as {backend!r} / {compression!r}")
        return existing

    def _lock_shard(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - non-POSIX: no cross-process shard lock
            return None
        handle = open(self.shard_dir / ".lock", "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreError(f"shard {self.shard!r} of {self.root} is being written by another process; "
                             f"give every writer its own shard (e.g. its rank)") from None
        return handle

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            self._lock_handle.close()
            self._lock_handle = None

    def _resume_shard(self) -> ShardManifest:
        path = self.shard_dir / SHARD_MANIFEST
        committed = read_shard_manifest(path) if path.exists() else ShardManifest(shard=self.shard)
        keep = {seg.file for seg in committed.segments}
        # Segment files a crashed writer left uncommitted are garbage: no manifest counts them.
        for entry in self.shard_dir.iterdir():
            if re.fullmatch(r"seg-\d{6}\.(zarr|h5)", entry.name) and entry.name not in keep:
                shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        if not path.exists():
            write_json_atomic(path, committed.to_json())
        return committed

    # ------------------------------------------------------------------ public state
    @property
    def cursor(self) -> Any:
        """The progress marker committed with the last committed rows (None for a new shard)."""
        return self._shard_manifest.cursor

    @property
    def committed_rows(self) -> dict[str, int]:
        """Rows per layer that readers can see in this shard."""
        return {name: self._shard_manifest.rows(name) for name in self.layers}

    @property
    def rows_written(self) -> dict[str, int]:
        """Rows per layer accepted so far (committed or still buffered)."""
        return dict(self._rows_written)

    # ------------------------------------------------------------------ writing
    def write(self, batch: Mapping[str, Rows | np.ndarray], *, sample_ids: Sequence[int] | np.ndarray | None = None,
              positions: Sequence[int] | np.ndarray | None = None, labels: Sequence[int] | np.ndarray | None = None,
              cursor: Any = None) -> None:
        """Append rows of one or more layers; all-or-nothing per call.

        ``batch`` maps layer names to :class:`Rows` or to plain ``[n, dim]`` arrays that
        share the keyword ``sample_ids`` / ``positions`` / ``labels``. ``cursor`` is a
        JSON-able progress marker committed together with these rows.
        """
        self._check_alive()
        prepared = {name: self._prepare(name, rows, sample_ids, positions, labels) for name, rows in batch.items()}
        for name, (data, index) in prepared.items():
            self._append(name, data, index)
        if cursor is not None:
            self._pending_cursor = cursor
        if self._commit_due():
            self._enqueue_commit(wait=False)

    def flush(self) -> None:
        """Commit everything written so far and wait until readers can see it."""
        self._check_alive()
        self._enqueue_commit(wait=True)

    def close(self) -> None:
        """Commit, stop the background thread and release the shard."""
        if self._closed:
            return
        try:
            if self._error is None:
                self._enqueue_commit(wait=True)
        finally:
            self._shutdown()
        if self._error is not None:
            raise WriterClosedError(f"writer of shard {self.shard!r} failed: {_cause(self._error)}; committed rows "
                                    f"are intact") from self._error

    def abort(self) -> None:
        """Stop without committing rows written since the last commit."""
        self._shutdown()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self._error is not None:
            self.abort()
        else:
            self.close()

    # ------------------------------------------------------------------ internals
    def _prepare(self, name: str, rows: Rows | np.ndarray, sample_ids, positions, labels) -> tuple[np.ndarray, np.ndarray]:
        if name not in self.layers:
            raise InvalidRowsError(f"unknown layer {name!r}; this store holds {sorted(self.layers)}")
        if not isinstance(rows, Rows):
            if sample_ids is None:
                raise InvalidRowsError(f"layer {name!r}: pass sample_ids= (or Rows objects) so rows can be traced "
                                       f"back to their images")
            rows = Rows(rows, sample_ids, positions, labels)
        spec = self.layers[name]
        data = np.asarray(rows.data)
        if data.ndim != 2:
            raise InvalidRowsError(f"layer {name!r}: rows must be a 2-D array [rows, {spec.dim}], got shape {data.shape}")
        if data.shape[1] != spec.dim:
            raise InvalidRowsError(f"layer {name!r} has width {spec.dim}; got rows of width {data.shape[1]}")
        try:
            data = to_stored(data, spec.dtype, allow_cast=self.allow_cast)
        except TypeError as error:
            raise InvalidRowsError(f"layer {name!r}: {error}") from None
        n = data.shape[0]
        index = np.empty((n, 3), dtype=backends.INDEX_DTYPE)
        for column, values, default in ((0, rows.sample_ids, None), (1, rows.positions, -1), (2, rows.labels, -1)):
            label = backends.INDEX_COLUMNS[column]
            if values is None:
                if default is None:
                    raise InvalidRowsError(f"layer {name!r}: sample_ids are required")
                index[:, column] = default
                continue
            values = np.asarray(values)
            if values.ndim == 0:
                values = np.broadcast_to(values, (n,))
            if values.shape != (n,) or values.dtype.kind not in "iu":
                raise InvalidRowsError(f"layer {name!r}: {label} must be {n} integers, got shape {values.shape} "
                                       f"of dtype {values.dtype}")
            index[:, column] = values
        if self.nonfinite == "error" and count_nonfinite_rows(data, spec.dtype):
            bad = np.flatnonzero(nonfinite_row_mask(data, spec.dtype))
            if bad.size:
                raise InvalidRowsError(
                    f"layer {name!r}: {bad.size} rows hold NaN or Inf (batch rows {bad[:10].tolist()}, sample ids "
                    f"{index[bad[:10], 0].tolist()}); nothing of this batch was written")
        return data, index

    def _new_buffer(self, name: str) -> _LayerBuffer:
        spec = self.layers[name]
        rows = self._chunk_rows[name]
        return _LayerBuffer(np.empty((rows, spec.dim), dtype=disk_dtype(spec.dtype)),
                            np.empty((rows, 3), dtype=backends.INDEX_DTYPE))

    def _take_buffer(self, name: str) -> _LayerBuffer:
        try:
            buffer = self._free[name].get_nowait()
            buffer.fill = 0
            return buffer
        except queue.Empty:
            return self._new_buffer(name)

    def _append(self, name: str, data: np.ndarray, index: np.ndarray) -> None:
        chunk_rows = self._chunk_rows[name]
        start = 0
        while start < data.shape[0]:
            buffer = self._buffers[name]
            take = min(chunk_rows - buffer.fill, data.shape[0] - start)
            buffer.data[buffer.fill:buffer.fill + take] = data[start:start + take]
            buffer.index[buffer.fill:buffer.fill + take] = index[start:start + take]
            buffer.fill += take
            start += take
            if buffer.fill == chunk_rows:
                self._put(_ChunkJob(self._segment, name, self._segment_chunks[name], buffer, chunk_rows))
                self._segment_chunks[name] += 1
                self._buffers[name] = self._take_buffer(name)
        self._segment_rows[name] += data.shape[0]
        self._rows_written[name] += data.shape[0]
        self._uncommitted_rows[name] += data.shape[0]
        self._uncommitted_bytes += data.nbytes + index.nbytes

    def _commit_due(self) -> bool:
        policy = self.commit_every
        return ((policy.seconds is not None and time.monotonic() - self._last_commit >= policy.seconds)
                or (policy.rows is not None and max(self._uncommitted_rows.values()) >= policy.rows)
                or (policy.bytes is not None and self._uncommitted_bytes >= policy.bytes))

    def _enqueue_commit(self, wait: bool) -> None:
        partials = []
        for name, buffer in self._buffers.items():
            if buffer.fill:
                partials.append((name, self._segment_chunks[name], buffer))
                self._buffers[name] = self._take_buffer(name)
        job = _CommitJob(self._segment, partials, dict(self._segment_rows), self._pending_cursor, threading.Event())
        self._put(job)
        if any(self._segment_rows.values()):
            self._segment += 1
        self._segment_chunks = dict.fromkeys(self.layers, 0)
        self._segment_rows = dict.fromkeys(self.layers, 0)
        self._last_commit = time.monotonic()
        self._uncommitted_rows = dict.fromkeys(self.layers, 0)
        self._uncommitted_bytes = 0
        if wait:
            while not job.done.wait(0.05):
                self._check_alive()
            self._check_alive()

    def _put(self, job: Any) -> None:
        while True:
            self._check_alive()
            try:
                self._queue.put(job, timeout=0.1)
                return
            except queue.Full:
                continue

    def _check_alive(self) -> None:
        if self._error is not None:
            raise WriterClosedError(f"the background writer of shard {self.shard!r} failed: {_cause(self._error)}; "
                                    f"rows committed before the failure are intact") from self._error
        if self._closed:
            raise WriterClosedError(f"writer of shard {self.shard!r} is closed")

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._thread.is_alive():
            while True:
                try:
                    self._queue.put(None, timeout=0.1)
                    break
                except queue.Full:
                    if not self._thread.is_alive():
                        break
            self._thread.join()
        self._release_lock()

    # ------------------------------------------------------------------ background thread
    def _fail(self, error: BaseException) -> None:
        """Record the first error of any background thread; the caller sees it on its next call."""
        with self._error_lock:
            if self._error is None:
                self._error = error

    def _run(self) -> None:
        segment: _Segment | None = None
        try:
            while True:
                self._slots.acquire()
                job = self._queue.get()
                if job is None or self._error is not None:
                    self._slots.release()
                    break
                if segment is None and (isinstance(job, _ChunkJob) or (isinstance(job, _CommitJob) and job.partials)):
                    segment = self._open_segment(job.segment)
                if isinstance(job, _ChunkJob):
                    self._submit(segment, job.layer, job.chunk, job.buffer, job.rows)
                    continue
                self._slots.release()
                for name, chunk, buffer in job.partials:
                    buffer.data[buffer.fill:] = 0
                    buffer.index[buffer.fill:] = 0
                    self._slots.acquire()
                    self._submit(segment, name, chunk, buffer, buffer.fill)
                self._wait_idle()
                if self._error is not None:  # a chunk of this segment failed: it must not be committed
                    break
                record = None
                if segment is not None:
                    segment.writer.close(job.rows, self.durable)
                    record = self._segment_record(segment, job.rows)
                    segment = None
                updated = self._shard_manifest.with_commit(record, job.cursor)
                write_json_atomic(self.shard_dir / SHARD_MANIFEST, updated.to_json())
                self._shard_manifest = updated
                job.done.set()
        except BaseException as error:  # noqa: BLE001 - surfaced to the caller on its next call
            self._fail(error)
        finally:
            # No file is written once this thread has ended: the shard lock is released after it.
            self._wait_idle()
            for _ in self._workers:
                self._tasks.put(None)
            for worker in self._workers:
                worker.join()
            if self._error is not None:
                while True:  # unblock producers waiting on a full queue
                    try:
                        self._queue.get_nowait()
                    except queue.Empty:
                        break

    def _open_segment(self, segment_id: int) -> _Segment:
        path = self.shard_dir / backends.segment_file_name(self.manifest.backend, segment_id)
        writer = backends.create_segment(self.manifest.backend, path, self.layers, self._chunk_rows,
                                         self.manifest.compression)
        return _Segment(segment_id, writer, {name: {} for name in self.layers}, {name: {} for name in self.layers},
                        threading.Lock())

    def _segment_record(self, segment: _Segment, rows: Mapping[str, int]) -> SegmentRecord:
        layers = {}
        for name in self.layers:
            chunks = -(-rows[name] // self._chunk_rows[name])
            if sorted(segment.checksums[name]) != list(range(chunks)):
                raise StoreError(f"segment {segment.id} of layer {name!r}: chunks {sorted(segment.checksums[name])} "
                                 f"were written, expected 0..{chunks - 1}; not committing it")
            layers[name] = SegmentLayerRecord(rows[name], tuple(segment.checksums[name][c] for c in range(chunks)),
                                              sum(segment.nonfinite[name].values()))
        return SegmentRecord(id=segment.id, file=backends.segment_file_name(self.manifest.backend, segment.id),
                             layers=layers)

    def _submit(self, segment: _Segment, layer: str, chunk: int, buffer: _LayerBuffer, rows: int) -> None:
        """Hand a chunk to a write thread; the caller holds a slot, which the thread releases."""
        with self._idle:
            self._in_flight += 1
        self._tasks.put((segment, layer, chunk, buffer, rows))

    def _wait_idle(self) -> None:
        with self._idle:
            while self._in_flight:
                self._idle.wait()

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            segment, layer, chunk, buffer, rows = task
            try:
                if self._error is None:
                    self._write_chunk(segment, layer, chunk, buffer, rows)
            except BaseException as error:  # noqa: BLE001 - surfaced to the caller on its next call
                self._fail(error)
            finally:
                self._free[layer].put(buffer)
                with self._idle:
                    self._in_flight -= 1
                    self._idle.notify_all()
                self._slots.release()

    def _write_chunk(self, segment: _Segment, layer: str, chunk: int, buffer: _LayerBuffer, rows: int) -> None:
        checksum, nonfinite = inspect_chunk(buffer.data[:rows], buffer.index[:rows], self.layers[layer].dtype,
                                            self.nonfinite == "count")
        segment.nonfinite[layer][chunk] = nonfinite
        if getattr(segment.writer, "thread_safe", False):
            segment.writer.write_chunk(layer, chunk, buffer.data, buffer.index, rows)
        else:
            with segment.lock:
                segment.writer.write_chunk(layer, chunk, buffer.data, buffer.index, rows)
        segment.checksums[layer][chunk] = checksum  # last: a chunk counts as written only once it is
