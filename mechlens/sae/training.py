"""Training SAEs: one pass over a stream of activations trains one SAE or a whole sweep.

>>> result = train_sae("runs/acts", "stage2", [TopKConfig(width=1024, k=k) for k in (8, 16, 32)],
...                    TrainConfig(steps=2000, batch_size=1024), out="runs/sae")

The :class:`SAETrainer` consumes any iterator of row batches (tensors, ndarrays, store
``Batch`` objects) or a :class:`~mechlens.sae.data.BatchSource` (replayable, so training resumes
mid-epoch); :func:`train_sae` wires it to a store layer: normalisation from the store's
statistics, shuffled streaming batches, checkpoints, export of SAEs that read raw activations.

Per step and per SAE: normalise the batch once, forward, loss = reconstruction + the scheduled
loss terms its architecture declares (``SAE.loss_terms``, see :mod:`mechlens.sae.terms`: the
sparsity penalty of ReLU / JumpReLU, AuxK and Multi-TopK of the TopK family, any term of a
registered architecture), backward, remove the decoder-parallel gradient, clip, Adam,
renormalise decoder rows, update the dead-latent counters. The trainer itself knows no
architecture. Metrics are accumulated on the device and synchronised only every ``log_every``
steps.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens._distributed import SINGLE_PROCESS, BatchGroup, DistContext, distributed_context, use_batch_group
from mechlens.sae.config import SAEConfig, TrainConfig, lr_rule
from mechlens.sae.lr import LRSearch, default_rates, save_search, validation_split
from mechlens.sae.data import (
    BatchSource,
    Normalizer,
    Prefetcher,
    RowBatch,
    StoreSource,
    as_source,
    geometric_median,
    resolve_device,
)
from mechlens._distributed import batch_mean_variance
from mechlens.sae.losses import squared_error
from mechlens.sae.modules import SAE, SAECheckpointError, build_sae, fold_normalization, sae_class
from mechlens.sae.terms import LossContext, LossTerm, sparsity_warmup

__all__ = [
    "SAETrainer",
    "TrainResult",
    "find_learning_rate",
    "lr_factor",
    "member_lr",
    "sparsity_factor",
    "train_sae",
]

CHECKPOINT_FORMAT = "mechlens-sae-trainer"
CHECKPOINT_VERSION = 2  # 2: the metric sums hold one entry per loss term (1: a fixed sparsity / aux layout)
TRAINER_FILE = "trainer.json"
# every row has these; then each loss term's "<name>_loss" and "<name>_coeff" (sparsity_coeff and aux_loss
# are 0 for an SAE without a "sparsity" / "aux" term)
LOG_COLUMNS = ("step", "rows", "sae", "lr", "loss", "mse", "fvu", "l0", "dead_fraction", "sparsity_coeff",
               "aux_loss", "elapsed_s")
# member.sums: loss, recon, l0, squared error, total variance (since the last log), then one per loss term
_FIXED_SUMS = 5
# store meta "spatial" (how the capture job made rows) -> the pooling an SAELatent must apply
DEAD_CHECK_EVERY = 10
_POOLING_OF_SPATIAL = {"all": "all", "random": "all", "mean": "mean", "max": "max", "cls": "cls"}


# ---------------------------------------------------------------------------- schedules
def lr_factor(step: int, config: TrainConfig) -> float:
    """Linear warm-up over the first ``lr_warmup_fraction`` of ``steps``, constant, linear decay
    to 0 over the last ``lr_decay_fraction``."""
    warmup_steps = config.lr_warmup_fraction * config.steps
    warm = 1.0 if warmup_steps <= 0 else min(1.0, (step + 1) / warmup_steps)
    decay_steps = config.lr_decay_fraction * config.steps
    if decay_steps <= 0:
        return warm
    decay_start = config.steps - decay_steps
    decay = 1.0 if step < decay_start else max(0.0, (config.steps - step) / decay_steps)
    return min(warm, decay)


sparsity_factor = sparsity_warmup  # the schedule of the sparsity terms (mechlens.sae.terms)


def member_lr(config: SAEConfig, train: TrainConfig) -> float:
    """The peak learning rate of one SAE: its config's ``lr``, else ``TrainConfig.lr`` (``"rule"``:
    :func:`~mechlens.sae.lr.lr_rule` of its width)."""
    if config.lr is not None:
        return float(config.lr)
    if train.lr == "rule":
        return lr_rule(config.width)
    if train.lr == "auto":
        raise ValueError("lr='auto' needs a validation split to test rates on: train through train_sae (which holds "
                         "images out) or call find_learning_rate and pass its rate")
    return float(train.lr)


# ---------------------------------------------------------------------------- results
@dataclass
class TrainResult:
    """What :meth:`SAETrainer.fit` / :func:`train_sae` did.

    ``saes``: the trained SAEs, exported (normalisation folded in: they read raw activations),
    in eval mode; ``metrics``: the last logged metrics of each; ``log``: every logged row;
    ``paths``: where they were saved (when an output directory was given); ``lr_search``: the
    :class:`~mechlens.sae.lr.LRSearch` that chose the rate of a run with ``lr="auto"``.
    """

    saes: list[SAE]
    configs: list[SAEConfig]
    steps: int
    rows: int
    seconds: float
    metrics: list[dict[str, float]]
    log: list[dict[str, Any]] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    lr_search: Any = None  # the LRSearch of a run with lr="auto"

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else float("nan")

    @property
    def sae(self) -> SAE:
        """The only SAE (an error when a sweep was trained)."""
        if len(self.saes) != 1:
            raise ValueError(f"this run trained {len(self.saes)} SAEs; use .saes")
        return self.saes[0]


@dataclass
class _Step:
    """One SAE's forward and backward of a step, waiting for its update."""

    out: Any
    loss: torch.Tensor
    recon: torch.Tensor
    values: list[torch.Tensor]
    counts: torch.Tensor
    rows: int  # this rank's rows


