"""Shortcut audit: rank features by the evidence that they are a shortcut, without being told the
artefact (no mask, no concept).

A shortcut feature (a ruler on the melanoma photos, a hospital tag on the X-rays) is one that

* **the model relies on for a class** (causal): zeroing it lowers that class's logit on the
  class's images, measured for every latent at once by attribution patching and then exactly, by
  ablation, for the strongest candidates;
* **marks that class in the data** (purity): its top exemplars are images of that class;
* **is not the object** (spatial): it survives erasing the object from its exemplars (when the
  data knows where objects are, ``object_boxes``: the box is filled with the image's median colour
  outside it, and ``off_object`` is the fraction of the latent's peak activation that remains);
  where objects are unknown, its exemplars' peaks sit in a few fixed places (location
  concentration: ``1 - H(peak cells) / log(min(cells, exemplars))``, a weaker proxy: centred
  objects score high on it too). Both are reported.

``score = causal x purity x spatial``, each in ``[0, 1]``: a feature of the object is causal and
pure but sits on the object; a background texture sits off it but marks no class. Optional TCAV
evidence (the latent's top exemplars as a concept, for its class) is reported beside the score for
the top suspects.
"""
from __future__ import annotations

import csv
import html
import io
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps
from mechlens.interventions import ablation_effects, attribution_patching

__all__ = ["ChannelDictionary", "ShortcutAudit", "Suspect", "audit_store", "shortcut_audit"]

COLUMNS = ("rank", "latent", "class_index", "class_name", "score", "causal", "logit_drop", "logit_drop_exact", "purity",
           "spatial", "off_object", "location", "frequency", "tcav_score", "tcav_p")


@dataclass
class Suspect:
    """One feature's evidence (see the module docstring)."""

    latent: int
    class_index: int
    class_name: str
    score: float
    causal: float  # the class's logit drop on ablation, relative to the largest drop for that class
    logit_drop: float  # estimated (attribution patching) mean drop of the class logit when zeroed
    logit_drop_exact: float | None  # measured by ablation (top candidates)
    purity: float  # fraction of the top exemplars that are images of the class
    spatial: float  # off_object when objects are known, else location
    off_object: float | None  # fraction of its peak activation left when the object is erased
    location: float
    frequency: float
    exemplars: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    tcav_score: float | None = None
    tcav_p: float | None = None
    rank: int = 0

    def row(self) -> dict[str, Any]:
        data = asdict(self)
        return {c: data[c] for c in COLUMNS}


