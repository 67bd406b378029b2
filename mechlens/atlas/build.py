"""Build the feature atlas: a static site (no server, no CDN, works from ``file://``) that
publishes every feature of an SAE with its statistics, exemplars, visualization, attribution
and concept alignment.

Everything that scales with the number of features is batched: one forward pass per batch of
exemplar images serves every feature of a chunk that has them among its top-k (the SAE encodes
all positions once), histograms come from one encoded sample of store rows, logit effects from
one class-by-channel gradient matrix times the decoder, the overview map from one embedding of
the decoder directions; causal effects from one intervened forward per feature and batch (every
class read from it); feature visualizations and attributions a batch of features per
optimization / per call; pages are rendered from templates and images written with PIL. A
circuit found with :func:`mechlens.interventions.feature_circuit` is published beside the
features (``circuit.html``), drawn with the atlas's own images.

At scale: the published features are cut into chunks of ``chunk`` (in page order, the same
chunks whatever the number of ranks), the chunks dealt out round-robin to the ranks of a
torchrun job (:func:`mechlens._distributed.distributed_context`), each chunk's pages computed
together and written one by one, atomically (a temp file renamed over the target), each
finished by ``features/<id>.json`` (its record: the page's data, its files and the digest of the
build's settings). Rank 0 writes the index once every rank is done. A rerun skips every feature
whose record matches the settings and whose files are all there, so a killed build resumes where
it stopped; the settings are recorded in ``settings.json`` and a build under other settings
rebuilds every page (saying what changed) or refuses (``on_change="refuse"``).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
from torch import nn

from activation_store.jsonutil import dumps as json_dumps
from mechlens._distributed import DistContext, distributed_context
from mechlens.atlas.circuit import write_circuit_page
from mechlens.atlas.features import FeatureSet, sae_features
from mechlens.atlas.panels import (
    AtlasContext,
    AttributeFn,
    AttributionPanel,
    CausalEffectsPanel,
    ConceptsPanel,
    ExemplarsPanel,
    FeatvisPanel,
    HistogramPanel,
    LogitEffectsPanel,
    MapPanel,
    QuantilesPanel,
    SimilarPanel,
    Panel,
    VisualizeFn,
)
from mechlens.atlas.compute import _device, _embed_method, _map_svg, _write_text, logit_effects
from mechlens.engine import eval_mode, unwrap_with_preprocessing
from mechlens.models.loading import LoadedModel, Preprocessing

if TYPE_CHECKING:
    from mechlens.interventions import Circuit

__all__ = ["ATLAS_FORMAT", "AtlasResult", "build_atlas", "logit_effects"]

ATLAS_FORMAT = 2  # the layout of settings.json and the per-feature records (features/<id>.json)
ON_CHANGE = ("rebuild", "refuse")


@dataclass
class AtlasResult:
    """Where the atlas was written and what it holds. ``rendered``: the features whose pages this
    run wrote (every rank's), ``reused``: how many finished pages a resumed build kept; ``data``
    (what ``atlas.json`` holds) is filled on the main rank."""

    out: Path
    index: Path
    features: list[int]
    seconds: float
    map_method: str
    data: dict[str, Any] = field(repr=False, default_factory=dict)
    circuit: Path | None = None  # circuit.html, when a circuit was published
    rendered: list[int] = field(repr=False, default_factory=list)
    reused: int = 0
    ranks: int = 1


def _relative_model(name: str, out: Path) -> str:
    """The store's model name (``SPEC@FINGERPRINT``) with a local path in it made relative."""
    spec, at, fingerprint = name.rpartition("@") if "@" in name else (name, "", "")
    return (os.path.relpath(spec, out) if os.path.isabs(spec) else spec) + at + fingerprint


def _relative_spec(spec: str, out: Path) -> str:
    """``spec`` with an absolute path in it (``sae:/abs/sae:17``, ``cav:/abs/x.cav``) made relative
    to the atlas folder: a published site names no machine's absolute paths."""
    kind, sep, rest = spec.partition(":")
    if not sep:
        return spec
    path, colon, index = rest.rpartition(":") if kind == "sae" else (rest, "", "")
    if not os.path.isabs(path):
        return spec
    return f"{kind}:{os.path.relpath(path, out)}{colon}{index}"


def _on_main(dist: DistContext, compute: Callable[[], Any]) -> Any:
    """``compute()`` run on the main rank only and its result broadcast; its error is raised on
    every rank (the others are told, not left waiting for a result that never comes)."""
    outcome: tuple[str, Any] = ("ok", None)
    failure: Exception | None = None
    if dist.is_main:
        try:
            outcome = ("ok", compute())
        except Exception as error:  # noqa: BLE001 - re-raised on every rank below
            failure, outcome = error, ("error", (type(error), str(error)))
    kind, value = dist.broadcast_object(outcome)
    if failure is not None:
        raise failure
    if kind == "error":
        kind_of, message = value
        error_type = kind_of if isinstance(kind_of, type) and issubclass(kind_of, Exception) else RuntimeError
        raise error_type(f"(raised on the main rank) {message}")
    return value


def _digest(value: Any) -> str:
    return hashlib.sha256(json_dumps(value, sort_keys=True).encode()).hexdigest()[:32]


def _array_digest(*arrays: Any) -> str:
    digest = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(np.asarray(array))
        digest.update(f"{array.shape}{array.dtype};".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:32]


def _settings(*, features: FeatureSet, net: nn.Module, preprocessing: Any, store: Any, view: Any, stats: Any,
              dataset: Any, class_names: list[str], ids: np.ndarray, flagged: dict[int, str], panels: Sequence[Panel],
              title: str, seed: int, exemplars: int, out: Path) -> dict[str, Any]:
    """Everything a page's content depends on (not how fast it is made: ``chunk``, ``batch_size``
    and the number of ranks are left out, so a resumed build may use others)."""
    from mechlens.capture import model_fingerprint

    specs = [_relative_spec(features.spec(int(i)), out) for i in ids]
    return {
        "format": ATLAS_FORMAT,
        "features": {"kind": getattr(features, "kind", type(features).__name__), "title": features.title,
                     "layer": features.layer, "width": features.width, "weights": model_fingerprint(features),
                     "specs": _digest(specs)},
        "model": {"weights": model_fingerprint(net), "preprocessing": repr(preprocessing)},
        "store": {"model": str(store.manifest.model), "created": store.manifest.created, "layer": view.name,
                  "rows": int(view.num_rows), "chunks": int(view.num_chunks)},
        "statistics": _array_digest(stats.frequency, stats.mean, stats.mean_active, stats.max, stats.top_values,
                                    stats.top_samples, stats.top_positions, np.asarray([stats.rows])),
        "dataset": {"type": f"{type(dataset).__module__}.{type(dataset).__qualname__}", "length": len(dataset),
                    "spec": str(getattr(dataset, "spec", "") or "")},
        "class_names": list(class_names),
        "published": {"count": len(ids), "ids": _digest([int(i) for i in ids]),
                      "flagged": {str(k): v for k, v in flagged.items()}},
        "panels": [panel.settings() for panel in panels],
        "title": title, "seed": int(seed), "exemplars": int(exemplars),
    }


def _changes(old: Any, new: Any, path: str = "") -> list[str]:
    """Where two settings differ, as ``path (old -> new)`` (leaves) or ``path`` (structure)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changes(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        return [c for n, (a, b) in enumerate(zip(old, new)) for c in _changes(a, b, f"{path}[{n}]")]
    if old == new:
        return []
    plain = all(isinstance(v, (bool, int, float, str, type(None))) for v in (old, new))
    return [f"{path} ({old!r} -> {new!r})" if plain else path]


def _record_path(out: Path, feature: int) -> Path:
    return out / "features" / f"{feature}.json"


def _complete(out: Path, feature: int, digest: str) -> bool:
    """Whether the page of ``feature`` was finished under the settings ``digest``: its record
    names them and every file it lists is there."""
    try:
        record = json.loads(_record_path(out, feature).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(record, dict) or record.get("format") != ATLAS_FORMAT or record.get("settings") != digest:
        return False
    files = [record.get("html"), *record.get("assets", [])]
    return all(isinstance(f, str) and (out / f).is_file() and (out / f).stat().st_size > 0 for f in files)


def _clear(out: Path) -> None:
    """Remove what a build writes (pages, records, images, index), nothing else."""
    for pattern in ("features/*.html", "features/*.json", "img/*.png"):
        for path in out.glob(pattern):
            path.unlink(missing_ok=True)
    for name in ("atlas.json", "index.html", "circuit.html", "circuit.json"):
        (out / name).unlink(missing_ok=True)


def _plan(out: Path, settings: dict[str, Any], ids: np.ndarray, chunk: int, resume: bool, on_change: str
          ) -> dict[str, Any]:
    """On the main rank: check ``out``, settle what stale pages become, record the settings and
    list, per chunk, the features whose pages are still to write."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; choose a directory for the atlas")
    if out.exists() and any(out.iterdir()) and not ((out / "atlas.json").exists() or (out / "settings.json").exists()):
        raise FileExistsError(f"{out} is a non-empty directory that is not an atlas; choose a new path")
    settings = json.loads(json_dumps(settings))  # as the record holds them (tuples as lists), to compare like with like
    digest = _digest(settings)
    previous: Any = None
    if (out / "settings.json").exists():
        try:
            previous = json.loads((out / "settings.json").read_text())
        except (OSError, ValueError):
            previous = None
        if not isinstance(previous, dict):
            previous = {"digest": None, "settings": {}}  # unreadable: nothing in it can vouch for a page
    if previous is not None and previous.get("digest") != digest:
        changed = _changes(previous.get("settings") or {}, settings) or ["the settings record"]
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        if on_change == "refuse":
            raise ValueError(f"{out} holds an atlas built with other settings (changed: {shown}); pass "
                             "on_change='rebuild' to discard its pages, or choose a new path")
        warnings.warn(f"atlas at {out}: the settings changed since its pages were written ({shown}); "
                      "discarding them and rebuilding every page", stacklevel=2)
        _clear(out)
    elif not resume:
        _clear(out)
    for sub in ("features", "img", "static"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for leftover in [*out.glob("features/.*.tmp-*"), *out.glob("img/.*.tmp-*"), *out.glob(".*.tmp-*"),
                     *out.glob("static/.*.tmp-*")]:
        leftover.unlink(missing_ok=True)  # what a killed build was writing (never renamed into place)
    (out / "atlas.json").unlink(missing_ok=True)  # the index is rewritten once every page is done
    _write_text(out / "settings.json", json_dumps({"format": ATLAS_FORMAT, "digest": digest, "settings": settings},
                                                   indent=1))
    pending = []
    for start in range(0, len(ids), chunk):
        todo = [int(i) for i in ids[start:start + chunk] if not _complete(out, int(i), digest)]
        if todo:
            pending.append(todo)
    return {"digest": digest, "pending": pending, "reused": len(ids) - sum(len(t) for t in pending)}


def build_atlas(
    sae: Any,
    store: Any,
    model: LoadedModel | nn.Module,
    out: str | os.PathLike,
    *,
    dataset: Any = None,
    stats: Any = None,
    class_names: Sequence[str] | None = None,
    cavs: Sequence[Any] = (),
    visualize: VisualizeFn | None = None,
    attribute: AttributeFn | None = None,
    panels: Sequence[Panel] | None = None,
    max_features: int | None = None,
    exemplars: int = 8,
    histogram_rows: int = 20000,
    effect_images: int = 64,
    causal: bool = True,
    causal_images: int = 64,
    circuit: Circuit | None = None,
    flagged: Mapping[int, str] | None = None,
    title: str | None = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
    chunk: int = 256,
    resume: bool = True,
    on_change: str = "rebuild",
    dist: DistContext | None = None,
    on_page: Callable[[int], Any] | None = None,
) -> AtlasResult:
    """Write the atlas of a feature set to ``out``: one page per feature that fires, made of panels.

    ``sae``: what to publish — an :class:`mechlens.sae.SAE` or its directory (its latents), or any
    :class:`~mechlens.atlas.FeatureSet` (:func:`~mechlens.atlas.channel_features` for the
    channels of a layer, :func:`~mechlens.atlas.direction_features` for CAV directions).
    ``store``: the activation store (path or :class:`ActivationStore`) holding the feature set's
    layer; ``dataset``: the images behind the store's sample ids (default: rebuilt from the spec
    the capture job recorded); ``stats``: :class:`mechlens.sae.FeatureStatistics` (loaded from the
    SAE directory or computed). ``panels``: the page's panels (default: exemplars, histogram,
    logit effects, causal effects unless ``causal=False``, the overview map, concept alignment with
    ``cavs``, feature visualizations with ``visualize(ids) -> images`` and attribution overlays with
    ``attribute(id, images) -> {method: maps}`` when given). Features that never fire are left out.

    ``effect_images`` / ``causal_images``: how many of the dataset's first images the logit
    effects / the ablations (:class:`~mechlens.atlas.CausalEffectsPanel`: one forward per feature
    over them) are measured on. ``circuit``: a :class:`mechlens.interventions.Circuit` to publish as
    ``circuit.html`` (linked from the index), its nodes that are latents of this atlas drawn with
    their exemplar or visualization and linked to their pages. ``flagged``: feature id -> a badge
    (``{17: "ruler"}``): published first whatever ``max_features`` leaves out, badged on the index
    and on their pages (what a report points at).

    Scale (see the module docstring): ``chunk`` features are computed together (a batch of
    visualizations, of attributions...); under torchrun (or with ``dist``, a
    :class:`~mechlens._distributed.DistContext`) every rank calls this with the same arguments and
    computes its share of the chunks. ``resume``: keep the finished pages of an earlier build with
    the same settings (``False``: rebuild all); ``on_change``: what to do with pages written under
    other settings, ``"rebuild"`` (warn and discard them) or ``"refuse"`` (raise). ``on_page(id)``
    runs after each page is finished (raise to stop: the pages written so far are kept).
    """
    if circuit is not None and not (hasattr(circuit, "to_svg") and hasattr(circuit, "nodes")):
        raise TypeError(f"circuit must be a mechlens.interventions.Circuit, got {type(circuit).__name__}")
    if isinstance(chunk, bool) or not isinstance(chunk, (int, np.integer)) or chunk < 1:
        raise ValueError(f"chunk must be a positive number of features computed together, got {chunk!r}")
    if on_change not in ON_CHANGE:
        raise ValueError(f"on_change must be one of {', '.join(map(repr, ON_CHANGE))}, got {on_change!r}")
    if on_page is not None and not callable(on_page):
        raise TypeError(f"on_page must be a callable taking a feature id, got {type(on_page).__name__}")
    if dist is not None and not isinstance(dist, DistContext):
        raise TypeError(f"dist must be a mechlens._distributed.DistContext (distributed_context()), got {type(dist).__name__}")
    if dist is not None and dist.world_size > 1 and not dist.active:
        raise ValueError(f"dist names {dist.world_size} ranks but no process group is joined: pass "
                         "mechlens._distributed.distributed_context() from inside torchrun, or leave dist out")
    own = dist is None
    dist = distributed_context() if dist is None else dist
    try:
        return _build(sae, store, model, Path(out), dist=dist, dataset=dataset, stats=stats, class_names=class_names,
                      cavs=cavs, visualize=visualize, attribute=attribute, panels=panels, max_features=max_features,
                      exemplars=exemplars, histogram_rows=histogram_rows, effect_images=effect_images, causal=causal,
                      causal_images=causal_images, circuit=circuit, flagged=flagged, title=title, seed=seed,
                      batch_size=batch_size, progress=progress, chunk=int(chunk), resume=resume, on_change=on_change,
                      on_page=on_page)
    finally:
        if own:
            dist.close()


def _build(sae: Any, store: Any, model: Any, out: Path, *, dist: DistContext, dataset: Any, stats: Any,
           class_names: Sequence[str] | None, cavs: Sequence[Any], visualize: VisualizeFn | None,
           attribute: AttributeFn | None, panels: Sequence[Panel] | None, max_features: int | None, exemplars: int,
           histogram_rows: int, effect_images: int, causal: bool, causal_images: int, circuit: Any,
           flagged: Mapping[int, str] | None, title: str | None, seed: int, batch_size: int, progress: bool,
           chunk: int, resume: bool, on_change: str, on_page: Callable[[int], Any] | None) -> AtlasResult:
    from jinja2 import Environment
    from markupsafe import Markup
    from tqdm.auto import tqdm

    from activation_store import ActivationStore
    from mechlens.atlas import templates
    from mechlens.capture import captured_dataset
    from mechlens.sae import SAE, FeatureStatistics, feature_statistics

    started = time.perf_counter()
    source_dir = None
    if not isinstance(sae, nn.Module):
        source_dir = Path(sae)
        sae = SAE.load(source_dir)
    features = sae if isinstance(sae, FeatureSet) else sae_features(sae, str(source_dir or ""))
    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    layer = features.layer or (stats.layer if stats is not None else None)
    if layer is None or layer not in store.layers:
        raise ValueError(f"the features' layer {layer!r} is not in the store (layers: {', '.join(store.layers)})")
    view = store[layer]
    if view.dim != features.d_in:
        raise ValueError(f"layer {layer!r} has rows of width {view.dim}, but the features read {features.d_in}")
    net, preprocessing = unwrap_with_preprocessing(model)
    device = _device(net)
    features = features.to(device).eval()
    talk = progress and dist.is_main
    if stats is None:
        if source_dir is not None and (source_dir / "feature_stats.json").exists():
            stats = FeatureStatistics.load(source_dir)
        else:  # every rank calls it: under torchrun it shares the pass out (mechlens.sae.stats)
            stats = feature_statistics(features, store, layer=layer, top_k=exemplars, progress=talk)
    if dataset is None:
        # the capture's own spec and policies, so the rebuilt dataset has the same files under the same ids
        dataset = captured_dataset(store, image_size=preprocessing.image_size if preprocessing is not None else None)
    if class_names is None:
        class_names = list(getattr(dataset, "class_names", []) or [])

    alive = np.flatnonzero(stats.frequency > 0)
    order = alive[np.argsort(-stats.frequency[alive], kind="stable")]
    ids = order[:max_features] if max_features else order
    flagged = {int(k): str(v) for k, v in (flagged or {}).items()}
    silent = [i for i in flagged if i not in set(alive.tolist())]
    if silent:
        raise ValueError(f"flagged feature(s) {silent[:5]} never fire on the store's rows: no page can show them")
    # flagged features first (a report points at them), whatever max_features leaves out
    ids = np.asarray([*flagged, *[int(i) for i in ids if int(i) not in flagged]], dtype=np.int64)
    if len(ids) == 0:
        raise ValueError("no feature of this set fires on the store's rows; there is nothing to publish")
    if panels is None:
        panels = [ExemplarsPanel(), QuantilesPanel(), HistogramPanel(histogram_rows), LogitEffectsPanel(effect_images)]
        if causal:
            panels.append(CausalEffectsPanel(causal_images))
        panels += [MapPanel(), SimilarPanel(), ConceptsPanel(cavs)]
        if visualize is not None:
            panels.append(FeatvisPanel(visualize))
        if attribute is not None:
            panels.append(AttributionPanel(attribute))
    panels = list(panels)
    title = title or (f"Feature atlas: {sae.width}-latent SAE on {layer}" if not isinstance(sae, FeatureSet)
                      else f"Feature atlas: {features.title}")

    plan = _on_main(dist, lambda: _plan(out, _settings(
        features=features, net=net, preprocessing=preprocessing, store=store, view=view, stats=stats, dataset=dataset,
        class_names=list(class_names), ids=ids, flagged=flagged, panels=panels, title=title, seed=seed,
        exemplars=exemplars, out=out), ids, chunk, resume, on_change))
    digest = plan["digest"]
    # chunks still to do, dealt out round-robin: disjoint, and the same on every rank
    mine = [todo for n, todo in enumerate(plan["pending"]) if n % dist.world_size == dist.rank]
    ctx = AtlasContext(features=features, ids=np.asarray([i for todo in mine for i in todo], dtype=np.int64),
                       stats=stats, model=model, net=net, preprocessing=preprocessing, device=device, view=view,
                       dataset=dataset, class_names=list(class_names), out=out, exemplars=exemplars,
                       batch_size=batch_size, seed=seed, progress=talk, all_ids=ids, dist=dist)
    env = Environment(autoescape=True)
    frame = env.from_string(templates.FEATURE)
    blocks = [env.from_string(panel.template) for panel in panels if panel.template]
    id_list = [int(i) for i in ids]
    position = {i: n for n, i in enumerate(id_list)}

    def blank(i: int) -> dict[str, Any]:
        return {
            "id": i, "spec": _relative_spec(features.spec(i), out), "frequency": float(stats.frequency[i]),
            "mean": float(stats.mean[i]),
            "mean_active": float(stats.mean_active[i]), "max": float(stats.max[i]), "exemplars": [], "top_classes": [],
            "logit_up": [], "logit_down": [], "concepts": [], "concept": None, "concept_cos": None, "has_vis": False,
            "histogram": [], "histogram_max": 0.0, "map": [float(position[i]), 0.0], "attributions": [], "causal": None,
            "flag": flagged.get(i),
        }

    def commit(page: dict[str, Any]) -> None:
        i, n = int(page["id"]), position[int(page["id"])]
        body = "\n".join(block.render(f=page) for block in blocks)
        html = frame.render(f=page, body=Markup(body), title=title, layer=layer, rows=stats.rows,
                            prev_id=id_list[n - 1] if n else None,
                            next_id=id_list[n + 1] if n + 1 < len(id_list) else None)
        _write_text(out / "features" / f"{i}.html", html)
        record = {"format": ATLAS_FORMAT, "settings": digest, "html": f"features/{i}.html",
                  "assets": sorted(set(ctx.assets.get(i, []))),
                  "page": {k: v for k, v in page.items() if k != "histogram_svg"}}
        _write_text(_record_path(out, i), json_dumps(record))  # last: the page is finished

    rendered: list[int] = []
    failure: Exception | None = None
    if plan["pending"]:
        try:
            with eval_mode(net):
                for panel in panels:
                    panel.prepare(ctx)
                ctx.progress = False  # one bar for the pages, not one per panel and chunk
                with tqdm(total=len(ctx.ids), unit="page", disable=not talk,
                          desc="atlas pages" + (f" (rank 0 of {dist.world_size})" if dist.world_size > 1 else "")) as bar:
                    for todo in mine:
                        ctx.ids, ctx.assets = np.asarray(todo, dtype=np.int64), {}
                        ctx.shared.pop("images_u8", None)
                        pages = [blank(i) for i in todo]
                        for panel in panels:
                            panel.compute(ctx, pages)
                        for page in pages:
                            commit(page)
                            rendered.append(int(page["id"]))
                            bar.update(1)
                            if on_page is not None:
                                on_page(int(page["id"]))
        except Exception as error:  # noqa: BLE001 - every rank learns of it below, then it is raised
            failure = error
    outcomes = dist.all_gather_object((None if failure is None else f"{type(failure).__name__}: {failure}", rendered))
    if failure is not None:
        raise failure
    failed = [(rank, message) for rank, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"rank {rank} of the atlas build failed ({message}); the pages written so far are kept: "
                           "rerun the build to resume")
    rendered_all = sorted((i for _, done in outcomes for i in done), key=position.__getitem__)

    map_method = _embed_method(len(id_list)) if any(isinstance(p, MapPanel) for p in panels) else "index"

    def write_index() -> tuple[dict[str, Any], bool]:
        pages = []
        for i in id_list:
            try:
                pages.append(json.loads(_record_path(out, i).read_text())["page"])
            except (OSError, ValueError, KeyError):
                raise RuntimeError(f"the page of feature {i} is not finished ({_record_path(out, i)} is missing or "
                                   "unreadable): rerun the build to resume") from None
        published = None
        if circuit is not None:
            published = write_circuit_page(out, circuit, features, pages, env=env, title=title,
                                           class_names=list(class_names))
        else:  # a rebuild without a circuit leaves no stale one behind
            for stale in ("circuit.html", "circuit.json"):
                (out / stale).unlink(missing_ok=True)
        coords = np.asarray([p["map"] for p in pages], dtype=float)
        summary = [("features", features.title), ("store", os.path.relpath(store.root, out)),
                   ("rows", f"{stats.rows:,}"),
                   ("features published", f"{len(pages)} of {features.width} ({features.width - len(alive)} never fire)"),
                   ("panels", ", ".join(panel.name for panel in panels))]
        index_html = env.from_string(templates.INDEX).render(
            title=title, subtitle=f"model {_relative_model(str(store.manifest.model), out)}", summary=summary,
            features=pages,
            map_svg=_map_svg(coords, id_list, np.asarray([p["frequency"] for p in pages]),
                             groups=[p["top_classes"][0]["name"] if p["top_classes"] else "none" for p in pages]),
            map_method=map_method, circuit=published)
        _write_text(out / "index.html", index_html)
        _write_text(out / "static" / "atlas.css", templates.CSS)
        _write_text(out / "static" / "atlas.js", templates.SORT_JS)
        data = {"layer": layer, "width": features.width, "rows": stats.rows, "class_names": list(class_names),
                "map_method": map_method, "panels": [panel.name for panel in panels], "features": pages,
                "circuit": published}
        _write_text(out / "atlas.json", json_dumps(data))
        return data, published is not None

    kept: dict[str, Any] = {}

    def index_on_main() -> bool:  # only whether a circuit was published travels to the other ranks
        kept["data"], has = write_index()
        return has

    has_circuit = _on_main(dist, index_on_main)
    data = kept.get("data", {})
    return AtlasResult(out=out, index=out / "index.html", features=id_list, seconds=time.perf_counter() - started,
                       map_method=map_method, data=data, circuit=out / "circuit.html" if has_circuit else None,
                       rendered=rendered_all, reused=int(plan["reused"]), ranks=dist.world_size)
