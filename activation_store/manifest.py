"""The JSON files of a store: ``store.json`` (what the store holds) and one
``shards/<shard>/manifest.json`` per writer (what that writer has committed).

Both are replaced atomically (temp file, fsync, rename, fsync of the directory), so a
reader sees either the previous or the next version, never a torn one.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from activation_store.dtypes import check_stored_dtype
from activation_store.errors import IncompatibleStoreError, InvalidNameError, NotAStoreError, StoreError

STORE_FORMAT = "mechlens-activation-store"
FORMAT_VERSION = 1
STORE_FILE = "store.json"
SHARDS_DIR = "shards"
SHARD_MANIFEST = "manifest.json"

# Names become directory / file / group names. This module holds the one sanitiser that every
# user- or manifest-supplied name goes through before it becomes a path component (layers and
# shards here; concepts, CAV files, SAE sweep members, experiment outputs in mechlens).
# Names are refused, never rewritten: a conservative alphabet keeps them from escaping the
# folder they are joined under (no '/', '\\', '..', NUL, leading '.' or '-') on every
# filesystem, and since a valid name is used verbatim the name -> path map stays injective.
# Dots are legal inside a name, so module paths such as ``layer1.0.conv1`` work unchanged.
NAME_MAX = 200
_SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]{0,%d}" % (NAME_MAX - 1))


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it is safe as a single path component, else raise :class:`InvalidNameError`.

    Allowed: letters, digits, ``_ . : -`` (1-200 characters, not starting with ``.`` or ``-``,
    no ``..``). ``what`` names the kind of name in the one-line error (``"layer"``, ``"concept"``).
    """
    if not isinstance(name, str) or not _SAFE_NAME.fullmatch(name) or ".." in name:
        raise InvalidNameError(
            f"invalid {what} name {_shown(name)}: use letters, digits, '_', '.', ':' or '-' "
            f"(1-{NAME_MAX} characters, not starting with '.' or '-', no '..' and no path separators)"
        )
    return name


def _shown(name: object) -> str:
    """``repr`` of a name for a one-line error (control characters escaped), shortened."""
    text = ascii(name) if isinstance(name, str) else f"of type {type(name).__name__}"
    return text if len(text) <= 80 else text[:60] + f"...' ({len(name)} characters)"


def safe_join(root: str | os.PathLike, name: str, what: str, *, suffix: str = "",
              within: str | os.PathLike | None = None) -> Path:
    """``root / (name + suffix)`` for a name that passes :func:`check_name`, checked to resolve
    inside ``within`` (default ``root``) so that a symlink cannot lead the write elsewhere.

    Raises :class:`InvalidNameError` (a ``ValueError``) otherwise; nothing is created.
    """
    check_name(name, what)
    if suffix and ("/" in suffix or "\\" in suffix or "\0" in suffix):
        raise InvalidNameError(f"invalid file suffix {suffix!r} for {what} {name!r}")
    path = Path(root) / (name + suffix)
    fence = Path(within if within is not None else root).resolve()
    resolved = path.resolve()
    if resolved == fence or not resolved.is_relative_to(fence):
        raise InvalidNameError(f"{what} {name!r}: {path} resolves to {resolved}, outside {fence} "
                               f"(a symbolic link?); refusing to write there")
    return path


@dataclass(frozen=True)
class LayerSpec:
    """One stored layer: its row width, stored dtype and rows per chunk."""

    dim: int
    dtype: str = "float16"
    chunk_rows: int | None = None  # chosen from the store's chunk size in bytes when None
    meta: Mapping[str, Any] = field(default_factory=dict)  # e.g. spatial shape, pooling

    def __post_init__(self) -> None:
        if int(self.dim) <= 0:
            raise ValueError(f"layer width must be positive, got {self.dim}")
        check_stored_dtype(self.dtype)
        if self.chunk_rows is not None and int(self.chunk_rows) <= 0:
            raise ValueError(f"chunk_rows must be positive, got {self.chunk_rows}")

    def to_json(self) -> dict[str, Any]:
        return {"dim": int(self.dim), "dtype": self.dtype, "chunk_rows": self.chunk_rows, "meta": dict(self.meta)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LayerSpec":
        return cls(dim=int(data["dim"]), dtype=str(data["dtype"]), chunk_rows=data.get("chunk_rows"),
                   meta=dict(data.get("meta", {})))


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, sort_keys=True))