@dataclass
class ShortcutAudit:
    """The features ranked by shortcut evidence (``suspects``, best first), and how it was measured."""

    layer: str
    suspects: list[Suspect]
    spatial_evidence: str  # "off_object" or "location"
    images_per_class: int
    spatial_shape: tuple[int, ...]
    image_size: tuple[int, int]
    class_names: list[str]

    def top(self, n: int = 10) -> list[Suspect]:
        return self.suspects[:n]

    def __repr__(self) -> str:
        first = (f"; first: latent {self.suspects[0].latent} -> {self.suspects[0].class_name} "
                 f"(score {self.suspects[0].score:.3f})") if self.suspects else ""
        return f"ShortcutAudit({self.layer!r}: {len(self.suspects)} features ranked, {self.spatial_evidence} evidence{first})"

    def to_csv(self, path: Any = None) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(s.row() for s in self.suspects)
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_json(self) -> str:
        return json_dumps({"layer": self.layer, "spatial_evidence": self.spatial_evidence,
                           "images_per_class": self.images_per_class, "spatial_shape": list(self.spatial_shape),
                           "suspects": [asdict(s) for s in self.suspects]})

    def plot(self, dataset: Any, n: int = 5, exemplars: int = 6) -> Any:
        """The top ``n`` suspects, one row each: their top exemplars with the peak cell outlined."""
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle

        chosen = self.top(n)
        fig, axes = plt.subplots(max(1, len(chosen)), exemplars, figsize=(1.6 * exemplars, 1.8 * max(1, len(chosen))),
                                 squeeze=False)
        h_cells, w_cells = (self.spatial_shape + (1, 1))[:2] if len(self.spatial_shape) >= 2 else (1, 1)
        for row, suspect in enumerate(chosen):
            for col in range(exemplars):
                ax = axes[row, col]
                ax.axis("off")
                if col >= len(suspect.exemplars):
                    continue
                image = _image(dataset, suspect.exemplars[col])
                ax.imshow(image.permute(1, 2, 0).clamp(0, 1).numpy())
                cy, cx = divmod(suspect.positions[col], w_cells)
                ch, cw = image.shape[1] / h_cells, image.shape[2] / w_cells
                ax.add_patch(Rectangle((cx * cw, cy * ch), cw, ch, fill=False, edgecolor="#ff3b30", linewidth=2))
            axes[row, 0].set_title(f"#{suspect.rank} latent {suspect.latent} -> {suspect.class_name}  score {suspect.score:.2f}",
                                   fontsize=8, loc="left")
        fig.tight_layout()
        return fig

    def write(self, out: Any, dataset: Any, n: int = 10) -> Path:
        """``audit.csv``, ``audit.json``, ``audit.png`` and ``audit.html`` (the top ``n`` with pictures) in ``out``."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        self.to_csv(out / "audit.csv")
        (out / "audit.json").write_text(self.to_json())
        fig = self.plot(dataset, n=min(n, 8))
        fig.savefig(out / "audit.png", dpi=110)
        import matplotlib.pyplot as plt

        plt.close(fig)
        rows = "".join(
            f"<tr><td>{s.rank}</td><td>{s.latent}</td><td>{html.escape(s.class_name)}</td><td><b>{s.score:.3f}</b></td>"
            f"<td>{s.causal:.2f} ({s.logit_drop:+.3g}{'' if s.logit_drop_exact is None else f'; measured {s.logit_drop_exact:+.3g}'})</td>"
            f"<td>{s.purity:.2f}</td><td>{'' if s.off_object is None else f'{s.off_object:.2f}'}</td><td>{s.location:.2f}</td>"
            f"<td>{s.frequency:.4f}</td><td>{'' if s.tcav_score is None else f'{s.tcav_score:.2f} (p={s.tcav_p:.3g})'}</td></tr>"
            for s in self.top(n))
        spatial_text = ("how much of its activation survives erasing the object from its exemplars"
                        if self.spatial_evidence == "off_object" else "how concentrated its exemplar peaks are in a few fixed cells")
        page = f"""<!doctype html><html><head><meta charset="utf-8"><title>Shortcut audit: {html.escape(self.layer)}</title>
