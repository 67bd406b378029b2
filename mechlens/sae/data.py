"""Feeding SAEs: batch sources (the store, an in-memory tensor, any iterator), activation
normalisation, the geometric median, a background prefetcher and the non-finite check.

A *batch source* has ``iterate(start)``: an endless iterator of batches beginning at batch
``start`` (so training can resume mid-epoch). :class:`StoreSource` streams shuffled batches from
a store layer (chunk-level shuffle plus a shuffle buffer; memory stays at a few chunks whatever
the layer's size), :class:`TensorSource` shuffles a tensor that is already in (device) memory.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = [
    "BatchSource",
    "NonFiniteActivationsError",
    "Normalizer",
    "StoreSource",
    "TensorSource",
    "geometric_median",
    "resolve_device",
]


class NonFiniteActivationsError(ValueError):
    """A batch of activations holds NaN or infinite values."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


# ---------------------------------------------------------------------------- batches
@dataclass
class RowBatch:
    """One training batch on the host or device, with the store row ids when known."""

    data: torch.Tensor
    row_ids: np.ndarray | None = None
    checked: bool = False  # already known to be finite


def as_row_batch(item: Any) -> RowBatch:
    """Accept an ndarray / tensor, a store ``Batch`` (``with_index=True``), a dict from
    ``LayerView.torch_dataset`` or a ``(data, ...)`` tuple."""
    from activation_store import Batch

    if isinstance(item, RowBatch):
        return item
    if isinstance(item, Batch):
        return RowBatch(_tensor(item.data), np.asarray(item.index.row_ids))
    if isinstance(item, dict):
        if "data" not in item:
            raise TypeError(f"a dict batch needs a 'data' key, got keys {sorted(item)}")
        ids = item.get("row_id")
        return RowBatch(_tensor(item["data"]), None if ids is None else np.asarray(torch.as_tensor(ids).cpu()))
    if isinstance(item, (tuple, list)) and item and not isinstance(item[0], (int, float)):
        return as_row_batch(item[0])
    return RowBatch(_tensor(item))


def _tensor(data: Any) -> torch.Tensor:
    if isinstance(data, torch.Tensor):
        return data
    if isinstance(data, np.ndarray):
        return torch.from_numpy(data)
    raise TypeError(f"an SAE batch must be a tensor or an ndarray of rows [N, d], got {type(data).__name__}")


def check_finite(batch: RowBatch, *, batch_number: int, rows_before: int) -> None:
    """Raise :class:`NonFiniteActivationsError` naming the bad rows (store row ids when known)."""
    data = batch.data.detach()
    if not data.dtype.is_floating_point:
        return
    if data.device.type == "cpu" and data.dtype in (torch.float16, torch.float32, torch.float64):
        ok = bool(np.isfinite(data.numpy()).all())  # numpy: no temporary bool tensor per element op
    else:
        ok = bool(torch.isfinite(data).all())
    if ok:
        return
    bad = (~torch.isfinite(data).all(dim=1)).nonzero().flatten().cpu().numpy()
    shown = bad[:20]
    if batch.row_ids is not None:
        where = f"store row ids {batch.row_ids[shown].tolist()}"
    else:
        where = f"rows {shown.tolist()} of batch {batch_number} (rows {(rows_before + shown).tolist()} of the stream)"
    more = f" and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
    raise NonFiniteActivationsError(
        f"batch {batch_number} holds NaN/inf activations in {len(bad)} row(s): {where}{more}. Training on them "
        "would turn every weight into NaN. Recapture those samples, or drop the rows (the store counts non-finite "
        "rows per layer: `mechlens store info`).")


# ---------------------------------------------------------------------------- sources
@runtime_checkable
class BatchSource(Protocol):
    """An endless, replayable stream of batches."""

    def iterate(self, start: int = 0) -> Iterator[Any]: ...


