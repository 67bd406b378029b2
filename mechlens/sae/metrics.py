"""How good is an SAE: reconstruction and sparsity on stored rows, and the effect of splicing
its reconstruction back into the model.

* :func:`evaluate` streams rows (a store layer or any iterable of batches) once: MSE, fraction of
  variance unexplained (FVU), mean L0, dead fraction (latents that never fire in the N rows
  evaluated), dense fraction (latents firing on more than ``dense_threshold`` of rows) and the
  histogram of log10 feature density.
* :func:`spliced_metrics` is the vision analogue of "cross-entropy loss recovered": a forward hook
  replaces the layer's output by the SAE reconstruction (per position for conv / token maps) and
  compares the model's predictions with the clean run on held-out images: accuracy change, KL of
  the output distribution, and the fraction of cross-entropy recovered relative to a baseline in
  which every latent is off (the reconstruction is ``b_dec``).
* :func:`plot_fvu_vs_l0`: the sparsity / fidelity frontier of a sweep (matplotlib, Agg).
"""
from __future__ import annotations

import contextlib

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mechlens.engine import HookSet, eval_mode, unwrap
from mechlens.features.layout import as_position_rows, rows_to_layout, current_layouts, infer_layouts, inferring_layouts, resolve_layout
from mechlens.sae.data import as_row_batch, check_finite
from mechlens.sae.modules import SAE

__all__ = [
    "SAEMetrics",
    "SplicedMetrics",
    "evaluate",
    "evaluate_store",
    "plot_fvu_vs_l0",
    "splice_sae",
    "spliced_metrics",
]


@dataclass
class SAEMetrics:
    """Reconstruction and sparsity of an SAE over ``rows`` rows.

    ``mse`` per element; ``fvu`` = sum ||x - x_hat||^2 / sum ||x - mean||^2; ``l0`` mean active
    latents per row; ``dead_fraction`` latents with no activation in these rows; ``dense_fraction``
    latents active on more than ``dense_threshold`` of them; ``density`` per latent;
    ``histogram`` counts of log10(density) over ``histogram_edges`` (dead latents left out).
    """

    rows: int
    mse: float
    fvu: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    dense_threshold: float
    density: np.ndarray = field(repr=False)
    histogram: np.ndarray = field(repr=False)
    histogram_edges: np.ndarray = field(repr=False)

    def to_json(self, *, with_density: bool = False) -> dict[str, Any]:
        data = {k: v for k, v in asdict(self).items() if not isinstance(v, np.ndarray)}
        data["histogram"] = self.histogram.tolist()
        data["histogram_edges"] = self.histogram_edges.tolist()
        if with_density:
            data["density"] = self.density.tolist()
        return data

    def __str__(self) -> str:
        return (f"rows {self.rows:,}  mse {self.mse:.4g}  fvu {self.fvu:.4f}  l0 {self.l0:.2f}  "
                f"dead {100 * self.dead_fraction:.1f}%  dense {100 * self.dense_fraction:.1f}%")

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table([self.to_json()], ["rows", "mse", "fvu", "l0", "dead_fraction", "dense_fraction"],
                          caption="SAE metrics")


class _Encoder:
    """Adapter: anything with ``encode`` -> latents and ``decode`` (our SAEs; peers wrapped)."""

    def __init__(self, sae: Any):
        self.sae = sae

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.sae.encode(x)
        return z, self.sae.decode(z)