<style>body{{font-family:Helvetica,Arial,sans-serif;margin:2em;max-width:1100px}}td,th{{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left}}</style></head>
<body><h1>Shortcut audit of {html.escape(self.layer)}</h1>
<p>Features ranked by <b>score = causal &times; purity &times; spatial</b>, found without any mask or concept of an artefact.
<i>causal</i>: how much the class's logit drops when the feature is zeroed, relative to the strongest feature for that class
(estimated for all, measured by ablation for the top candidates); <i>purity</i>: the fraction of its top exemplars that show
the class; <i>spatial</i>: {spatial_text}.
Images per class for the causal effects: {self.images_per_class}.</p>
<table><tr><th>#</th><th>latent</th><th>class</th><th>score</th><th>causal (logit drop)</th><th>purity</th><th>off object</th>
<th>location</th><th>frequency</th><th>TCAV</th></tr>{rows}</table>
<h2>Top suspects: exemplars with the peak cell</h2><img src="audit.png" style="max-width:100%"></body></html>
"""
        (out / "audit.html").write_text(page)
        return out / "audit.html"

    def to_pandas(self) -> Any:
        """Every suspect as a row of a ``pandas.DataFrame`` (pandas is optional)."""
        from mechlens._display import to_pandas

        return to_pandas([s.row() for s in self.suspects], COLUMNS)

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table([s.row() for s in self.suspects], COLUMNS, caption=f"shortcut audit of {self.layer}", max_rows=15)


def _image(dataset: Any, index: int) -> torch.Tensor:
    item = dataset[int(index)]
    return torch.as_tensor(item[0] if isinstance(item, (tuple, list)) else item).float()


def _labels(dataset: Any) -> np.ndarray:
    labels = getattr(dataset, "labels", None)
    if labels is not None:
        return np.asarray(labels)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])


def _cell_boxes(positions: np.ndarray, spatial: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """``[..., 4]`` pixel boxes ``(x0, y0, x1, y1)`` of flat cell indices on a ``spatial`` grid."""
    gy, gx = np.divmod(positions, spatial[1])
    ch, cw = image_size[0] / spatial[0], image_size[1] / spatial[1]
    return np.stack([gx * cw, gy * ch, (gx + 1) * cw, (gy + 1) * ch], axis=-1)


def _erase(image: torch.Tensor, box: np.ndarray) -> torch.Tensor:
    """``image`` with the object's box filled with the median colour of the pixels outside it."""
    h, w = image.shape[-2:]
    x0, y0 = max(0, int(math.floor(box[0]))), max(0, int(math.floor(box[1])))
    x1, y1 = min(w, int(math.ceil(box[2]))), min(h, int(math.ceil(box[3])))
    outside = torch.ones(h, w, dtype=torch.bool)
    outside[y0:y1, x0:x1] = False
    out = image.clone()
    if outside.any() and x1 > x0 and y1 > y0:
        fill = image[:, outside].median(dim=1).values
        out[:, y0:y1, x0:x1] = fill[:, None, None]
    return out


def _survival(model: Any, sae: Any, dataset: Any, boxes: np.ndarray, samples: np.ndarray, use: np.ndarray, *,
              batch_size: int) -> np.ndarray:
    """``[W]``: per latent, the mean over its exemplars of ``max_p z(erased) / max_p z(image)``, clipped to [0, 1]."""
    from mechlens.engine import capture, eval_mode, unwrap
    from mechlens.features.layout import as_position_rows, infer_layouts

    ids = np.unique(samples[use])
    if len(ids) == 0:
        return np.zeros(len(samples))
    net = unwrap(model)
    preprocessing = getattr(model, "preprocessing", None) if net is not model else None
    to_input = preprocessing.normalize if preprocessing is not None else (lambda x: x)
    layer = sae.config.layer
    device = next(net.parameters()).device
    peaks: dict[str, list[torch.Tensor]] = {"image": [], "erased": []}
    layout = None
    with eval_mode(net), torch.no_grad():
        for start in range(0, len(ids), batch_size):
            chunk = ids[start:start + batch_size]
            images = torch.stack([_image(dataset, i) for i in chunk])
            erased = torch.stack([_erase(img, boxes[i]) for img, i in zip(images, chunk)])
            for name, batch in (("image", images), ("erased", erased)):
                x = to_input(batch.to(device))
                if layout is None:
                    recorded = getattr(sae.config, "layout", "auto")
                    layout = infer_layouts(net, [layer], x[:1], layout=None if recorded in ("", "auto", None) else recorded)[layer].layout
                with capture(net, [layer]) as cap:
                    net(x)
                    rows, _ = as_position_rows(cap[layer], layout)
                b, p, c = rows.shape
                peaks[name].append(sae.encode(rows.reshape(b * p, c)).reshape(b, p, -1).amax(dim=1).cpu())
    image_peak, erased_peak = torch.cat(peaks["image"]).numpy(), torch.cat(peaks["erased"]).numpy()  # [len(ids), W]
    where = {int(i): j for j, i in enumerate(ids)}
    survival = np.zeros(len(samples))
    for latent in np.flatnonzero(use.any(axis=1)):
        rows = [where[int(i)] for i in samples[latent][use[latent]]]
        before, after = image_peak[rows, latent], erased_peak[rows, latent]
        ratio = np.where(before > 0, np.clip(after / np.maximum(before, 1e-12), 0.0, 1.0), 0.0)
        survival[latent] = float(ratio.mean())
    return survival