@dataclass
class _Member:
    sae: SAE
    optimizer: torch.optim.Optimizer
    rows_since_fired: torch.Tensor
    sums: torch.Tensor  # loss, recon, l0, squared error, total variance (since last log), each loss term
    steps_in_window: int = 0
    dead_index: torch.Tensor | None = None  # dead latents (LossContext.dead), refreshed every DEAD_CHECK_EVERY steps

    @property
    def terms(self) -> tuple[LossTerm, ...]:
        return tuple(self.sae.loss_terms)

    @property
    def tracks_dead(self) -> bool:
        return any(term.uses_dead_latents for term in self.terms)


# ---------------------------------------------------------------------------- trainer
class SAETrainer:
    """Train one or several SAEs on the same stream of rows (they must share ``d_in``).

    ``dist``: data-parallel ranks (:func:`mechlens._distributed.distributed_context`, e.g. under
    ``torchrun``). Each rank feeds its own part of every global batch; a step then equals one
    process's step on the concatenated batch (rank order): gradients, dead-latent counts and
    metrics are summed over the ranks, BatchTopK selects over the global batch and AuxK normalises
    by its variance. Every rank holds the same SAEs; only rank 0 writes checkpoints and logs.
    """

    def __init__(self, configs: SAEConfig | Sequence[SAEConfig], train: TrainConfig | None = None, *,
                 dist: DistContext | None = None):
        configs = [configs] if isinstance(configs, SAEConfig) else list(configs)
        if not configs:
            raise ValueError("SAETrainer needs at least one SAE config")
        d_ins = {c.d_in for c in configs}
        if len(d_ins) > 1:
            raise ValueError(f"SAEs trained in one pass read the same rows, but their d_in differ: {sorted(map(str, d_ins))}")
        self.configs: list[SAEConfig] = configs
        self.train = train or TrainConfig()
        self.device = resolve_device(self.train.device)
        self.step = 0
        self.rows_seen = 0
        self.elapsed = 0.0
        self.normalizer: Normalizer | None = None
        self.members: list[_Member] = []
        self.log: list[dict[str, Any]] = []
        self.dist = dist or SINGLE_PROCESS
        if self.dist.world_size > 1:
            archetypal = [c.name for c in configs if c.arch == "archetypal"]
            if archetypal:
                raise ValueError(f"{archetypal[0]}: an archetypal SAE takes its archetypes from the first batch one "
                                 "process sees; train it in one process (without torchrun)")

    # ------------------------------------------------------------------ set-up
    @property
    def initialised(self) -> bool:
        return bool(self.members)

    @property
    def d_in(self) -> int | None:
        return self.configs[0].d_in

    def initialise(self, *, normalizer: Normalizer | None = None, init_rows: torch.Tensor | None = None,
                   b_dec: torch.Tensor | None = None) -> "SAETrainer":
        """Build the SAEs. ``normalizer`` defaults to one estimated from ``init_rows`` (identity when
        ``TrainConfig.normalize`` is off); ``b_dec`` (in the normalised space) defaults to the mean or
        geometric median of ``init_rows`` (per ``TrainConfig.b_dec_init``)."""
        cfg = self.train
        if self.d_in is None:
            if init_rows is None:
                raise ValueError("the SAE configs have no d_in and no rows were given to infer it from")
            self.configs = [c.replace(d_in=int(init_rows.shape[1])) for c in self.configs]
        if init_rows is not None:
            init_rows = init_rows.to(self.device, torch.float32)
            if init_rows.shape[1] != self.d_in:
                raise ValueError(f"rows have width {init_rows.shape[1]} but the SAEs read d_in={self.d_in}")
        if normalizer is None:
            if not cfg.normalize:
                normalizer = Normalizer.identity()
            elif init_rows is None:
                raise ValueError("normalize=True needs a normalizer or rows to estimate it from")
            else:
                normalizer = Normalizer.from_rows(init_rows, center=cfg.center)
        self.normalizer = normalizer.to(self.device)
        if b_dec is None and cfg.b_dec_init != "zeros":
            if init_rows is None:
                raise ValueError(f"b_dec_init={cfg.b_dec_init!r} needs rows (or pass b_dec=)")
            rows = self.normalizer.apply(init_rows)
            b_dec = rows.mean(0) if cfg.b_dec_init == "mean" else geometric_median(rows)
        self.members = []
        for index, config in enumerate(self.configs):
            sae = build_sae(config, device=self.device, seed=cfg.seed + index).train()
            if b_dec is not None:
                with torch.no_grad():
                    sae.b_dec.copy_(b_dec.to(sae.b_dec))
            self.members.append(self._member(sae))
        return self

    def _member(self, sae: SAE) -> _Member:
        cfg = self.train
        groups: Any = sae.parameters()
        scale = float(sae.config.decoder_lr_scale)
        if scale != 1.0:  # the decoder in a group of its own, stepped at ``lr_scale`` x the SAE's rate
            decoder = [p for name, p in sae.named_parameters() if name == "W_dec"]
            if not decoder:
                raise ValueError(f"decoder_lr_scale={scale:g}: the {sae.config.arch} SAE has no learnt decoder W_dec; "
                                 "leave decoder_lr_scale at 1")
            groups = [{"params": decoder, "lr_scale": scale},
                      {"params": [p for name, p in sae.named_parameters() if name != "W_dec"]}]
        optimizer = torch.optim.Adam(groups, lr=member_lr(sae.config, cfg), betas=cfg.adam_betas, eps=cfg.adam_eps)
        return _Member(sae, optimizer, torch.zeros(sae.width, dtype=torch.long, device=self.device),
                       torch.zeros(_FIXED_SUMS + len(sae.loss_terms), dtype=torch.float64, device=self.device))

    def log_columns(self) -> list[str]:
        """The columns of the metrics log: :data:`LOG_COLUMNS`, then those of every loss term."""
        columns = list(LOG_COLUMNS)
        for config in self.configs:
            for term in sae_class(config.arch).loss_terms:
                columns.extend(c for c in term.columns if c not in columns)
        return columns

    # ------------------------------------------------------------------ one step
    def train_step(self, x: torch.Tensor, *, global_rows: int | None = None) -> None:
        """One optimizer step of every SAE on raw rows ``x`` ``[N, d_in]`` (on the trainer's device).
        Under data parallelism ``x`` is this rank's part of the global batch of ``global_rows`` rows
        (summed over the ranks when not given)."""
        cfg = self.train
        x = self.normalizer.apply(x.to(self.device, torch.float32))
        factor = lr_factor(self.step, cfg)
        batch = x.shape[0]
        parallel = self.dist.active
        if parallel:
            rows = int(global_rows) if global_rows is not None else int(
                self.dist.all_reduce_sum(torch.tensor([batch], dtype=torch.long, device=self.device)).item())
            group = BatchGroup(self.dist, rows)
        else:
            rows, group = batch, None
        with use_batch_group(group):
            variance = batch_mean_variance(x) * rows  # the global batch's sum of squared deviations
            pending = []
            for member in self.members:
                step = self._forward_backward(member, x, factor, batch / rows)
                if parallel:
                    pending.append(step)  # their gradients and counts are summed over the ranks at once
                else:
                    self._apply(member, step, rows, variance)
            if parallel:
                self._all_reduce(pending)
                for member, step in zip(self.members, pending):
                    self._apply(member, step, rows, variance)
        self.step += 1
        self.rows_seen += rows
        if self.step % DEAD_CHECK_EVERY == 0:
            self._refresh_dead_flags()

    def _forward_backward(self, member: "_Member", x: torch.Tensor, factor: float, share: float) -> "_Step":
        # ``share``: this rank's rows / the global batch's, so the summed gradients are the global mean's
        cfg = self.train
        sae = member.sae
        config = sae.config
        for group in member.optimizer.param_groups:
            group["lr"] = member_lr(config, cfg) * factor * group.get("lr_scale", 1.0)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.autocast == "bf16"):
            out = sae(x)
            recon = squared_error(x, out.x_hat.float())
            loss = recon
            context = LossContext(x, out, self.step, cfg, member.dead_index)
            values = []
            for term in member.terms:
                value = term.compute(sae, context)
                if value is None:  # the term is off for this step
                    values.append(recon.new_zeros(()))
                    continue
                value = value.float()
                loss = loss + term.coefficient(config, self.step, cfg) * value
                values.append(value.detach())
        member.optimizer.zero_grad(set_to_none=True)
        (loss * share if share != 1 else loss).backward()
        with torch.no_grad():
            if out.active is not None:  # a sparse forward lists its firing latents
                fired = (out.active_values > 0).to(x.dtype)
                counts = torch.bincount(out.active, weights=fired, minlength=sae.width)
            else:
                counts = (out.z > 0).sum(dim=0)
        return _Step(out, loss.detach(), recon.detach(), values, counts, x.shape[0])

    def _all_reduce(self, pending: list["_Step"]) -> None:
        # one collective per step for every SAE's gradients and firing counts
        pieces = []
        for member, step in zip(self.members, pending):
            for param in member.sae.parameters():
                if param.grad is None:
                    param.grad = torch.zeros_like(param)
                pieces.append(param.grad.reshape(-1))
            pieces.append(step.counts.to(pieces[-1].dtype))
        flat = self.dist.all_reduce_sum(torch.cat(pieces))
        offset = 0
        for member, step in zip(self.members, pending):
            for param in member.sae.parameters():
                n = param.numel()
                param.grad.copy_(flat[offset:offset + n].view_as(param.grad))
                offset += n
            n = step.counts.numel()
            step.counts = flat[offset:offset + n].round().to(step.counts.dtype)
            offset += n

    def _apply(self, member: "_Member", step: "_Step", rows: int, variance: torch.Tensor) -> None:
        cfg = self.train
        sae = member.sae
        config = sae.config
        if config.normalize_decoder:
            sae.remove_parallel_decoder_grad()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        member.optimizer.step()
        if config.normalize_decoder:
            sae.normalize_decoder_rows()
        sae.after_step(step.out)
        with torch.no_grad():
            counts = step.counts
            member.rows_since_fired = torch.where(counts > 0, torch.zeros_like(member.rows_since_fired),
                                                  member.rows_since_fired + rows)
            # the loss terms are this rank's means; collect_metrics averages them over the ranks
            member.sums += torch.stack([step.loss, step.recon, counts.sum() / rows, step.recon * step.rows,
                                        variance, *step.values]).double()
            member.steps_in_window += 1

    def _refresh_dead_flags(self) -> None:
        # One host sync every DEAD_CHECK_EVERY steps lists the dead latents that terms such as AuxK
        # use until the next check: their cost then scales with the number of dead latents (none,
        # in most steps of a healthy run) instead of the width. Only for SAEs with such a term.
        # Part of the checkpoint, so a resumed run takes the same decisions.
        for member in self.members:
            if member.tracks_dead:
                self._set_dead(member, member.rows_since_fired >= self.train.dead_window)

    @staticmethod
    def _set_dead(member: "_Member", mask: torch.Tensor) -> None:
        index = mask.nonzero().flatten()
        member.dead_index = index if index.numel() else None

    # ------------------------------------------------------------------ metrics
    def collect_metrics(self) -> list[dict[str, float]]:
        """Average the metrics accumulated since the last call (one host sync) and reset them."""
        if not self.members:
            return []
        flat = torch.cat([m.sums for m in self.members])
        if self.dist.active:
            # summed over the ranks: the squared errors add up; every other entry is a per-rank mean
            # (equal batch parts) or a global value, so the sum is divided by the world size
            flat = self.dist.all_reduce_sum(flat.clone())
            divide = torch.full_like(flat, float(self.dist.world_size))
            offset = 0
            for member in self.members:
                divide[offset + 3] = 1.0
                offset += len(member.sums)
            flat = flat / divide
        flat = flat.cpu().numpy()
        dead = torch.stack([(m.rows_since_fired >= self.train.dead_window).double().mean()
                            for m in self.members]).cpu().numpy()
        rows = []
        last = max(self.step - 1, 0)
        factor = lr_factor(last, self.train)
        offset = 0
        for index, member in enumerate(self.members):
            sums = flat[offset:offset + len(member.sums)]
            offset += len(member.sums)
            n = max(member.steps_in_window, 1)
            row = {
                "step": self.step, "rows": self.rows_seen, "sae": index,
                "lr": member_lr(member.sae.config, self.train) * factor,
                "loss": sums[0] / n, "mse": sums[1] / n / member.sae.d_in, "fvu": sums[3] / max(sums[4], 1e-30),
                "l0": sums[2] / n, "dead_fraction": float(dead[index]), "sparsity_coeff": 0.0, "aux_loss": 0.0,
                "elapsed_s": self.elapsed,
            }
            for term, total in zip(member.terms, sums[_FIXED_SUMS:]):
                value, coeff = term.columns
                row[value] = total / n
                row[coeff] = term.coefficient(member.sae.config, last, self.train)
            rows.append(row)
            member.sums.zero_()
            member.steps_in_window = 0
        return [{k: (float(v) if not isinstance(v, int) else v) for k, v in row.items()} for row in rows]

    # ------------------------------------------------------------------ the loop
    def fit(self, data: Iterable[Any] | BatchSource, *, until_step: int | None = None, progress: bool = True,
            log_path: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
            normalizer: Normalizer | None = None, b_dec: torch.Tensor | None = None) -> TrainResult:
        """Train until ``TrainConfig.steps`` (or ``until_step``, to stop early and resume later).

        ``data``: a :class:`BatchSource` or any iterable of row batches. On a fresh trainer the first
        ``TrainConfig.init_rows`` rows also serve to estimate the normalisation and ``b_dec`` (unless
        given). A resumed trainer skips the batches it already trained on (a plain iterable must
        replay the same stream). Checkpoints go to ``checkpoint_dir`` every ``checkpoint_every``
        steps and when stopping early.
        """
        cfg = self.train
        stop = cfg.steps if until_step is None else min(int(until_step), cfg.steps)
        source = as_source(data)
        prefetch = Prefetcher(source.iterate(self.step), self.device, depth=cfg.prefetch, first_batch=self.step,
                              rows_before=self.rows_seen)
        stream = iter(prefetch)
        main = self.dist.is_main
        writer = _MetricsLog(log_path, self.log_columns()) if log_path is not None and main else None
        try:
            if not self.initialised:
                peeked: list[RowBatch] = []
                needs_rows = normalizer is None and cfg.normalize or (b_dec is None and cfg.b_dec_init != "zeros") \
                    or self.d_in is None
                wanted = math.ceil(cfg.init_rows / self.dist.world_size)  # each rank's part of the init rows
                while needs_rows and sum(len(b.data) for b in peeked) < wanted:
                    item = next(stream, None)
                    if item is None:
                        break
                    peeked.append(item)
                rows = self._init_rows(peeked) if needs_rows else None
                self.initialise(normalizer=normalizer, init_rows=rows, b_dec=b_dec)
                stream = itertools.chain(peeked, stream)
            bar = _progress_bar(cfg.steps, self.step, progress and main)
            started = time.perf_counter() - self.elapsed
            try:
                while self.step < stop:
                    batch = next(stream, None)
                    global_rows = self._global_rows(batch)
                    if global_rows is None:
                        warnings.warn(f"the data ended after {self.step} of {cfg.steps} steps"
                                      + (" on one of the ranks" if self.dist.active else ""), stacklevel=2)
                        break
                    self.train_step(batch.data, global_rows=global_rows)
                    self.elapsed = time.perf_counter() - started  # host time; synchronised at each log
                    bar.update(1)
                    if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                        self._log(self.collect_metrics(), writer, bar)
                        self.elapsed = time.perf_counter() - started
                    if checkpoint_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                        self.save_checkpoint(checkpoint_dir)
                if self.step < stop and any(m.steps_in_window for m in self.members):
                    self._log(self.collect_metrics(), writer, bar)  # the data ran out: log what is left
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.elapsed = time.perf_counter() - started
            finally:
                bar.close()
            if checkpoint_dir is not None and (self.step < cfg.steps or cfg.checkpoint_every):
                self.save_checkpoint(checkpoint_dir)
        finally:
            prefetch.close()
            if writer is not None:
                writer.close()
        last = {}
        for row in self.log:
            last[row["sae"]] = row
        return TrainResult(self.export(), list(self.configs), self.step, self.rows_seen, self.elapsed,
                           [last.get(i, {}) for i in range(len(self.members))], list(self.log))

    def _init_rows(self, peeked: list[RowBatch]) -> torch.Tensor:
        """The first ``init_rows`` rows (normalisation, ``b_dec``): under data parallelism, every
        rank's peeked batches interleaved in the order of the concatenated global batches."""
        parts = [[b.data.to("cpu") for b in peeked]]
        if self.dist.active:
            parts = self.dist.all_gather_object(parts[0])
        ordered = [part[j] for j in range(max(map(len, parts))) for part in parts if j < len(part)]
        if not ordered:
            raise ValueError("the data stream is empty: nothing to train on")
        return torch.cat(ordered)[:self.train.init_rows]

    def _global_rows(self, batch: RowBatch | None) -> int | None:
        """The global batch's size, or None when the data ended (on any rank: all stop together)."""
        if not self.dist.active:
            return None if batch is None else len(batch.data)
        state = torch.tensor([0 if batch is None else 1, 0 if batch is None else len(batch.data)], dtype=torch.long,
                             device=self.device)
        self.dist.all_reduce_sum(state)
        return int(state[1]) if int(state[0]) == self.dist.world_size else None

    def _log(self, rows: list[dict[str, float]], writer: "_MetricsLog | None", bar: Any) -> None:
        self.log.extend(rows)
        if writer is not None:
            writer.write(rows)
        if rows:
            bar.set_postfix_str(" | ".join(f"fvu {r['fvu']:.3f} l0 {r['l0']:.1f} dead {100 * r['dead_fraction']:.0f}%"
                                           for r in rows[:4]) + (" ..." if len(rows) > 4 else ""), refresh=False)

    # ------------------------------------------------------------------ export
    def export(self) -> list[SAE]:
        """The SAEs with the normalisation folded in (they read raw activations), in eval mode."""
        if not self.initialised:
            raise RuntimeError("nothing trained yet")
        exported = []
        for member in self.members:
            folded = fold_normalization(member.sae, scale=self.normalizer.scale, shift=self.normalizer.shift)
            exported.append(folded.eval())
        return exported

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, directory: str | os.PathLike) -> Path:
        """Write the full training state (SAEs in the normalised space, Adam moments, dead-latent
        counters, normaliser, step) to ``directory``; older state files there are removed."""
        from safetensors.torch import save_file

        directory = Path(directory)
        if not self.dist.is_main:  # every rank holds the same state: rank 0 writes it
            self.dist.barrier()
            return directory
        try:
            self._write_checkpoint(directory, save_file)
        finally:
            self.dist.barrier()
        return directory

    def _write_checkpoint(self, directory: Path, save_file: Any) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        groups = []
        for index, member in enumerate(self.members):
            for name, tensor in member.sae.state_dict().items():
                tensors[f"{index}.sae.{name}"] = tensor
            state = member.optimizer.state_dict()
            for param_id, values in state["state"].items():
                for key, value in values.items():
                    tensors[f"{index}.optim.{param_id}.{key}"] = torch.as_tensor(value)
            groups.append(state["param_groups"])
            tensors[f"{index}.rows_since_fired"] = member.rows_since_fired
            dead = torch.zeros(member.sae.width, dtype=torch.bool, device=self.device)
            if member.dead_index is not None:
                dead[member.dead_index] = True
            tensors[f"{index}.auxk_latents"] = dead
            tensors[f"{index}.metric_sums"] = member.sums  # so the first log after a resume is the same
        if self.normalizer.shift is not None:
            tensors["normalizer.shift"] = self.normalizer.shift
        name = f"state-step{self.step:09d}.safetensors"
        tmp = directory / (name + ".tmp")
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp))
        tmp.replace(directory / name)
        record = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "step": self.step, "rows_seen": self.rows_seen,
                  "elapsed_s": self.elapsed, "state_file": name, "train_config": self.train.to_json(),
                  "configs": [c.to_json() for c in self.configs], "optimizer_groups": groups,
                  "normalizer": {"scale": self.normalizer.scale, "centered": self.normalizer.shift is not None},
                  "steps_in_window": [m.steps_in_window for m in self.members],
                  "log": self.log}
        tmp = directory / (TRAINER_FILE + ".tmp")
        tmp.write_text(json_dumps(record))
        tmp.replace(directory / TRAINER_FILE)  # the commit point
        for old in directory.glob("state-step*.safetensors"):
            if old.name != name:
                old.unlink(missing_ok=True)

    @classmethod
    def from_checkpoint(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                        expect: Sequence[SAEConfig] | None = None, train: TrainConfig | None = None,
                        dist: DistContext | None = None) -> "SAETrainer":
        """Rebuild a trainer from :meth:`save_checkpoint`. ``expect``: the configs this run asks for;
        a checkpoint of other SAEs (another width, k, architecture) is an error naming both.
        ``dist``: the ranks that continue the run (any number: the state is the same on every rank).
        ``train`` may change only ``device``, ``log_every``, ``checkpoint_every`` and ``prefetch``."""
        from safetensors.torch import load_file

        from activation_store.manifest import safe_join
        from mechlens.sae.config import SAEConfig as _Config

        directory = Path(directory)
        file = directory / TRAINER_FILE
        if not file.is_file():
            raise SAECheckpointError(f"no trainer checkpoint in {directory} ({TRAINER_FILE} is missing)")
        record = json.loads(file.read_text())
        if record.get("format") != CHECKPOINT_FORMAT:
            raise SAECheckpointError(f"{file} is not a mechlens SAE trainer checkpoint")
        configs = [_Config.from_json(c) for c in record["configs"]]
        saved_train = TrainConfig.from_json(record["train_config"])
        if expect is not None:
            _check_same_saes(configs, list(expect), directory)
        if train is not None:
            allowed = {"device", "log_every", "checkpoint_every", "prefetch"}
            changed = {k for k, v in train.to_json().items() if saved_train.to_json()[k] != v} - allowed
            if changed:
                raise SAECheckpointError(
                    f"cannot resume {directory} with different training settings {sorted(changed)} (the schedule and "
                    "data order depend on them); start a new run or resume with the saved settings")
            saved_train = saved_train.replace(**{k: getattr(train, k) for k in allowed})
        if device is not None:
            saved_train = saved_train.replace(device=str(device))
        trainer = cls(configs, saved_train, dist=dist)
        try:  # a name from the checkpoint file: it must not lead outside the checkpoint directory
            state_file = safe_join(directory, record["state_file"], "checkpoint state file")
        except ValueError as error:
            raise SAECheckpointError(f"{file} is damaged or was edited by hand: {error}") from None
        state = load_file(str(state_file), device="cpu")
        shift = state.get("normalizer.shift")
        trainer.normalizer = Normalizer(float(record["normalizer"]["scale"]), shift).to(trainer.device)
        for index, config in enumerate(configs):
            sae = build_sae(config, device=trainer.device, seed=None).train()
            prefix = f"{index}.sae."
            sae_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            sae.check_state(sae_state, f"{directory} (SAE {index})")
            sae.load_state_dict(sae_state)
            member = trainer._member(sae)
            prefix = f"{index}.optim."
            optim_state: dict[int, dict[str, torch.Tensor]] = {}
            for key, value in state.items():
                if key.startswith(prefix):
                    param_id, name = key[len(prefix):].split(".", 1)
                    optim_state.setdefault(int(param_id), {})[name] = value
            member.optimizer.load_state_dict({"state": optim_state, "param_groups": record["optimizer_groups"][index]})
            member.rows_since_fired = state[f"{index}.rows_since_fired"].to(trainer.device)
            trainer._set_dead(member, state[f"{index}.auxk_latents"].to(trainer.device))
            sums = state.get(f"{index}.metric_sums")
            if record.get("version", 1) >= 2 and sums is not None and sums.shape == member.sums.shape:
                # (an older layout: the first log window after the resume starts afresh)
                member.sums = sums.to(trainer.device)
                member.steps_in_window = int(record["steps_in_window"][index])
            trainer.members.append(member)
        trainer.step = int(record["step"])
        trainer.rows_seen = int(record["rows_seen"])
        trainer.elapsed = float(record["elapsed_s"])
        trainer.log = list(record.get("log", []))
        return trainer


