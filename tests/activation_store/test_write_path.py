"""The parallel write path: chunk files equal to zarr's own, checksums and non-finite counts,
errors in write threads, and verify / resume with several write threads."""
from __future__ import annotations

import errno
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from activation_store import ActivationStore, LayerSpec, StoreWriter, WriterClosedError
from activation_store import backends
from activation_store.dtypes import float_to_bfloat16_bits
from activation_store.writer import chunk_checksum, count_nonfinite_rows, inspect_chunk, nonfinite_row_mask

SEGMENT = Path("shards/rank-00000/seg-000000.zarr")


def _write(path: Path, data: np.ndarray, *, chunk_rows: int, dtype: str = "float16", batch: int = 37,
           **options) -> None:
    with StoreWriter(path, model="m", layers={"layer": LayerSpec(data.shape[1], dtype, chunk_rows=chunk_rows)},
                     commit_every=3600, **options) as writer:
        for begin in range(0, len(data), batch):
            ids = np.arange(begin, min(begin + batch, len(data)))
            writer.write({"layer": data[begin:begin + batch]}, sample_ids=ids, labels=ids % 5)


def test_direct_chunk_files_equal_zarrs_own_and_open_with_plain_zarr(tmp_path):
    """Several write threads write the chunk files straight to disk: byte for byte what
    zarr-python writes for the same arrays, partial last chunk included."""
    import zarr

    rows, width, chunk_rows = 1000, 24, 64  # 16 chunks, the last one partial (40 rows)
    data = np.random.default_rng(0).standard_normal((rows, width)).astype(np.float16)
    _write(tmp_path / "s", data, chunk_rows=chunk_rows, write_threads=3)

    group = zarr.open(str(tmp_path / "s" / SEGMENT), mode="r")
    np.testing.assert_array_equal(group["layer/data"][:], data)
    index = group["layer/index"][:]
    np.testing.assert_array_equal(index[:, 0], np.arange(rows))
    np.testing.assert_array_equal(index[:, 2], np.arange(rows) % 5)

    reference = zarr.open_group(str(tmp_path / "ref.zarr"), mode="w")
    for name, values in (("data", data), ("index", index)):
        array = reference.create_array(name, shape=values.shape, chunks=(chunk_rows, values.shape[1]),
                                       dtype=values.dtype, compressors=None, fill_value=0)
        array[:] = values
        ours = sorted((tmp_path / "s" / SEGMENT / "layer" / name / "c").glob("*/0"), key=lambda p: int(p.parent.name))
        theirs = sorted((tmp_path / "ref.zarr" / name / "c").glob("*/0"), key=lambda p: int(p.parent.name))
        assert [p.parent.name for p in ours] == [p.parent.name for p in theirs] == [str(i) for i in range(16)]
        for mine, zarrs in zip(ours, theirs):
            assert mine.read_bytes() == zarrs.read_bytes(), f"{name} chunk {mine.parent.name} differs"


@pytest.mark.parametrize("threads", [1, 4])
def test_checksums_and_nonfinite_counts_match_a_serial_pass(tmp_path, threads):
    data = np.random.default_rng(1).standard_normal((700, 16)).astype(np.float32)
    data[[5, 300, 301, 699], [0, 3, 15, 7]] = [np.nan, np.inf, -np.inf, np.nan]
    _write(tmp_path / "s", data, chunk_rows=50, dtype="float32", write_threads=threads)
    store = ActivationStore(tmp_path / "s")
    record = json.loads((tmp_path / "s" / "shards" / "rank-00000" / "manifest.json").read_text())
    checksums = [int(c, 16) for c in record["segments"][0]["layers"]["layer"]["checksums"]]
    index = np.stack([np.arange(700), np.full(700, -1), np.arange(700) % 5], axis=1).astype("<i8")
    expected = [chunk_checksum(data[c * 50:(c + 1) * 50], index[c * 50:(c + 1) * 50]) for c in range(14)]
    assert checksums == expected
    assert store.info().layers[0].nonfinite_rows == 4
    assert store.verify().ok


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
def test_fast_nonfinite_count_equals_the_row_mask(stored):
    rng = np.random.default_rng(2)
    values = (rng.standard_normal((300, 33)) * 100).astype(np.float32)
    largest = {"float16": 65504.0, "bfloat16": 3.3895314e38, "float32": np.finfo(np.float32).max}[stored]
    values[0, :3] = [largest, -largest, -0.0]  # extreme finite values are not counted
    to_disk = {"float16": lambda v: v.astype(np.float16), "float32": lambda v: v,
               "bfloat16": float_to_bfloat16_bits}[stored]
    disk = to_disk(values)
    assert count_nonfinite_rows(disk, stored) == 0
    index = np.zeros((300, 3), "<i8")
    assert inspect_chunk(disk, index, stored, True) == (chunk_checksum(disk, index), 0)
    for bad in (np.nan, np.inf, -np.inf):
        values[[7, 250], [1, 32]] = bad
        values[251, 0] = -bad
        disk = to_disk(values)
        want = int(np.count_nonzero(nonfinite_row_mask(disk, stored)))
        assert want == 3
        assert count_nonfinite_rows(disk, stored) == want
        assert inspect_chunk(disk, index, stored, True) == (chunk_checksum(disk, index), want)
        assert inspect_chunk(disk, index, stored, False)[1] == 0
        if stored != "bfloat16":  # a big-endian batch is checked by value, not by its byte order
            assert count_nonfinite_rows(disk.astype(disk.dtype.newbyteorder(">")), stored) == want
        values[[7, 250, 251], [1, 32, 0]] = 1.0