def shortcut_audit(
    model: Any,
    sae: Any,
    stats: Any,
    dataset: Any,
    *,
    spatial_shape: Sequence[int],
    class_names: Sequence[str] | None = None,
    object_boxes: np.ndarray | None = None,
    images_per_class: int = 100,
    exemplars: int | None = None,
    verify: int = 20,
    tcav: int = 0,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = False,
) -> ShortcutAudit:
    """Rank the latents of ``sae`` by shortcut evidence (module docstring).

    ``stats``: :class:`~mechlens.sae.FeatureStatistics` of the SAE over a store captured from
    ``dataset`` (its sample ids index ``dataset``, which yields ``(image, label)``; images as the
    model takes them, pixels for a ``LoadedModel``). ``spatial_shape``: the layer's map (the store
    records it). ``object_boxes``: ``[N, 4]`` object boxes ``(x0, y0, x1, y1)`` in pixels per image
    of ``dataset`` when known (default: the dataset's own ``object_box`` if it has one; otherwise
    location concentration stands in). ``verify``: candidates whose causal effect is then measured
    by ablation. ``tcav``: run TCAV for the top this-many suspects (their exemplars as a concept)."""
    from tqdm.auto import tqdm

    spatial = tuple(int(s) for s in spatial_shape)
    if len(spatial) != 2:
        raise ValueError(f"the audit reads peak positions on a 2-d map; spatial_shape={spatial} (pooled or token "
                         "layers: pass the grid of patch tokens)")
    labels = _labels(dataset)
    if len(labels) <= int(np.max(stats.top_samples)):
        raise ValueError(f"the statistics name sample {int(np.max(stats.top_samples))} but the dataset has {len(labels)} "
                         "images: pass the dataset the store was captured from")
    classes = sorted(int(c) for c in np.unique(labels))
    names = list(class_names) if class_names is not None else list(getattr(dataset, "class_names", None) or [str(c) for c in classes])
    if object_boxes is None:
        object_boxes = getattr(dataset, "object_box", None)
    example = _image(dataset, 0)
    image_size = (int(example.shape[-2]), int(example.shape[-1]))
    k = int(exemplars or stats.top_k)
    samples, positions = stats.top_samples[:, :k], stats.top_positions[:, :k]
    valid = samples >= 0
    count = valid.sum(axis=1)
    safe = np.where(valid, samples, 0)
    # purity: the exemplars' majority class
    exemplar_labels = np.where(valid, labels[safe], -1)
    votes = np.stack([(exemplar_labels == c).sum(axis=1) for c in classes], axis=1)  # [W, classes]
    majority = np.asarray(classes)[votes.argmax(axis=1)]
    purity = np.where(count > 0, votes.max(axis=1) / np.maximum(count, 1), 0.0)
    # location concentration of the peak cells
    cells = max(1, spatial[0] * spatial[1])
    location = np.zeros(len(count))
    for latent in np.flatnonzero(count > 1):
        _, freq = np.unique(positions[latent][valid[latent]], return_counts=True)
        p = freq / freq.sum()
        entropy = float(-(p * np.log(p)).sum())
        location[latent] = 1.0 - entropy / math.log(min(cells, int(count[latent])))
    eligible = count >= max(2, k // 2)
    off_object = None
    if object_boxes is not None:
        off_object = _survival(model, sae, dataset, np.asarray(object_boxes), samples, valid & eligible[:, None],
                               batch_size=batch_size)
    # erasing the object is a causal test of "not the object"; where objects are unknown, the weaker
    # proxy: a feature that peaks in a few fixed places (centred objects score high on it too)
    spatial_score = location if off_object is None else off_object
    # causal: per class, the estimated drop of its logit on its images when each latent is zeroed
    rng = np.random.default_rng(seed)
    drops = np.zeros((len(count), max(classes) + 1))
    chosen_ids: dict[int, np.ndarray] = {}
    for c in tqdm(classes, desc="audit: causal effects", unit="class", disable=not progress):
        ids = np.flatnonzero(labels == c)
        ids = np.sort(rng.choice(ids, min(images_per_class, len(ids)), replace=False))
        chosen_ids[c] = ids
        images = torch.stack([_image(dataset, i) for i in ids])
        effects = attribution_patching(model, sae, images, f"class:{c}", batch_size=batch_size)
        drops[:, c] = -effects.effects
    own_drop = drops[np.arange(len(count)), majority]
    strongest = np.array([max(drops[eligible & (majority == c), c].max(initial=0.0), 1e-12) for c in range(drops.shape[1])])
    causal = np.clip(own_drop / strongest[majority], 0.0, 1.0)
    score = np.where(eligible, causal * purity * spatial_score, 0.0)
    # verify the strongest candidates by ablation (exact), then re-rank them
    exact: dict[int, float] = {}
    candidates = [int(i) for i in np.argsort(-score, kind="stable")[:verify] if score[i] > 0]
    for latent in tqdm(candidates, desc="audit: ablation", unit="latent", disable=not progress):
        c = int(majority[latent])
        images = torch.stack([_image(dataset, i) for i in chosen_ids[c]])
        measured = ablation_effects(model, sae, images, f"class:{c}", latents=[latent], batch_size=batch_size)
        exact[latent] = -float(measured.effects[0])
        causal[latent] = float(np.clip(exact[latent] / strongest[c], 0.0, 1.0))
        score[latent] = causal[latent] * purity[latent] * spatial_score[latent]
    order = [int(i) for i in np.argsort(-score, kind="stable") if eligible[i]]
    suspects = [Suspect(latent=i, class_index=int(majority[i]), class_name=str(names[int(majority[i])]) if int(majority[i]) < len(names) else str(int(majority[i])),
                        score=float(score[i]), causal=float(causal[i]), logit_drop=float(own_drop[i]),
                        logit_drop_exact=exact.get(i), purity=float(purity[i]), spatial=float(spatial_score[i]),
                        off_object=None if off_object is None else float(off_object[i]), location=float(location[i]),
                        frequency=float(stats.frequency[i]), exemplars=[int(s) for s in samples[i][valid[i]]],
                        positions=[int(p) for p in positions[i][valid[i]]], rank=rank + 1)
                for rank, i in enumerate(order)]
    if tcav:
        _tcav_evidence(model, sae, dataset, labels, suspects[:tcav], object_boxes=None if object_boxes is None
                       else np.asarray(object_boxes), seed=seed)
    return ShortcutAudit(layer=str(getattr(getattr(sae, "config", None), "layer", "") or stats.layer), suspects=suspects,
                         spatial_evidence="location" if off_object is None else "off_object",
                         images_per_class=images_per_class, spatial_shape=spatial, image_size=image_size,
                         class_names=[str(n) for n in names])


class _Erased(torch.utils.data.Dataset):
    """``dataset``'s images with the object erased (``(image, label)`` items)."""

    def __init__(self, dataset: Any, boxes: np.ndarray) -> None:
        self.dataset, self.boxes = dataset, boxes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.dataset[int(index)]
        return _erase(_image(self.dataset, index), self.boxes[int(index)]), int(item[1])


def _tcav_evidence(model: Any, sae: Any, dataset: Any, labels: np.ndarray, suspects: Sequence[Suspect], *,
                   object_boxes: np.ndarray | None, seed: int) -> None:
    """TCAV, at the SAE's layer and for each suspect's class, of the suspect's top exemplars as a
    concept against random images of other classes. With object boxes, both sides have the object
    erased, so the concept is what the exemplars share *besides* the object (the exemplars are
    images of the class itself, so with the object in, TCAV would measure the class)."""
    from mechlens.probes import ConceptSet, random_concept_sets, run_tcav

    layer = sae.config.layer
    source = dataset if object_boxes is None else _Erased(dataset, object_boxes)
    for suspect in suspects:
        concept_ids = suspect.exemplars
        if len(concept_ids) < 4:
            continue
        others = np.flatnonzero(labels != suspect.class_index)
        randoms = random_concept_sets(torch.utils.data.Subset(source, others.tolist()), 10, len(concept_ids), seed=seed)
        examples_ids = [int(i) for i in np.flatnonzero(labels == suspect.class_index) if int(i) not in set(concept_ids)][:30]
        if len(examples_ids) < 2:
            continue
        concept = ConceptSet.from_dataset(f"latent {suspect.latent}", source, concept_ids)
        examples = ConceptSet.from_dataset("examples", dataset, examples_ids)
        report = run_tcav(model, layers=layer, concepts=[concept], random_sets=randoms, examples=examples,
                          targets=[suspect.class_index], seed=seed)
        result = report.results[0]
        suspect.tcav_score = float(np.mean(result.scores))
        suspect.tcav_p = float(result.p_value)


class ChannelDictionary(torch.nn.Module):
    """The channels of ``layer`` as a dictionary with the SAE interface (``encode`` / ``decode`` are
    the identity), so the audit, attribution patching and ablation treat channel ``i`` as latent ``i``."""

    def __init__(self, layer: str, d_in: int, layout: str = "auto") -> None:
        super().__init__()
        import types

        self.config = types.SimpleNamespace(layer=layer, layout=layout, d_in=d_in, width=d_in, pooling="all")
        self.register_buffer("_device_anchor", torch.zeros(1))

    @property
    def width(self) -> int:
        return int(self.config.width)

    @property
    def d_in(self) -> int:
        return int(self.config.d_in)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z


def audit_store(
    model: Any,
    store: Any,
    *,
    sae: Any = None,
    channels: str | None = None,
    dataset: Any = None,
    stats: Any = None,
    exemplars: int = 8,
    progress: bool = False,
    **options: Any,
) -> ShortcutAudit:
    """:func:`shortcut_audit` of an SAE's latents (``sae=``) or a layer's channels
    (``channels="LAYER"``) over the images behind ``store``: the dataset the capture recorded
    (or ``dataset=``), the layer's map shape from the store, feature statistics computed unless
    given. ``options`` go to :func:`shortcut_audit`."""
    from activation_store import ActivationStore

    from mechlens.capture import captured_dataset
    from mechlens.sae import feature_statistics

    if (sae is None) == (channels is None):
        raise ValueError("audit an SAE (sae=) or a layer's channels (channels='LAYER'), one of the two")
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    if channels is not None:
        if channels not in store.layers:
            raise ValueError(f"layer {channels!r} is not in the store (layers: {', '.join(store.layers)})")
        meta = store[channels].spec.meta
        sae = ChannelDictionary(channels, store[channels].dim, layout=meta.get("layout") or "auto")
    layer = sae.config.layer
    if layer not in store.layers:
        raise ValueError(f"the SAE reads layer {layer!r}, which the store does not hold (layers: {', '.join(store.layers)})")
    meta = store[layer].spec.meta
    if meta.get("spatial") != "all":
        raise ValueError(f"layer {layer!r} was captured with spatial={meta.get('spatial')!r}; the audit needs every "
                         "position (capture with spatial='all')")
    if dataset is None:
        image_size = getattr(getattr(model, "preprocessing", None), "image_size", None)
        dataset = captured_dataset(store, image_size=image_size)
    if stats is None:
        stats = feature_statistics(sae, store, layer=layer, top_k=exemplars, progress=progress)
    return shortcut_audit(model, sae, stats, dataset, spatial_shape=meta["spatial_shape"], progress=progress, **options)
