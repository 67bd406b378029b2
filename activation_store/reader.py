"""Reading an activation store: committed rows only, verified chunk reads, random
access by row id, shuffled batch iteration, ``verify()`` and per-layer statistics.

Logical row ids of a layer run over the shards in name order, then over each shard's
committed segments in order. A store still being written grows at the end of every
shard, so ids are stable only once writing has finished; the row index (sample id,
position) is the stable reference.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import xxhash

from activation_store import backends, remote
from activation_store.dtypes import disk_dtype, from_disk, read_dtype
from activation_store.errors import CorruptChunkError, StoreError
from activation_store.manifest import (
    SHARD_MANIFEST, SHARDS_DIR, LayerSpec, ShardManifest, StoreManifest, check_name, read_shard_manifest,
    read_store_manifest, safe_join,
)
from activation_store.stats import RunningMoments


@dataclass(frozen=True)
class RowIndex:
    """The row index of some rows: where each row came from."""

    row_ids: np.ndarray
    sample_id: np.ndarray
    position: np.ndarray
    label: np.ndarray


@dataclass(frozen=True)
class Batch:
    """A batch of rows with their index (what ``iter_batches(with_index=True)`` yields)."""

    data: np.ndarray
    index: RowIndex


@dataclass(frozen=True)
class BadChunk:
    layer: str
    shard: str
    segment: int
    chunk: int
    reason: str

    def __str__(self) -> str:
        return f"layer {self.layer!r}, shard {self.shard!r}, segment {self.segment}, chunk {self.chunk}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of :meth:`ActivationStore.verify`."""

    chunks_checked: int
    bytes_checked: int
    bad_chunks: tuple[BadChunk, ...]

    @property
    def ok(self) -> bool:
        return not self.bad_chunks


@dataclass(frozen=True)
class LayerStatistics:
    """Per-dimension mean and variance, and E[||x||^2], over the finite rows of a layer."""

    layer: str
    count: int
    mean: np.ndarray
    variance: np.ndarray
    mean_squared_norm: float
    nonfinite_rows: int

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "count": self.count, "mean": self.mean.tolist(), "variance": self.variance.tolist(),
                "mean_squared_norm": self.mean_squared_norm, "nonfinite_rows": self.nonfinite_rows}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LayerStatistics":
        return cls(data["layer"], int(data["count"]), np.asarray(data["mean"], np.float64),
                   np.asarray(data["variance"], np.float64), float(data["mean_squared_norm"]),
                   int(data["nonfinite_rows"]))


@dataclass(frozen=True)
class LayerInfo:
    name: str
    rows: int
    dim: int
    dtype: str
    chunk_rows: int
    chunks: int
    nonfinite_rows: int
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ShardInfo:
    name: str
    segments: int
    rows: Mapping[str, int]
    cursor: Any


@dataclass(frozen=True)
class StoreInfo:
    """Summary of a store (what ``mechlens store info`` prints)."""

    path: str
    model: str
    backend: str
    compression: str | None
    layers: tuple[LayerInfo, ...]
    shards: tuple[ShardInfo, ...]
    size_bytes: int

    def __str__(self) -> str:
        lines = [f"store    {self.path}", f"model    {self.model}",
                 f"backend  {self.backend} (compression: {self.compression or 'none'})",
                 f"size     {_human_bytes(self.size_bytes)} on disk", f"shards   {len(self.shards)}", "",
                 f"{'layer':<32} {'rows':>12} {'dim':>6} {'dtype':>9} {'chunks':>7} {'non-finite':>10}"]
        for layer in self.layers:
            lines.append(f"{layer.name:<32} {layer.rows:>12,} {layer.dim:>6} {layer.dtype:>9} {layer.chunks:>7} "
                         f"{layer.nonfinite_rows:>10}")
        if self.shards:
            lines += ["", f"{'shard':<16} {'segments':>8}  rows per layer"]
            for shard in self.shards:
                rows = ", ".join(f"{k}={v:,}" for k, v in shard.rows.items())
                lines.append(f"{shard.name:<16} {shard.segments:>8}  {rows}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"path": self.path, "model": self.model, "backend": self.backend, "compression": self.compression,
                "size_bytes": self.size_bytes,
                "layers": [layer.__dict__ | {"meta": dict(layer.meta)} for layer in self.layers],
                "shards": [{"name": s.name, "segments": s.segments, "rows": dict(s.rows), "cursor": s.cursor}
                           for s in self.shards]}


