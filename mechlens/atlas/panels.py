"""Panels of a feature page. A build computes the pages chunk by chunk (``chunk`` features at a
time, the chunks shared out between the ranks of a torchrun job); each panel computes its content
for a whole chunk at once (batched over features: one forward per batch of exemplar images, one
optimization per batch of visualizations, one attribution per batch of exemplars) and renders a
block of the page from a small template. What needs every published feature (the overview map,
the images the quantile bands are drawn from, the class gradients) is computed once per build in
:meth:`Panel.prepare`.

:func:`mechlens.atlas.build_atlas` assembles the default panels; pass ``panels=`` to choose,
reorder or add your own: subclass :class:`Panel`, fill ``pages[i]`` (a dict per feature of the
chunk, ``ctx.ids[i]``) in :meth:`Panel.compute` and show it with :attr:`Panel.template` (Jinja,
autoescaped; the feature's dict is ``f``). Write images with :meth:`AtlasContext.save_image` (the
build then knows the page's files: a resumed build checks them before it skips the page), and say
in :meth:`Panel.settings` what changes the panel's output (a resumed build refuses or rebuilds
pages written with other settings).
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mechlens.atlas.compute import (
    _embed,
    _histogram_svg,
    _histograms,
    _images,
    _overlay,
    _prepare,
    _sample_rows,
    _save_png,
    ablation_disagrees,
    class_gradients,
    linear_ablation_effects,
)
from mechlens._distributed import SINGLE_PROCESS, DistContext
from mechlens.engine import capture
from mechlens.features.layout import as_position_rows, infer_layouts

__all__ = [
    "AtlasContext", "AttributionPanel", "CausalEffectsPanel", "ConceptsPanel", "ExemplarsPanel", "FeatvisPanel",
    "HistogramPanel", "LogitEffectsPanel", "MapPanel", "Panel", "QuantilesPanel", "SimilarPanel",
]

VisualizeFn = Callable[[Sequence[int]], torch.Tensor]
AttributeFn = Callable[[int, torch.Tensor], dict]


def callable_settings(fn: Any) -> Any:
    """What a build records of a callback: its ``settings`` attribute (the ready-made callbacks of
    :mod:`mechlens.atlas.callbacks` carry one), else its qualified name."""
    settings = getattr(fn, "settings", None)
    if settings is not None:
        return settings
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"


def _plain(value: Any) -> bool:
    if isinstance(value, (bool, int, float, str, type(None))):
        return True
    return isinstance(value, (list, tuple)) and all(_plain(v) for v in value)


@dataclass
class AtlasContext:
    """What panels share: the feature set and its statistics, the feature ``ids`` being computed
    (a chunk in :meth:`Panel.compute`; every feature this rank computes in :meth:`Panel.prepare`),
    ``all_ids`` (every published feature, in page order), the model, the store's layer view, the
    images behind its sample ids, the output folder and the process group (``dist``)."""

    features: Any  # a FeatureSet
    ids: np.ndarray
    stats: Any
    model: Any
    net: Any
    preprocessing: Any
    device: torch.device
    view: Any
    dataset: Any
    class_names: list[str]
    out: Path
    exemplars: int
    batch_size: int = 64
    seed: int = 0
    progress: bool = True
    shared: dict = field(default_factory=dict)  # what one panel leaves for the next (exemplar images)
    all_ids: np.ndarray | None = None  # every published feature (default: ids)
    dist: DistContext = SINGLE_PROCESS
    assets: dict = field(default_factory=dict)  # feature id -> the files written for its page

    def __post_init__(self) -> None:
        if self.all_ids is None:
            self.all_ids = np.asarray(self.ids)
        self._where: dict[int, int] | None = None

    @property
    def layer(self) -> str:
        return self.features.layer

    def name_of(self, label: int) -> str:
        return self.class_names[label] if 0 <= label < len(self.class_names) else str(label)

    def positions(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Where each of ``ids`` sits in :attr:`all_ids` (the column of a build-wide array)."""
        if self._where is None or len(self._where) != len(self.all_ids):
            self._where = {int(i): n for n, i in enumerate(self.all_ids)}
        return np.asarray([self._where[int(i)] for i in ids], dtype=np.int64)

    def images(self, ids: Sequence[int]) -> torch.Tensor:
        return _images(self.dataset, ids)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        return _prepare(images, self.preprocessing, self.device)

    def save_image(self, feature: int, name: str, array: np.ndarray, scale: int = 1) -> None:
        """Write ``img/name`` (uint8 ``[H, W, 3]``) atomically and record it as a file of the page of
        ``feature``."""
        _save_png(array, self.out / "img" / name, scale=scale)
        self.assets.setdefault(int(feature), []).append(f"img/{name}")

    def encoded(self, sample_ids: np.ndarray, columns: np.ndarray | None = None):
        """``(ids, images, z [B, P, F], spatial)`` per batch: the values of the features ``columns``
        (default :attr:`ids`) at every position of the layer's map on these samples (one forward
        per batch)."""
        columns = torch.as_tensor(np.asarray(self.ids if columns is None else columns, dtype=np.int64), device=self.device)
        layout = (self.view.spec.meta or {}).get("layout") or "auto"  # what the capture knew
        with capture(self.net, self.layer) as cap, torch.no_grad():
            for start in range(0, len(sample_ids), self.batch_size):
                batch_ids = sample_ids[start:start + self.batch_size]
                images = self.images(batch_ids)
                x = self.prepare(images)
                if layout == "auto":
                    layout = infer_layouts(self.net, [self.layer], x)[self.layer].layout
                self.net(x)
                rows, spatial = as_position_rows(cap[self.layer].float(), layout)
                b, p, c = rows.shape
                yield batch_ids, images, self.features.encode(rows.reshape(b * p, c))[:, columns].reshape(b, p, -1), spatial

    def effect_images(self, count: int) -> torch.Tensor:
        """The images effects are measured on: the dataset's first ``count`` (pixels in ``[0, 1]``),
        the same for every effect panel, so their numbers are about the same images."""
        return self.images(np.arange(min(count, len(self.dataset))))