def _check_same_saes(saved: list[SAEConfig], wanted: list[SAEConfig], directory: Path) -> None:
    def describe(configs: list[SAEConfig]) -> str:
        return ", ".join(f"{c.arch}(width={c.width}, d_in={c.d_in})" for c in configs)

    keys = ("width", "d_in")
    mismatch = len(saved) != len(wanted) or any(
        s.arch != w.arch or any(getattr(s, k) != getattr(w, k) for k in keys if getattr(w, k) is not None)
        for s, w in zip(saved, wanted))
    if not mismatch:
        comparable = [(s.to_json(), w.to_json()) for s, w in zip(saved, wanted)]
        skip = {"layer", "pooling", "layout", "d_in", "input_scale", "input_centered"}
        # a config without its own lr takes the checkpoint's (what lr="auto" chose before the kill)
        mismatch = any({k: v for k, v in a.items() if k not in skip and not (k == "lr" and b[k] is None)}
                       != {k: v for k, v in b.items() if k not in skip and not (k == "lr" and v is None)}
                       for a, b in comparable)
    if mismatch:
        raise SAECheckpointError(
            f"the checkpoint in {directory} trained {describe(saved)}, but this run asks for {describe(wanted)}; "
            "point --checkpoint-dir elsewhere or resume with the same SAE settings")


