"""A store backend registered from outside the package (docs/extending.md): one file, one
``register_backend`` call; writers, readers, checksums and resume work unchanged."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from activation_store import ActivationStore, Backend, LayerSpec, StoreWriter, register_backend


class NpyWriter:
    """Each chunk as two .npy files (data and index) in a segment directory."""

    def __init__(self, path: Path, layers, chunk_rows, compression) -> None:
        self.path = Path(path)
        for layer in layers:
            (self.path / layer).mkdir(parents=True, exist_ok=True)

    def write_chunk(self, layer: str, chunk: int, data: np.ndarray, index: np.ndarray, rows: int) -> None:
        np.save(self.path / layer / f"{chunk}.data.npy", data[:rows])
        np.save(self.path / layer / f"{chunk}.index.npy", index[:rows])

    def close(self, rows, durable: bool) -> None:
        pass


class NpyReader:
    def __init__(self, path: Path, layers, chunk_rows) -> None:
        self.path = Path(path)

    def read_chunk(self, layer, chunk, rows, out, index_out, digest=None) -> None:
        data = np.load(self.path / layer / f"{chunk}.data.npy")
        index = np.load(self.path / layer / f"{chunk}.index.npy")
        out[:rows] = data[:rows]
        if index_out is not None:
            index_out[:rows] = index[:rows]
        if digest is not None:
            digest.update(np.ascontiguousarray(data[:rows]).view(np.uint8))
            digest.update(np.ascontiguousarray(index[:rows]).view(np.uint8))

    def close(self) -> None:
        pass


def test_a_third_party_backend_writes_and_reads_a_verified_store(tmp_path) -> None:
    register_backend(Backend("npy", "npy", (), NpyWriter, NpyReader))
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((300, 8)).astype(np.float32)
    with StoreWriter(tmp_path / "s", model="m", layers={"l": LayerSpec(8, "float32", chunk_rows=64)},
                     backend="npy") as writer:
        writer.write({"l": rows[:200]}, sample_ids=np.arange(200))
        writer.flush()  # a committed segment, then a second one on close
        writer.write({"l": rows[200:]}, sample_ids=np.arange(200, 300))
    store = ActivationStore(tmp_path / "s")
    assert store.manifest.backend == "npy"
    assert list((tmp_path / "s").rglob("seg-*.npy"))  # the backend's own segment files
    np.testing.assert_array_equal(np.asarray(store["l"][:]), rows)
    assert store.verify().ok  # the checksums the writer recorded match what the backend reads back
