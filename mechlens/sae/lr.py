"""Choosing an SAE's learning rate: a rule from the width, or a short range test.

>>> lr_rule(4096)                                                   # the rule (see its docstring)
>>> search = find_learning_rate("runs/acts", "stage2", TopKConfig(width=4096, k=32), TrainConfig(steps=20_000))
>>> search.best_lr, search                                          # a table in a notebook
>>> train_sae("runs/acts", "stage2", config, TrainConfig(steps=20_000, lr="auto"))   # the same, then the run

The range test (:func:`mechlens.sae.training.find_learning_rate`) trains the SAE at several rates in *one* pass over the data (the rates are
members of one sweep, so the rows are read once), for a fraction of the run's steps with the
run's schedule shrunk to fit, and scores each on a validation split of the store: whole chunks
held out, minus the images that may straddle a chunk boundary, so no image is on both sides.
The full run then trains on every row at the rate with the lowest validation FVU.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mechlens.sae.config import LR_RULE_BASE, LR_RULE_WIDTH, lr_rule

__all__ = ["LR_RULE_BASE", "LR_RULE_WIDTH", "LRSearch", "default_rates", "lr_rule", "save_search", "validation_split"]


def default_rates(width: int, count: int = 6) -> list[float]:
    """``count`` rates a factor 2 apart around :func:`lr_rule`: from rule/8 to rule * 2^(count-4)."""
    centre = lr_rule(width)
    return [float(f"{centre * 2.0 ** (i - 3):.3g}") for i in range(count)]


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


def save_search(search: LRSearch, out: str | os.PathLike) -> list[Path]:
    """Write ``lr_search.json`` and ``lr_search.png`` into ``out``."""
    from activation_store.jsonutil import dumps

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_search.json").write_text(dumps(search.to_json(), indent=2))
    search.plot(out / "lr_search.png")
    return [out / "lr_search.json", out / "lr_search.png"]