class StoreSource:
    """Shuffled batches of one store layer, epoch after epoch (reshuffled each epoch).

    Each epoch yields ``rows // batch_size`` full batches (``drop_last``). Memory: about
    ``shuffle_buffer_chunks + 1`` chunks. Batches carry their row ids, so a bad row is named.
    ``rank`` / ``world_size``: this data-parallel rank's part (its chunks of each epoch's order).
    """

    def __init__(self, view: Any, batch_size: int, *, seed: int = 0, shuffle_buffer_chunks: int = 8,
                 chunks: Any = None, rank: int = 0, world_size: int = 1):
        self.view = view
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.shuffle_buffer_chunks = int(shuffle_buffer_chunks)
        self.chunks = None if chunks is None else [int(c) for c in chunks]  # None: every chunk
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_rows = view.chunk_rows(self.chunks)
        if self.num_rows < self.batch_size * self.world_size:
            raise ValueError(f"layer {view.name!r} has {self.num_rows} committed rows"
                             + (" in the chunks used for training" if chunks is not None else "")
                             + f", fewer than one batch of {self.batch_size * self.world_size}; lower the batch size or "
                             "capture more")
        num_chunks = view.num_chunks if self.chunks is None else len(set(self.chunks))
        if num_chunks < self.world_size:
            raise ValueError(f"layer {view.name!r} has {num_chunks} chunks, fewer than the {self.world_size} ranks that "
                             "split them; use fewer ranks or write the store with smaller chunks")

    @property
    def batches_per_epoch(self) -> int:
        """Batches of this rank in epoch 0 (with several ranks the split, so the count, changes per epoch)."""
        return self.epoch_batches(0)

    def epoch_batches(self, epoch: int) -> int:
        if self.world_size == 1:
            return self.num_rows // self.batch_size
        order = self.view.chunk_order(seed=self.seed, epoch=epoch, rank=self.rank, world_size=self.world_size,
                                      chunks=self.chunks)
        return self.view.chunk_rows(order) // self.batch_size

    def _checked_epoch_batches(self, epoch: int) -> int:
        count = self.epoch_batches(epoch)
        if count == 0:  # else the stream would spin through empty epochs forever
            raise ValueError(f"rank {self.rank} of {self.world_size} gets fewer than {self.batch_size} rows of layer "
                             f"{self.view.name!r} in epoch {epoch}; use fewer ranks, a smaller batch, or smaller chunks")
        return count

    def iterate(self, start: int = 0) -> Iterator[Any]:
        epoch, skip = 0, int(start)
        while skip >= (count := self._checked_epoch_batches(epoch)):
            skip -= count
            epoch += 1
        while True:
            self._checked_epoch_batches(epoch)
            batches = self.view.iter_batches(self.batch_size, shuffle=True, seed=self.seed, epoch=epoch,
                                             shuffle_buffer_chunks=self.shuffle_buffer_chunks, drop_last=True,
                                             with_index=True, chunks=self.chunks, rank=self.rank,
                                             world_size=self.world_size)
            for position, batch in enumerate(batches):
                if position >= skip:
                    yield batch
            skip = 0
            epoch += 1


class TensorSource:
    """Shuffled batches of a tensor already in memory (any device), reshuffled each epoch.
    The tensor is checked for NaN/inf once, up front."""

    def __init__(self, data: torch.Tensor | np.ndarray, batch_size: int, *, seed: int = 0):
        self.data = _tensor(data).detach()
        if self.data.dim() != 2:
            raise ValueError(f"expected rows [N, d], got shape {tuple(self.data.shape)}")
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        if len(self.data) < self.batch_size:
            raise ValueError(f"{len(self.data)} rows are fewer than one batch of {self.batch_size}")
        check_finite(RowBatch(self.data), batch_number=0, rows_before=0)

    @property
    def batches_per_epoch(self) -> int:
        return len(self.data) // self.batch_size

    def iterate(self, start: int = 0) -> Iterator[RowBatch]:
        epoch, skip = divmod(int(start), self.batches_per_epoch)
        while True:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(len(self.data), generator=generator)
            # on the host, gather with numpy: this runs on the prefetch thread, and a torch op there
            # would start a second OpenMP team competing with the training thread's
            host = self.data.numpy() if self.data.device.type == "cpu" else None
            order = order.numpy() if host is not None else order.to(self.data.device)
            for position in range(skip, self.batches_per_epoch):
                ids = order[position * self.batch_size:(position + 1) * self.batch_size]
                rows = torch.from_numpy(host[ids]) if host is not None else self.data.index_select(0, ids)
                yield RowBatch(rows, checked=True)
            skip = 0
            epoch += 1


class _Replay:
    """A plain iterable as a source: replays it from the start and skips ``start`` batches."""

    def __init__(self, iterable: Iterable[Any]):
        self.iterable = iterable

    def iterate(self, start: int = 0) -> Iterator[Any]:
        iterator = iter(self.iterable)
        if start and iterator is self.iterable:
            raise ValueError(
                f"cannot resume at batch {start} from a one-shot iterator (a generator): it cannot be replayed from "
                "its start. Pass a re-iterable (a list, a DataLoader) or a BatchSource such as StoreSource / TensorSource")
        for _ in range(int(start)):
            if next(iterator, None) is None:
                raise ValueError(f"cannot resume: the data iterator ended before the {start} batches already "
                                 "trained on (pass the same stream as the interrupted run)")
        yield from iterator


def as_source(data: Any) -> BatchSource:
    if isinstance(data, BatchSource):
        return data
    if isinstance(data, (torch.Tensor, np.ndarray)):
        raise TypeError("a bare tensor is one batch, not a stream; wrap it: TensorSource(rows, batch_size)")
    return _Replay(data)


