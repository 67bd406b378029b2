"""Per-latent feature statistics in one streaming pass over a store: the atlas's input.

For every latent: firing frequency, mean activation (over all rows and over the rows where it
fires), maximum, and the top-k exemplars (value, store row id, sample id, position). With
``distinct_samples`` (the default) the exemplars are k different images, each at its strongest
position; otherwise the k strongest rows, wherever they come from.

Everything runs batched on the device: per batch one ``[N, width]`` encode, column-wise
``topk`` (or a per-sample ``scatter_reduce`` max first), then a merge of ``[width, 2k]``
candidates; no Python loop over rows or latents.

Ties are broken canonically: exemplars are ordered by value (descending), then store row id
(ascending), and a sample's exemplar is its first row (lowest row id) reaching its maximum. Batches
are runs of whole chunks that depend on the store and ``batch_size`` only, so every row is encoded
in the same batch whatever the number of ranks.

Across ranks (``torchrun``, or ``rank`` / ``world_size`` with a joined process group) each rank
reads its own runs of chunks; the sums are all-reduced in float64 and the ranks' top-k candidates
are gathered and merged with the same merge as between batches, so every rank gets the result of
one process: identical exemplars, and sums equal up to float64 rounding order.

Saved next to the SAE as ``feature_stats.safetensors`` + ``feature_stats.json``.
"""
from __future__ import annotations

import json
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens._distributed import DistContext, distributed_context
from mechlens.engine import eval_mode
from mechlens.sae.data import RowBatch, check_finite
from mechlens.sae.modules import SAE

__all__ = ["FeatureStatistics", "feature_statistics"]

STATS_TENSORS = "feature_stats.safetensors"
STATS_JSON = "feature_stats.json"
_NEG = float("-inf")