def test_a_failing_write_thread_surfaces_its_cause_and_loses_no_committed_rows(tmp_path, monkeypatch):
    """Chunk 3 of the second segment fails while chunk 2 is still being written on another
    thread: the error names the cause, that segment is never committed, the first stays
    readable and verified, and a new writer resumes from the committed cursor."""
    layers = {"layer": LayerSpec(8, "float32", chunk_rows=10)}
    path = tmp_path / "s"
    writer = StoreWriter(path, model="m", layers=layers, write_threads=2, commit_every=3600)
    writer.write({"layer": np.ones((45, 8), np.float32)}, sample_ids=np.arange(45), cursor=45)
    writer.flush()

    original = backends._ZarrSegmentWriter.write_chunk
    slow_started, release = threading.Event(), threading.Event()

    def flaky(self, layer, chunk, data, index, rows):
        if chunk == 2:
            slow_started.set()
            assert release.wait(10)
        if chunk == 3:
            assert slow_started.wait(10)
            raise OSError(errno.EIO, "Input/output error", "chunk 3")
        return original(self, layer, chunk, data, index, rows)

    monkeypatch.setattr(backends._ZarrSegmentWriter, "write_chunk", flaky)
    with pytest.raises(WriterClosedError) as caught:
        for start in range(45, 200, 10):
            writer.write({"layer": np.full((10, 8), 7, np.float32)}, sample_ids=np.arange(start, start + 10),
                         cursor=start + 10)
        writer.flush()
    message = str(caught.value)
    assert "OSError: [Errno 5] Input/output error" in message and "rows committed before the failure are intact" \
        in message and "\n" not in message
    release.set()
    with pytest.raises(WriterClosedError, match="Input/output error"):
        writer.close()
    assert not writer._thread.is_alive() and not any(w.is_alive() for w in writer._workers)

    monkeypatch.setattr(backends._ZarrSegmentWriter, "write_chunk", original)
    store = ActivationStore(path)
    assert store["layer"].num_rows == 45 and store.verify().ok
    np.testing.assert_array_equal(store["layer"][:], np.ones((45, 8), np.float32))
    with StoreWriter(path, model="m", layers=layers, write_threads=2) as resumed:
        assert resumed.cursor == 45
        resumed.write({"layer": np.full((30, 8), 2, np.float32)}, sample_ids=np.arange(45, 75), cursor=75)
    store = ActivationStore(path)
    np.testing.assert_array_equal(store["layer"].read_index().sample_id, np.arange(75))
    assert store.verify().ok and not (store["layer"][:] == 7).any()


@pytest.mark.parametrize("backend,compression", [("zarr", "zstd"), ("hdf5", None)])
def test_backends_that_are_not_thread_safe_get_one_chunk_write_at_a_time(tmp_path, monkeypatch, backend,
                                                                          compression):
    cls = backends._ZarrSegmentWriter if backend == "zarr" else backends._Hdf5SegmentWriter
    original, active, most = cls.write_chunk, [0], [0]
    lock = threading.Lock()

    def counting(self, *args):
        assert not self.thread_safe
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return original(self, *args)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(cls, "write_chunk", counting)
    data = np.random.default_rng(3).standard_normal((503, 12)).astype(np.float32)
    with StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(12, "float32", chunk_rows=20)},
                     backend=backend, compression=compression, write_threads=4, commit_every="200rows") as writer:
        for begin in range(0, 503, 61):
            writer.write({"layer": data[begin:begin + 61]}, sample_ids=np.arange(begin, min(begin + 61, 503)))
    assert most[0] == 1
    store = ActivationStore(tmp_path / "s")
    np.testing.assert_array_equal(store["layer"][:], data)
    assert store.verify().ok


def test_durable_multi_segment_writes_with_many_threads_verify(tmp_path):
    data = np.random.default_rng(4).standard_normal((2000, 32)).astype(np.float16)
    _write(tmp_path / "s", data, chunk_rows=64, write_threads=4, durable=True, batch=300)
    with StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(32, "float16", chunk_rows=64)},
                     commit_every="500rows", write_threads=4) as writer:  # resumed: new segments of 500 rows
        for begin in range(2000, 3000, 300):
            writer.write({"layer": data[begin - 2000:begin - 1700]}, sample_ids=np.arange(begin, begin + 300))
    store = ActivationStore(tmp_path / "s")
    assert store["layer"].num_rows == 3200
    np.testing.assert_array_equal(store["layer"][:2000], data)
    np.testing.assert_array_equal(store["layer"][2000:], data[:1200])
    assert store.verify().ok


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_write_threads_is_refused_in_one_line(tmp_path, bad):
    with pytest.raises(ValueError) as caught:
        StoreWriter(tmp_path / "s", model="m", layers={"layer": 4}, write_threads=bad)
    message = str(caught.value)
    assert "write_threads must be an integer >= 1" in message and "\n" not in message