def _device_of(sae: Any) -> torch.device:
    if isinstance(sae, nn.Module):
        first = next(sae.parameters(), None)
        if first is not None:
            return first.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(sae: Any, batches: Iterable[Any], *, max_rows: int | None = None, dense_threshold: float = 0.1,
             histogram_bins: int = 40, device: str | torch.device | None = None) -> SAEMetrics:
    """Stream ``batches`` (raw rows, as stored) through ``sae`` (anything with ``encode`` /
    ``decode``) and accumulate :class:`SAEMetrics` over at most ``max_rows`` rows (in float64)."""
    device = torch.device(device) if device is not None else _device_of(sae)
    mode = eval_mode(sae) if isinstance(sae, nn.Module) else contextlib.nullcontext()
    model = _Encoder(sae)
    count = 0
    sum_x = sq_x = sq_err = l0_sum = None
    fired = None
    with mode:
        for number, item in enumerate(batches):
            batch = as_row_batch(item)
            if not batch.checked:
                check_finite(batch, batch_number=number, rows_before=count)
            x = batch.data.to(device, torch.float32)
            if max_rows is not None and count + len(x) > max_rows:
                x = x[:max_rows - count]
            if len(x) == 0:
                break
            z, x_hat = model(x)
            active = z > 0
            if sum_x is None:
                sum_x = torch.zeros(x.shape[1], dtype=torch.float64, device=device)
                sq_x = torch.zeros((), dtype=torch.float64, device=device)
                sq_err = torch.zeros((), dtype=torch.float64, device=device)
                l0_sum = torch.zeros((), dtype=torch.float64, device=device)
                fired = torch.zeros(z.shape[1], dtype=torch.float64, device=device)
            xd = x.double()
            sum_x += xd.sum(0)
            sq_x += xd.pow(2).sum()
            sq_err += (x_hat.double() - xd).pow(2).sum()
            l0_sum += active.sum(dtype=torch.float64)
            fired += active.sum(0, dtype=torch.float64)
            count += len(x)
            if max_rows is not None and count >= max_rows:
                break
    if count == 0:
        raise ValueError("no rows to evaluate the SAE on (the batches were empty)")
    d = sum_x.numel()
    total_var = float(sq_x - sum_x.pow(2).sum() / count)
    density = (fired / count).cpu().numpy()
    alive = density[density > 0]
    edges = np.linspace(-math.log10(count) - 0.5, 0.0, histogram_bins + 1)
    hist, _ = np.histogram(np.log10(alive), bins=edges)
    return SAEMetrics(
        rows=count, mse=float(sq_err) / (count * d), fvu=float(sq_err) / max(total_var, 1e-30),
        l0=float(l0_sum) / count, dead_fraction=float((density == 0).mean()),
        dense_fraction=float((density > dense_threshold).mean()), dense_threshold=dense_threshold,
        density=density, histogram=hist, histogram_edges=edges)


def evaluate_store(sae: SAE, store: Any, layer: str | None = None, *, max_rows: int | None = 100_000,
                   batch_size: int = 4096, seed: int = 0, device: str | torch.device | None = None,
                   **kwargs: Any) -> SAEMetrics:
    """:func:`evaluate` on (a seeded shuffled sample of ``max_rows`` of) a store layer; the layer
    defaults to the one the SAE was trained on."""
    from activation_store import ActivationStore

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layer = layer or sae.config.layer
    if not layer:
        raise ValueError("the SAE does not record its layer; pass layer=")
    view = store.layer(layer)
    if view.dim != sae.d_in:
        raise ValueError(f"layer {layer!r} has rows of width {view.dim}, the SAE reads {sae.d_in}")
    batches = view.iter_batches(batch_size, shuffle=True, seed=seed, with_index=True)
    return evaluate(sae, batches, max_rows=max_rows, device=device, **kwargs)


# ---------------------------------------------------------------------------- splicing
class _SpliceHook:
    """Forward hook replacing a layer's output by ``replace(rows)`` position by position."""

    def __init__(self, replace: Callable[[torch.Tensor], torch.Tensor], layout: str, pooling: str, layer: str,
                 model: nn.Module | None = None):
        self.replace, self.layout, self.pooling, self.layer = replace, layout, pooling, layer
        self.model = model
        self.inputs: torch.Tensor | None = None  # the model's latest input (for the layout probe)
        self.calls = 0

    def remember_inputs(self, module: nn.Module, args: Any) -> None:
        if not inferring_layouts() and args and isinstance(args[0], torch.Tensor):
            self.inputs = args[0]

    def _layout_of(self, output: torch.Tensor) -> str:
        """The recorded layout, else the one known in scope, else the model's (probed once)."""
        if self.layout != "auto" or output.dim() == 2 or self.layer in current_layouts():
            return resolve_layout(output, self.layout, layer=self.layer)
        if self.model is None or self.inputs is None:
            return resolve_layout(output, self.layout, layer=self.layer)  # raises: nothing to ask
        self.layout = infer_layouts(self.model, [self.layer], self.inputs.detach())[self.layer].layout
        return resolve_layout(output, self.layout, layer=self.layer)

    def __call__(self, module: nn.Module, args: Any, output: Any) -> torch.Tensor:
        if not isinstance(output, torch.Tensor):
            raise TypeError(f"layer {self.layer!r} returns a {type(output).__name__}; splicing needs a tensor output")
        if inferring_layouts():  # mechlens' layout probe: the layer's own output tells its layout
            return output
        layout = self._layout_of(output)
        rows, spatial = as_position_rows(output, layout)
        b, p, c = rows.shape
        if self.pooling != "all" and p > 1:
            raise ValueError(
                f"this SAE was trained on {self.pooling}-pooled rows of {self.layer!r}, so it cannot rebuild the "
                f"{p} positions of the layer's output; splice SAEs trained per position (pooling 'all') or on a "
                "flat layer")
        new = self.replace(rows.reshape(b * p, c)).to(output.dtype).reshape(b, p, c)
        self.calls += 1
        return rows_to_layout(new, output, layout)