@dataclass
class FeatureStatistics:
    """Statistics of every latent of one SAE over ``rows`` rows of ``layer``.

    Arrays are indexed by latent: ``frequency`` (fraction of rows where it fires), ``mean``
    (over all rows), ``mean_active`` (over firing rows; 0 if it never fires), ``max``;
    ``top_values`` / ``top_rows`` / ``top_samples`` / ``top_positions`` are ``[width, k]``, best
    first, padded with ``-inf`` / ``-1`` when fewer than k rows fire. ``rank``: the rank of the
    process holding this copy when the statistics were computed across ranks (every rank holds
    the same statistics; only rank 0's :meth:`save` writes).
    """

    layer: str
    store: str
    rows: int
    top_k: int
    distinct_samples: bool
    frequency: np.ndarray
    mean: np.ndarray
    mean_active: np.ndarray
    max: np.ndarray
    top_values: np.ndarray
    top_rows: np.ndarray
    top_samples: np.ndarray
    top_positions: np.ndarray
    rank: int = field(default=0, repr=False, compare=False)

    @property
    def width(self) -> int:
        return len(self.frequency)

    def __repr__(self) -> str:
        alive = int((self.frequency > 0).sum())
        return (f"FeatureStatistics({self.layer!r}: {self.width} latents, {alive} fire, over {self.rows:,} rows, "
                f"top {self.top_k} exemplars each)")

    def table(self, n: int | None = None) -> list[dict[str, Any]]:
        """The latents, most frequent first: frequency, mean when active, max, best exemplar."""
        order = np.argsort(-self.frequency, kind="stable")[:n]
        return [{"latent": int(i), "frequency": float(self.frequency[i]), "mean_active": float(self.mean_active[i]),
                 "max": float(self.max[i]), "top_sample": int(self.top_samples[i, 0]) if self.top_k else -1}
                for i in order]

    def to_pandas(self) -> Any:
        from mechlens._display import to_pandas

        return to_pandas(self.table())

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table(self.table(20), caption=repr(self))

    def exemplars(self, latent: int) -> list[dict[str, Any]]:
        """The exemplars of one latent as ``{"value", "row", "sample", "position"}`` dicts."""
        if not 0 <= latent < self.width:
            raise IndexError(f"latent {latent} is out of range: the SAE has {self.width} latents")
        keep = self.top_rows[latent] >= 0
        return [{"value": float(v), "row": int(r), "sample": int(s), "position": int(p)}
                for v, r, s, p in zip(self.top_values[latent][keep], self.top_rows[latent][keep],
                                      self.top_samples[latent][keep], self.top_positions[latent][keep])]

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``feature_stats.safetensors`` and ``feature_stats.json`` into ``directory``, each
        atomically. Statistics computed across ranks are written once, by rank 0: every rank may
        call this (the others write nothing) and gets the same path back."""
        from safetensors.numpy import save_file

        directory = Path(directory)
        if self.rank != 0:
            return directory
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in
                  ("frequency", "mean", "mean_active", "max", "top_values", "top_rows", "top_samples", "top_positions")}
        tmp = directory / f".{STATS_TENSORS}.tmp-{os.getpid()}"  # per process: concurrent saves never share one
        save_file(arrays, str(tmp))
        tmp.replace(directory / STATS_TENSORS)
        meta = {"format": "mechlens-sae-feature-stats", "version": 1, "layer": self.layer, "store": self.store,
                "rows": self.rows, "top_k": self.top_k, "distinct_samples": self.distinct_samples,
                "width": self.width}
        tmp = directory / f".{STATS_JSON}.tmp-{os.getpid()}"
        tmp.write_text(json_dumps(meta, indent=2))
        tmp.replace(directory / STATS_JSON)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "FeatureStatistics":
        from safetensors.numpy import load_file

        directory = Path(directory)
        if not (directory / STATS_JSON).is_file():
            raise FileNotFoundError(f"no feature statistics in {directory}; compute them with `mechlens sae stats`")
        meta = json.loads((directory / STATS_JSON).read_text())
        arrays = load_file(str(directory / STATS_TENSORS))
        return cls(meta["layer"], meta["store"], int(meta["rows"]), int(meta["top_k"]), bool(meta["distinct_samples"]),
                   **arrays)


_TIE = 1 << 32  # the tie-break field of a ranking key: batch positions are far below 2**32


def _ranking_key(values: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """int64 keys whose ``topk`` ranks by value (descending), then ``order`` (ascending); every
    non-firing entry gets -1, below them all. A positive float32's bit pattern grows with its
    value, so the key is exact: no float rounding decides a tie."""
    key = values.contiguous().view(torch.int32).to(torch.int64)
    key.mul_(_TIE).add_(_TIE - 1 - order)
    return key.masked_fill_(~(values > 0), -1)


def _top_indices(values: torch.Tensor, order: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (along dim 0) of the ``k`` largest entries of each column, a tie on the k-th value
    going to the lowest ``order``. The order inside the k does not matter: the merge sorts them.
    Only the columns with such a tie pay for the exact keys."""
    top, index = values.topk(k, dim=0)
    kth = top[-1]
    tied = (kth > 0) & ((values >= kth).sum(0) > k)
    if bool(tied.any()):
        columns = tied.nonzero().squeeze(1)
        subset = order if order.shape[1] == 1 else order[:, columns]
        index[:, columns] = _ranking_key(values[:, columns], subset).topk(k, dim=0).indices
    return index


