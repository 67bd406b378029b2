"""Choosing an SAE's learning rate: a rule from the width, or a short range test.

>>> lr_rule(4096)                                                   # the rule (see its docstring)
>>> search = find_learning_rate("runs/acts", "stage2", TopKConfig(width=4096, k=32), TrainConfig(steps=20_000))
>>> search.best_lr, search                                          # a table in a notebook
>>> train_sae("runs/acts", "stage2", config, TrainConfig(steps=20_000, lr="auto"))   # the same, then the run

The range test trains the SAE at several rates in *one* pass over the data (the rates are
members of one sweep, so the rows are read once), for a fraction of the run's steps with the
run's schedule shrunk to fit, and scores each on a validation split of the store: whole chunks
held out, minus the images that may straddle a chunk boundary, so no image is on both sides.
The full run then trains on every row at the rate with the lowest validation FVU.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from mechlens.sae.config import SAEConfig, TrainConfig

__all__ = ["LRSearch", "find_learning_rate", "lr_rule", "validation_split"]

# Gao et al. 2024 (fig. 3 and appendix) fit the best rate of TopK SAEs on GPT-2 activations as
# ~ width^-1/2; dictionary_learning's TopK trainer uses 2e-4 / sqrt(width / 2^14). On our
# normalisation (E||x||^2 = d) the measured optimum sat higher (see benchmarks/sae_lr.py and the
# README): LR_RULE_BASE is the rate at 2^14 latents.
LR_RULE_BASE = 2e-4
LR_RULE_WIDTH = 2 ** 14


def lr_rule(width: int) -> float:
    """The learning rate for an SAE of ``width`` latents: ``LR_RULE_BASE * sqrt(2^14 / width)``
    (Gao et al.'s width^-1/2 scaling)."""
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return LR_RULE_BASE * math.sqrt(LR_RULE_WIDTH / int(width))


def default_rates(width: int, count: int = 6) -> list[float]:
    """``count`` rates a factor 2 apart around :func:`lr_rule`: from rule/4 to rule * 2^(count-3)."""
    centre = lr_rule(width)
    return [float(f"{centre * 2.0 ** (i - 2):.3g}") for i in range(count)]


@dataclass
class LRSearch:
    """The outcome of a range test: per config (by name) and rate, the validation FVU, L0 and
    dead fraction, and the rate chosen (lowest FVU)."""

    results: dict[str, list[dict[str, float]]]
    best: dict[str, float]
    steps: int
    validation_rows: int

    @property
    def best_lr(self) -> float:
        """The chosen rate (an error when several configs were searched: use ``best``)."""
        if len(self.best) != 1:
            raise ValueError(f"this search chose rates for {len(self.best)} configs; use .best[name]")
        return next(iter(self.best.values()))

    def to_json(self) -> dict[str, Any]:
        return {"results": self.results, "best": self.best, "steps": self.steps,
                "validation_rows": self.validation_rows}

    def rows(self) -> list[dict[str, Any]]:
        return [{"config": name, **row, "chosen": row["lr"] == self.best[name]}
                for name, rows in self.results.items() for row in rows]

    def __str__(self) -> str:
        lines = [f"learning-rate range test: {self.steps} steps, {self.validation_rows:,} validation rows"]
        for row in self.rows():
            lines.append(f"  {row['config']:<28} lr {row['lr']:<9.3g} fvu {row['fvu']:.4f}  l0 {row['l0']:.2f}  "
                         f"dead {100 * row['dead_fraction']:.1f}%" + ("  <- chosen" if row["chosen"] else ""))
        return "\n".join(lines)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table(self.rows(), ["config", "lr", "fvu", "l0", "dead_fraction", "chosen"],
                          caption=f"learning-rate range test ({self.steps} steps)")

    def plot(self, path: str | os.PathLike | None = None) -> Any:
        """Validation FVU against the rate (log scale), the chosen rate marked; saved when ``path``."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(5, 3.5))
        for name, rows in self.results.items():
            rates = [r["lr"] for r in rows]
            axis.plot(rates, [r["fvu"] for r in rows], "o-", label=name)
            axis.axvline(self.best[name], color=axis.lines[-1].get_color(), linestyle=":", linewidth=1)
        axis.set_xscale("log")
        axis.set_xlabel("learning rate")
        axis.set_ylabel("validation FVU")
        axis.set_title(f"range test ({self.steps} steps)")
        axis.legend(fontsize=7)
        figure.tight_layout()
        if path is not None:
            figure.savefig(path, dpi=110)
            plt.close(figure)
        return figure


def validation_split(view: Any, fraction: float = 0.1, *, seed: int = 0, max_rows: int = 65_536,
                     min_training_rows: int = 1) -> tuple[list[int], np.ndarray]:
    """``(training chunk positions, validation row ids)`` of a store layer: whole chunks held out
    (about ``fraction`` of them, at most ``max_rows`` rows), minus the rows of the first and last
    image of each held-out chunk (an image can straddle two chunks; the others cannot)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    chunks = view.num_chunks
    if chunks < 2:
        raise ValueError(f"layer {view.name!r} has {chunks} chunk(s): a validation split holds out whole chunks, so "
                         "it needs at least 2 (capture more images, or give a learning rate)")
    order = np.random.default_rng(seed).permutation(chunks)
    held: list[int] = []
    rows = 0
    for position in order[:max(1, int(round(fraction * chunks)))]:
        if rows >= max_rows or len(held) == chunks - 1:
            break
        held.append(int(position))
        rows += view.chunk_rows([int(position)])
    training = sorted(set(range(chunks)) - set(held))
    if view.chunk_rows(training) < min_training_rows:
        raise ValueError(f"holding out {len(held)} chunk(s) of layer {view.name!r} for validation leaves fewer than "
                         f"{min_training_rows} training rows; capture more images or give a learning rate")
    kept = []
    for position in sorted(held):
        data, index = view.read_chunk(position, with_index=True)
        samples = np.asarray(index.sample_id)
        inner = (samples != samples[0]) & (samples != samples[-1])
        kept.append(np.asarray(index.row_ids)[inner])
    ids = np.concatenate(kept)[:max_rows] if kept else np.empty(0, np.int64)
    if ids.size == 0:
        raise ValueError(f"the held-out chunks of layer {view.name!r} hold no image whole (each holds 2 images or "
                         "fewer): write larger chunks, or give a learning rate")
    return training, ids


def find_learning_rate(store: Any, layer: str, configs: "SAEConfig | Sequence[SAEConfig]",
                       train: "TrainConfig | None" = None, *, rates: Sequence[float] | None = None,
                       fraction: float = 0.2, validation: float = 0.1, min_steps: int = 100,
                       progress: bool = True) -> LRSearch:
    """Train every config at every rate (default :func:`default_rates` of its width) in one pass
    for ``fraction`` of ``train.steps`` (at least ``min_steps``), score each on a validation split
    (:func:`validation_split`) and choose, per config, the rate of lowest validation FVU."""
    from activation_store import ActivationStore

    from mechlens.sae.config import SAEConfig, TrainConfig
    from mechlens.sae.data import Normalizer, StoreSource
    from mechlens.sae.metrics import evaluate
    from mechlens.sae.training import SAETrainer, _layer_context

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


def save_search(search: LRSearch, out: str | os.PathLike) -> list[Path]:
    """Write ``lr_search.json`` and ``lr_search.png`` into ``out``."""
    from activation_store.jsonutil import dumps

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_search.json").write_text(dumps(search.to_json(), indent=2))
    search.plot(out / "lr_search.png")
    return [out / "lr_search.json", out / "lr_search.png"]
