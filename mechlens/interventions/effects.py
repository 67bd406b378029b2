"""Measured effects of interventions: per intervention x target feature, the mean change of the
target's value over a set of images with a bootstrap confidence interval, and the change of
accuracy per class when labels are known."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens.engine import eval_mode
from mechlens.features.forward import feature_forward
from mechlens.features.parse import as_features
from mechlens.interventions.core import Intervention, _input_space, intervene

__all__ = ["EffectTable", "intervention_effects"]

COLUMNS = ("intervention", "target", "mean_effect", "ci_low", "ci_high", "clean_mean", "intervened_mean", "images")


@dataclass
class EffectTable:
    """One row per (intervention, target): ``mean_effect`` (intervened minus clean value, averaged
    over images) with its bootstrap ``ci_low`` / ``ci_high`` (``confidence`` level, percentile
    method over images). ``accuracy``: per intervention and class, the clean and intervened
    accuracy (when labels were given). ``effects``: the per-image effects ``[images]`` per row."""

    rows: list[dict[str, Any]]
    accuracy: list[dict[str, Any]] = field(default_factory=list)
    confidence: float = 0.95
    effects: dict[tuple[str, str], np.ndarray] = field(default_factory=dict, repr=False)

    def row(self, intervention: str, target: str) -> dict[str, Any]:
        for row in self.rows:
            if row["intervention"] == intervention and row["target"] == target:
                return row
        raise KeyError(f"no row for intervention {intervention!r} and target {target!r}")

    def to_csv(self, path: Any = None) -> str:
        """The rows as CSV (written to ``path`` when given)."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        text = buffer.getvalue()
        if path is not None:
            with open(path, "w", newline="") as handle:
                handle.write(text)
        return text

    def to_json(self) -> str:
        return json_dumps({"confidence": self.confidence, "effects": self.rows, "accuracy": self.accuracy})

    def plot(self, target: str | None = None, ax: Any = None) -> Any:
        """Bar chart of the mean effects with their intervals (one target, or every row)."""
        import matplotlib.pyplot as plt

        rows = [r for r in self.rows if target is None or r["target"] == target]
        if ax is None:
            _, ax = plt.subplots(figsize=(max(4, 0.6 * len(rows) + 2), 3))
        means = np.array([r["mean_effect"] for r in rows])
        low = means - np.array([r["ci_low"] for r in rows])
        high = np.array([r["ci_high"] for r in rows]) - means
        labels = [f"{r['intervention']}\n-> {r['target']}" if target is None else r["intervention"] for r in rows]
        ax.bar(range(len(rows)), means, yerr=np.vstack([low, high]), capsize=3, color="#4a7bd0")
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(rows)), labels, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mean effect (intervened - clean)")
        ax.set_title(f"intervention effects{f' on {target}' if target else ''} ({int(100 * self.confidence)}% CI)")
        ax.figure.tight_layout()
        return ax.figure

    def __repr__(self) -> str:
        names = list(dict.fromkeys(r["intervention"] for r in self.rows))
        targets = list(dict.fromkeys(r["target"] for r in self.rows))
        images = self.rows[0]["images"] if self.rows else 0
        return (f"EffectTable({len(names)} intervention(s) x {len(targets)} target(s) over {images} images, "
                f"{int(100 * self.confidence)}% CIs{', accuracy per class' if self.accuracy else ''})")

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (pandas is optional)."""
        from mechlens._display import to_pandas

        return to_pandas(self.rows, COLUMNS)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        table = html_table(self.rows, COLUMNS, caption=f"intervention effects ({int(100 * self.confidence)}% bootstrap CI)")
        if self.accuracy:
            table += html_table(self.accuracy, caption="accuracy per class")
        return table


def _batches(data: Any, batch_size: int):
    """``(images, labels or None)`` batches from a tensor of images, ``(images, labels)`` or a Dataset."""
    if isinstance(data, torch.Tensor):
        for start in range(0, len(data), batch_size):
            yield data[start:start + batch_size], None
        return
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], torch.Tensor):
        images, labels = data
        labels = torch.as_tensor(labels)
        for start in range(0, len(images), batch_size):
            yield images[start:start + batch_size], labels[start:start + batch_size]
        return
    if not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise TypeError(f"data must be images [N, C, H, W], (images, labels) or a Dataset, got {type(data).__name__}")
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        if isinstance(items[0], (tuple, list)):
            yield torch.stack([torch.as_tensor(i[0]) for i in items]).float(), torch.as_tensor([int(i[1]) for i in items])
        else:
            yield torch.stack([torch.as_tensor(i) for i in items]).float(), None


def intervention_effects(
    model: Any,
    data: Any,
    interventions: Mapping[str, Intervention | Sequence[Intervention]],
    targets: Any,
    *,
    batch_size: int = 64,
    bootstrap: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> EffectTable:
    """Run each named intervention (or list of interventions, applied together) over ``data``
    and measure its effect on every target feature (spec strings such as ``"class:3"``,
    ``"class:3:softmax"``, or Features). ``data``: images ``[N, C, H, W]`` (pixels in ``[0, 1]`` for
    a ``LoadedModel``), ``(images, labels)``, or a Dataset of ``(image, label)``; with labels the
    table also holds accuracy per class, clean and intervened. Patch interventions need a source
    as large as each batch: pass ``batch_size=len(data)`` with them."""
    if not interventions:
        raise ValueError("intervention_effects needs at least one named intervention")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if bootstrap < 100:
        raise ValueError(f"bootstrap must be at least 100 resamples, got {bootstrap}")
    target_features = as_features(targets)
    net, to_model_input = _input_space(model)
    names = [f.name for f in target_features]
    clean_values, edited_values = [], {name: [] for name in interventions}
    labels_all, clean_pred, edited_pred = [], [], {name: [] for name in interventions}
    with eval_mode(net), torch.no_grad():
        for images, labels in _batches(data, batch_size):
            x = to_model_input(images.to(next(net.parameters()).device))
            clean = feature_forward(net, target_features, x, grads=False)
            clean_values.append(clean.values.cpu())
            if labels is not None:
                labels_all.append(labels)
                clean_pred.append(_predictions(clean.output))
            for name, chosen in interventions.items():
                with intervene(model, chosen) as edits:
                    edited = feature_forward(net, target_features, x, grads=False)
                silent = [layer for layer, edit in edits.items() if edit.calls == 0]
                if silent:
                    raise RuntimeError(f"intervention {name!r}: layer(s) {', '.join(silent)} did not run")
                edited_values[name].append(edited.values.cpu())
                if labels is not None:
                    edited_pred[name].append(_predictions(edited.output))
    if not clean_values:
        raise ValueError("no images to measure the interventions on (the data is empty)")
    clean_all = torch.cat(clean_values).double().numpy()
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(clean_all), size=(bootstrap, len(clean_all)))
    tail = (1 - confidence) / 2
    rows, per_image = [], {}
    for name in interventions:
        edited_all = torch.cat(edited_values[name]).double().numpy()
        effect = edited_all - clean_all  # [N, targets]
        boot = effect[resamples].mean(axis=1)  # [bootstrap, targets]
        low, high = np.quantile(boot, [tail, 1 - tail], axis=0)
        for t, target in enumerate(names):
            per_image[(name, target)] = effect[:, t]
            rows.append({"intervention": name, "target": target, "mean_effect": float(effect[:, t].mean()),
                         "ci_low": float(low[t]), "ci_high": float(high[t]), "clean_mean": float(clean_all[:, t].mean()),
                         "intervened_mean": float(edited_all[:, t].mean()), "images": int(len(effect))})
    accuracy = []
    if labels_all:
        labels = torch.cat(labels_all).numpy()
        before = torch.cat(clean_pred).numpy()
        for name in interventions:
            after = torch.cat(edited_pred[name]).numpy()
            for cls in np.unique(labels):
                chosen = labels == cls
                accuracy.append({"intervention": name, "class": int(cls), "images": int(chosen.sum()),
                                 "clean_accuracy": float((before[chosen] == cls).mean()),
                                 "intervened_accuracy": float((after[chosen] == cls).mean())})
    return EffectTable(rows=rows, accuracy=accuracy, confidence=confidence, effects=per_image)


def _predictions(output: Any) -> torch.Tensor:
    if not isinstance(output, torch.Tensor) or output.dim() != 2:
        raise TypeError("accuracy per class needs model(x) to return [B, classes] logits "
                        "(mechlens.engine.select_output chooses them)")
    return output.argmax(dim=1).cpu()