def _batch_candidates(z: torch.Tensor, samples: torch.Tensor, k: int,
                      distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, the best ``k`` entries of one batch: values ``[W, k']`` and batch row indices.

    The batch's rows are in store order, so a lower batch index is a lower row id: ties go to it."""
    n, width = z.shape
    positions = torch.arange(n, device=z.device)
    z = torch.where(z > 0, z, torch.full_like(z, _NEG))
    if not distinct:
        index = _top_indices(z, positions.unsqueeze(1), min(k, n))
        return z.gather(0, index).T, index.T
    unique, inverse = torch.unique(samples, return_inverse=True)
    expanded = inverse.unsqueeze(1).expand(n, width)
    best = torch.full((len(unique), width), _NEG, dtype=z.dtype, device=z.device)
    best.scatter_reduce_(0, expanded, z, reduce="amax", include_self=True)
    # the first row (lowest row id) reaching each sample's maximum
    hits = z == best.gather(0, expanded)
    order = positions.unsqueeze(1).expand(n, width)
    first = torch.full((len(unique), width), n, dtype=torch.long, device=z.device)
    first.scatter_reduce_(0, expanded, torch.where(hits, order, torch.full_like(order, n)), reduce="amin",
                          include_self=True)
    which = _top_indices(best, first, min(k, len(unique)))
    return best.gather(0, which).T, first.gather(0, which).T


def _canonical_order(values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Column indices sorting each row of ``values`` by value (descending), then row id (ascending)."""
    by_row = rows.argsort(dim=1, stable=True)
    by_value = values.gather(1, by_row).argsort(dim=1, descending=True, stable=True)
    return by_row.gather(1, by_value)


def _merge(run_v: torch.Tensor, run_r: torch.Tensor, run_s: torch.Tensor, run_p: torch.Tensor,
           new_v: torch.Tensor, new_r: torch.Tensor, new_s: torch.Tensor, new_p: torch.Tensor, k: int,
           distinct: bool) -> tuple[torch.Tensor, ...]:
    """The best ``k`` of two candidate sets, canonically ordered. Exact whichever way the rows
    were split between the sets (batches, or ranks): each set holds its own best k."""
    if distinct:
        # a sample may be in both sets (its rows span two batches, or two ranks): keep its larger
        # value, the lower row id on a tie
        valid_run = run_v > _NEG
        valid_new = new_v > _NEG
        same = (new_s.unsqueeze(2) == run_s.unsqueeze(1)) & valid_new.unsqueeze(2) & valid_run.unsqueeze(1)
        nv, rv = new_v.unsqueeze(2), run_v.unsqueeze(1)
        new_better = (nv > rv) | ((nv == rv) & (new_r.unsqueeze(2) < run_r.unsqueeze(1)))
        new_wins = same & new_better
        run_v = run_v.masked_fill(new_wins.any(1), _NEG)
        new_v = new_v.masked_fill((same & ~new_wins).any(2), _NEG)
    values = torch.cat([run_v, new_v], 1)
    index = _canonical_order(values, torch.cat([run_r, new_r], 1))[:, :k]
    pick = lambda a, b: torch.cat([a, b], 1).gather(1, index)  # noqa: E731
    return values.gather(1, index), pick(run_r, new_r), pick(run_s, new_s), pick(run_p, new_p)


def _covering_chunks(view: Any, limit: int) -> int:
    """How many chunks (in store order) hold the first ``limit`` rows."""
    if limit >= view.num_rows:
        return view.num_chunks
    low, high = 1, view.num_chunks  # the smallest m whose first m chunks hold >= limit rows
    while low < high:
        middle = (low + high) // 2
        if view.chunk_rows(range(middle)) >= limit:
            high = middle
        else:
            low = middle + 1
    return low


def _chunk_groups(view: Any, chunks: int, batch_size: int) -> list[np.ndarray]:
    """Runs of consecutive chunks of at most ``batch_size`` rows (a larger chunk alone): the unit
    of work. Each run is encoded as the same batch(es) whatever the number of ranks, so a row's
    activations never depend on how the store was split."""
    per_group = max(1, batch_size // max(1, int(view.spec.chunk_rows)))
    return [np.arange(start, min(start + per_group, chunks)) for start in range(0, chunks, per_group)]


def _read_groups(view: Any, groups: list[np.ndarray], batch_size: int, prefetch: int = 2):
    """The batches of each run of chunks, the next runs read ahead on a thread while this one is encoded."""
    def read(group: np.ndarray) -> list:
        return list(view.iter_batches(batch_size, shuffle=False, with_index=True, chunks=group, prefetch=0))

    upcoming = iter(groups)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="feature-stats-read") as pool:
        pending = deque(pool.submit(read, group) for group in islice(upcoming, prefetch))
        while pending:
            batches = pending.popleft().result()
            following = next(upcoming, None)
            if following is not None:
                pending.append(pool.submit(read, following))
            yield from batches


def _check_same_pass(dist: DistContext, plan: dict[str, Any]) -> None:
    """Refuse ranks that would split different passes (other arguments, or another snapshot of a
    store still being written): their merge would be silently wrong."""
    plans = dist.all_gather_object(plan)
    differ = [key for key in plan if len({repr(p[key]) for p in plans}) > 1]
    if differ:
        shown = "; ".join(f"{key}: {[p[key] for p in plans]} by rank" for key in differ)
        raise ValueError(f"the {dist.world_size} ranks were given different passes ({shown}); give every rank the "
                         "same store, layer and arguments, and let the store finish being written")


def _raise_if_any_failed(dist: DistContext, error: Exception | None) -> None:
    """Every rank learns whether one failed, so none waits forever in the merge's collectives."""
    messages = dist.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(rank, message) for rank, message in enumerate(messages) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"feature statistics failed on rank {rank} of {dist.world_size}: {message}")


def _collective_device(dist: DistContext) -> torch.device:
    """Where the ranks exchange tensors: the CPU under gloo; under NCCL the rank's own GPU, made
    current (NCCL's object collectives use the current device: cuda:0 on every rank otherwise)."""
    if not dist.active or torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    device = dist.device()
    torch.cuda.set_device(device)
    return device


@torch.no_grad()
def feature_statistics(sae: SAE, store: Any, layer: str | None = None, *, top_k: int = 16,
                       distinct_samples: bool = True, batch_size: int = 4096, max_rows: int | None = None,
                       device: str | torch.device | None = None, progress: bool = False, rank: int | None = None,
                       world_size: int | None = None) -> FeatureStatistics:
    """One pass over ``layer`` of ``store`` (default: the SAE's layer) computing
    :class:`FeatureStatistics`; ``max_rows`` limits the pass to the first rows (in store order).

    ``rank`` / ``world_size`` default to torchrun's environment: with several ranks (a process
    group joined here, or by the caller) each reads its share of the chunks and every rank
    returns the merged statistics, the same as one process's (``max_rows`` still means the first
    rows of the store, split between the ranks). Call it on every rank with the same arguments.
    """
    from activation_store import ActivationStore
    from tqdm.auto import tqdm

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layer = layer or sae.config.layer
    if not layer:
        raise ValueError("the SAE does not record its layer; pass layer=")
    view = store.layer(layer)
    if view.dim != sae.d_in:
        raise ValueError(f"layer {layer!r} has rows of width {view.dim}, but the SAE reads rows of width {sae.d_in}")
    if top_k < 1:
        raise ValueError(f"top_k must be positive, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if max_rows is not None and max_rows < 1:
        raise ValueError(f"max_rows must be positive (or None for every row), got {max_rows}")
    if view.num_rows == 0:
        raise ValueError(f"layer {layer!r} of {store.root} has no committed rows")
    dist = distributed_context(rank, world_size)
    if dist.world_size > 1 and not dist.active:
        raise ValueError(f"feature_statistics as rank {dist.rank} of {dist.world_size} needs a process group to "
                         "merge the ranks' statistics: launch with torchrun (or call "
                         "torch.distributed.init_process_group first), or pass world_size=1")
    exchange = _collective_device(dist)
    device = torch.device(device) if device is not None else sae.device
    width = sae.width
    limit = view.num_rows if max_rows is None else min(max_rows, view.num_rows)
    chunks = _covering_chunks(view, limit)
    groups = _chunk_groups(view, chunks, batch_size)
    _check_same_pass(dist, {"layer": layer, "rows": view.num_rows, "chunks": view.num_chunks, "max_rows": limit,
                            "top_k": top_k, "distinct_samples": distinct_samples, "batch_size": batch_size,
                            "width": width, "d_in": sae.d_in})
    mine = groups[dist.rank::dist.world_size]
    assigned = view.chunk_rows(np.concatenate(mine)) if mine else 0
    if mine and mine[-1][-1] == chunks - 1:  # the last run may hold rows past max_rows
        assigned -= view.chunk_rows(range(chunks)) - limit

    sums = torch.zeros(2 * width + 1, dtype=torch.float64, device=device)  # fired, total, rows: one all-reduce
    fired, total, count = sums[:width], sums[width:2 * width], sums[2 * width:]
    maximum = torch.full((width,), _NEG, dtype=torch.float32, device=device)
    run_v = torch.full((width, top_k), _NEG, device=device)
    run_r = torch.full((width, top_k), -1, dtype=torch.long, device=device)
    run_s = run_r.clone()
    run_p = run_r.clone()
    bar = tqdm(total=assigned, disable=not progress or not dist.is_main, unit="row", unit_scale=True,
               desc=f"feature stats {layer}" + (f" (rank 0 of {dist.world_size})" if dist.world_size > 1 else ""))
    mode = eval_mode(sae)
    mode.__enter__()
    error: Exception | None = None
    try:
        done = 0
        for number, batch in enumerate(_read_groups(view, mine, batch_size)):
            row_ids = np.asarray(batch.index.row_ids, np.int64)
            keep = row_ids < limit
            n = int(keep.sum())
            if n == 0:
                continue
            data, row_ids = batch.data[:n], row_ids[:n]  # rows are in store order: those kept come first
            check_finite(RowBatch(torch.from_numpy(data), row_ids), batch_number=number, rows_before=done)
            x = torch.from_numpy(data).to(device, torch.float32)
            rows = torch.from_numpy(row_ids).to(device)
            samples = torch.from_numpy(np.asarray(batch.index.sample_id[:n], np.int64)).to(device)
            positions = torch.from_numpy(np.asarray(batch.index.position[:n], np.int64)).to(device)
            z = sae.encode(x.to(sae.device)).to(device).float()
            fired += (z > 0).sum(0, dtype=torch.float64)
            total += z.sum(0, dtype=torch.float64)
            maximum = torch.maximum(maximum, z.amax(0))
            values, local = _batch_candidates(z, samples, top_k, distinct_samples)
            run_v, run_r, run_s, run_p = _merge(run_v, run_r, run_s, run_p, values, rows[local], samples[local],
                                                positions[local], top_k, distinct_samples)
            count += n
            done += n
            bar.update(n)
    except Exception as failure:  # noqa: BLE001 - shared with the other ranks, then raised as it is
        error = failure
    finally:
        bar.close()
        mode.__exit__(None, None, None)
    _raise_if_any_failed(dist, error)

    if dist.active:
        sums = dist.all_reduce_sum(sums.to(exchange))
        maximum = dist.all_reduce_max(maximum.to(exchange))
        values = dist.all_gather(run_v.to(exchange))
        ids = dist.all_gather(torch.stack([run_r, run_s, run_p]).to(exchange))
        run_v, (run_r, run_s, run_p) = values[0], ids[0]
        for other_v, (other_r, other_s, other_p) in zip(values[1:], ids[1:]):
            run_v, run_r, run_s, run_p = _merge(run_v, run_r, run_s, run_p, other_v, other_r, other_s, other_p,
                                                top_k, distinct_samples)
    rows_seen = int(sums[-1].item())
    if rows_seen != limit:  # the plan covers exactly the first `limit` rows: anything else is a bug
        raise RuntimeError(f"feature statistics read {rows_seen} rows of {layer!r} instead of {limit}")
    empty = run_v == _NEG
    run_r, run_s, run_p = (t.masked_fill(empty, -1) for t in (run_r, run_s, run_p))
    fired_np = sums[:width].cpu().numpy()
    total_np = sums[width:2 * width].cpu().numpy()
    return FeatureStatistics(
        layer=layer, store=str(store.root), rows=limit, top_k=top_k, distinct_samples=distinct_samples,
        frequency=(fired_np / limit).astype(np.float64), mean=(total_np / limit).astype(np.float64),
        mean_active=np.divide(total_np, fired_np, out=np.zeros_like(total_np), where=fired_np > 0),
        max=maximum.cpu().numpy().astype(np.float32), top_values=run_v.cpu().numpy(),
        top_rows=run_r.cpu().numpy(), top_samples=run_s.cpu().numpy(), top_positions=run_p.cpu().numpy(),
        rank=dist.rank)