@dataclass(frozen=True)
class StoreManifest:
    """Contents of ``store.json``: fixed when the store is created."""

    model: str
    layers: Mapping[str, LayerSpec]
    backend: str = "zarr"
    compression: str | None = None
    created: float = field(default_factory=time.time)
    provenance: Mapping[str, Any] = field(default_factory=dict)
    format: str = STORE_FORMAT
    version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": self.format, "version": self.version, "model": self.model, "backend": self.backend,
            "compression": self.compression, "created": self.created, "provenance": dict(self.provenance),
            "layers": {name: spec.to_json() for name, spec in self.layers.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "StoreManifest":
        if data.get("format") != STORE_FORMAT:
            raise StoreError(f"unknown store format {data.get('format')!r} (expected {STORE_FORMAT!r})")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise StoreError(f"store format version {data['version']} is newer than this mechlens "
                             f"({FORMAT_VERSION}); upgrade mechlens to read it")
        return cls(
            model=str(data["model"]), backend=str(data["backend"]), compression=data.get("compression"),
            created=float(data.get("created", 0.0)), provenance=dict(data.get("provenance", {})),
            layers={name: LayerSpec.from_json(spec) for name, spec in data["layers"].items()},
            version=int(data["version"]),
        )

    def check_compatible(self, model: str, layers: Mapping[str, LayerSpec]) -> None:
        """Raise ``IncompatibleStoreError`` listing every difference from a writer's request."""
        problems = []
        if model != self.model:
            problems.append(f"model is {self.model!r}, not {model!r}")
        if set(layers) != set(self.layers):
            missing, extra = sorted(set(self.layers) - set(layers)), sorted(set(layers) - set(self.layers))
            problems.append(f"layer set differs (store-only: {missing}, requested-only: {extra})")
        for name in sorted(set(layers) & set(self.layers)):
            have, want = self.layers[name], layers[name]
            if have.dim != want.dim:
                problems.append(f"layer {name!r} has width {have.dim}, not {want.dim}")
            if have.dtype != want.dtype:
                problems.append(f"layer {name!r} is stored as {have.dtype}, not {want.dtype}")
            # meta describes how rows were made (pooling, positions); mixing two kinds is corrupt.
            if want.meta and _json_normal(have.meta) != _json_normal(want.meta):
                problems.append(f"layer {name!r} was written with {dict(have.meta)}, not {dict(want.meta)}")
        if problems:
            raise IncompatibleStoreError(
                "cannot resume this store with different settings: " + "; ".join(problems)
                + ". Write to a new store path, or reopen with the store's own settings."
            )


@dataclass(frozen=True)
class SegmentLayerRecord:
    """What one committed segment holds for one layer."""

    rows: int
    checksums: tuple[int, ...]  # XXH3-64 per chunk over the committed rows' data then index bytes (hex in JSON)
    nonfinite_rows: int = 0


@dataclass(frozen=True)
class SegmentRecord:
    """A committed, immutable segment file of a shard."""

    id: int
    file: str
    layers: Mapping[str, SegmentLayerRecord]

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "file": self.file,
                "layers": {k: {"rows": v.rows, "checksums": [f"{c:016x}" for c in v.checksums], "nonfinite_rows": v.nonfinite_rows}
                           for k, v in self.layers.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SegmentRecord":
        return cls(id=int(data["id"]), file=str(data["file"]),
                   layers={k: SegmentLayerRecord(rows=int(v["rows"]), checksums=tuple(int(c, 16) for c in v["checksums"]),
                                                 nonfinite_rows=int(v.get("nonfinite_rows", 0)))
                           for k, v in data["layers"].items()})


@dataclass(frozen=True)
class ShardManifest:
    """Contents of ``shards/<shard>/manifest.json``: the committed state of one writer."""

    shard: str
    generation: int = 0
    segments: tuple[SegmentRecord, ...] = ()
    cursor: Any = None  # opaque, JSON-able progress marker committed together with the rows
    updated: float = 0.0

    def rows(self, layer: str) -> int:
        return sum(seg.layers[layer].rows for seg in self.segments if layer in seg.layers)

    def to_json(self) -> dict[str, Any]:
        return {"format": STORE_FORMAT + "-shard", "version": FORMAT_VERSION, "shard": self.shard,
                "generation": self.generation, "updated": self.updated, "cursor": self.cursor,
                "segments": [s.to_json() for s in self.segments]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "ShardManifest":
        return cls(shard=str(data["shard"]), generation=int(data["generation"]), updated=float(data.get("updated", 0)),
                   cursor=data.get("cursor"), segments=tuple(SegmentRecord.from_json(s) for s in data["segments"]))

    def with_commit(self, segment: SegmentRecord | None, cursor: Any) -> "ShardManifest":
        segments = self.segments + ((segment,) if segment is not None else ())
        return dataclasses.replace(self, generation=self.generation + 1, segments=segments, cursor=cursor,
                                   updated=time.time())


def write_json_atomic(path: Path, payload: Mapping[str, Any]) -> None:
    """Replace ``path`` with ``payload`` atomically and durably (temp, fsync, rename, fsync dir)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    data = json.dumps(payload, indent=1, sort_keys=True).encode()
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def create_json_exclusive(path: Path, payload: Mapping[str, Any]) -> bool:
    """Write ``path`` only if it does not exist yet (race-free across processes).

    Returns False when another process created it first.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.new-{os.getpid()}-{threading.get_ident()}")  # unique per thread too
    with open(tmp, "wb") as handle:
        handle.write(json.dumps(payload, indent=1, sort_keys=True).encode())
        handle.flush()
        os.fsync(handle.fileno())
    try:
        os.link(tmp, path)  # fails if the target exists: exactly one creator wins
        fsync_dir(path.parent)
        return True
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)


def fsync_dir(directory: Path) -> None:
    """fsync a directory so a rename in it survives power loss (no-op where unsupported)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_store_manifest(root: Path) -> StoreManifest:
    """Load ``store.json`` or raise ``NotAStoreError`` with a helpful message."""
    root = Path(root)
    path = root / STORE_FILE
    if not root.exists():
        raise NotAStoreError(f"{root} does not exist")
    if not path.is_file():
        raise NotAStoreError(f"{root} is not an activation store (no {STORE_FILE}); "
                             f"create one with a writer or a capture job")
    return parse_store_manifest(path.read_bytes(), str(path))


def parse_store_manifest(text: str | bytes, where: str) -> StoreManifest:
    """Parse the bytes of a ``store.json`` read from ``where`` (a path or URL, named in errors)."""
    try:
        manifest = StoreManifest.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"{where} is damaged and cannot be parsed: {_one_line(error)}") from error
    try:
        for name in manifest.layers:
            check_name(name, "layer")
    except InvalidNameError as error:
        raise _bad_name(where, error) from error
    return manifest


def read_shard_manifest(path: Path) -> ShardManifest:
    """Load one shard manifest (its shard, segment file and layer names validated)."""
    path = Path(path)
    return parse_shard_manifest(path.read_bytes(), str(path), path.parent.name)


def parse_shard_manifest(text: str | bytes, where: str, directory: str) -> ShardManifest:
    """Parse the bytes of a shard manifest read from ``where`` (a path or URL, named in errors) in the
    shard directory named ``directory``; every shard, segment file and layer name is validated."""
    try:
        manifest = ShardManifest.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise StoreError(f"shard manifest {where} is damaged and cannot be parsed: {_one_line(error)}") from error
    try:
        check_name(directory, "shard directory")
        check_name(manifest.shard, "shard")
        for segment in manifest.segments:
            check_name(segment.file, "segment file")
            for layer in segment.layers:
                check_name(layer, "layer")
    except InvalidNameError as error:
        raise _bad_name(where, error) from error
    return manifest


def _bad_name(path: Path | str, error: InvalidNameError) -> StoreError:
    return StoreError(f"{path} is damaged or was edited by hand: {error}; such a name could make the store read or "
                      f"write outside its folder, so the store is refused (fix the name in that file, or rebuild the store)")


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__