# ---------------------------------------------------------------------------- logging helpers
class _MetricsLog:
    """Per-step metrics to CSV (``.csv``) or JSON lines (any other suffix); appends on resume."""

    def __init__(self, path: str | os.PathLike, columns: Sequence[str] = LOG_COLUMNS):
        self.path = Path(path)
        self.columns = tuple(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.csv = self.path.suffix.lower() == ".csv"
        new = not self.path.exists() or self.path.stat().st_size == 0
        self.handle = self.path.open("a", newline="")
        self.writer = csv.DictWriter(self.handle, fieldnames=self.columns) if self.csv else None
        if self.writer is not None and new:
            self.writer.writeheader()

    def write(self, rows: list[dict[str, Any]]) -> None:
        for row in rows:
            if self.writer is not None:
                self.writer.writerow({k: row.get(k) for k in self.columns})
            else:
                self.handle.write(json_dumps(row) + "\n")
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


def _progress_bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="sae", unit="step", dynamic_ncols=True)


# ---------------------------------------------------------------------------- store-level entry point
def _layer_context(view: Any) -> dict[str, str]:
    meta: Mapping[str, Any] = view.spec.meta or {}
    context = {"layer": view.name}
    spatial = meta.get("spatial")
    if spatial in _POOLING_OF_SPATIAL:
        context["pooling"] = _POOLING_OF_SPATIAL[spatial]
    if meta.get("layout") in ("nchw", "nhwc", "nlc", "ncl", "nc"):
        context["layout"] = meta["layout"]
    return context