# ---------------------------------------------------------------------------- prefetch
class Prefetcher:
    """Convert batches to float32 on ``device`` on a background thread, ``depth`` batches ahead
    (pinned host memory and non-blocking copies on CUDA), checking host batches for NaN/inf there.
    Iterating re-raises any error of the producer thread."""

    _END = object()

    def __init__(self, iterator: Iterator[Any], device: torch.device, *, depth: int = 2, first_batch: int = 0,
                 rows_before: int = 0):
        self.device = device
        self._iterator = iterator
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._batch_number = first_batch
        self._rows_before = rows_before
        self._thread: threading.Thread | None = None
        self._synchronous = depth <= 0

    def _convert(self, item: Any) -> RowBatch:
        batch = as_row_batch(item)
        data = batch.data
        if not batch.checked:  # on this thread: a device tensor's check syncs here, not in the training loop
            check_finite(batch, batch_number=self._batch_number, rows_before=self._rows_before)
            batch.checked = True
        self._batch_number += 1
        self._rows_before += int(data.shape[0])
        if data.dtype != torch.float32:
            # numpy on the host (see TensorSource.iterate: no torch op on this thread)
            data = torch.from_numpy(data.numpy().astype(np.float32)) if data.device.type == "cpu" \
                else data.to(torch.float32)
        if data.device != self.device:
            if self.device.type == "cuda" and data.device.type == "cpu":
                data = data.pin_memory()
            data = data.to(self.device, non_blocking=True)
        return RowBatch(data, batch.row_ids, batch.checked)

    def _run(self) -> None:
        try:
            for item in self._iterator:
                converted = self._convert(item)
                while not self._stop.is_set():
                    try:
                        self._queue.put(converted, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self._stop.is_set():
                    return
            self._put_final(self._END)
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            self._put_final(error)

    def _put_final(self, value: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[RowBatch]:
        if self._synchronous:
            for item in self._iterator:
                yield self._convert(item)
            return
        self._thread = threading.Thread(target=self._run, name="sae-prefetch", daemon=True)
        self._thread.start()
        try:
            while True:
                item = self._queue.get()
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.close()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


# ---------------------------------------------------------------------------- normalisation
@dataclass
class Normalizer:
    """``x -> (x - shift) * scale``: a scalar scale so that E||x - shift||^2 = d, and an optional
    per-dimension shift (the data mean, when centring)."""

    scale: float
    shift: torch.Tensor | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.shift is not None:
            x = x - self.shift
        return x * self.scale if self.scale != 1.0 else x

    def to(self, device: torch.device) -> "Normalizer":
        return Normalizer(self.scale, None if self.shift is None else self.shift.to(device))

    @classmethod
    def identity(cls) -> "Normalizer":
        return cls(1.0, None)

    @classmethod
    def from_moments(cls, mean: np.ndarray, variance: np.ndarray, mean_squared_norm: float, *,
                     center: bool) -> "Normalizer":
        d = len(mean)
        energy = float(np.sum(variance)) if center else float(mean_squared_norm)
        if not np.isfinite(energy) or energy <= 0:
            raise ValueError(f"cannot normalise: the activations have E||x{' - mean' if center else ''}||^2 = {energy} "
                             "(all rows constant or zero?)")
        shift = torch.as_tensor(np.asarray(mean), dtype=torch.float32) if center else None
        return cls(float(np.sqrt(d / energy)), shift)

    @classmethod
    def from_statistics(cls, stats: Any, *, center: bool) -> "Normalizer":
        """From a store's :class:`~activation_store.LayerStatistics` (no extra pass over the data)."""
        return cls.from_moments(stats.mean, stats.variance, stats.mean_squared_norm, center=center)

    @classmethod
    def from_rows(cls, rows: torch.Tensor, *, center: bool) -> "Normalizer":
        x = rows.double()
        mean = x.mean(0)
        return cls.from_moments(mean.cpu().numpy(), x.var(0, unbiased=False).cpu().numpy(),
                                float(x.pow(2).sum(1).mean()), center=center)


def geometric_median(rows: torch.Tensor, *, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """The point minimising the sum of Euclidean distances to ``rows`` (Weiszfeld's algorithm,
    batched; starts at the mean). Robust to outliers, unlike the mean."""
    x = rows.double()
    median = x.mean(0)
    for _ in range(iterations):
        distances = (x - median).norm(dim=1).clamp_min(1e-12)
        weights = 1.0 / distances
        new = (weights[:, None] * x).sum(0) / weights.sum()
        shift = (new - median).norm()
        median = new
        if float(shift) <= tol * (1.0 + float(median.norm())):
            break
    return median.to(rows.dtype)