def _allocated_bytes(stat: os.stat_result) -> int:
    blocks = getattr(stat, "st_blocks", None)
    return stat.st_size if blocks is None else min(stat.st_size, blocks * 512)


def _human_bytes(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{size:.1f} TiB"


@dataclass(frozen=True)
class _ChunkTable:
    """Every committed chunk of one layer, in logical row order (parallel arrays)."""

    shard: np.ndarray      # index into ``shard_names``
    segment: np.ndarray    # index into ``segments``
    chunk: np.ndarray      # chunk number inside its segment
    rows: np.ndarray
    start: np.ndarray      # logical id of the chunk's first row
    checksum: np.ndarray
    # The snapshot these positions index into: a view taken before a refresh() keeps reading the
    # segments it was built on, whatever the new snapshot's order.
    shard_names: tuple[str, ...] = ()
    segments: tuple[tuple[str, int, str], ...] = ()  # (shard, segment id, file)

    @property
    def num_rows(self) -> int:
        return int(self.start[-1] + self.rows[-1]) if len(self.rows) else 0


class ActivationStore:
    """A read-only view of the committed contents of a store.

    ``verify_reads`` (default on) checks every chunk's XXH3-64 checksum as it is read, so a damaged
    chunk raises :class:`CorruptChunkError` instead of returning wrong numbers.
    ``memory_map`` (default on) reads uncompressed zarr chunks as read-only views of the
    memory-mapped chunk files (zero-copy; chunk files are immutable once committed), so the
    arrays from :meth:`LayerView.read_chunk` / :meth:`LayerView.iter_chunks` are read-only
    (``np.array(chunk)`` for a private copy); rows and batches are always fresh arrays.
    Call :meth:`refresh` to see rows committed after opening.

    ``path`` may be an fsspec URL (``s3://bucket/store``, ``gs://...``; ``storage_options`` are
    passed to fsspec, e.g. ``{"endpoint_url": "http://127.0.0.1:9000"}``): such a store is read
    through fsspec, every chunk still verified, and is read-only (writing is local / NFS only).
    ``root`` is then the URL string; statistics are not cached there.
    """

    def __repr__(self) -> str:
        layers = ", ".join(f"{name}: {self[name].num_rows:,} x {self[name].dim}" for name in self.layers)
        return f"ActivationStore({str(self.root)!r}, {layers or 'empty'})"

    def __init__(self, path: str | os.PathLike, *, verify_reads: bool = True, memory_map: bool = True,
                 storage_options: Mapping[str, Any] | None = None):
        self._remote: remote.RemoteLocation | None = None
        if remote.is_url(path):
            self._remote = remote.RemoteLocation(str(path), storage_options)
            self.root: Path | str = self._remote.url
            self.manifest: StoreManifest = self._remote.read_store_manifest()
        else:
            if storage_options:
                raise ValueError(f"storage_options apply to fsspec URLs (s3://..., gs://...) only; {str(path)!r} "
                                 f"is a local path: drop storage_options, or pass the store's URL")
            self.root = remote.local_path(path)
            self.manifest = read_store_manifest(self.root)
        self.verify_reads = verify_reads
        self.memory_map = memory_map
        # Keyed by the segment's identity (shard, file), never by its position in a snapshot: a
        # refresh() while another shard grows shifts positions, and committed files never change.
        self._readers: dict[tuple[str, str], backends.SegmentReader] = {}
        self._readers_pid = os.getpid()
        self._lock = threading.Lock()
        self.refresh()

    @property
    def is_remote(self) -> bool:
        """True when the store is read through fsspec from a URL."""
        return self._remote is not None

    @property
    def storage_options(self) -> dict[str, Any]:
        """The fsspec options of a store opened by URL (empty for a local store)."""
        return dict(self._remote.storage_options) if self._remote is not None else {}

    # ------------------------------------------------------------------ snapshot
    def refresh(self) -> None:
        """Re-read the shard manifests: pick up rows committed since the last snapshot."""
        if self._remote is not None:
            self.shards: dict[str, ShardManifest] = self._remote.read_shard_manifests()
        else:
            shards_dir = self.root / SHARDS_DIR
            shard_dirs = sorted(p for p in shards_dir.iterdir() if (p / SHARD_MANIFEST).is_file()) \
                if shards_dir.is_dir() else []
            self.shards = {p.name: read_shard_manifest(p / SHARD_MANIFEST) for p in shard_dirs}
        self._shard_names = list(self.shards)
        self._segments: list[tuple[str, int, str]] = []  # (shard, segment id, file)
        tables: dict[str, dict[str, list]] = {name: {k: [] for k in ("shard", "segment", "chunk", "rows", "checksum")}
                                               for name in self.manifest.layers}
        for shard_pos, (shard, manifest) in enumerate(self.shards.items()):
            for segment in manifest.segments:
                self._segments.append((shard, segment.id, segment.file))
                segment_pos = len(self._segments) - 1
                for layer, record in segment.layers.items():
                    if layer not in tables or record.rows == 0:
                        continue
                    chunk_rows = self.manifest.layers[layer].chunk_rows
                    for chunk, checksum in enumerate(record.checksums):
                        table = tables[layer]
                        table["shard"].append(shard_pos)
                        table["segment"].append(segment_pos)
                        table["chunk"].append(chunk)
                        table["rows"].append(min(chunk_rows, record.rows - chunk * chunk_rows))
                        table["checksum"].append(checksum)
        self._tables: dict[str, _ChunkTable] = {}
        for layer, table in tables.items():
            rows = np.asarray(table["rows"], np.int64)
            starts = np.concatenate([[0], np.cumsum(rows)[:-1]]).astype(np.int64) if len(rows) else rows
            self._tables[layer] = _ChunkTable(np.asarray(table["shard"], np.int64), np.asarray(table["segment"], np.int64),
                                              np.asarray(table["chunk"], np.int64), rows, starts,
                                              np.asarray(table["checksum"], np.uint64), tuple(self._shard_names),
                                              tuple(self._segments))

    # ------------------------------------------------------------------ access
    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self.manifest.layers)

    def __getitem__(self, layer: str) -> "LayerView":
        return self.layer(layer)

    def layer(self, name: str) -> "LayerView":
        """A view of one layer's rows."""
        if name not in self.manifest.layers:
            import difflib

            close = difflib.get_close_matches(name, self.layers, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise KeyError(f"layer {name!r} is not in the store {self.root} (it holds {list(self.layers)}){hint}")
        return LayerView(self, name)

    def num_rows(self, layer: str) -> int:
        return self.layer(layer).num_rows

    def info(self) -> StoreInfo:
        """Layers, rows, dims, dtypes, shards and size on disk."""
        layers = []
        for name, spec in self.manifest.layers.items():
            table = self._tables[name]
            nonfinite = sum(seg.layers[name].nonfinite_rows for m in self.shards.values() for seg in m.segments
                            if name in seg.layers)
            layers.append(LayerInfo(name, table.num_rows, spec.dim, spec.dtype, int(spec.chunk_rows), len(table.rows),
                                    nonfinite, dict(spec.meta)))
        shards = tuple(ShardInfo(name, len(m.segments), {layer: m.rows(layer) for layer in self.layers}, m.cursor)
                       for name, m in self.shards.items())
        if self._remote is not None:
            size = self._remote.size_bytes()
        else:  # allocated blocks, not apparent sizes: partial chunks are sparse files
            size = sum(_allocated_bytes(f.stat()) for f in self.root.rglob("*") if f.is_file())
        return StoreInfo(str(self.root), self.manifest.model, self.manifest.backend, self.manifest.compression,
                         tuple(layers), shards, size)

    def verify(self, *, layers: Sequence[str] | None = None, progress: bool = False) -> VerifyReport:
        """Re-read every committed chunk and check its XXH3-64 checksum; report every bad chunk."""
        bad: list[BadChunk] = []
        checked = 0
        nbytes = 0
        names = list(layers) if layers is not None else list(self.layers)
        total = sum(self.layer(n).num_chunks for n in names)  # an unknown name: KeyError with close matches
        bar = _progress(total, "verify", progress)
        for name in names:
            view = self.layer(name)
            for position in range(view.num_chunks):
                try:
                    data, _ = view._read_chunk(position, with_index=True, verify=True)
                    nbytes += data.nbytes
                except CorruptChunkError as error:
                    bad.append(BadChunk(error.layer, error.shard, error.segment, error.chunk, error.reason))
                checked += 1
                bar.update(1)
        bar.close()
        return VerifyReport(checked, nbytes, tuple(bad))

    def statistics(self, layer: str, *, use_cache: bool = True, progress: bool = False) -> LayerStatistics:
        """Per-dimension mean / variance and mean squared norm of a layer, in one pass.

        Moments are computed per chunk, merged per shard, then across shards with a
        numerically stable merge; non-finite rows are left out and counted. The result
        is cached in ``stats/<layer>.json`` keyed by the committed chunks it covers (a store read
        by URL uses a cache uploaded with it, but never writes one).
        """
        view = self.layer(layer)
        table = self._tables[layer]
        fingerprint = hashlib.sha256(np.stack([table.rows, table.checksum]).tobytes()).hexdigest() if len(table.rows) else "empty"
        cache = None
        if self._remote is not None:
            text = self._remote.read_optional("stats", check_name(layer, "layer") + ".json") if use_cache else None
        else:
            # the layer name was validated with the manifest; the resolved path is checked too (a symlinked
            # stats/ must not lead the cache write outside the store)
            cache = safe_join(self.root / "stats", layer, "layer", suffix=".json", within=self.root)
            try:
                text = cache.read_bytes() if use_cache and cache.is_file() else None
            except OSError:
                text = None
        if text is not None:
            try:
                cached = json.loads(text)
                if cached.get("fingerprint") == fingerprint:
                    return LayerStatistics.from_json(cached["statistics"])
            except (ValueError, KeyError, TypeError, AttributeError):
                pass
        per_shard = {s: RunningMoments.empty(view.dim) for s in range(len(table.shard_names))}
        nonfinite = 0
        bar = _progress(view.num_chunks, f"statistics {layer}", progress)
        for position, data in view.iter_chunks(shuffle=False, raw=False, _positions=True):
            bad = ~np.isfinite(data).all(axis=1)
            if bad.any():
                nonfinite += int(bad.sum())
                data = data[~bad]
            shard = int(table.shard[position])
            per_shard[shard] = per_shard[shard].merge(RunningMoments.of(data))
            bar.update(1)
        bar.close()
        total = RunningMoments.empty(view.dim)
        for moments in per_shard.values():
            total = total.merge(moments)
        result = LayerStatistics(layer, total.count, total.mean, total.variance, total.mean_squared_norm, nonfinite)
        if cache is None:
            return result
        try:
            cache.parent.mkdir(exist_ok=True)
            tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}-{threading.get_ident()}")
            tmp.write_text(json.dumps({"fingerprint": fingerprint, "statistics": result.to_json()}))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only store still answers, it just does not cache
        return result

    # ------------------------------------------------------------------ segment files
    def _segment_reader(self, shard: str, file: str) -> backends.SegmentReader:
        with self._lock:
            if self._readers_pid != os.getpid():  # after fork: never share file handles with the parent
                self._readers = {}
                self._readers_pid = os.getpid()
            key = (shard, file)
            reader = self._readers.get(key)
            if reader is None:
                chunk_rows = {k: int(v.chunk_rows) for k, v in self.manifest.layers.items()}
                if self._remote is not None:
                    reader = self._remote.open_segment(self.manifest.backend, shard, file, self.manifest.layers,
                                                       chunk_rows)
                else:
                    reader = backends.open_segment(self.manifest.backend, self.root / SHARDS_DIR / shard / file,
                                                   self.manifest.layers, chunk_rows)
                self._readers[key] = reader
            return reader

    def close(self) -> None:
        with self._lock:
            for reader in self._readers.values():
                reader.close()
            self._readers.clear()

    def __enter__(self) -> "ActivationStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:  # picklable for DataLoader workers: handles are reopened
        state = self.__dict__.copy()
        state["_readers"] = {}
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def _progress(total: int, desc: str, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="chunk", disable=not enabled, leave=False)


