"""A deterministic writer, run as a subprocess by the fault tests (SIGKILL, concurrent reads).

Batch ``b`` holds rows whose values are a pure function of their sample id, so any run,
interrupted or not, must end with exactly the same store. It resumes from the committed
cursor, prints ``ready`` once the writer is open, and exits 0 when all batches are written.
"""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from activation_store import LayerSpec, Rows, StoreWriter

LAYERS = {"conv.out": LayerSpec(dim=24, dtype="float32", chunk_rows=64), "head": LayerSpec(dim=5, dtype="float16",
                                                                                        chunk_rows=50)}


def rows_for(layer: str, sample_ids: np.ndarray) -> np.ndarray:
    """Row values of a layer for given sample ids (exact in float16 / float32)."""
    dim = LAYERS[layer].dim
    values = (sample_ids[:, None] % 1000) + np.arange(dim)[None, :] / 4.0
    return values.astype(np.float16 if LAYERS[layer].dtype == "float16" else np.float32)


def batch_ids(batch: int, batch_size: int) -> np.ndarray:
    return np.arange(batch * batch_size, (batch + 1) * batch_size, dtype=np.int64)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("--batches", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=37)
    parser.add_argument("--backend", default="zarr")
    parser.add_argument("--commit-interval", type=float, default=0.02)
    parser.add_argument("--sleep", type=float, default=0.005, help="pause per batch, so kills land mid-run")
    args = parser.parse_args()
    writer = StoreWriter(args.store, model="test-model", layers=LAYERS, backend=args.backend, shard=0,
                         commit_every=args.commit_interval)
    start = 0 if writer.cursor is None else int(writer.cursor["next_batch"])
    print("ready", start, flush=True)
    for batch in range(start, args.batches):
        ids = batch_ids(batch, args.batch_size)
        # the head layer has one row per sample, the conv layer two positions per sample
        conv_ids = np.repeat(ids, 2)
        writer.write({"conv.out": Rows(rows_for("conv.out", conv_ids), conv_ids, np.tile([0, 1], len(ids)), conv_ids % 7),
                      "head": Rows(rows_for("head", ids), ids, None, ids % 7)},
                     cursor={"next_batch": batch + 1})
        time.sleep(args.sleep)
    writer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