class Panel:
    """One block of every feature page (see the module docstring)."""

    name = "panel"
    template = ""

    def prepare(self, ctx: AtlasContext) -> None:
        """Once per build, on every rank, before any chunk: what needs every published feature
        (``ctx.all_ids``) or serves every chunk of this rank (``ctx.ids``; empty when this rank has
        nothing left to compute). Leave results in ``ctx.shared``. No collectives here: a rank that
        failed earlier does not come, so what every rank needs is computed by every rank
        (deterministically). Default: nothing."""

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """What determines this panel's output (recorded with the atlas; pages written under other
        settings are not reused). Default: the class, its template and its public attributes of
        plain types; a panel holding anything else says what it is here."""
        return {"panel": f"{type(self).__module__}.{type(self).__qualname__}",
                "template": hashlib.sha256(self.template.encode()).hexdigest()[:16],
                **{k: v for k, v in sorted(vars(self).items()) if not k.startswith("_") and _plain(v)}}


def _exemplar_tile(image: np.ndarray, values: np.ndarray, spatial: tuple[int, ...], peak: float, position: int) -> np.ndarray:
    """``image`` ``[H, W, 3]`` with the feature's map (``values`` per position, relative to ``peak``)
    in red and the cell at ``position`` boxed (when the layer has a 2-d map)."""
    h, w = image.shape[:2]
    heat, box = np.zeros((h, w)), None
    if len(spatial) == 2:
        grid = torch.from_numpy(np.clip(values.reshape(spatial) / max(peak, 1e-12), 0, 1))[None, None].float()
        heat = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False)[0, 0].numpy()
        if position >= 0:
            gy, gx = divmod(position, spatial[1])
            sy, sx = h / spatial[0], w / spatial[1]
            box = (int(gy * sy), int(gx * sx), int((gy + 1) * sy), int((gx + 1) * sx))
    return _overlay(image[None], heat[None], [box])[0]


def _peak_crop(image: np.ndarray, spatial: tuple[int, ...], position: int) -> np.ndarray | None:
    """The part of ``image`` around the peak cell (the cell and half a cell on every side)."""
    if len(spatial) != 2 or position < 0:
        return None
    h, w = image.shape[:2]
    gy, gx = divmod(position, spatial[1])
    sy, sx = h / spatial[0], w / spatial[1]
    y0, x0 = max(0, int((gy - 0.5) * sy)), max(0, int((gx - 0.5) * sx))
    y1, x1 = min(h, int((gy + 1.5) * sy)), min(w, int((gx + 1.5) * sx))
    if y1 <= y0 or x1 <= x0:
        return None
    crop = image[y0:y1, x0:x1]
    return crop if crop.dtype == np.uint8 else (np.clip(crop, 0, 1) * 255).round().astype(np.uint8)


