"""Crash safety, corruption detection and concurrent reads."""
from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from activation_store import ActivationStore, CorruptChunkError, LayerSpec, StoreWriter
from tests.activation_store.writer_process import LAYERS, batch_ids, rows_for

BATCHES, BATCH_SIZE = 60, 37


def expected_head() -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([batch_ids(b, BATCH_SIZE) for b in range(BATCHES)])
    return ids, rows_for("head", ids)


def assert_complete(store_path: Path) -> None:
    store = ActivationStore(store_path)
    ids, head = expected_head()
    index = store["head"].read_index()
    np.testing.assert_array_equal(index.sample_id, ids)  # none lost, none duplicated, in order
    np.testing.assert_array_equal(store["head"][:], head)
    conv_ids = np.repeat(ids, 2)
    conv_index = store["conv.out"].read_index()
    np.testing.assert_array_equal(conv_index.sample_id, conv_ids)
    np.testing.assert_array_equal(conv_index.position, np.tile([0, 1], len(ids)))
    np.testing.assert_array_equal(conv_index.label, conv_ids % 7)
    np.testing.assert_array_equal(store["conv.out"][:], rows_for("conv.out", conv_ids))
    assert store.verify().ok


@pytest.mark.parametrize("backend,seed", [("zarr", 0), ("zarr", 1), ("zarr", 2), ("hdf5", 3), ("hdf5", 4)])
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_result(tmp_path, writer_process, backend, seed):
    rng = random.Random(seed)
    store = tmp_path / "store"
    kills = 0
    for _attempt in range(40):
        proc = writer_process(store, "--backend", backend, "--batches", str(BATCHES), "--batch-size", str(BATCH_SIZE))
        assert proc.stdout.readline().startswith("ready"), proc.stderr.read()
        if kills < 3:
            time.sleep(rng.uniform(0.0, 0.25))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        proc.wait(timeout=60)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    else:
        pytest.fail("writer never completed")
    assert kills >= 1, "no kill landed mid-run; the test did not exercise a crash"
    assert_complete(store)


def test_reader_during_writes_sees_only_committed_rows(tmp_path, writer_process):
    store_path = tmp_path / "store"
    proc = writer_process(store_path, "--batches", "120", "--batch-size", "11", "--sleep", "0.01")
    assert proc.stdout.readline().startswith("ready")
    seen_counts = []
    store = ActivationStore(store_path)
    while True:
        done = proc.poll() is not None
        store.refresh()
        view = store["head"]
        count = view.num_rows
        if count:
            index = view.read_index()
            # never fill values or garbage: every committed row matches its sample id
            np.testing.assert_array_equal(view[:], rows_for("head", index.sample_id))
            np.testing.assert_array_equal(index.sample_id, np.arange(count))
        seen_counts.append(count)
        if done:
            break
        time.sleep(0.01)
    assert proc.returncode == 0, proc.stderr.read()
    partial = [c for c in seen_counts if 0 < c < 120 * 11]
    assert len(partial) >= 3, f"reader never overlapped the writer: {seen_counts[:20]}"
    assert seen_counts == sorted(seen_counts)


def _write_small(path: Path, backend: str = "zarr") -> np.ndarray:
    data = np.arange(400 * 8, dtype=np.float32).reshape(400, 8)
    with StoreWriter(path, model="m", layers={"layer": LayerSpec(8, "float32", chunk_rows=100)}, backend=backend) as w:
        w.write({"layer": data}, sample_ids=np.arange(400))
    return data


def _chunk_files(path: Path) -> list[Path]:
    """The data chunk files of the layer, by chunk number (zarr v3 key ``c/<chunk>/0``)."""
    files = path.glob("shards/rank-00000/seg-000000.zarr/layer/data/c/*/0")
    return sorted(files, key=lambda p: int(p.parent.name))


def test_corrupted_chunk_is_named_by_verify_and_by_reads(tmp_path):
    path = tmp_path / "store"
    data = _write_small(path)
    files = _chunk_files(path)
    assert len(files) == 4
    target = files[2]  # chunk 2 of the data array
    raw = bytearray(target.read_bytes())
    raw[100] ^= 0xFF
    target.write_bytes(bytes(raw))
    store = ActivationStore(path)
    report = store.verify()
    assert not report.ok and len(report.bad_chunks) == 1
    bad = report.bad_chunks[0]
    assert (bad.layer, bad.shard, bad.segment, bad.chunk) == ("layer", "rank-00000", 0, 2)
    with pytest.raises(CorruptChunkError, match=r"layer 'layer', shard 'rank-00000', segment 0, chunk 2"):
        store["layer"][250]
    np.testing.assert_array_equal(store["layer"][:200], data[:200])  # good chunks still read


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_truncated_or_missing_chunk_is_detected(tmp_path, damage):
    path = tmp_path / "store"
    _write_small(path)
    target = _chunk_files(path)[1]
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[:123])
    else:
        target.unlink()
    store = ActivationStore(path)
    report = store.verify()
    assert [b.chunk for b in report.bad_chunks] == [1]
    assert ("missing" if damage == "delete" else "bytes") in report.bad_chunks[0].reason
    with pytest.raises(CorruptChunkError, match="chunk 1"):
        store["layer"][:]


def test_corruption_in_hdf5_segment_is_detected(tmp_path):
    path = tmp_path / "store"
    data = _write_small(path, backend="hdf5")
    segment = next(path.rglob("seg-*.h5"))
    raw = bytearray(segment.read_bytes())
    # the data of this 12.8 kB array sits in one contiguous run; flip a byte of row 150
    offset = raw.find(data[150].tobytes())
    assert offset > 0
    raw[offset + 3] ^= 0x55
    segment.write_bytes(bytes(raw))
    report = ActivationStore(path).verify()
    assert [b.chunk for b in report.bad_chunks] == [1]
    segment.write_bytes(bytes(raw[: len(raw) // 3]))  # truncated file: every chunk is reported
    report = ActivationStore(path).verify()
    assert len(report.bad_chunks) == 4 and all(b.shard == "rank-00000" for b in report.bad_chunks)


def test_uncommitted_segment_of_a_dead_writer_is_discarded_on_resume(tmp_path):
    path = tmp_path / "store"
    layers = {"layer": LayerSpec(4, "float32", chunk_rows=10)}
    writer = StoreWriter(path, model="m", layers=layers)
    writer.write({"layer": np.ones((25, 4), np.float32)}, sample_ids=np.arange(25), cursor=25)
    writer.flush()
    writer.write({"layer": np.full((40, 4), 7, np.float32)}, sample_ids=np.arange(25, 65), cursor=65)
    writer.abort()
    assert ActivationStore(path)["layer"].num_rows == 25
    with StoreWriter(path, model="m", layers=layers) as resumed:
        assert resumed.cursor == 25 and resumed.committed_rows == {"layer": 25}
        resumed.write({"layer": np.full((5, 4), 2, np.float32)}, sample_ids=np.arange(25, 30), cursor=30)
    store = ActivationStore(path)
    np.testing.assert_array_equal(store["layer"].read_index().sample_id, np.arange(30))
    # the dead writer's rows (value 7) are gone; its segment id was reused for the new rows
    assert not (store["layer"][:] == 7).any()
    np.testing.assert_array_equal(store["layer"][25:], np.full((5, 4), 2, np.float32))
    assert len(list((path / "shards" / "rank-00000").glob("seg-*"))) == 2
