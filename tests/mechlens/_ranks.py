"""Spawning CPU ranks (gloo) for the multi-rank tests: each rank runs as torchrun would start it
(MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE / LOCAL_RANK in its environment, one thread), and
the test waits on the processes' exits, never on a sleep, up to a timeout."""
from __future__ import annotations

import os
import socket
import time
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on the loopback interface now (for the group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world: int, port: int, join: bool, target: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    if join:
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        target(rank, world, *args)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def run_ranks(world: int, target: Callable[..., Any], *args: Any, join: bool = True, timeout: float = 240.0) -> None:
    """``target(rank, world, *args)`` on ``world`` spawned ranks (``target`` must be importable:
    a module-level function). ``join``: the group is joined before ``target`` runs; otherwise
    the code under test joins it from the environment, as under torchrun. An exception in a rank
    fails the test with that rank's traceback; a rank still running after ``timeout`` s is killed."""
    context = mp.start_processes(_entry, args=(world, free_port(), join, target, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not context.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
