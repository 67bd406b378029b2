"""Data-parallel SAE training: rows/s of ``train_sae`` on 1 and on N ranks, and the scaling efficiency.

Writes a store of planted-dictionary rows (a sparse code times random atoms, float16), then for
each world size spawns that many ranks in one process group (gloo on CPU, NCCL with
``--device cuda``: rank r on GPU r) and trains the same SAE sweep for the same number of steps of
the same global batch. rows/s = global rows trained / the training call's wall-clock on rank 0
(set-up, the store's statistics pass and the first batches included, as a user waits for them;
imports are done before the clock starts); the training loop's own rows/s is printed beside it.
Scaling efficiency at N ranks = rows/s(N) / (N * rows/s(1)); on a shared 2-core machine the
ranks compete with each other (and with anything else running) for the cores, so the CPU figure
is a floor, not the GPU box's.

    python benchmarks/sae_ddp.py                     # 1 and 2 CPU ranks, 1 thread each
    python benchmarks/sae_ddp.py --device cuda --worlds 1 2 4 8
    python benchmarks/sae_ddp.py --quick             # tiny, for the test suite
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.multiprocessing as mp


def write_store(path: Path, rows: int, d_in: int, seed: int = 0) -> None:
    from activation_store import LayerSpec, StoreWriter

    rng = np.random.default_rng(seed)
    atoms = rng.standard_normal((4 * d_in, d_in)).astype(np.float32)
    chunk_bytes = max(4096, rows * d_in * 2 // 64)  # 64 chunks: enough to split over many ranks
    with StoreWriter(path, model="sae_ddp", layers={"acts": LayerSpec(d_in, "float16")}, chunk_bytes=chunk_bytes) as writer:
        for start in range(0, rows, 16_384):
            n = min(16_384, rows - start)
            codes = rng.random((n, 4 * d_in), dtype=np.float32) * (rng.random((n, 4 * d_in)) < 8 / (4 * d_in))
            writer.write({"acts": (codes @ atoms).astype(np.float16)}, sample_ids=np.arange(start, start + n))


def _rank(rank: int, world: int, port: int, args: dict[str, Any], out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(args["threads"])
    cuda = args["device"] == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    if world > 1:
        torch.distributed.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    from mechlens.sae.config import TopKConfig, TrainConfig
    from mechlens.sae.training import train_sae

    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first use imports torch._dynamo (~3 s): untimed
    try:
        configs = [TopKConfig(width=args["width"], k=k) for k in args["ks"]]
        train = TrainConfig(steps=args["steps"], batch_size=args["batch_size"], log_every=max(1, args["steps"] // 4),
                            device=f"cuda:{rank}" if cuda else "cpu", lr=1e-3)
        started = time.perf_counter()
        result = train_sae(args["store"], "acts", configs, train, progress=False,
                           rank=rank if world > 1 else None, world_size=world if world > 1 else None)
        wall = time.perf_counter() - started
        if rank == 0:
            Path(out).write_text(json.dumps({"rows": result.rows, "wall_s": wall, "train_s": result.seconds,
                                             "fvu": [m.get("fvu") for m in result.metrics]}))
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_world(world: int, args: dict[str, Any], scratch: Path) -> dict[str, Any]:
    out = scratch / f"world{world}.json"
    context = mp.start_processes(_rank, args=(world, free_port(), args, str(out)), nprocs=world, join=False,
                                 start_method="spawn")
    while not context.join():
        pass
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (for the test suite)")
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of ranks to compare")
    parser.add_argument("--rows", type=int, default=2 ** 19)
    parser.add_argument("--d-in", type=int, default=256)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--ks", type=int, nargs="+", default=[32], help="one SAE per k, trained in one pass")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=4096, help="the global batch (split over the ranks)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per rank")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.d_in, args.width, args.steps, args.batch_size = 2 ** 14, 32, 256, 20, 512
    if 1 not in args.worlds:
        parser.error("--worlds must include 1 (the baseline of the scaling efficiency)")
    if args.device == "cuda" and max(args.worlds) > torch.cuda.device_count():
        parser.error(f"--worlds {max(args.worlds)} needs as many GPUs; {torch.cuda.device_count()} are visible")
    scratch = Path(tempfile.mkdtemp(prefix="sae-ddp-", dir=args.dir))
    try:
        store = scratch / "store"
        write_store(store, args.rows, args.d_in)
        settings = {"store": str(store), "width": args.width, "ks": args.ks, "steps": args.steps,
                    "batch_size": args.batch_size, "threads": args.threads, "device": args.device}
        results = {}
        for world in sorted(set(args.worlds)):
            results[world] = run_world(world, settings, scratch)
            rate = results[world]["rows"] / results[world]["wall_s"]
            print(f"{world} rank(s): {results[world]['rows']:,} rows in {results[world]['wall_s']:.1f} s = "
                  f"{rate:,.0f} rows/s (training loop {results[world]['rows'] / results[world]['train_s']:,.0f} "
                  f"rows/s); final FVU {', '.join(f'{v:.4f}' for v in results[world]['fvu'])}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    base = results[1]["rows"] / results[1]["wall_s"]
    ratios = {}
    for world, r in results.items():
        if world > 1:
            rate = r["rows"] / r["wall_s"]
            ratios[f"speedup_{world}"] = round(rate / base, 3)
            ratios[f"scaling_efficiency_{world}"] = round(rate / (world * base), 3)
            print(f"{world} ranks: speedup {rate / base:.2f}x, scaling efficiency {rate / (world * base):.2f}")
    figures = {"settings": {k: v for k, v in settings.items() if k != "store"} | {"rows": args.rows, "d_in": args.d_in,
                                                                                  "cpu_count": os.cpu_count(),
                                                                                  "quick": args.quick},
               "rows_per_s": {str(w): round(r["rows"] / r["wall_s"], 1) for w, r in results.items()},
               "loop_rows_per_s": {str(w): round(r["rows"] / r["train_s"], 1) for w, r in results.items()},
               "final_fvu": {str(w): r["fvu"] for w, r in results.items()}}
    print(json.dumps({"benchmark": "sae_ddp", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