class splice_sae:
    """Context manager: inside the block, ``layer``'s output is replaced by ``replace(rows)``
    (default: the SAE's reconstruction). The hook is removed on exit, also on error.

    >>> with splice_sae(model, sae):
    ...     logits = model(images)
    """

    def __init__(self, model: nn.Module, sae: SAE, *, layer: str | None = None,
                 replace: Callable[[torch.Tensor], torch.Tensor] | None = None, layout: str | None = None,
                 pooling: str | None = None):
        from mechlens.models.layers import get_module

        model = unwrap(model)
        self.layer = layer or sae.config.layer
        if not self.layer:
            raise ValueError("the SAE does not record the layer it was trained on; pass layer=")
        self.module = get_module(model, self.layer)
        self.model = model
        self.hook = _SpliceHook(replace or sae.reconstruct, layout or sae.config.layout, pooling or sae.config.pooling,
                                self.layer, model)
        self.hooks = HookSet()

    def __enter__(self) -> "_SpliceHook":
        self.hooks.pre(self.model, self.hook.remember_inputs).forward(self.module, self.hook)
        return self.hook

    def __exit__(self, *exc: Any) -> bool:
        self.hooks.remove()
        return False


@dataclass
class SplicedMetrics:
    """Clean vs spliced predictions on ``samples`` held-out images.

    ``kl``: mean KL(p_clean || p_spliced) in nats; ``ce_*``: cross-entropy with the labels for the
    clean model, with the SAE spliced in, and with the "all latents off" baseline (``b_dec``);
    ``ce_recovered`` = (ce_baseline - ce_spliced) / (ce_baseline - ce_clean).
    """

    samples: int
    clean_accuracy: float
    spliced_accuracy: float
    baseline_accuracy: float
    kl: float
    ce_clean: float
    ce_spliced: float
    ce_baseline: float

    @property
    def accuracy_change(self) -> float:
        return self.spliced_accuracy - self.clean_accuracy

    @property
    def ce_recovered(self) -> float:
        gap = self.ce_baseline - self.ce_clean
        return float("nan") if abs(gap) < 1e-12 else (self.ce_baseline - self.ce_spliced) / gap

    def to_json(self) -> dict[str, float]:
        return {**asdict(self), "accuracy_change": self.accuracy_change, "ce_recovered": self.ce_recovered}

    def __str__(self) -> str:
        return (f"samples {self.samples}  accuracy {100 * self.clean_accuracy:.1f}% -> {100 * self.spliced_accuracy:.1f}% "
                f"({100 * self.accuracy_change:+.1f} pts)  KL {self.kl:.4g}  CE recovered {self.ce_recovered:.3f}")