class ExemplarsPanel(Panel):
    """The top exemplars of each feature, its activation map over them and their classes."""

    name = "exemplars"
    template = """<h2>Top {{ f.exemplars | length }} exemplars</h2>
<p>Each image with the feature's activation map over it (red) and the strongest position boxed.
Top classes: {% for c in f.top_classes %}<span class="pill">{{ c.name }} {{ '%.0f' % (100 * c.share) }}%</span>{% endfor %}</p>
<div class="cards">{% for e in f.exemplars %}<div class="card"><img src="../img/{{ f.id }}-ex{{ loop.index0 }}.png" width="160" alt="exemplar {{ loop.index }}">
<div>sample {{ e.sample }} &middot; {{ e.label_name }} &middot; value {{ '%.3g' % e.value }}</div></div>{% endfor %}</div>
{% if f.crops %}<h3>Around the peak</h3><div class="cards">{% for e in f.exemplars %}<img src="../img/{{ f.id }}-crop{{ loop.index0 }}.png" width="96" alt="crop {{ loop.index }}">{% endfor %}</div>{% endif %}"""

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        from tqdm.auto import tqdm

        stats, ids, k = ctx.stats, ctx.ids, min(ctx.exemplars, ctx.stats.top_samples.shape[1])
        samples = stats.top_samples[ids, :k]
        wanted = np.unique(samples[samples >= 0])
        maps: dict[int, np.ndarray] = {}  # sample -> [P, len(ids)] feature values
        images_u8: dict[int, np.ndarray] = {}
        spatial: tuple[int, ...] = ()
        bar = tqdm(total=len(wanted), desc="atlas exemplars", unit="img", disable=not ctx.progress)
        for batch_ids, images, z, spatial in ctx.encoded(wanted):
            for sid, zi, img in zip(batch_ids, z.cpu().numpy(), images):
                maps[int(sid)] = zi
                images_u8[int(sid)] = img.permute(1, 2, 0).cpu().numpy()
            bar.update(len(batch_ids))
        bar.close()
        labels: dict[int, int] = {}
        if (samples >= 0).any():
            index = ctx.view.read_index(stats.top_rows[ids, :k][samples >= 0])
            labels = dict(zip(index.sample_id.tolist(), index.label.tolist()))
        ctx.shared["images_u8"] = images_u8
        for column, (feature, page) in enumerate(zip(ids, pages)):
            feature = int(feature)
            rows_out, tiles = [], []
            for j in range(k):
                sid = int(stats.top_samples[feature, j])
                if sid < 0:
                    continue
                image = images_u8[sid]
                position = int(stats.top_positions[feature, j])
                tile = _exemplar_tile(image, maps[sid][:, column], spatial, float(stats.max[feature]), position)
                ctx.save_image(feature, f"{feature}-ex{len(tiles)}.png", tile, scale=max(1, 160 // max(image.shape[1], 1)))
                crop = _peak_crop(image, spatial, position)
                if crop is not None:
                    ctx.save_image(feature, f"{feature}-crop{len(tiles)}.png", crop, scale=max(1, 96 // max(crop.shape[1], 1)))
                tiles.append(tile)
                label = int(labels.get(sid, -1))
                rows_out.append({"sample": sid, "value": float(stats.top_values[feature, j]), "label": label,
                                 "label_name": ctx.name_of(label), "position": int(stats.top_positions[feature, j])})
            if tiles:
                ctx.save_image(feature, f"{feature}-exemplars.png", np.concatenate(tiles, axis=1))
            page["crops"] = len(spatial) == 2 and bool(tiles)
            label_list = [e["label"] for e in rows_out]
            classes, shares = np.unique(label_list, return_counts=True) if label_list else (np.array([]), np.array([]))
            page["exemplars"] = rows_out
            page["top_classes"] = [{"name": ctx.name_of(int(c)), "share": float(s) / len(label_list)}
                                   for c, s in sorted(zip(classes, shares), key=lambda t: -t[1])[:3]]


class QuantilesPanel(Panel):
    """Exemplars below the top: for each band of activation (fractions of the feature's max),
    images of a random sample whose peak falls in it, the peak boxed — what the feature does at
    half strength, and whether its weak activations still mean the same thing."""

    name = "exemplars by quantile"
    template = """{% if f.quantiles %}<h2>Below the top: exemplars by activation band</h2>
{% for band in f.quantiles %}<div><b>{{ '%.0f' % (100 * band.low) }}&ndash;{{ '%.0f' % (100 * band.high) }}% of max</b>
{% if band.images %}<div class="cards">{% for e in band.images %}<div class="card"><img src="../img/{{ f.id }}-q{{ band.index }}-{{ loop.index0 }}.png" width="96" alt="band {{ band.index }} exemplar">
<div>sample {{ e.sample }} &middot; {{ e.label_name }} &middot; {{ '%.3g' % e.value }}</div></div>{% endfor %}</div>
{% else %}<p>none among the {{ f.quantile_images }} sampled images</p>{% endif %}</div>{% endfor %}{% endif %}"""

    def __init__(self, images: int = 256, bands: Sequence[tuple[float, float]] = ((0.5, 0.75), (0.25, 0.5), (0.0, 0.25)),
                 per_band: int = 4) -> None:
        self.count, self.bands, self.per_band = images, [(float(a), float(b)) for a, b in bands], per_band

    def prepare(self, ctx: AtlasContext) -> None:
        if not len(ctx.ids):
            return
        # one pass over the sampled images for every published feature: the bands of this rank's
        # features, and what fires together for the similar-features panel (any pair of features)
        rng = np.random.default_rng(ctx.seed)
        chosen = np.sort(rng.choice(len(ctx.dataset), min(self.count, len(ctx.dataset)), replace=False))
        peaks, where = [], []
        for _, _, z, _ in ctx.encoded(chosen, columns=ctx.all_ids):
            value, position = z.max(dim=1)
            peaks.append(value.cpu().numpy())
            where.append(position.cpu().numpy())
        empty = np.zeros((0, len(ctx.all_ids)))
        value = np.concatenate(peaks) if peaks else empty
        position = np.concatenate(where) if where else empty.astype(np.int64)
        ctx.shared["quantile_pass"] = (chosen, value, position)
        ctx.shared["peak_values"] = value  # [images, all_ids]: what fires together (SimilarPanel)

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        if not len(ctx.ids):
            return
        if "quantile_pass" not in ctx.shared:
            self.prepare(ctx)
        chosen, value, position = ctx.shared["quantile_pass"]
        columns = ctx.positions(ctx.ids)
        picks: list[list[np.ndarray]] = []
        for feature, column in zip(ctx.ids, columns):
            top = max(float(ctx.stats.max[int(feature)]), 1e-12)
            bands = []
            for low, high in self.bands:
                hit = np.flatnonzero((value[:, column] > low * top) & (value[:, column] <= high * top))
                bands.append(hit[np.argsort(-value[hit, column], kind="stable")][: self.per_band])
            picks.append(bands)
        # the activation maps of the picked images only (one forward per batch of them)
        wanted = np.unique(np.concatenate([chosen[rows] for bands in picks for rows in bands] or [np.zeros(0, np.int64)]))
        image_of, spatial = {}, ()
        for batch_ids, images, z, spatial in ctx.encoded(wanted):
            for i, img, zi in zip(batch_ids, images, z.cpu().numpy()):
                image_of[int(i)] = (img.permute(1, 2, 0).cpu().numpy(), zi)
        for slot, (feature, column, page) in enumerate(zip(ctx.ids, columns, pages)):
            top = max(float(ctx.stats.max[int(feature)]), 1e-12)
            bands = []
            for index, ((low, high), picked) in enumerate(zip(self.bands, picks[slot])):
                shown = []
                for n, row in enumerate(picked):
                    sid = int(chosen[row])
                    image, z = image_of[sid]
                    tile = _exemplar_tile(image, z[:, slot], spatial, top, int(position[row, column]))
                    ctx.save_image(int(feature), f"{int(feature)}-q{index}-{n}.png", tile,
                                   scale=max(1, 96 // max(image.shape[1], 1)))
                    label = int(ctx.dataset[sid][1]) if isinstance(ctx.dataset[sid], (tuple, list)) else -1
                    shown.append({"sample": sid, "value": float(value[row, column]), "label": label,
                                  "label_name": ctx.name_of(label)})
                bands.append({"index": index, "low": low, "high": high, "images": shown})
            page["quantiles"], page["quantile_images"] = bands, len(chosen)


class HistogramPanel(Panel):
    """Each feature's histogram of positive values over a sample of the store's rows."""

    name = "histogram"
    template = """<div class="cards"><div class="card"><h3>Activation histogram (active rows)</h3>{{ f.histogram_svg | safe }}</div></div>"""

    def __init__(self, rows: int = 20000, bins: int = 16) -> None:
        self.rows, self.bins = rows, bins

    def prepare(self, ctx: AtlasContext) -> None:
        if not len(ctx.ids):
            return
        # one sample of store rows, encoded twice for all of this rank's features (not per chunk)
        counts, tops = _histograms(ctx.features, ctx.view, ctx.ids, self.rows, self.bins, ctx.device,
                                   rows=_sample_rows(ctx.view, self.rows))
        ctx.shared["histograms"] = {int(i): (c, float(t)) for i, c, t in zip(ctx.ids, counts, tops)}

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        done = ctx.shared.get("histograms", {})
        if any(int(i) not in done for i in ctx.ids):
            counts, tops = _histograms(ctx.features, ctx.view, ctx.ids, self.rows, self.bins, ctx.device)
            done = {int(i): (c, float(t)) for i, c, t in zip(ctx.ids, counts, tops)}
        for feature, page in zip(ctx.ids, pages):
            count, top = done[int(feature)]
            page["histogram"], page["histogram_max"] = count.tolist(), float(top)
            page["histogram_svg"] = _histogram_svg(count, float(top))


class LogitEffectsPanel(Panel):
    """The first-order change of each class logit when a feature's direction is added."""

    name = "logit effects"
    template = """<table class="meta">
<tr><td><b>pushes up (logit effect)</b></td><td>{% for c in f.logit_up %}<span class="pill up">{{ c.name }} {{ '%+.3g' % c.effect }}</span>{% endfor %}</td></tr>
<tr><td><b>pushes down</b></td><td>{% for c in f.logit_down %}<span class="pill down">{{ c.name }} {{ '%+.3g' % c.effect }}</span>{% endfor %}</td></tr>
</table>"""

    def __init__(self, images: int = 64) -> None:
        self.count = images

    def prepare(self, ctx: AtlasContext) -> None:
        if len(ctx.ids):  # one forward and a backward per class serve every chunk
            ctx.shared["class_gradients"] = class_gradients(ctx.model, ctx.layer, ctx.effect_images(self.count))

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        if not len(ctx.ids):
            return
        if "class_gradients" not in ctx.shared:
            self.prepare(ctx)
        gradient = ctx.shared["class_gradients"]  # [classes, C]
        directions = ctx.features.directions[torch.as_tensor(ctx.ids, device=ctx.features.device)]
        effects = (gradient @ directions.to(gradient).T).detach().cpu().numpy()  # [classes, F]
        for column, page in enumerate(pages):
            effect = effects[:, column]
            page["logit_up"] = [{"name": ctx.name_of(int(c)), "effect": float(effect[c])}
                                for c in np.argsort(-effect)[:3] if effect[c] > 0]
            page["logit_down"] = [{"name": ctx.name_of(int(c)), "effect": float(effect[c])}
                                  for c in np.argsort(effect)[:3] if effect[c] < 0]


class CausalEffectsPanel(Panel):
    """The measured effect of ablating each feature on every class logit, beside its linear
    (first-order) estimate, over the dataset's first ``images`` as the logit-effects panel picks
    them (:meth:`AtlasContext.effect_images`; both figures of a page read the same images).

    Ablation is :func:`mechlens.interventions.ablate` of the feature at every position: an SAE
    latent is zeroed in latent space (the SAE's error term kept), a channel zeroed, a direction
    projected out. The measurement is :func:`~mechlens.interventions.intervention_effects` (mean
    change of each class logit with a ``bootstrap`` percentile CI, seeded by the atlas's seed; one
    intervened forward per feature and batch, all classes read from it); the estimate is
    :func:`~mechlens.atlas.compute.linear_ablation_effects` -- the linear prediction of *the
    same ablation*, not the logit-effects panel's "add the direction" figure, so the two compare
    like with like. A class where they disagree (:func:`~mechlens.atlas.compute.ablation_disagrees`,
    ``tolerance``) is flagged on the page. ``classes``: the class indices measured (default all:
    the cost of the CI grows with their number); ``show``: how many classes the page's table lists
    (the largest effects; disagreements always; ``atlas.json`` holds them all).
    """

    name = "causal effects"
    template = """{% if f.causal %}<h2>Causal effects (ablation)</h2>
{% if f.causal.skipped %}<p>not measured: {{ f.causal.skipped }}</p>{% else %}
<p>Ablating the feature ({{ f.causal.ablation }}) over {{ f.causal.images }} images: the change of each class logit
as the linear (first-order) estimate predicts it and as measured, with its {{ '%.0f' % (100 * f.causal.confidence) }}% bootstrap interval.</p>
{% for c in f.causal.classes if c.disagree %}<p class="disagree"><span class="badge">disagree</span> the linear estimate says
{{ '%+.3g' % c.linear }} on {{ c.name }}; ablation measures {{ '%+.3g' % c.effect }} [{{ '%+.3g' % c.ci_low }}, {{ '%+.3g' % c.ci_high }}]: they disagree</p>{% else %}
<p>The linear estimate and the measurement agree on every class.</p>{% endfor %}
<table class="causal"><thead><tr><th>class</th><th>linear estimate</th><th>measured ablation effect [CI]</th><th></th></tr></thead><tbody>
{% for c in f.causal.classes if c.shown %}<tr{% if c.disagree %} class="disagree"{% endif %}><td>{{ c.name }}</td>
<td class="num">{{ '%+.3g' % c.linear }}</td><td class="num">{{ '%+.3g' % c.effect }} [{{ '%+.3g' % c.ci_low }}, {{ '%+.3g' % c.ci_high }}]</td>
<td>{% if c.disagree %}<span class="badge">disagree</span>{% endif %}</td></tr>{% endfor %}
</tbody></table>{% endif %}{% endif %}"""

    ABLATIONS = {"latent": "zeroed, the SAE's error term kept", "channel": "channel zeroed",
                 "direction": "direction projected out"}

    def __init__(self, images: int = 64, *, bootstrap: int = 500, tolerance: float = 0.5,
                 classes: Sequence[int] | None = None, show: int = 10, chunk: int = 32) -> None:
        self.count, self.bootstrap, self.tolerance = images, bootstrap, tolerance
        self.classes = None if classes is None else [int(c) for c in classes]
        self.show, self.chunk = show, max(1, chunk)

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        from tqdm.auto import tqdm

        from mechlens.interventions import ablate, intervention_effects

        edits: dict[int, Any] = {}
        for column, (feature, page) in enumerate(zip(ctx.ids, pages)):
            try:
                edits[column] = ablate(ctx.features.feature(int(feature)))
            except (NotImplementedError, TypeError, ValueError) as error:  # a third-party set or feature kind
                page["causal"] = {"skipped": str(error) or f"{type(ctx.features).__name__} names no feature to ablate"}
        if not edits:
            return
        images = ctx.effect_images(self.count)
        linear = linear_ablation_effects(ctx.model, ctx.features, images, ctx.ids, batch_size=ctx.batch_size)
        classes = self.classes if self.classes is not None else list(range(linear.shape[0]))
        targets = [f"class:{c}" for c in classes]
        x = ctx.prepare(images)  # the module's own input: the estimate above read the same tensor
        ablation = self.ABLATIONS.get(getattr(ctx.features, "kind", ""), "set to 0")
        bar = tqdm(total=len(edits), desc="atlas causal effects", unit="feature", disable=not ctx.progress)
        columns = list(edits)
        for start in range(0, len(columns), self.chunk):
            chunk = columns[start:start + self.chunk]
            # one call per chunk of features (the clean forward is shared within it); the seeded
            # resamples depend only on the image count, so chunking does not change any interval
            table = intervention_effects(ctx.net, x, {str(c): edits[c] for c in chunk}, targets,
                                         batch_size=ctx.batch_size, bootstrap=self.bootstrap, seed=ctx.seed)
            for column in chunk:
                rows = [table.row(str(column), target) for target in targets]
                pages[column]["causal"] = self._record(ctx, classes, linear[classes, column], rows, ablation, len(x),
                                                       table.confidence)
            bar.update(len(chunk))
        bar.close()

    def _record(self, ctx: AtlasContext, classes: list[int], linear: np.ndarray, rows: list[dict], ablation: str,
                images: int, confidence: float) -> dict:
        effect, low, high = (np.array([r[key] for r in rows]) for key in ("mean_effect", "ci_low", "ci_high"))
        linear = linear + 0.0  # no "-0" on the page: the estimate of a feature that is 0 throughout
        disagree = ablation_disagrees(linear, effect, low, high, tolerance=self.tolerance)
        size = np.maximum(np.abs(linear), np.abs(effect))
        shown = set(np.argsort(-size, kind="stable")[:self.show].tolist()) | set(np.flatnonzero(disagree).tolist())
        return {"ablation": ablation, "images": images, "confidence": confidence, "bootstrap": self.bootstrap,
                "disagrees": bool(disagree.any()),
                "classes": [{"class": c, "name": ctx.name_of(c), "linear": float(linear[n]), "effect": float(effect[n]),
                             "ci_low": float(low[n]), "ci_high": float(high[n]), "disagree": bool(disagree[n]),
                             "shown": n in shown} for n, c in enumerate(classes)]}


class ConceptsPanel(Panel):
    """Cosine of each feature's direction with CAVs of the same layer. The best concept is named
    only at a cosine of at least ``min_cos`` (else "none": a direction at cosine 0.1 or below zero
    is not that concept)."""

    name = "concepts"
    template = """<table class="meta"><tr><td><b>concept alignment</b></td><td>{% for c in f.concepts %}<span class="pill">{{ c.name }} cos {{ '%.2f' % c.cos }}</span>{% else %}no CAVs given{% endfor %}</td></tr></table>"""

    def __init__(self, cavs: Sequence[Any], min_cos: float = 0.3) -> None:
        self.cavs, self.min_cos = list(cavs), float(min_cos)

    def settings(self) -> dict[str, Any]:
        vectors = [hashlib.sha256(np.asarray(c.vector, dtype=np.float64).tobytes()).hexdigest()[:16] for c in self.cavs]
        return {**super().settings(), "cavs": [[str(c.concept), str(getattr(c, "layer", "")), v]
                                              for c, v in zip(self.cavs, vectors)]}

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        foreign = [c for c in self.cavs if getattr(c, "layer", ctx.layer) not in (ctx.layer, "")]
        if foreign:
            raise ValueError(f"CAV {foreign[0].concept!r} was trained at layer {foreign[0].layer!r}, not at the "
                             f"features' layer {ctx.layer!r}")
        if not self.cavs:
            return
        vectors = np.stack([np.asarray(c.vector, dtype=np.float64) for c in self.cavs])
        dec = ctx.features.directions[torch.as_tensor(ctx.ids, device=ctx.features.device)].cpu().numpy().astype(np.float64)
        cos = (dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)) @ \
            (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).T
        for column, page in enumerate(pages):
            ranking = np.argsort(-cos[column])
            page["concepts"] = [{"name": self.cavs[c].concept, "cos": float(cos[column, c])} for c in ranking[:3]]
            best = page["concepts"][0]
            page["concept"], page["concept_cos"] = (best["name"], best["cos"]) if best["cos"] >= self.min_cos else ("none", best["cos"])


class MapPanel(Panel):
    """Where each feature sits on the overview map (t-SNE / PCA of the feature directions)."""

    name = "map"

    def prepare(self, ctx: AtlasContext) -> None:
        if not len(ctx.ids):
            return
        # every published feature's place, on every rank: the embedding is seeded and deterministic,
        # so the ranks agree without a collective (a panel's prepare must not wait on the others)
        directions = ctx.features.directions[torch.as_tensor(ctx.all_ids, device=ctx.features.device)]
        ctx.shared["map"], ctx.shared["map_method"] = _embed(directions.detach().cpu().numpy(), ctx.seed)

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        if not len(ctx.ids):
            return
        if "map" not in ctx.shared:
            self.prepare(ctx)
        coords = ctx.shared["map"]
        for page, row in zip(pages, ctx.positions(ctx.ids)):
            page["map"] = [float(v) for v in coords[row]]


class SimilarPanel(Panel):
    """The published features whose directions are closest to each feature's (cosine), linked:
    near-duplicates and the neighbours a split feature left behind; and, when the quantile pass
    ran, those that fire on the same images (Jaccard of the sets of images they fire on)."""

    name = "similar features"
    template = """{% if f.similar %}<table class="meta"><tr><td><b>similar features (direction cosine)</b></td><td>
{% for s in f.similar %}<a class="pill" href="{{ s.id }}.html">#{{ s.id }} {{ '%.2f' % s.cos }}</a>{% endfor %}</td></tr>
{% if f.coactive %}<tr><td><b>fire on the same images (Jaccard)</b></td><td>
{% for s in f.coactive %}<a class="pill" href="{{ s.id }}.html">#{{ s.id }} {{ '%.2f' % s.jaccard }}</a>{% endfor %}</td></tr>{% endif %}</table>{% endif %}"""

    def __init__(self, count: int = 5) -> None:
        self.count = count

    def prepare(self, ctx: AtlasContext) -> None:
        if not len(ctx.ids):
            return
        directions = ctx.features.directions[torch.as_tensor(ctx.all_ids, device=ctx.features.device)].detach().double().cpu()
        ctx.shared["unit_directions"] = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
        fired = ctx.shared.get("peak_values")  # after QuantilesPanel.prepare
        if fired is not None:
            active = (np.asarray(fired) > 0).astype(np.float64)  # [images, all_ids]
            ctx.shared["coactivity"] = (active, active.sum(axis=0))

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        # the chunk's rows of the [F, F] tables only: a 32k-feature atlas never holds F x F
        if not len(ctx.ids):
            return
        if "unit_directions" not in ctx.shared:
            self.prepare(ctx)
        unit = ctx.shared["unit_directions"]
        rows = ctx.positions(ctx.ids)
        cos = (unit[torch.as_tensor(rows)] @ unit.T).numpy()
        cos[np.arange(len(rows)), rows] = -np.inf
        jaccard = None
        if "coactivity" in ctx.shared:
            active, count = ctx.shared["coactivity"]
            both = active[:, rows].T @ active
            jaccard = both / np.maximum(count[rows][:, None] + count[None, :] - both, 1)
            jaccard[np.arange(len(rows)), rows] = -1.0
        for row, page in enumerate(pages):
            order = np.argsort(-cos[row])[: self.count]
            page["similar"] = [{"id": int(ctx.all_ids[j]), "cos": float(cos[row, j])} for j in order if np.isfinite(cos[row, j])]
            if jaccard is not None:
                near = np.argsort(-jaccard[row], kind="stable")[: self.count]
                page["coactive"] = [{"id": int(ctx.all_ids[j]), "jaccard": float(jaccard[row, j])} for j in near if jaccard[row, j] > 0]


class FeatvisPanel(Panel):
    """Feature visualizations of each feature: ``visualize(ids) -> images [F, 3, H, W]``, or
    ``[F, n, 3, H, W]`` for several per feature (the first the plain optimum, the others a
    diversity batch, as :func:`~mechlens.atlas.feature_visualizer` with ``diversity=`` renders)."""

    name = "featvis"
    template = """{% if f.has_vis %}<div class="cards"><div class="card"><h3>Feature visualization</h3><img src="../img/{{ f.id }}-vis.png" width="192" alt="visualization of feature {{ f.id }}"></div>
{% if f.vis_more %}<div class="card"><h3>Diversity batch</h3>{% for k in range(f.vis_more) %}<img src="../img/{{ f.id }}-vis{{ k + 1 }}.png" width="128" alt="diverse visualization {{ k + 1 }}">{% endfor %}</div>{% endif %}</div>{% endif %}"""

    def __init__(self, visualize: VisualizeFn) -> None:
        self.visualize = visualize

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "visualize": callable_settings(self.visualize)}

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        if not len(ctx.ids):
            return
        # the whole chunk in one call: feature_visualizer optimizes its features a batch at a time
        images = self.visualize([int(i) for i in ctx.ids]).detach().cpu().clamp(0, 1)
        if images.dim() == 4:
            images = images.unsqueeze(1)
        if len(images) != len(ctx.ids):
            raise ValueError(f"visualize returned {len(images)} images for {len(ctx.ids)} features: it must return one "
                             "(or one row of several) per feature id it is given")
        for feature, several, page in zip(ctx.ids, images, pages):
            for k, image in enumerate(several):
                name = f"{feature}-vis.png" if k == 0 else f"{feature}-vis{k}.png"
                ctx.save_image(int(feature), name, (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            page["has_vis"], page["vis_more"] = True, len(several) - 1


class AttributionPanel(Panel):
    """Attribution maps of each feature on its top exemplar: ``attribute(id, images) -> {method: maps}``
    (after :class:`ExemplarsPanel`). A callback with a ``batched(ids, images) -> {method: maps [F, H, W]}``
    attribute (as :func:`~mechlens.atlas.feature_attributor` returns) explains a batch of features,
    each on its own exemplar, in one call (``batch`` of them at a time, default the atlas's batch size)."""

    name = "attribution"
    template = """{% if f.attributions %}<h2>Attribution</h2><div class="cards">{% for a in f.attributions %}<div class="card"><h3>{{ a.method }}</h3>
<img src="../img/{{ a.file }}" width="160" alt="{{ a.method }} for feature {{ f.id }}"></div>{% endfor %}</div>{% endif %}"""

    def __init__(self, attribute: AttributeFn, batch: int | None = None) -> None:
        if batch is not None and int(batch) < 1:
            raise ValueError(f"batch must be a positive number of features, got {batch}")
        self.attribute, self.batch = attribute, batch

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "attribute": callable_settings(self.attribute)}

    def compute(self, ctx: AtlasContext, pages: list[dict]) -> None:
        images_u8 = ctx.shared.get("images_u8")
        if images_u8 is None:
            raise ValueError("the attribution panel shows maps on the top exemplar: put ExemplarsPanel before it")
        todo = [(int(feature), page) for feature, page in zip(ctx.ids, pages) if page.get("exemplars")]
        batched = getattr(self.attribute, "batched", None)
        step = self.batch or ctx.batch_size
        for start in range(0, len(todo), step if batched is not None else 1):
            part = todo[start:start + (step if batched is not None else 1)]
            firsts = [page["exemplars"][0]["sample"] for _, page in part]
            images = ctx.images(firsts)
            if batched is not None:
                maps = batched([feature for feature, _ in part], images)
            else:
                maps = self.attribute(part[0][0], images)
            for method, amaps in maps.items():
                amaps = amaps.detach().float().cpu().numpy()
                if len(amaps) != len(part):
                    raise ValueError(f"the attribution callback returned {len(amaps)} {method} maps for {len(part)} images")
                for (feature, page), first, amap in zip(part, firsts, amaps):
                    amap = np.abs(amap) / max(np.abs(amap).max(), 1e-12)
                    image = images_u8[first]
                    file = f"{feature}-attr-{''.join(ch for ch in method if ch.isalnum())}.png"
                    ctx.save_image(feature, file, _overlay(image[None], amap[None], [None])[0],
                                   scale=max(1, 160 // max(image.shape[1], 1)))
                    page["attributions"].append({"method": method, "file": file})
