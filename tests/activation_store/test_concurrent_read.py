"""Readers of a store that is being written: two shards growing while a reader polls with refresh().

Every row written here encodes where it came from (shard, sample id), so a reader that returns
another shard's rows, a stale row or a row twice is caught, not just a crash.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

from activation_store import ActivationStore, CommitPolicy, LayerSpec, StoreWriter

DIM = 4
CHUNK_ROWS = 8


def encoded_rows(shard: int, ids: np.ndarray) -> np.ndarray:
    """Row content that says which shard and sample it belongs to (exact in float32)."""
    ids = ids.astype(np.float32)
    return np.stack([np.full_like(ids, shard), ids, ids * 2 + shard, -ids], axis=1)


def sample_id(shard: int, i: int) -> int:
    return shard * 100_000 + i


def open_writer(path, shard: int, backend: str) -> StoreWriter:
    # commits only when told (flush), so the test decides when each shard grows
    return StoreWriter(path, model="m", layers={"acts": LayerSpec(DIM, "float32", chunk_rows=CHUNK_ROWS)},
                       shard=shard, backend=backend, commit_every=CommitPolicy(seconds=3600, bytes=None))


def check_snapshot(store: ActivationStore, committed: dict[int, int]) -> None:
    """The reader shows exactly a prefix of each shard, in shard order, every row intact."""
    view = store["acts"]
    data = view[:]
    index = view.read_index()
    counts = [int((data[:, 0] == shard).sum()) for shard in (0, 1)]
    # at least what was committed before the refresh; never more than was written since
    assert counts[0] >= committed[0] and counts[1] >= committed[1], (counts, committed)
    expected = np.concatenate([encoded_rows(s, np.array([sample_id(s, i) for i in range(counts[s])]))
                               for s in (0, 1)])
    np.testing.assert_array_equal(data, expected)
    np.testing.assert_array_equal(index.sample_id, expected[:, 1].astype(np.int64))
    streamed = np.concatenate(list(view.iter_chunks(shuffle=False)) or [np.empty((0, DIM), np.float32)])
    np.testing.assert_array_equal(streamed, expected)


@pytest.mark.parametrize("backend", ["zarr", "hdf5"])
@pytest.mark.parametrize("verify_reads", [True, False])
def test_refresh_while_an_earlier_shard_grows_keeps_every_row_right(tmp_path, verify_reads, backend):
    """Deterministic form of the torchrun-watching bug: shard 0 grows after shard 1's segments were
    read, which shifts the segment positions of shard 1 in the next snapshot."""
    path = tmp_path / "store"
    writers = [open_writer(path, 0, backend), open_writer(path, 1, backend)]
    written = {0: 0, 1: 0}
    store = None
    try:
        for step in range(12):
            for shard in (0, 1):
                ids = np.array([sample_id(shard, written[shard] + j) for j in range(5)])
                writers[shard].write({"acts": encoded_rows(shard, ids)}, sample_ids=ids)
                writers[shard].flush()
                written[shard] += 5
                if store is None:
                    store = ActivationStore(path, verify_reads=verify_reads)
                old_view = store["acts"]
                old_rows = old_view[:]
                store.refresh()
                check_snapshot(store, written)
                # a view taken before the refresh still reads its own snapshot, unchanged
                np.testing.assert_array_equal(old_view[:], old_rows)
    finally:
        for writer in writers:
            writer.close()
        if store is not None:
            store.close()


@pytest.mark.parametrize("verify_reads", [True, False])
def test_polling_reader_of_two_concurrent_writers(tmp_path, verify_reads):
    """Two writers on two shards commit in their own threads while a reader polls >= 100 times.

    The writers and the reader synchronise on events (each writer commits once per reader poll),
    never on sleeps, so every poll sees some shard grown since the last one.
    """
    path = tmp_path / "store"
    polls_wanted = 120
    # a write -> commit -> poll handshake per writer: commits interleave with refresh() calls
    committed = {0: 0, 1: 0}
    lock = threading.Lock()
    poll_done = [threading.Event(), threading.Event()]
    errors: list[BaseException] = []
    ready = threading.Barrier(3)

    def write(shard: int) -> None:
        try:
            with open_writer(path, shard, "zarr") as writer:
                ready.wait()
                for step in range(polls_wanted // 2 + 1):
                    rows = 3 + (step * 7 + shard) % 11  # uneven sizes: partial and multi-chunk commits
                    with lock:
                        start = committed[shard]
                    ids = np.array([sample_id(shard, start + j) for j in range(rows)])
                    writer.write({"acts": encoded_rows(shard, ids)}, sample_ids=ids)
                    writer.flush()
                    with lock:
                        committed[shard] += rows
                    if not poll_done[shard].wait(timeout=60):
                        raise TimeoutError("the reader stopped polling")
                    poll_done[shard].clear()
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(error)
            ready.abort()

    threads = [threading.Thread(target=write, args=(shard,), daemon=True) for shard in (0, 1)]
    for thread in threads:
        thread.start()
    try:
        ready.wait()
    except threading.BrokenBarrierError:
        for thread in threads:
            thread.join(timeout=60)
        raise errors[0] if errors else AssertionError("a writer did not start")
    polls = 0
    store = None
    try:
        while any(t.is_alive() for t in threads) or polls < polls_wanted:
            with lock:
                before = dict(committed)
            if store is None:
                store = ActivationStore(path, verify_reads=verify_reads)
            else:
                store.refresh()
            check_snapshot(store, before)
            polls += 1
            for event in poll_done:
                event.set()
            if errors:
                raise errors[0]
            if not any(t.is_alive() for t in threads) and polls >= polls_wanted:
                break
    finally:
        for event in poll_done:
            event.set()
        for thread in threads:
            thread.join(timeout=60)
        if store is not None:
            store.close()
    assert not errors, errors
    assert polls >= polls_wanted
    final = ActivationStore(path)
    check_snapshot(final, committed)
    assert final.num_rows("acts") == committed[0] + committed[1]