def _image_batches(data: Any, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    from torch.utils.data import DataLoader, Dataset

    if isinstance(data, Dataset):
        generator = torch.Generator().manual_seed(0)
        yield from DataLoader(data, batch_size=batch_size, shuffle=False, generator=generator)
        return
    yield from data


@torch.no_grad()
def spliced_metrics(model: Any, sae: SAE, data: Any, *, layer: str | None = None, batch_size: int = 128,
                    max_samples: int | None = None, device: str | torch.device | None = None,
                    transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SplicedMetrics:
    """Splice ``sae`` into ``model`` at its layer and compare with the clean model on ``data`` (a
    Dataset of ``(image, label)`` or an iterable of ``(images, labels)`` batches). A
    ``LoadedModel``'s preprocessing is applied unless ``transform`` is given. The model's
    training mode is restored afterwards."""
    preprocessing = getattr(model, "preprocessing", None)
    if transform is None and preprocessing is not None:
        transform = preprocessing.normalize
    net = unwrap(model)
    if device is None:
        first = next(net.parameters(), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    sae = sae.to(device)
    baseline = lambda rows: sae.b_dec.expand(rows.shape[0], -1)  # noqa: E731 - every latent off
    samples = 0
    totals = torch.zeros(7, dtype=torch.float64)
    with eval_mode(net), eval_mode(sae):
        for images, labels in _image_batches(data, batch_size):
            if max_samples is not None and samples >= max_samples:
                break
            if max_samples is not None:
                images, labels = images[:max_samples - samples], labels[:max_samples - samples]
            images = images.to(device)
            labels = torch.as_tensor(labels).to(device).long()
            if transform is not None:
                images = transform(images)
            clean = net(images).float()
            with splice_sae(net, sae, layer=layer) as hook:
                spliced = net(images).float()
            if hook.calls == 0:
                raise RuntimeError(f"layer {layer or sae.config.layer!r} did not run during the forward pass, so "
                                   "nothing was spliced")
            with splice_sae(net, sae, layer=layer, replace=baseline):
                base = net(images).float()
            log_clean = clean.log_softmax(1)
            log_spliced = spliced.log_softmax(1)
            kl = (log_clean.exp() * (log_clean - log_spliced)).sum(1).clamp_min(0)
            totals += torch.stack([
                (clean.argmax(1) == labels).sum(), (spliced.argmax(1) == labels).sum(),
                (base.argmax(1) == labels).sum(), kl.sum(), F.cross_entropy(clean, labels, reduction="sum"),
                F.cross_entropy(spliced, labels, reduction="sum"), F.cross_entropy(base, labels, reduction="sum"),
            ]).double().cpu()
            samples += len(labels)
    if samples == 0:
        raise ValueError("no images to evaluate the spliced model on")
    t = (totals / samples).tolist()
    return SplicedMetrics(samples, t[0], t[1], t[2], t[3], t[4], t[5], t[6])


# ---------------------------------------------------------------------------- plot
def plot_fvu_vs_l0(points: Sequence[tuple[str, SAEMetrics]] | Sequence[tuple[str, float, float]],
                   path: str | os.PathLike, *, title: str = "SAE sweep: fidelity vs sparsity",
                   groups: Sequence[str] | None = None) -> Path:
    """FVU against mean L0 (log x) for a sweep, with the Pareto frontier (the lowest FVU reached at
    each L0 or below) drawn per group; ``points`` are ``(label, SAEMetrics)`` or ``(label, l0,
    fvu)``, ``groups`` (one per point, e.g. the architecture) colours them. Agg backend."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("nothing to plot: no SAE metrics given")
    if groups is not None and len(groups) != len(points):
        raise ValueError(f"groups has {len(groups)} entries for {len(points)} points")
    parsed = []
    for point in points:
        if len(point) == 2:
            label, metrics = point  # type: ignore[misc]
            parsed.append((label, metrics.l0, metrics.fvu))
        else:
            parsed.append(tuple(point))  # type: ignore[arg-type]
    names = list(groups) if groups is not None else [""] * len(parsed)
    figure = Figure(figsize=(5.5, 4.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    for group in dict.fromkeys(names):
        members = sorted((p for p, g in zip(parsed, names) if g == group), key=lambda p: (p[1], p[2]))
        frontier, best = [], float("inf")
        for _, l0, fvu in members:
            if fvu < best:
                frontier.append((l0, fvu))
                best = fvu
        dots = axes.scatter([p[1] for p in members], [p[2] for p in members], zorder=2, label=group or None)
        axes.plot([f[0] for f in frontier], [f[1] for f in frontier], "-", color=dots.get_facecolor()[0], alpha=0.6,
                  zorder=1, drawstyle="steps-post")
    for label, l0, fvu in parsed:
        axes.annotate(label, (l0, fvu), textcoords="offset points", xytext=(4, 4), fontsize=7)
    if min(p[1] for p in parsed) > 0:
        axes.set_xscale("log")
    if groups is not None:
        axes.legend(fontsize=7, title="frontier per", title_fontsize=7)
    axes.set_xlabel("mean L0 (active latents per row)")
    axes.set_ylabel("fraction of variance unexplained")
    axes.set_title(title)
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    return path