MANY_EPOCHS = 100  # passes over the same rows beyond which a run fits those rows more than the layer


class ManyEpochsWarning(UserWarning):
    """An SAE run that passes over the same stored rows many times."""


def train_sae(store: Any, layer: str, configs: SAEConfig | Sequence[SAEConfig], train: TrainConfig | None = None, *,
              out: str | os.PathLike | None = None, checkpoint_dir: str | os.PathLike | None = None,
              resume: bool = False, progress: bool = True, log_path: str | os.PathLike | None = None,
              until_step: int | None = None, rank: int | None = None, world_size: int | None = None) -> TrainResult:
    """Train SAE(s) on the rows of ``layer`` in ``store`` (a path or an open ``ActivationStore``).

    ``d_in``, ``layer``, ``pooling`` and ``layout`` of the configs are filled in from the store.
    The normalisation comes from the store's statistics (one cached pass); batches are streamed
    shuffled (never the whole layer in memory). ``out``: one SAE is saved in ``out``, a sweep in
    ``out/<config.name>``. ``resume=True`` continues from ``checkpoint_dir`` when it holds a
    checkpoint (the same SAE settings are required).

    Under ``torchrun`` (or with ``rank`` / ``world_size`` in a process group the caller joined) the
    ranks train data-parallel: each streams its own, seeded part of the store's chunks, and
    ``TrainConfig.batch_size`` is the global batch (each rank reads ``batch_size / world_size``
    rows a step), so the schedule and the learning-rate rule mean the same at any world size.
    Checkpoints (on a filesystem every rank sees) are written once and resume at any world size:
    the step, schedule, Adam moments and dead-latent counters continue exactly, and each rank skips
    its share of the rows already trained on (with another world size the chunks are split
    differently, so the rows that follow are not the very rows the old ranks would have read).
    """
    dist = distributed_context(rank, world_size)
    try:
        return _train_sae(store, layer, configs, train, out=out, checkpoint_dir=checkpoint_dir, resume=resume,
                          progress=progress, log_path=log_path, until_step=until_step, dist=dist)
    finally:
        dist.close()


