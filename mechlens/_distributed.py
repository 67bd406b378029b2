"""The process group as every multi-rank part of mechlens sees it (capture, SAE training,
feature statistics, the atlas): rank and world size from the arguments or torchrun's
environment, and the few collectives they need, which are no-ops in a single process."""
from __future__ import annotations

import contextlib
import contextvars
import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job. ``active``: a process group is joined (collectives run)."""

    rank: int
    world_size: int
    local_rank: int
    initialized_here: bool

    @property
    def active(self) -> bool:
        return self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def device(self) -> torch.device:
        """The device this rank computes on: its local GPU under torchrun where there is one, else the CPU."""
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank % torch.cuda.device_count())
        return torch.device("cpu")

    def close(self) -> None:
        """Leave the process group if this context joined it."""
        if self.initialized_here and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ------------------------------------------------------------------ collectives (no-ops alone)
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place (and returned)."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return tensor

    def all_reduce_min(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MIN)
        return tensor

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """``tensor`` of every rank, in rank order (the shapes must agree)."""
        if not self.active:
            return [tensor]
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        torch.distributed.all_gather(out, tensor.contiguous())
        return out

    def all_gather_object(self, value: Any) -> list[Any]:
        """A picklable ``value`` of every rank, in rank order."""
        if not self.active:
            return [value]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, value)
        return out

    def broadcast_object(self, value: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``value`` on every rank."""
        if not self.active:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=src)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()


SINGLE_PROCESS = DistContext(0, 1, 0, False)


def distributed_context(rank: int | None = None, world_size: int | None = None) -> DistContext:
    """Rank and world size from the arguments or torchrun's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``); joins the process group when there are several ranks
    (NCCL where CUDA is available, else gloo). A group the caller already joined is used as is."""
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    world = int(world_size) if world_size is not None else env_world
    this = int(rank) if rank is not None else int(os.environ.get("RANK", "0"))
    if world < 1 or not 0 <= this < world:
        raise ValueError(f"rank {this} is not in a world of size {world}")
    initialized_here = False
    if world > 1 and env_world == world and "MASTER_ADDR" in os.environ:
        import torch.distributed as dist

        if not dist.is_initialized():
            backend = "nccl" if torch.cuda.is_available() else "gloo"
            if backend == "nccl":  # else every rank's object collectives and default tensors land on cuda:0
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", this)) % torch.cuda.device_count())
            dist.init_process_group(backend=backend)
            initialized_here = True
    if world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
        group_world, group_rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        if (group_world, group_rank) != (world, this):
            raise ValueError(f"the process group is rank {group_rank} of {group_world}, but rank {this} of {world} "
                             "was asked for: pass neither (torchrun's environment) or the group's own")
    return DistContext(this, world, int(os.environ.get("LOCAL_RANK", this)), initialized_here)


# ---------------------------------------------------------------------------- the global batch
@dataclass(frozen=True)
class BatchGroup:
    """Set while data-parallel ranks train on one global batch split between them: operations that
    read the whole batch (BatchTopK's selection, a batch variance) reduce over ``dist`` so that
    each rank computes what one process would on the concatenated batch. ``rows``: its size."""

    dist: DistContext
    rows: int


_BATCH_GROUP: contextvars.ContextVar[BatchGroup | None] = contextvars.ContextVar("mechlens_batch_group", default=None)


def batch_group() -> BatchGroup | None:
    """The :class:`BatchGroup` of the data-parallel step running now, or None (one process)."""
    return _BATCH_GROUP.get()


@contextlib.contextmanager
def use_batch_group(group: BatchGroup | None) -> Iterator[None]:
    token = _BATCH_GROUP.set(group)
    try:
        yield
    finally:
        _BATCH_GROUP.reset(token)


def batch_mean_variance(rows: torch.Tensor) -> torch.Tensor:
    """``mean_n ||rows_n - mean(rows)||^2`` over the global batch (a scalar; no gradient)."""
    group = batch_group()
    if group is None:
        return (rows - rows.mean(dim=0, keepdim=True)).pow(2).sum(dim=-1).mean()
    with torch.no_grad():
        moments = torch.cat([rows.sum(dim=0), rows.pow(2).sum().view(1)]).double()
        group.dist.all_reduce_sum(moments)
        n = float(group.rows)
        return ((moments[-1] - moments[:-1].pow(2).sum() / n) / n).to(rows.dtype)
