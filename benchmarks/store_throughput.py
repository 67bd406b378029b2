"""Store throughput: zarr and HDF5 backends vs a raw np.memmap baseline, in one run.

Writes N float16 rows of width 512 in batches of 4096 through each (the store checksums every
chunk and counts its non-finite rows on its default write threads; a zarr write on one write
thread is reported too), then reads every chunk back in a shuffled order (the store maps each
chunk file, zero-copy, and verifies its XXH3-64 checksum while reading, on the default 2
read-ahead threads; the hash touches every byte, so the data really is read). Copied reads of
zarr (``memory_map=False``: ``readinto`` a private buffer), with and without verification,
are reported too. Data stays in the page cache for all three (no fsync anywhere), so this
measures the software path, which is what the store controls. An untimed warm-up first
imports zarr and h5py, so no system pays a one-off import in its timings, and an untimed
``sync`` before each write means none pays for writing back the dirty pages of the one
before. Prints MB/s, the ratio to the memmap baseline, and one JSON line at the end.

    python benchmarks/store_throughput.py            # ~1.5 GB per system
    python benchmarks/store_throughput.py --quick    # ~64 MB, for the test suite
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from activation_store import ActivationStore, LayerSpec, StoreWriter
from activation_store.backends import chunk_rows_for
from activation_store.writer import DEFAULT_CHUNK_BYTES

WIDTH = 512
BATCH = 4096


def make_batches(count: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((BATCH, WIDTH), dtype=np.float32).astype(np.float16) for _ in range(count)]


def write_store(path: Path, backend: str, pool: list[np.ndarray], batches: int, **options) -> float:
    start = time.perf_counter()
    with StoreWriter(path, model="benchmark", layers={"layer": LayerSpec(WIDTH, "float16")}, backend=backend,
                     commit_every=3600, **options) as writer:
        for i in range(batches):
            ids = np.arange(i * BATCH, (i + 1) * BATCH)
            writer.write({"layer": pool[i % len(pool)]}, sample_ids=ids)
    return time.perf_counter() - start


def read_store(path: Path, seed: int, verify: bool = True, memory_map: bool = True) -> tuple[float, int]:
    start = time.perf_counter()
    view = ActivationStore(path, verify_reads=verify, memory_map=memory_map).layer("layer")
    total = 0
    for chunk in view.iter_chunks(shuffle=True, seed=seed):
        total += chunk.nbytes
    return time.perf_counter() - start, total


def write_memmap(path: Path, pool: list[np.ndarray], batches: int) -> float:
    start = time.perf_counter()
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(batches * BATCH, WIDTH))
    for i in range(batches):
        array[i * BATCH:(i + 1) * BATCH] = pool[i % len(pool)]
    del array  # unmapped without msync: dirty pages stay in the page cache, as the store's do
    return time.perf_counter() - start


def read_memmap(path: Path, chunk_rows: int, seed: int) -> tuple[float, int]:
    start = time.perf_counter()
    array = np.load(path, mmap_mode="r")
    chunks = -(-array.shape[0] // chunk_rows)
    total = 0
    for chunk in np.random.default_rng(seed).permutation(chunks):
        block = np.array(array[chunk * chunk_rows:(chunk + 1) * chunk_rows])
        total += block.nbytes
    del array
    return time.perf_counter() - start, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~64 MB per system (for tests)")
    parser.add_argument("--gb", type=float, default=1.5, help="GB written per system (default 1.5)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repetitions; the median is reported")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    gigabytes = 0.064 if args.quick else args.gb
    repeats = 1 if args.quick else args.repeats
    batches = max(2, int(gigabytes * 1e9 / (BATCH * WIDTH * 2)))
    nbytes = batches * BATCH * WIDTH * 2
    pool = make_batches(8)
    scratch = Path(tempfile.mkdtemp(prefix="store-bench-", dir=args.dir))
    times: dict[str, list[float]] = {k: [] for k in ("memmap_write", "memmap_read", "zarr_write", "zarr_read",
                                                     "hdf5_write", "hdf5_read", "zarr_read_copied",
                                                     "zarr_read_copied_unverified", "zarr_write_1thread")}
    try:
        for system in ("zarr", "hdf5"):  # untimed warm-up: imports and first calls
            write_store(scratch / f"warm-{system}", system, pool, 2)
            read_store(scratch / f"warm-{system}", seed=0)
            shutil.rmtree(scratch / f"warm-{system}")
        chunk_rows = chunk_rows_for(LayerSpec(WIDTH, "float16"), DEFAULT_CHUNK_BYTES)
        for repeat in range(repeats):
            for system in ("memmap", "zarr", "zarr_1thread", "hdf5"):
                target = scratch / f"{system}-{repeat}"
                os.sync()  # untimed: no system pays for writing back the dirty pages of the one before
                if system == "memmap":
                    times["memmap_write"].append(write_memmap(target.with_suffix(".npy"), pool, batches))
                    seconds, got = read_memmap(target.with_suffix(".npy"), chunk_rows, seed=repeat)
                    target.with_suffix(".npy").unlink()
                elif system == "zarr_1thread":
                    times["zarr_write_1thread"].append(write_store(target, "zarr", pool, batches, write_threads=1))
                    shutil.rmtree(target)
                    continue
                else:
                    times[f"{system}_write"].append(write_store(target, system, pool, batches))
                    if system == "zarr":
                        for name, verify in (("zarr_read_copied", True), ("zarr_read_copied_unverified", False)):
                            seconds, got = read_store(target, seed=repeat + 100, verify=verify, memory_map=False)
                            assert got == nbytes
                            times[name].append(seconds)
                    seconds, got = read_store(target, seed=repeat)
                    shutil.rmtree(target)
                assert got == nbytes, f"{system} read {got} bytes, expected {nbytes}"
                times[f"{system}_read"].append(seconds)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    mbps = {name: nbytes / 1e6 / statistics.median(values) for name, values in times.items()}
    figures = {f"{name}_MBps": round(value, 1) for name, value in mbps.items()}
    figures.update({"bytes_per_system": nbytes, "rows": batches * BATCH, "width": WIDTH, "repeats": repeats,
                    "zarr_write_threads": inspect.signature(StoreWriter).parameters["write_threads"].default})
    ratios = {f"{system}_{op}_vs_memmap": round(mbps[f"{system}_{op}"] / mbps[f"memmap_{op}"], 3)
              for system in ("zarr", "hdf5") for op in ("write", "read")}
    for name in ("zarr_read_copied", "zarr_read_copied_unverified"):
        ratios[f"{name}_vs_memmap"] = round(mbps[name] / mbps["memmap_read"], 3)
    ratios["zarr_write_1thread_vs_memmap"] = round(mbps["zarr_write_1thread"] / mbps["memmap_write"], 3)
    print(f"{'system':<8} {'write MB/s':>11} {'read MB/s':>10} {'write ratio':>12} {'read ratio':>11}")
    for system in ("memmap", "zarr", "hdf5"):
        w, r = mbps[f"{system}_write"], mbps[f"{system}_read"]
        print(f"{system:<8} {w:>11.0f} {r:>10.0f} {w / mbps['memmap_write']:>12.2f} {r / mbps['memmap_read']:>11.2f}")
    for name, what in (("zarr_read_copied", "verified"), ("zarr_read_copied_unverified", "unverified")):
        print(f"zarr copied read (memory_map=False), {what}: {mbps[name]:.0f} MB/s "
              f"({ratios[name + '_vs_memmap']:.2f}x memmap)")
    print(f"zarr write on one write thread: {mbps['zarr_write_1thread']:.0f} MB/s "
          f"({ratios['zarr_write_1thread_vs_memmap']:.2f}x memmap)")
    print(json.dumps({"benchmark": "store_throughput", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