def _train_sae(store: Any, layer: str, configs: SAEConfig | Sequence[SAEConfig], train: TrainConfig | None, *,
               out: str | os.PathLike | None, checkpoint_dir: str | os.PathLike | None, resume: bool, progress: bool,
               log_path: str | os.PathLike | None, until_step: int | None, dist: DistContext) -> TrainResult:
    from activation_store import ActivationStore

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    view = store.layer(layer)  # unknown layer: KeyError listing the store's layers and close names
    train = train or TrainConfig()
    configs = [configs] if isinstance(configs, SAEConfig) else list(configs)
    context = _layer_context(view)
    filled = []
    for config in configs:
        if config.d_in is not None and config.d_in != view.dim:
            raise ValueError(f"the SAE config reads rows of width d_in={config.d_in}, but layer {layer!r} of "
                             f"{store.root} has width {view.dim}; leave d_in unset to take it from the store")
        filled.append(config.replace(d_in=view.dim, **context))
    configs = filled
    if dist.world_size > 1:
        if train.batch_size % dist.world_size:
            raise ValueError(f"batch_size {train.batch_size} (the global batch) does not split evenly over "
                             f"{dist.world_size} ranks; pass a multiple of the world size")
        if train.lr == "auto" and any(c.lr is None for c in configs):
            raise ValueError('lr="auto" runs its range test in one process: run find_learning_rate (or `mechlens sae '
                             'train --lr auto --steps 0`) without torchrun first, then pass the rate it chose')
        if train.device in (None, "cuda") and dist.device().type == "cuda":  # one GPU per rank: its local rank's
            train = train.replace(device=str(dist.device()))
    source = StoreSource(view, train.batch_size // dist.world_size, seed=train.seed,
                         shuffle_buffer_chunks=train.shuffle_buffer_chunks, rank=dist.rank, world_size=dist.world_size)
    epochs = train.steps * train.batch_size / view.num_rows
    if epochs > MANY_EPOCHS:
        warnings.warn(f"training {train.steps:,} steps of {train.batch_size:,} rows on the {view.num_rows:,} rows of "
                      f"{layer!r} is {epochs:.0f} passes over the same rows: the SAE will fit these rows, not the layer "
                      "(capture more images, or fewer steps)", ManyEpochsWarning, stacklevel=2)
    trainer = None
    has_checkpoint = checkpoint_dir is not None and (Path(checkpoint_dir) / TRAINER_FILE).is_file()
    if has_checkpoint and not resume:
        # never silently start over on top of a run that a kill interrupted (nor overwrite it)
        raise SAECheckpointError(f"{checkpoint_dir} already holds a trainer checkpoint; pass resume=True (--resume) to "
                                 "continue that run, or choose another checkpoint directory to start a new one")
    if resume and has_checkpoint:
        trainer = SAETrainer.from_checkpoint(checkpoint_dir, expect=configs, train=train, dist=dist)
    search = None
    if trainer is None and train.lr == "auto" and any(c.lr is None for c in configs):
        search = find_learning_rate(store, layer, [c for c in configs if c.lr is None], train, progress=progress)
        configs = [c if c.lr is not None else c.replace(lr=search.best[c.name]) for c in configs]
    normalizer = b_dec = None
    if trainer is None:
        trainer = SAETrainer(configs, train, dist=dist)
        stats = None
        if train.normalize or train.b_dec_init == "mean":
            if not dist.is_main:  # rank 0 makes the one cached pass; the others read its cache
                dist.barrier()
            stats = store.statistics(layer)
            if dist.is_main:
                dist.barrier()
        if train.normalize:
            normalizer = Normalizer.from_statistics(stats, center=train.center)
        else:
            normalizer = Normalizer.identity()
        if train.b_dec_init == "mean":
            b_dec = normalizer.apply(torch.as_tensor(stats.mean, dtype=torch.float32))
    result = trainer.fit(source, until_step=until_step, progress=progress, log_path=log_path,
                         checkpoint_dir=checkpoint_dir, normalizer=normalizer, b_dec=b_dec)
    result.lr_search = search
    if out is not None and trainer.step >= train.steps and dist.is_main:
        where = str(store.root.resolve()) if isinstance(store.root, Path) else str(store.root)  # a path or a URL
        result.paths = save_saes(result, out, store=where, train=trainer.train)
        if search is not None:
            save_search(search, out)
    return result


