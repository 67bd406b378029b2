"""Round trips, interoperability, shards, statistics, batch iteration and bad input."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from activation_store import (
    ActivationStore, IncompatibleStoreError, InvalidRowsError, LayerSpec, NotAStoreError, Rows, StoreError,
    StoreWriter, WriterClosedError, bfloat16_bits_to_float32, float_to_bfloat16_bits,
)

ROOT = Path(__file__).resolve().parents[2]


def write_rows(path, data, *, dtype="float32", backend="zarr", compression=None, chunk_rows=64, shard=0,
               start_id=0, batch=50, **kwargs):
    layers = {"layer": LayerSpec(data.shape[1], dtype, chunk_rows=chunk_rows)}
    with StoreWriter(path, model="m", layers=layers, backend=backend, compression=compression, shard=shard,
                     **kwargs) as writer:
        for begin in range(0, len(data), batch):
            ids = np.arange(begin, min(begin + batch, len(data))) + start_id
            writer.write({"layer": data[begin:begin + batch]}, sample_ids=ids, labels=ids % 3)
    return ActivationStore(path)


@pytest.mark.parametrize("backend,compression", [("zarr", None), ("zarr", "zstd"), ("hdf5", None), ("hdf5", "gzip")])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip(tmp_path, backend, compression, dtype):
    data = np.random.default_rng(0).standard_normal((333, 20)).astype(dtype)
    store = write_rows(tmp_path / "s", data, dtype=dtype, backend=backend, compression=compression)
    view = store["layer"]
    assert view.shape == (333, 20) and view.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(view[:], data)
    np.testing.assert_array_equal(view[[332, 0, 5, 5]], data[[332, 0, 5, 5]])
    np.testing.assert_array_equal(view[-1], data[-1])
    index = view.read_index([7, 300])
    np.testing.assert_array_equal(index.sample_id, [7, 300])
    np.testing.assert_array_equal(index.label, [1, 0])
    np.testing.assert_array_equal(index.position, [-1, -1])
    assert store.verify().ok


def test_bfloat16_is_stored_losslessly(tmp_path):
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 2**16, size=(200, 16), dtype=np.uint16)
    bits[(bits & 0x7F80) == 0x7F80] = 0x3F80  # keep finite patterns only (NaN payloads are counted separately)
    store = write_rows(tmp_path / "s", bits, dtype="bfloat16")
    np.testing.assert_array_equal(store["layer"].read_rows(np.arange(200), raw=True), bits)
    np.testing.assert_array_equal(store["layer"][:], bfloat16_bits_to_float32(bits))
    values = rng.standard_normal(1000).astype(np.float32)
    rounded = bfloat16_bits_to_float32(float_to_bfloat16_bits(values))
    assert np.max(np.abs(rounded - values) / np.abs(values)) <= 2.0**-8  # round-to-nearest of an 8-bit mantissa


def test_zarr_segments_are_plain_zarr_v3_arrays(tmp_path):
    import zarr

    data = np.random.default_rng(2).standard_normal((150, 12)).astype(np.float16)
    write_rows(tmp_path / "s", data, dtype="float16", chunk_rows=64)
    segment = tmp_path / "s" / "shards" / "rank-00000" / "seg-000000.zarr"
    array = zarr.open_array(str(segment / "layer" / "data"), mode="r")
    assert array.shape == (150, 12) and array.chunks == (64, 12) and array.metadata.zarr_format == 3
    np.testing.assert_array_equal(array[:], data)
    index = zarr.open_array(str(segment / "layer" / "index"), mode="r")
    np.testing.assert_array_equal(index[:, 0], np.arange(150))
    assert index.attrs["columns"] == ["sample_id", "position", "label"]


def test_hdf5_segments_are_plain_hdf5(tmp_path):
    import h5py

    data = np.random.default_rng(3).standard_normal((90, 6)).astype(np.float32)
    write_rows(tmp_path / "s", data, backend="hdf5")
    with h5py.File(tmp_path / "s" / "shards" / "rank-00000" / "seg-000000.h5", "r") as handle:
        np.testing.assert_array_equal(handle["layer/data"][:], data)


def test_shards_form_one_logical_array_and_statistics_merge_stably(tmp_path):
    rng = np.random.default_rng(4)
    # a large offset with a small spread: a naive E[x^2]-E[x]^2 in float32 would lose the variance
    parts = [1e4 + rng.standard_normal((n, 8)).astype(np.float32) * 0.01 for n in (300, 170, 55)]
    for shard, part in enumerate(parts):
        write_rows(tmp_path / "s", part, shard=shard, start_id=1000 * shard)
    store = ActivationStore(tmp_path / "s")
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(store["layer"][:], everything)
    assert [s.name for s in store.info().shards] == ["rank-00000", "rank-00001", "rank-00002"]
    stats = store.statistics("layer")
    exact = everything.astype(np.float64)
    assert stats.count == len(exact)
    np.testing.assert_allclose(stats.mean, exact.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats.variance, exact.var(0), rtol=1e-6)
    np.testing.assert_allclose(stats.mean_squared_norm, (exact ** 2).sum(1).mean(), rtol=1e-12)
    assert (tmp_path / "s" / "stats" / "layer.json").is_file()
    cached = store.statistics("layer")
    np.testing.assert_array_equal(cached.variance, stats.variance)


def test_statistics_skip_and_count_nonfinite_rows(tmp_path):
    data = np.ones((100, 4), np.float32)
    data[[3, 50]] = np.nan
    data[70, 2] = np.inf
    store = write_rows(tmp_path / "s", data)
    info = store.info()
    assert info.layers[0].nonfinite_rows == 3  # counted in the manifest at write time
    stats = store.statistics("layer")
    assert stats.nonfinite_rows == 3 and stats.count == 97
    np.testing.assert_array_equal(stats.mean, np.ones(4))


def test_iter_batches_cover_every_row_once_and_shuffle_by_seed(tmp_path):
    data = np.arange(1000 * 3, dtype=np.float32).reshape(1000, 3)
    store = write_rows(tmp_path / "s", data, chunk_rows=64, batch=97)
    view = store["layer"]

    def order(**kwargs):
        batches = list(view.iter_batches(128, with_index=True, **kwargs))
        for batch in batches:
            np.testing.assert_array_equal(batch.data, data[batch.index.sample_id])
        return np.concatenate([b.index.row_ids for b in batches])

    first = order(seed=0)
    assert sorted(first) == list(range(1000))
    np.testing.assert_array_equal(order(seed=0), first)
    assert not np.array_equal(order(seed=1), first)
    assert not np.array_equal(order(seed=0, epoch=1), first)
    np.testing.assert_array_equal(order(shuffle=False), np.arange(1000))
    halves = [order(seed=5, rank=r, world_size=2) for r in range(2)]
    assert not set(halves[0]) & set(halves[1]) and len(halves[0]) + len(halves[1]) == 1000
    sizes = [len(b) for b in view.iter_batches(128, drop_last=True)]
    assert sizes and set(sizes) == {128}


def test_torch_dataloader_with_workers_reads_every_row_once(tmp_path):
    torch = pytest.importorskip("torch")
    data = np.arange(700 * 2, dtype=np.float32).reshape(700, 2)
    store = write_rows(tmp_path / "s", data, chunk_rows=50)
    dataset = store["layer"].torch_dataset(64, with_index=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    seen = []
    for batch in loader:
        assert batch["data"].dtype == torch.float32
        torch.testing.assert_close(batch["data"], torch.from_numpy(data)[batch["sample_id"]])
        seen.append(batch["row_id"])
    assert sorted(torch.cat(seen).tolist()) == list(range(700))


def test_resume_appends_after_committed_rows(tmp_path):
    data = np.random.default_rng(5).standard_normal((120, 4)).astype(np.float32)
    layers = {"layer": LayerSpec(4, "float32", chunk_rows=16)}
    with StoreWriter(tmp_path / "s", model="m", layers=layers) as writer:
        writer.write({"layer": data[:70]}, sample_ids=np.arange(70), cursor={"done": 70})
    with StoreWriter(tmp_path / "s", model="m", layers=layers) as writer:
        assert writer.cursor == {"done": 70} and writer.committed_rows == {"layer": 70}
        writer.write({"layer": data[70:]}, sample_ids=np.arange(70, 120), cursor={"done": 120})
    np.testing.assert_array_equal(ActivationStore(tmp_path / "s")["layer"][:], data)


# ------------------------------------------------------------------------------ bad input
@pytest.fixture
def open_writer(tmp_path):
    writer = StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(8, "float16", chunk_rows=16)})
    writer.write({"layer": np.ones((10, 8), np.float16)}, sample_ids=np.arange(10))
    writer.flush()
    yield writer
    writer.abort()


def _committed(tmp_path) -> int:
    return ActivationStore(tmp_path / "s")["layer"].num_rows


@pytest.mark.parametrize("rows,kwargs,message", [
    (np.ones((4, 7), np.float16), {}, "width 8; got rows of width 7"),
    (np.ones((4, 8), np.float64), {}, "cannot be stored as float16"),
    (np.ones((4, 8), np.int32), {}, "cannot be stored as float16"),
    (np.ones(8, np.float16), {}, "2-D array"),
    (np.ones((4, 8), np.float16), {"sample_ids": np.arange(3)}, "sample_id must be 4 integers"),
])
def test_bad_rows_are_refused_and_nothing_committed_is_lost(tmp_path, open_writer, rows, kwargs, message):
    kwargs = {"sample_ids": np.arange(len(rows) if rows.ndim == 2 else 1)} | kwargs
    with pytest.raises(InvalidRowsError, match=message):
        open_writer.write({"layer": rows}, **kwargs)
    open_writer.write({"layer": np.full((2, 8), 3, np.float16)}, sample_ids=[10, 11])
    open_writer.flush()
    assert _committed(tmp_path) == 12


def test_unknown_layer_in_a_batch_is_refused(open_writer):
    with pytest.raises(InvalidRowsError, match="unknown layer 'layr'"):
        open_writer.write({"layr": np.ones((1, 8), np.float16)}, sample_ids=[0])


def test_cast_is_opt_in(tmp_path):
    with StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(2, "float16")}, allow_cast=True) as w:
        w.write({"layer": np.array([[1.5, 2.25]], np.float64)}, sample_ids=[0])
    np.testing.assert_array_equal(ActivationStore(tmp_path / "s")["layer"][:], [[1.5, 2.25]])


def test_nonfinite_rows_error_policy_writes_nothing_of_the_batch(tmp_path):
    layers = {"a": LayerSpec(3, "float32"), "b": LayerSpec(2, "float32")}
    with StoreWriter(tmp_path / "s", model="m", layers=layers, nonfinite="error") as writer:
        writer.write({"a": np.zeros((2, 3), np.float32), "b": np.zeros((2, 2), np.float32)}, sample_ids=[0, 1])
        bad = np.zeros((3, 3), np.float32)
        bad[1, 2] = np.nan
        with pytest.raises(InvalidRowsError, match=r"1 rows hold NaN or Inf \(batch rows \[1\], sample ids \[6\]\)"):
            writer.write({"b": np.zeros((3, 2), np.float32), "a": bad}, sample_ids=[5, 6, 7])
    store = ActivationStore(tmp_path / "s")
    assert store["a"].num_rows == 2 and store["b"].num_rows == 2  # layer 'b' of the bad batch was not kept


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "x\\y", "", "a" * 300, "-rf", "a..b"])
def test_layer_names_that_could_escape_the_directory_are_refused(tmp_path, name):
    with pytest.raises(ValueError, match="invalid layer name"):
        StoreWriter(tmp_path / "s", model="m", layers={name: LayerSpec(4)})
    assert not (tmp_path / "escape").exists()


def test_shard_names_are_validated(tmp_path):
    with pytest.raises(ValueError, match="invalid shard name"):
        StoreWriter(tmp_path / "s", model="m", layers={"l": LayerSpec(4)}, shard="../../x")


def test_a_path_that_is_not_a_store(tmp_path):
    with pytest.raises(NotAStoreError, match="not an activation store"):
        ActivationStore(tmp_path)
    with pytest.raises(NotAStoreError, match="does not exist"):
        ActivationStore(tmp_path / "nope")
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="non-empty directory that is not an activation store"):
        StoreWriter(tmp_path, model="m", layers={"l": LayerSpec(4)})
    assert (tmp_path / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("change,message", [
    ({"model": "other"}, "model is 'm', not 'other'"),
    ({"layers": {"layer": LayerSpec(9, "float16")}}, "has width 8, not 9"),
    ({"layers": {"layer": LayerSpec(8, "float32")}}, "stored as float16, not float32"),
    ({"layers": {"layer": LayerSpec(8, "float16"), "extra": LayerSpec(2)}}, "layer set differs"),
    ({"backend": "hdf5"}, "uses backend 'zarr'"),
])
def test_resume_with_different_settings_is_refused(tmp_path, change, message):
    base = {"model": "m", "layers": {"layer": LayerSpec(8, "float16")}}
    with StoreWriter(tmp_path / "s", **base) as writer:
        writer.write({"layer": np.ones((3, 8), np.float16)}, sample_ids=[0, 1, 2])
    with pytest.raises((IncompatibleStoreError,), match=message):
        StoreWriter(tmp_path / "s", **(base | change))
    assert ActivationStore(tmp_path / "s")["layer"].num_rows == 3


def test_two_writers_on_one_shard_are_refused(tmp_path, open_writer):
    with pytest.raises(StoreError, match="being written by another process"):
        StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(8, "float16", chunk_rows=16)})


def test_background_write_failure_surfaces_and_keeps_committed_rows(tmp_path, monkeypatch):
    from activation_store import backends

    writer = StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(4, "float32", chunk_rows=8)})
    writer.write({"layer": np.ones((5, 4), np.float32)}, sample_ids=np.arange(5))
    writer.flush()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(backends, "create_segment", disk_full)
    writer.write({"layer": np.ones((20, 4), np.float32)}, sample_ids=np.arange(5, 25))
    with pytest.raises(WriterClosedError, match="failed") as info:
        writer.flush()
    assert isinstance(info.value.__cause__, OSError)
    writer.abort()
    assert ActivationStore(tmp_path / "s")["layer"].num_rows == 5


def test_reader_errors_name_the_problem(tmp_path):
    store = write_rows(tmp_path / "s", np.ones((10, 2), np.float32))
    with pytest.raises(KeyError, match=r"did you mean \['layer'\]"):
        store["layr"]
    with pytest.raises(IndexError, match="out of range"):
        store["layer"][10]


# ------------------------------------------------------------------------------ CLI and benchmark
def test_cli_info_and_verify(tmp_path, capsys):
    from mechlens.cli import main

    write_rows(tmp_path / "s", np.ones((130, 4), np.float32), chunk_rows=64)
    assert main(["store", "info", str(tmp_path / "s")]) == 0
    out = capsys.readouterr().out
    assert "layer" in out and "130" in out and "float32" in out and "rank-00000" in out
    assert main(["store", "info", "--json", str(tmp_path / "s")]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["rows"] == 130
    assert main(["store", "verify", "--no-progress", str(tmp_path / "s")]) == 0
    assert "3 chunks" in capsys.readouterr().out
    chunk = next((tmp_path / "s").glob("shards/*/seg-*/layer/data/c/1/0"))
    chunk.write_bytes(b"\0" * chunk.stat().st_size)
    assert main(["store", "verify", "--no-progress", str(tmp_path / "s")]) == 1
    assert "chunk 1: checksum mismatch" in capsys.readouterr().out
    assert main(["store", "info", str(tmp_path)]) == 2
    assert "not an activation store" in capsys.readouterr().err


def test_throughput_benchmark_quick_run_prints_its_json_line():
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "store_throughput.py"), "--quick"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "store_throughput"
    for key in ("zarr_write_vs_memmap", "zarr_read_vs_memmap", "hdf5_write_vs_memmap", "hdf5_read_vs_memmap"):
        assert line["ratios"][key] > 0
    assert line["figures"]["bytes_per_system"] > 50e6


def test_writes_happen_off_the_callers_thread_with_bounded_back_pressure(tmp_path, monkeypatch):
    import threading

    from activation_store import backends

    gate = threading.Event()
    writer_threads = set()
    original = backends._ZarrSegmentWriter.write_chunk

    def slow_disk(self, *args, **kwargs):
        writer_threads.add(threading.current_thread().name)
        gate.wait()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(backends._ZarrSegmentWriter, "write_chunk", slow_disk)
    writer = StoreWriter(tmp_path / "s", model="m", layers={"layer": LayerSpec(4, "float32", chunk_rows=10)},
                         max_queued_chunks=2)
    allocated = []
    monkeypatch.setattr(writer, "_new_buffer", lambda name, f=writer._new_buffer: allocated.append(1) or f(name))
    done = threading.Event()

    def produce():
        for i in range(20):  # 20 chunks' worth of rows
            writer.write({"layer": np.full((10, 4), i, np.float32)}, sample_ids=np.arange(i * 10, i * 10 + 10))
        done.set()

    producer = threading.Thread(target=produce)
    producer.start()
    assert not done.wait(0.5), "the caller should block while the disk is stuck"
    assert writer._queue.qsize() <= 2 and len(allocated) <= 4  # memory stays bounded
    gate.set()
    producer.join(10)
    assert done.is_set()
    writer.close()
    assert writer_threads == {"store-writer-rank-00000"}
    np.testing.assert_array_equal(ActivationStore(tmp_path / "s")["layer"][::10, 0], np.arange(20))


def test_memory_mapped_reads_are_zero_copy_read_only_and_equal_to_copied_reads(tmp_path):
    """Uncompressed zarr chunks come back as read-only views of the mapped chunk files, equal
    to the copied reads of ``memory_map=False``; the mappings hold no file descriptors open
    after the arrays are dropped, and rows / batches stay private writable copies."""
    import os

    data = np.random.default_rng(3).standard_normal((1000, 24)).astype("float16")
    write_rows(tmp_path / "s", data, dtype="float16", chunk_rows=64)
    mapped = ActivationStore(tmp_path / "s")["layer"]
    copied = ActivationStore(tmp_path / "s", memory_map=False)["layer"]
    chunk = mapped.read_chunk(3)
    assert not chunk.flags.writeable and not chunk.flags.owndata
    with pytest.raises(ValueError, match="read-only"):
        chunk += 1
    private = copied.read_chunk(3)
    assert private.flags.writeable
    np.testing.assert_array_equal(chunk, private)
    fds_before = len(os.listdir("/proc/self/fd"))
    for prefetch in (0, 2):
        got = np.concatenate(list(mapped.iter_chunks(prefetch=prefetch)))
        np.testing.assert_array_equal(got, data)
    del got, chunk
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    rows = mapped[[5, 900]]
    batch = next(iter(mapped.iter_batches(100, seed=1)))
    assert rows.flags.writeable and batch.flags.writeable
    np.testing.assert_array_equal(rows, data[[5, 900]])