class LayerView:
    """The committed rows of one layer: ``shape == (num_rows, dim)``.

    Indexing (``view[10]``, ``view[5:9]``, ``view[[3, 1, 2]]``) returns numpy arrays;
    bfloat16 layers are returned as float32 (exact) unless ``raw=True`` is asked for.
    """

    def __init__(self, store: ActivationStore, name: str):
        self.store = store
        self.name = name
        self.spec: LayerSpec = store.manifest.layers[name]
        self._table = store._tables[name]

    @property
    def dim(self) -> int:
        return self.spec.dim

    @property
    def num_rows(self) -> int:
        return self._table.num_rows

    @property
    def num_chunks(self) -> int:
        return len(self._table.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.dim)

    @property
    def dtype(self) -> np.dtype:
        """The dtype reads return (bfloat16 layers read as float32)."""
        return read_dtype(self.spec.dtype)

    def __len__(self) -> int:
        return self.num_rows

    def __repr__(self) -> str:
        return f"LayerView({self.name!r}, rows={self.num_rows}, dim={self.dim}, dtype={self.spec.dtype})"

    # ------------------------------------------------------------------ chunks
    def _read_chunk(self, position: int, *, with_index: bool, verify: bool | None = None, raw: bool = True,
                    out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        table = self._table
        rows = int(table.rows[position])
        shard, segment_id, file = table.segments[int(table.segment[position])]
        chunk = int(table.chunk[position])
        verify = self.store.verify_reads if verify is None else verify
        index = np.empty((rows, 3), backends.INDEX_DTYPE) if (with_index or verify) else None
        digest = xxhash.xxh3_64() if verify else None
        try:
            reader = self.store._segment_reader(shard, file)
            data = None
            if out is None and self.store.memory_map and hasattr(reader, "map_chunk"):
                data = reader.map_chunk(self.name, chunk, rows, disk_dtype(self.spec.dtype), digest)
            if data is None:
                data = out if out is not None else np.empty((rows, self.dim), disk_dtype(self.spec.dtype))
                reader.read_chunk(self.name, chunk, rows, data, index, digest)
            elif index is not None:
                reader.read_chunk(self.name, chunk, rows, None, index, digest)
        except backends.ChunkReadError as error:
            raise CorruptChunkError(self.name, shard, segment_id, chunk, str(error)) from error
        if verify and digest.intdigest() != int(table.checksum[position]):
            raise CorruptChunkError(self.name, shard, segment_id, chunk,
                                    "checksum mismatch (the chunk's bytes changed after it was committed)")
        return (data if raw else from_disk(data, self.spec.dtype, raw=False)), index

    def read_chunk(self, position: int, *, raw: bool = False, with_index: bool = False):
        """Read the ``position``-th committed chunk (logical order); optionally with its :class:`RowIndex`."""
        if not 0 <= position < self.num_chunks:
            raise IndexError(f"chunk {position} out of range: layer {self.name!r} has {self.num_chunks} chunks")
        data, index = self._read_chunk(position, with_index=with_index, raw=raw)
        if not with_index:
            return data
        start = int(self._table.start[position])
        return data, RowIndex(np.arange(start, start + len(data)), index[:, 0], index[:, 1], index[:, 2])

    def iter_chunks(self, *, shuffle: bool = False, seed: int = 0, raw: bool = False, prefetch: int = 2,
                    rank: int = 0, world_size: int = 1, _positions: bool = False) -> Iterator[np.ndarray]:
        """Yield every committed chunk (optionally in a seeded random order), reading ahead on threads."""
        order = np.arange(self.num_chunks)
        if shuffle:
            order = np.random.default_rng(seed).permutation(self.num_chunks)
        order = order[rank::world_size]
        for position, (data, _) in zip(order, self._read_ahead(order, prefetch, with_index=False)):
            data = data if raw else from_disk(data, self.spec.dtype, raw=False)
            yield (int(position), data) if _positions else data

    def _read_ahead(self, positions: Sequence[int], prefetch: int, with_index: bool):
        if prefetch <= 0:
            for position in positions:
                yield self._read_chunk(int(position), with_index=with_index)
            return
        with ThreadPoolExecutor(max_workers=max(1, prefetch), thread_name_prefix="store-read") as pool:
            pending = []
            iterator = iter(positions)
            for position in iterator:
                pending.append(pool.submit(self._read_chunk, int(position), with_index=with_index))
                if len(pending) > prefetch:
                    yield pending.pop(0).result()
            for future in pending:
                yield future.result()

    # ------------------------------------------------------------------ rows
    def _normalise_ids(self, rows) -> np.ndarray:
        if isinstance(rows, slice):
            return np.arange(*rows.indices(self.num_rows))
        ids = np.asarray(rows)
        if ids.dtype.kind not in "iu":
            raise TypeError(f"row ids must be integers, got dtype {ids.dtype}")
        ids = np.where(ids < 0, ids + self.num_rows, ids).astype(np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            raise IndexError(f"row id out of range for layer {self.name!r} with {self.num_rows} committed rows")
        return ids

    def __getitem__(self, rows) -> np.ndarray:
        if isinstance(rows, tuple):  # numpy-style view[rows, columns]
            return self[rows[0]][(slice(None),) + rows[1:]] if not isinstance(rows[0], (int, np.integer)) \
                else self[rows[0]][rows[1:]]
        if isinstance(rows, (int, np.integer)):
            return self.read_rows([rows])[0]
        return self.read_rows(rows)

    def read_rows(self, rows, *, raw: bool = False) -> np.ndarray:
        """Rows by logical id (any order, repeats allowed); each chunk is read once."""
        ids = self._normalise_ids(rows).reshape(-1)
        out = np.empty((ids.size, self.dim), disk_dtype(self.spec.dtype))
        if ids.size:
            positions = np.searchsorted(self._table.start, ids, side="right") - 1
            for position in np.unique(positions):
                mask = positions == position
                data, _ = self._read_chunk(int(position), with_index=False)
                out[mask] = data[ids[mask] - self._table.start[position]]
        return out if raw else from_disk(out, self.spec.dtype, raw=False)

    def read_index(self, rows=None) -> RowIndex:
        """The row index (sample id, position, label) of the given rows (all rows when None)."""
        ids = np.arange(self.num_rows) if rows is None else self._normalise_ids(rows).reshape(-1)
        out = np.empty((ids.size, 3), backends.INDEX_DTYPE)
        if ids.size:
            positions = np.searchsorted(self._table.start, ids, side="right") - 1
            for position in np.unique(positions):
                mask = positions == position
                _, index = self._read_chunk(int(position), with_index=True)
                out[mask] = index[ids[mask] - self._table.start[position]]
        return RowIndex(ids, out[:, 0], out[:, 1], out[:, 2])

    # ------------------------------------------------------------------ batches
    def iter_batches(self, batch_size: int, *, shuffle: bool = True, seed: int = 0, epoch: int = 0,
                     shuffle_buffer_chunks: int = 8, drop_last: bool = False, with_index: bool = False,
                     raw: bool = False, rank: int = 0, world_size: int = 1, prefetch: int = 2,
                     chunks: Sequence[int] | None = None) -> Iterator:
        """Yield ``[batch_size, dim]`` arrays (or :class:`Batch` with ``with_index``).

        Shuffling is two-level: the chunk order is permuted (seeded by ``seed`` and
        ``epoch``), then rows are permuted inside a buffer of ``shuffle_buffer_chunks``
        chunks. ``rank`` / ``world_size`` split the chunks between processes or DataLoader
        workers. ``chunks``: only these chunk positions (e.g. all but a validation split).
        Memory stays at about (shuffle_buffer_chunks + prefetch) chunks.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        rng = np.random.default_rng([seed, epoch])
        order = self.chunk_order(shuffle=shuffle, seed=seed, epoch=epoch, rank=rank, world_size=world_size,
                                 chunks=chunks, rng=rng)
        reads = self._read_ahead(order, prefetch, with_index=True)
        window = max(1, int(shuffle_buffer_chunks))
        carry_data = np.empty((0, self.dim), disk_dtype(self.spec.dtype))
        carry_index = np.empty((0, 4), np.int64)
        for start in range(0, len(order), window):
            positions = order[start:start + window]
            parts, indices = [carry_data], [carry_index]
            for position in positions:
                data, index = next(reads)
                ids = self._table.start[position] + np.arange(len(data))
                parts.append(data)
                indices.append(np.column_stack([ids, index]))
            data, index = np.concatenate(parts), np.concatenate(indices)
            if shuffle:
                perm = rng.permutation(len(data))
                data, index = data[perm], index[perm]
            full = (len(data) // batch_size) * batch_size
            for begin in range(0, full, batch_size):
                yield self._emit(data[begin:begin + batch_size], index[begin:begin + batch_size], with_index, raw)
            carry_data, carry_index = data[full:], index[full:]
        if len(carry_data) and not drop_last:
            yield self._emit(carry_data, carry_index, with_index, raw)

    def chunk_order(self, *, shuffle: bool = True, seed: int = 0, epoch: int = 0, rank: int = 0, world_size: int = 1,
                    chunks: Sequence[int] | None = None, rng: np.random.Generator | None = None) -> np.ndarray:
        """The chunk positions :meth:`iter_batches` reads for ``rank``, in its order (``rng``: the
        generator it goes on to shuffle rows with, seeded ``[seed, epoch]``)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        rng = rng if rng is not None else np.random.default_rng([seed, epoch])
        selected = np.arange(self.num_chunks) if chunks is None else self._chunk_positions(chunks)
        order = selected[rng.permutation(len(selected))] if shuffle else selected
        return order[rank::world_size]

    def _chunk_positions(self, chunks: Sequence[int]) -> np.ndarray:
        positions = np.unique(np.asarray(chunks, dtype=np.int64).reshape(-1))
        if positions.size and (positions[0] < 0 or positions[-1] >= self.num_chunks):
            raise IndexError(f"chunk positions must be in [0, {self.num_chunks}) for layer {self.name!r}, got "
                             f"{positions[0] if positions[0] < 0 else positions[-1]}")
        return positions

    def chunk_rows(self, chunks: Sequence[int] | None = None) -> int:
        """The number of rows in the given chunk positions (all chunks when None)."""
        if chunks is None:
            return self.num_rows
        return int(np.asarray(self._table.rows)[self._chunk_positions(chunks)].sum())

    def _emit(self, data: np.ndarray, index: np.ndarray, with_index: bool, raw: bool):
        data = data if raw else from_disk(data, self.spec.dtype, raw=False)
        if not with_index:
            return data
        return Batch(data, RowIndex(index[:, 0], index[:, 1], index[:, 2], index[:, 3]))

    def torch_dataset(self, batch_size: int, **kwargs):
        """A ``torch.utils.data.IterableDataset`` of batches, splitting chunks across DataLoader workers.

        Use with ``DataLoader(ds, batch_size=None, num_workers=N)``. Keywords are those of
        :meth:`iter_batches`; ``rank`` / ``world_size`` are combined with the worker split.
        """
        from activation_store.torch_adapter import StoreBatches

        if self.store.storage_options:
            kwargs["storage_options"] = self.store.storage_options
        return StoreBatches(self.store.root, self.name, batch_size, verify_reads=self.store.verify_reads, **kwargs)

    def statistics(self, **kwargs) -> LayerStatistics:
        return self.store.statistics(self.name, **kwargs)
