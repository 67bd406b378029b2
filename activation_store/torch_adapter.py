"""A torch ``IterableDataset`` over a store layer (imported lazily: the store itself needs no torch)."""
from __future__ import annotations

import os
from typing import Any, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info


class StoreBatches(IterableDataset):
    """Batches of one layer as torch tensors; each DataLoader worker reads its own chunks.

    bfloat16 layers come back as ``torch.bfloat16`` (no float32 detour); other dtypes as stored.
    """

    def __init__(self, root: str | os.PathLike, layer: str, batch_size: int, *, verify_reads: bool = True,
                 rank: int = 0, world_size: int = 1, storage_options: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__()
        self.root, self.layer, self.batch_size = str(root), layer, batch_size
        self.storage_options = storage_options  # an fsspec URL's (each worker opens the store itself)
        self.verify_reads, self.rank, self.world_size, self.kwargs = verify_reads, rank, world_size, kwargs
        self.epoch = int(kwargs.pop("epoch", 0))

    def set_epoch(self, epoch: int) -> None:
        """Reseed the shuffle for a new epoch (like ``DistributedSampler.set_epoch``)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[Any]:
        from activation_store.reader import ActivationStore, Batch

        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        view = ActivationStore(self.root, verify_reads=self.verify_reads,
                               storage_options=self.storage_options).layer(self.layer)
        bf16 = view.spec.dtype == "bfloat16"
        for item in view.iter_batches(self.batch_size, rank=self.rank * workers + worker,
                                      world_size=self.world_size * workers, raw=bf16, epoch=self.epoch, **self.kwargs):
            if isinstance(item, Batch):
                yield {"data": _tensor(item.data, bf16), "row_id": torch.from_numpy(item.index.row_ids),
                       "sample_id": torch.from_numpy(item.index.sample_id),
                       "position": torch.from_numpy(item.index.position), "label": torch.from_numpy(item.index.label)}
            else:
                yield _tensor(item, bf16)


def _tensor(array, bf16: bool) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    return tensor.view(torch.bfloat16) if bf16 else tensor