def find_learning_rate(store: Any, layer: str, configs: "SAEConfig | Sequence[SAEConfig]",
                       train: "TrainConfig | None" = None, *, rates: Sequence[float] | None = None,
                       fraction: float = 0.2, validation: float = 0.1, min_steps: int = 100,
                       progress: bool = True) -> LRSearch:
    """Train every config at every rate (default :func:`~mechlens.sae.lr.default_rates` of its width) in one pass
    for ``fraction`` of ``train.steps`` (at least ``min_steps``), score each on a validation split
    (:func:`validation_split`) and choose, per config, the rate of lowest validation FVU."""
    from activation_store import ActivationStore

    from mechlens.sae.metrics import evaluate

    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    view = store.layer(layer)
    train = train or TrainConfig()
    configs = [configs] if isinstance(configs, SAEConfig) else list(configs)
    context = _layer_context(view)
    steps = max(int(min_steps), int(round(fraction * train.steps)))
    training_chunks, validation_ids = validation_split(view, validation, seed=train.seed,
                                                       min_training_rows=train.batch_size)
    members: list[SAEConfig] = []
    owners: list[tuple[str, float]] = []
    for config in configs:
        base = config.replace(lr=None, d_in=view.dim, **context)
        for rate in (rates if rates is not None else default_rates(config.width)):
            if not rate > 0:
                raise ValueError(f"learning rates must be positive, got {rate}")
            members.append(base.replace(lr=float(rate)))
            owners.append((base.name, float(rate)))
    probe = train.replace(steps=steps, lr=float(members[0].lr), log_every=steps, checkpoint_every=0,
                          dead_window=min(train.dead_window, max(train.batch_size, steps * train.batch_size // 4)))
    stats = store.statistics(layer)
    normalizer = Normalizer.from_statistics(stats, center=probe.center) if probe.normalize else Normalizer.identity()
    b_dec = None
    if probe.b_dec_init == "mean":
        import torch

        b_dec = normalizer.apply(torch.as_tensor(stats.mean, dtype=torch.float32))
    source = StoreSource(view, probe.batch_size, seed=probe.seed, shuffle_buffer_chunks=probe.shuffle_buffer_chunks,
                         chunks=training_chunks)
    result = SAETrainer(members, probe).fit(source, progress=progress, normalizer=normalizer, b_dec=b_dec)
    held_out = view.read_rows(validation_ids)
    batches = [held_out[i:i + 8192] for i in range(0, len(held_out), 8192)]
    results: dict[str, list[dict[str, float]]] = {}
    for sae, (name, rate) in zip(result.saes, owners):
        metrics = evaluate(sae, batches)
        results.setdefault(name, []).append({"lr": rate, "fvu": float(metrics.fvu), "l0": float(metrics.l0),
                                             "dead_fraction": float(metrics.dead_fraction)})
    best = {}
    for name, rows in results.items():
        finite = [r for r in rows if math.isfinite(r["fvu"])]
        if not finite:
            raise ValueError(f"every rate diverged for {name} (non-finite validation FVU): give lower rates")
        best[name] = min(finite, key=lambda r: r["fvu"])["lr"]
    return LRSearch(results, best, steps, int(len(validation_ids)))


def save_saes(result: TrainResult, out: str | os.PathLike, *, store: str | None = None,
              train: TrainConfig | None = None) -> list[Path]:
    """Save every SAE of ``result``: ``out`` for one, ``out/<name>`` for a sweep (names made unique)."""
    from activation_store.manifest import safe_join

    out = Path(out)
    paths = []
    names: dict[str, int] = {}
    for index, (sae, metrics) in enumerate(zip(result.saes, result.metrics)):
        if len(result.saes) == 1:
            path = out
        else:
            name = sae.config.name
            names[name] = names.get(name, 0) + 1
            path = safe_join(out, name if names[name] == 1 else f"{name}-{names[name]}", "SAE")
        metadata = {"store": store, "steps": result.steps, "rows": result.rows,
                    "train_config": train.to_json() if train is not None else None,
                    "final_train_metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}}
        paths.append(sae.save(path, metadata=metadata))
    return paths

