"""Per-latent feature statistics in one streaming pass over a store: the atlas's input.

For every latent: firing frequency, mean activation (over all rows and over the rows where it
fires), maximum, and the top-k exemplars (value, store row id, sample id, position). With
``distinct_samples`` (the default) the exemplars are k different images, each at its strongest
position; otherwise the k strongest rows, wherever they come from.

Everything runs batched on the device: per batch one ``[N, width]`` encode, column-wise
``topk`` (or a per-sample ``scatter_reduce`` max first), then a merge of ``[width, 2k]``
candidates; no Python loop over rows or latents.

Saved next to the SAE as ``feature_stats.safetensors`` + ``feature_stats.json``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
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
    first, padded with ``-inf`` / ``-1`` when fewer than k rows fire.
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
        from safetensors.numpy import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        arrays = {name: np.ascontiguousarray(getattr(self, name)) for name in
                  ("frequency", "mean", "mean_active", "max", "top_values", "top_rows", "top_samples", "top_positions")}
        tmp = directory / (STATS_TENSORS + ".tmp")
        save_file(arrays, str(tmp))
        tmp.replace(directory / STATS_TENSORS)
        meta = {"format": "mechlens-sae-feature-stats", "version": 1, "layer": self.layer, "store": self.store,
                "rows": self.rows, "top_k": self.top_k, "distinct_samples": self.distinct_samples,
                "width": self.width}
        tmp = directory / (STATS_JSON + ".tmp")
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


def _batch_candidates(z: torch.Tensor, rows: torch.Tensor, samples: torch.Tensor, k: int,
                      distinct: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per latent, the best ``k`` entries of one batch: values ``[W, k']`` and batch row indices."""
    z = torch.where(z > 0, z, torch.full_like(z, _NEG))
    n, width = z.shape
    if not distinct:
        values, index = z.topk(min(k, n), dim=0)
        return values.T, index.T
    unique, inverse = torch.unique(samples, return_inverse=True)
    expanded = inverse.unsqueeze(1).expand(n, width)
    best = torch.full((len(unique), width), _NEG, dtype=z.dtype, device=z.device)
    best.scatter_reduce_(0, expanded, z, reduce="amax", include_self=True)
    # the first row (in stream order) reaching each sample's maximum
    hits = z == best.gather(0, expanded)
    order = torch.arange(n, device=z.device).unsqueeze(1).expand(n, width)
    first = torch.full((len(unique), width), n, dtype=torch.long, device=z.device)
    first.scatter_reduce_(0, expanded, torch.where(hits, order, torch.full_like(order, n)), reduce="amin",
                          include_self=True)
    values, which = best.topk(min(k, len(unique)), dim=0)
    return values.T, first.gather(0, which).T


def _merge(run_v: torch.Tensor, run_r: torch.Tensor, run_s: torch.Tensor, run_p: torch.Tensor,
           new_v: torch.Tensor, new_r: torch.Tensor, new_s: torch.Tensor, new_p: torch.Tensor, k: int,
           distinct: bool) -> tuple[torch.Tensor, ...]:
    if distinct:
        # a sample may already be among the running exemplars (its rows span two batches): keep
        # its larger value (the earlier row on a tie)
        valid_run = run_v > _NEG
        valid_new = new_v > _NEG
        same = (new_s.unsqueeze(2) == run_s.unsqueeze(1)) & valid_new.unsqueeze(2) & valid_run.unsqueeze(1)
        new_wins = same & (new_v.unsqueeze(2) > run_v.unsqueeze(1))
        run_v = run_v.masked_fill(new_wins.any(1), _NEG)
        new_v = new_v.masked_fill((same & ~new_wins).any(2), _NEG)
    values = torch.cat([run_v, new_v], 1)
    top, index = values.topk(k, dim=1)
    pick = lambda a, b: torch.cat([a, b], 1).gather(1, index)  # noqa: E731
    return top, pick(run_r, new_r), pick(run_s, new_s), pick(run_p, new_p)


@torch.no_grad()
def feature_statistics(sae: SAE, store: Any, layer: str | None = None, *, top_k: int = 16,
                       distinct_samples: bool = True, batch_size: int = 4096, max_rows: int | None = None,
                       device: str | torch.device | None = None, progress: bool = False) -> FeatureStatistics:
    """One pass over ``layer`` of ``store`` (default: the SAE's layer) computing
    :class:`FeatureStatistics`; ``max_rows`` limits the pass to the first rows (in store order)."""
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
    device = torch.device(device) if device is not None else sae.device
    width = sae.width
    fired = torch.zeros(width, dtype=torch.float64, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    maximum = torch.full((width,), _NEG, dtype=torch.float32, device=device)
    run_v = torch.full((width, top_k), _NEG, device=device)
    run_r = torch.full((width, top_k), -1, dtype=torch.long, device=device)
    run_s = run_r.clone()
    run_p = run_r.clone()
    count = 0
    limit = view.num_rows if max_rows is None else min(max_rows, view.num_rows)
    bar = tqdm(total=limit, disable=not progress, desc=f"feature stats {layer}", unit="row", unit_scale=True)
    mode = eval_mode(sae)
    mode.__enter__()
    try:
        for number, batch in enumerate(view.iter_batches(batch_size, shuffle=False, with_index=True)):
            if count >= limit:
                break
            data, index = batch.data[:limit - count], batch.index
            n = len(data)
            check_finite(RowBatch(torch.from_numpy(data), np.asarray(index.row_ids[:n])), batch_number=number,
                         rows_before=count)
            x = torch.from_numpy(data).to(device, torch.float32)
            rows = torch.from_numpy(np.asarray(index.row_ids[:n], np.int64)).to(device)
            samples = torch.from_numpy(np.asarray(index.sample_id[:n], np.int64)).to(device)
            positions = torch.from_numpy(np.asarray(index.position[:n], np.int64)).to(device)
            z = sae.encode(x.to(sae.device)).to(device).float()
            fired += (z > 0).sum(0, dtype=torch.float64)
            total += z.sum(0, dtype=torch.float64)
            maximum = torch.maximum(maximum, z.amax(0))
            values, local = _batch_candidates(z, rows, samples, top_k, distinct_samples)
            run_v, run_r, run_s, run_p = _merge(run_v, run_r, run_s, run_p, values, rows[local], samples[local],
                                                positions[local], top_k, distinct_samples)
            count += n
            bar.update(n)
    finally:
        bar.close()
        mode.__exit__(None, None, None)
    if count == 0:
        raise ValueError(f"layer {layer!r} of {store.root} has no committed rows")
    empty = run_v == _NEG
    run_r, run_s, run_p = (t.masked_fill(empty, -1) for t in (run_r, run_s, run_p))
    fired_np = fired.cpu().numpy()
    total_np = total.cpu().numpy()
    return FeatureStatistics(
        layer=layer, store=str(store.root), rows=count, top_k=top_k, distinct_samples=distinct_samples,
        frequency=(fired_np / count).astype(np.float64), mean=(total_np / count).astype(np.float64),
        mean_active=np.divide(total_np, fired_np, out=np.zeros_like(total_np), where=fired_np > 0),
        max=maximum.cpu().numpy().astype(np.float32), top_values=run_v.cpu().numpy(),
        top_rows=run_r.cpu().numpy(), top_samples=run_s.cpu().numpy(), top_positions=run_p.cpu().numpy())
