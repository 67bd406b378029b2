"""Which attribution methods to trust on *this* model: one report of the sanity checks and the
faithfulness metrics of many methods (``mechlens evaluate`` writes it).

No single attribution method should be trusted in isolation: corroborate every claim with at
least two methods, prefer the ones that pass the model-parameter randomization check (Adebayo et
al.), and when a gradient method and a forward-only one (occlusion) disagree, suspect the
gradient. :func:`evaluate_methods` measures, per method, on one model and one batch of images:

* ``randomization``: the cascading randomization check (:func:`randomization_check`); it
  *passes* when the maps' mean Spearman correlation with the trained model's stays below 0.5 at
  every step, *fails* at 0.6 or more at some step, else is inconclusive (the thresholds the
  registry's ``randomization`` notes were measured with);
* ``deletion`` / ``insertion``: the AUCs of the pixel-flipping curves (:func:`deletion_curve`) and
  of a random map on the same images. A method is *faithful* when its insertion AUC exceeds its
  deletion AUC by more than the random map's do (``ins_minus_del`` against
  ``ins_minus_del_random``), tested over the images: a one-sided Wilcoxon signed-rank test of
  each image's gain over the random map at level :data:`FAITHFUL_ALPHA` (``faithful_p``; a
  map no better than random is called faithful at most that often, shown by
  ``benchmarks/report_calibration.py``). Not significant: ``faithful`` is False when the mean
  gain is not positive and None (not established) otherwise; either way not *trust*. A random
  order deletes and inserts symmetrically (deleting a fraction
  t is inserting 1 - t), so its gap is about 0. "Deletes faster than random" alone is not used:
  deleting random pixels makes the images out of distribution faster than deleting a blob does
  (measured on the shapes CNN: Grad-CAM's and occlusion's deletion AUCs were *above* a random
  map's while their insertion AUCs were far better);
* ``localization`` (only with ``masks``): pointing game and IoU against the masks;
* ``stability``: Spearman correlation of the maps under 2-pixel shifts;
* ``agreement``: the Spearman correlation of each pair of methods' |maps| pooled to a common 8x8
  grid (methods differ in resolution: pixels, occlusion windows, CAM cells), so each method knows
  which others corroborate it (``agrees_with``: 0.5 or more; independent maps score 0 +- 0.16
  per image).

**Checks are plain functions** ``check(ctx, method) -> {column: value}`` in :data:`CHECKS`;
adding a metric to the report is one line, e.g.
``CHECKS["road"] = lambda ctx, m: {"road_auc": float(road(ctx.model, ctx.images, ctx.target, ctx.attribution(m)).auc.mean())}``.
The verdict reads the columns named above and ignores the others (they are reported).

Two heavier checks are opt-in (:data:`OPTIONAL_CHECKS`: in :data:`CHECKS`, not in the default run;
ask for them with ``checks=[..., "manipulation", "roar"]``):

* ``manipulation``: :func:`mechlens.evaluation.manipulation.manipulation_check`, run once per
  report: fine-tune a copy of the model so that the maps of the attacked method(s)
  (``manipulation_attack``; default ``gradcam`` when it is among the methods, else the first
  attackable one) move into the image border while the predictions stay, then measure how far
  *every* method's maps moved (``manipulation_mass_gain``, ``manipulation_spearman``,
  ``manipulation_moved``, ``manipulation_preserved``: the predictions were kept). Maps that such a
  fine-tune moves say how the function is computed more than what it uses (Heo et al. 2019);
* ``roar``: :func:`mechlens.evaluation.roar.roar` on ``roar_data=(train, test)``, retraining with
  ``roar_recipe`` (default :meth:`RetrainRecipe.from_model`: a re-initialised copy of the model),
  all methods at once, cached and resumable under ``cache_dir``: ``roar_accuracy`` (mean test
  accuracy over ``roar_fractions`` after removing each method's top pixels and retraining),
  ``roar_random_accuracy`` (a random ranking), ``roar_drop`` / ``roar_random_drop`` (from the
  unmodified data) and ``roar_faithful``: True when its accuracy is below the random ranking's
  by a one-sided two-proportion test at 0.05 (``roar_gap_p``; the test images' sampling only,
  not the retraining's noise), False when it is not below at all, None otherwise and when the
  retrain on the unmodified data does not beat the majority class (``roar_chance_p``).

Verdicts: ``trust`` (passes the randomization check, is faithful, and agrees with another method
that passes; and, when those checks ran, is not moved by a fine-tune that kept the predictions and
is faithful under ROAR), ``use with care`` (passes, but is not faithful, not corroborated, moved by
the manipulation or no better than random under ROAR: the reasons say which), ``do not trust``
(fails the randomization check: its maps show the image more than the model).
"""
from __future__ import annotations

import csv
import html
import io
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from mechlens.attribution.base import Attribution, MethodInfo, Target, attribute, get_method, pixel_space, resolve_target
from mechlens.attribution.layers import suggest_cam_layer
from mechlens.evaluation.faithfulness import deletion_curve, insertion_curve, localization_iou, pointing_game, random_maps
from mechlens.evaluation.metrics import faithfulness_correlation, max_sensitivity, relevance_mass_accuracy, sparseness
from mechlens.evaluation.randomization import randomization_check
from mechlens.evaluation.similarity import spearman
from mechlens.evaluation.stability import attribution_stability

__all__ = ["CHECKS", "OPTIONAL_CHECKS", "Check", "CheckContext", "MethodReport", "default_attack", "evaluate_methods",
           "map_agreement", "VERDICTS"]

VERDICTS = ("trust", "use with care", "do not trust")
PASS_BELOW, FAIL_AT = 0.5, 0.6  # the registry's randomization thresholds (mechlens.attribution.base.MethodInfo)
COLUMNS = ("method", "family", "verdict", "randomization", "randomization_rho", "faithful", "faithful_p",
           "ins_minus_del", "ins_minus_del_random", "deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
           "agreement", "agrees_with",
           "pointing_game", "pointing_chance", "iou", "stability",
           "manipulation_moved", "manipulation_preserved", "manipulation_attacked", "manipulation_mass_gain",
           "manipulation_spearman", "roar_faithful", "roar_gap_p", "roar_accuracy", "roar_random_accuracy", "roar_drop",
           "roar_random_drop", "roar_unmodified_accuracy", "roar_chance_p", "registry_randomization", "seconds", "reasons")
FAITHFUL_ALPHA = 0.05  # level of the one-sided test that a map beats a random one (faithfulness_test)
ROAR_CHANCE_ALPHA = 0.05  # the unmodified retrain must beat the majority class at this level (binomial test)
MANIPULATION_REASON = "maps moved by a fine-tune that kept the predictions (Heo et al. 2019)"


# ---------------------------------------------------------------------------- the checks
@dataclass
class CheckContext:
    """What a check sees: the model (as given: ``nn.Module`` or ``LoadedModel``), the images
    (pixels), the target resolved once on the model, the CAM ``layer``, optional ``masks``
    ``[B, H, W]``, the ``seed``, per-method keyword arguments, the report's ``methods``, the
    settings of the opt-in checks (``manipulation_*``, ``roar_*``, ``cache_dir``) and a scratch
    ``cache`` shared by the checks (e.g. the random map's curves, the one manipulation run)."""

    model: Any
    images: torch.Tensor
    target: Target
    layer: str | None = None
    masks: torch.Tensor | None = None
    seed: int = 0
    method_kwargs: dict[str, dict[str, Any]] = field(default_factory=dict)
    deletion_steps: int = 16
    deletion_baseline: Any = "zeros"
    randomization_layers: Sequence[str] | None = None
    methods: list[str] = field(default_factory=list)
    manipulation_attack: list[str] | None = None
    manipulation_options: dict[str, Any] = field(default_factory=dict)
    roar_data: tuple[Any, Any] | None = None
    roar_recipe: Any = None
    roar_fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9)
    cache_dir: Any = None
    user_target: Any = None
    progress: bool = False
    cache: dict[str, Any] = field(default_factory=dict)
    details: dict[str, dict[str, Any]] = field(default_factory=dict)
    _attributions: dict[str, Attribution] = field(default_factory=dict)

    def kwargs(self, method: str) -> dict[str, Any]:
        """The keyword arguments ``method`` runs with (the CAM layer for methods that need one)."""
        info = get_method(method)
        out = dict(self.method_kwargs.get(info.name, {}))
        if info.needs_layer and "layer" not in out:
            out["layer"] = self.layer
        return out

    def attribution(self, method: str) -> Attribution:
        """The method's maps of the images (computed once, shared by the checks)."""
        name = get_method(method).name
        if name not in self._attributions:
            self._attributions[name] = attribute(self.model, self.images, self.target, method=name, **self.kwargs(name))
        return self._attributions[name]

    def keep(self, method: str, check: str, value: Any) -> None:
        """Keep a check's full result (curves, per-layer similarities) for plots and JSON."""
        self.details.setdefault(get_method(method).name, {})[check] = value


Check = Callable[[CheckContext, str], Mapping[str, Any]]


def check_randomization(ctx: CheckContext, method: str) -> dict[str, Any]:
    result = randomization_check(ctx.model, ctx.images, ctx.target, method, seed=ctx.seed, keep_maps=False,
                                 layers=ctx.randomization_layers, method_kwargs=ctx.kwargs(method))
    ctx.keep(method, "randomization", result)
    curve = result.mean_spearman()
    finite = curve[~curve.isnan()]
    if finite.numel() == 0:
        return {"randomization": "inconclusive", "randomization_rho": float("nan")}
    rho = float(finite.max())
    status = "passes" if rho < PASS_BELOW else "fails" if rho >= FAIL_AT else "inconclusive"
    return {"randomization": status, "randomization_rho": rho}


def _random_curves(ctx: CheckContext) -> tuple[Any, Any]:
    if "random_curves" not in ctx.cache:
        maps = random_maps((ctx.images.shape[0], *ctx.images.shape[-2:]), seed=ctx.seed)
        kw = dict(steps=ctx.deletion_steps, baseline=ctx.deletion_baseline, seed=ctx.seed)
        ctx.cache["random_curves"] = (deletion_curve(ctx.model, ctx.images, ctx.target, maps, **kw),
                                      insertion_curve(ctx.model, ctx.images, ctx.target, maps, **kw))
    return ctx.cache["random_curves"]


def faithfulness_test(deletion: Any, insertion: Any, random_deletion: Any, random_insertion: Any
                      ) -> tuple[bool | None, float]:
    """``(faithful, p)``: one-sided Wilcoxon signed-rank test, over the images, that a map's
    insertion - deletion AUC gain exceeds a random map's on the same images (curves from
    :func:`deletion_curve` / :func:`insertion_curve`). ``faithful``: True when ``p`` <
    :data:`FAITHFUL_ALPHA`, False when the mean gain is not positive, None (not established)
    otherwise."""
    from scipy.stats import wilcoxon

    gain = ((insertion.auc - deletion.auc) - (random_insertion.auc - random_deletion.auc)).double().cpu().numpy()
    gain = gain[np.isfinite(gain)]
    p = float(wilcoxon(gain, alternative="greater").pvalue) if np.any(gain != 0) else 1.0
    if p < FAITHFUL_ALPHA:
        return True, p
    return (False if gain.size == 0 or gain.mean() <= 0 else None), p


def check_deletion(ctx: CheckContext, method: str) -> dict[str, Any]:
    curve = deletion_curve(ctx.model, ctx.images, ctx.target, ctx.attribution(method), steps=ctx.deletion_steps,
                           baseline=ctx.deletion_baseline, seed=ctx.seed)
    ctx.keep(method, "deletion", curve)
    return {"deletion_auc": curve.mean_auc, "deletion_auc_random": _random_curves(ctx)[0].mean_auc}


def check_insertion(ctx: CheckContext, method: str) -> dict[str, Any]:
    curve = insertion_curve(ctx.model, ctx.images, ctx.target, ctx.attribution(method), steps=ctx.deletion_steps,
                            baseline=ctx.deletion_baseline, seed=ctx.seed)
    ctx.keep(method, "insertion", curve)
    return {"insertion_auc": curve.mean_auc, "insertion_auc_random": _random_curves(ctx)[1].mean_auc}


def check_localization(ctx: CheckContext, method: str) -> dict[str, Any]:
    if ctx.masks is None:
        return {}
    points = pointing_game(ctx.attribution(method), ctx.masks)
    return {"pointing_game": points.rate, "pointing_chance": points.chance_rate,
            "iou": float(localization_iou(ctx.attribution(method), ctx.masks).mean())}


def check_stability(ctx: CheckContext, method: str) -> dict[str, Any]:
    result = attribution_stability(ctx.model, ctx.images, ctx.target, method, seed=ctx.seed, **ctx.kwargs(method))
    return {"stability": result.mean}


def check_faithfulness_correlation(ctx: CheckContext, method: str) -> dict[str, Any]:
    result = faithfulness_correlation(ctx.model, ctx.images, ctx.target, ctx.attribution(method), seed=ctx.seed,
                                      subset_size=max(1, min(224, ctx.images.shape[-1] * ctx.images.shape[-2] // 8)))
    return {"faithfulness_corr": result.mean}


def check_max_sensitivity(ctx: CheckContext, method: str) -> dict[str, Any]:
    # 5 draws (Captum's default is 10): a robustness indication at half the cost, per method
    result = max_sensitivity(ctx.model, ctx.images, ctx.target, method, n_perturb_samples=5, seed=ctx.seed,
                             **ctx.kwargs(method))
    return {"max_sensitivity": result.mean}


def check_sparseness(ctx: CheckContext, method: str) -> dict[str, Any]:
    return {"sparseness": sparseness(ctx.attribution(method).heatmap()).mean}


def check_relevance_mass(ctx: CheckContext, method: str) -> dict[str, Any]:
    if ctx.masks is None:
        return {}
    heat = ctx.attribution(method).heatmap(tuple(ctx.masks.shape[-2:]))
    return {"relevance_mass": relevance_mass_accuracy(heat, ctx.masks, absolute=True).mean}


def _report_methods(ctx: CheckContext, method: str) -> list[str]:
    return list(ctx.methods) or [get_method(method).name]


def _manipulation(ctx: CheckContext, method: str) -> Any:
    """The one manipulation run of the report (every method measured on the same fine-tuned copy)."""
    if "manipulation" not in ctx.cache:
        from mechlens.evaluation.manipulation import manipulation_check

        methods = _report_methods(ctx, method)
        attack = ctx.manipulation_attack or default_attack(methods)
        target = _class_target(ctx)
        ctx.cache["manipulation"] = manipulation_check(
            ctx.model, ctx.images, target, methods=methods, attack=attack, layer=ctx.layer,
            method_kwargs={m: ctx.kwargs(m) for m in methods}, progress=ctx.progress,
            **({} if "manipulated" in ctx.manipulation_options else {"seed": ctx.seed}), **ctx.manipulation_options)
        ctx.details.setdefault("(manipulation)", {})["manipulation"] = ctx.cache["manipulation"]
    return ctx.cache["manipulation"]


def _class_target(ctx: CheckContext) -> Any:
    """The report's target as the manipulation takes it: ``None`` (the predicted class) or class
    indices (it attacks and keeps class logits, not other features)."""
    if ctx.user_target is None:
        return None
    from mechlens.features.base import ClassLogit

    features = [ctx.target.features[int(i)] for i in ctx.target.index]
    if not all(isinstance(f, ClassLogit) for f in features):
        raise ValueError(f"the manipulation check attacks class logits; the report's target "
                         f"({', '.join(sorted(set(ctx.target.names)))}) is not a class: use target=None or class:N")
    indices = [f.index for f in features]
    return indices[0] if len(set(indices)) == 1 else torch.tensor(indices)


def check_manipulation(ctx: CheckContext, method: str) -> dict[str, Any]:
    result = _manipulation(ctx, method)
    row = result.row(method)
    return {"manipulation_moved": bool(row["moved"]), "manipulation_preserved": bool(result.preserved),
            "manipulation_attacked": get_method(method).name in result.attacked,
            "manipulation_mass_gain": float(row["mass_gain"]), "manipulation_spearman": float(row["spearman"])}


def _roar(ctx: CheckContext, method: str) -> Any:
    """The one ROAR run of the report (all methods and the random control; cached under ``cache_dir``)."""
    if "roar" not in ctx.cache:
        from mechlens.evaluation.roar import RetrainRecipe, roar

        if ctx.roar_data is None:
            raise ValueError("the roar check retrains on labelled images: pass roar_data=(train, test), datasets of "
                             "(image, label) or (images, labels) tensors")
        recipe = ctx.roar_recipe if ctx.roar_recipe is not None else RetrainRecipe.from_model(ctx.model,
                                                                                              model_seed=ctx.seed)
        methods = _report_methods(ctx, method)
        train, test = ctx.roar_data
        ctx.cache["roar"] = roar(ctx.model, train, test, methods, recipe=recipe, fractions=ctx.roar_fractions,
                                 method_kwargs={m: ctx.kwargs(m) for m in methods if ctx.kwargs(m)},
                                 cache_dir=ctx.cache_dir, seed=ctx.seed, progress=ctx.progress)
        ctx.details.setdefault("(roar)", {})["roar"] = ctx.cache["roar"]
    return ctx.cache["roar"]


def _roar_gap_p(accuracy: float, random_accuracy: float, n: int) -> float:
    """One-sided p-value that the method's mean ROAR accuracy is below the random ranking's, by a
    two-proportion z-test on ``n`` test images per arm. It treats the mean over fractions as one
    proportion (its variance is at most a single fraction's) and the arms as independent (they
    share the test images, which only lowers the variance of the gap): conservative for the test
    sample; the retraining's own noise (one retrain per fraction) is not in it."""
    from scipy.stats import norm

    pooled = (accuracy + random_accuracy) / 2
    spread = math.sqrt(max(2 * pooled * (1 - pooled) / max(n, 1), 1e-12))
    return float(norm.sf((random_accuracy - accuracy) / spread))


def check_roar(ctx: CheckContext, method: str) -> dict[str, Any]:
    result = _roar(ctx, method)
    name = get_method(method).name
    accuracy, random_accuracy = result.mean_accuracy(name), result.mean_accuracy("random")
    unmodified = result.unmodified_accuracy
    p_chance = result.chance_p_value()
    # a retrain at chance on the unmodified data makes every drop zero-ish: no verdict either way
    faithful = None
    gap_p = _roar_gap_p(accuracy, random_accuracy, int(result.settings["test_images"]))
    if p_chance < ROAR_CHANCE_ALPHA:
        faithful = True if gap_p < ROAR_CHANCE_ALPHA else (False if accuracy >= random_accuracy else None)
    return {"roar_faithful": faithful, "roar_gap_p": gap_p, "roar_accuracy": accuracy,
            "roar_random_accuracy": random_accuracy, "roar_drop": unmodified - accuracy,
            "roar_random_drop": unmodified - random_accuracy, "roar_unmodified_accuracy": unmodified,
            "roar_chance_p": p_chance}


def default_attack(methods: Sequence[str]) -> list[str]:
    """What the manipulation check attacks by default: ``gradcam`` when it is among ``methods``, else
    the first of them that :data:`mechlens.evaluation.manipulation.ATTACKABLE` lists."""
    attackable = tuple(_manipulation_module().ATTACKABLE)  # read now: the tuple grows
    names = [get_method(m).name for m in methods]
    for name in (["gradcam"] if "gradcam" in names else []) + names:
        if name in attackable:
            return [name]
    raise ValueError(f"none of the methods {names} can be attacked by the manipulation check (it differentiates the "
                     f"maps of {', '.join(attackable)}); name the method(s) to attack (manipulation_attack= / --attack)")


#: The report's checks, in order: name -> ``check(ctx, method) -> {column: value}``.
CHECKS: dict[str, Check] = {
    "randomization": check_randomization,
    "deletion": check_deletion,
    "insertion": check_insertion,
    "faithfulness_correlation": check_faithfulness_correlation,
    "localization": check_localization,
    "relevance_mass": check_relevance_mass,
    "stability": check_stability,
    "max_sensitivity": check_max_sensitivity,
    "sparseness": check_sparseness,
    "manipulation": check_manipulation,
    "roar": check_roar,
}
#: Checks of :data:`CHECKS` that run only when asked for by name: they fine-tune or retrain models.
OPTIONAL_CHECKS: frozenset[str] = frozenset({"manipulation", "roar"})


def map_agreement(a: torch.Tensor, b: torch.Tensor, *, grid: int = 8) -> torch.Tensor:
    """Spearman correlation ``[B]`` of maps ``a`` and ``b`` ``[B, H, W]`` after average-pooling both
    to ``grid x grid`` cells (maps of different resolution compared at a common one; NaN where a
    pooled map is constant)."""
    import torch.nn.functional as F

    size = (min(grid, a.shape[-2]), min(grid, a.shape[-1]))
    pool = lambda m: F.adaptive_avg_pool2d(m.float().unsqueeze(1), size).squeeze(1)  # noqa: E731
    return spearman(pool(a), pool(b))


# ---------------------------------------------------------------------------- the report
@dataclass
class MethodReport:
    """The table (``rows``, one per method, columns :data:`COLUMNS` then any a custom check added),
    each method's ``verdict`` and ``reasons``, the ``summary`` advice, the pairwise
    ``agreement`` (pooled Spearman, ``[M, M]``), and the full results of the checks (``details``)."""

    rows: list[dict[str, Any]]
    summary: str
    agreement: torch.Tensor
    methods: list[str]
    details: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    attributions: dict[str, Attribution] = field(default_factory=dict, repr=False)
    images: torch.Tensor | None = field(default=None, repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        extra = [k for row in self.rows for k in row if k not in COLUMNS]
        return [c for c in COLUMNS if any(c in row for row in self.rows)] + list(dict.fromkeys(extra))

    @property
    def verdicts(self) -> dict[str, str]:
        return {row["method"]: row["verdict"] for row in self.rows}

    @property
    def trusted(self) -> list[str]:
        return [row["method"] for row in self.rows if row["verdict"] == "trust"]

    def row(self, method: str) -> dict[str, Any]:
        name = get_method(method).name
        for row in self.rows:
            if row["method"] == name:
                return row
        raise KeyError(f"{method!r} is not in this report; it has {', '.join(self.methods)}")

    def table(self) -> list[dict[str, Any]]:
        """The rows with every column present (missing values None), list cells joined."""
        return [{c: ("; ".join(map(str, row[c])) if isinstance(row.get(c), list) else row.get(c)) for c in self.columns}
                for row in self.rows]

    def to_pandas(self) -> Any:
        """The table as a ``pandas.DataFrame`` (pandas is optional)."""
        from mechlens._display import to_pandas

        return to_pandas(self.table(), self.columns)

    def to_csv(self, path: Any = None) -> str:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.columns)
        writer.writeheader()
        writer.writerows(self.table())
        text = buffer.getvalue()
        if path is not None:
            Path(path).write_text(text)
        return text

    def to_dict(self) -> dict[str, Any]:
        details: dict[str, Any] = {}
        for method, checks in self.details.items():
            details[method] = {name: value.to_dict() for name, value in checks.items() if hasattr(value, "to_dict")}
        return {"summary": self.summary, "methods": list(self.methods), "rows": [dict(r) for r in self.rows],
                "agreement": self.agreement.tolist(), "settings": dict(self.settings), "details": details}

    def to_json(self, **kwargs: Any) -> str:
        from activation_store.jsonutil import dumps

        return dumps(self.to_dict(), **kwargs)

    def text(self) -> str:
        """The table and the verdicts as plain text (what the CLI prints)."""
        shown = ("method", "verdict", "randomization", "randomization_rho", "faithful", "faithful_p", "ins_minus_del",
                 "ins_minus_del_random", "faithfulness_corr", "agreement", "pointing_game", "max_sensitivity",
                 "manipulation_moved", "manipulation_spearman", "roar_faithful", "roar_drop", "roar_random_drop")
        shown = [c for c in shown if c in self.columns]
        cells = [[_fmt(row.get(c)) for c in shown] for row in self.rows]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(shown)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(shown, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        lines.append("")
        lines += [f"{row['method']}: {row['verdict']} - {'; '.join(row['reasons'])}" for row in self.rows]
        lines += ["", self.summary]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        table = html_table(self.table(), self.columns, caption="attribution methods on this model")
        return f"<p>{html.escape(self.summary)}</p>{table}"

    def plot(self, *, n: int = 3) -> Any:
        """One figure: each method's maps of the first ``n`` images (rows), then the randomization
        cascade (mean Spearman per step) and the deletion curves of every method and of a random map
        (and, when they ran, the manipulation check's map similarity and the ROAR curves)."""
        from mechlens.attribution.display import as_rgb, draw_map, figure

        methods = list(self.methods)
        n = min(n, self.images.shape[0]) if self.images is not None else 0
        manipulation = self.details.get("(manipulation)", {}).get("manipulation")
        roar_result = self.details.get("(roar)", {}).get("roar")
        cols = max(n, 2 + (manipulation is not None) + (roar_result is not None))
        fig = figure(2.2 * cols, 2.0 * len(methods) + 3.0)
        grid = fig.add_gridspec(len(methods) + 1, cols, height_ratios=[1.0] * len(methods) + [1.4])
        for m, method in enumerate(methods):
            attribution = self.attributions.get(method)
            if attribution is None:
                continue
            heat = attribution.heatmap()
            for i in range(n):
                ax = fig.add_subplot(grid[m, i])
                image = as_rgb(self.images[i]) if self.images is not None else None
                draw_map(ax, fig, heat[i].float().cpu().numpy(), image, colorbar=False,
                         title=f"{method}: {self.verdicts.get(method, '')}" if i == 0 else None)
        ax = fig.add_subplot(grid[len(methods), 0])
        for method in methods:
            result = self.details.get(method, {}).get("randomization")
            if result is not None:
                ax.plot(range(1, len(result.layers) + 1), result.mean_spearman().numpy(), marker="o", label=method)
        ax.axhline(PASS_BELOW, color="0.5", linestyle=":", linewidth=1)
        ax.set_xlabel("layers randomized (top first)", fontsize=8)
        ax.set_ylabel("Spearman with trained", fontsize=8)
        ax.set_title("randomization check", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax = fig.add_subplot(grid[len(methods), 1])
        for method in methods:
            curve = self.details.get(method, {}).get("deletion")
            if curve is not None:
                ax.plot(curve.fractions.numpy(), curve.scores.mean(dim=0).numpy(), label=method)
        random_curve = self.details.get("(random)", {}).get("deletion")
        if random_curve is not None:
            ax.plot(random_curve.fractions.numpy(), random_curve.scores.mean(dim=0).numpy(), color="0.4",
                    linestyle="--", label="random")
        ax.set_xlabel("fraction of pixels deleted", fontsize=8)
        ax.set_ylabel("target score", fontsize=8)
        ax.set_title("deletion (lower is faithful)", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        panel = 2
        if manipulation is not None:
            ax = fig.add_subplot(grid[len(methods), panel])
            panel += 1
            rows = [manipulation.row(m) for m in methods]
            ax.bar(range(len(rows)), [r["spearman"] for r in rows],
                   color=["tab:red" if r["moved"] else "tab:green" for r in rows])
            ax.set_xticks(range(len(rows)), [f"{m}*" if m in manipulation.attacked else m for m in methods],
                          rotation=30, fontsize=7, ha="right")
            ax.set_ylabel("Spearman before / after", fontsize=8)
            ax.set_title(f"manipulation (* attacked, red: moved)\npredictions kept on {manipulation.agreement:.0%}",
                         fontsize=8)
        if roar_result is not None:
            ax = fig.add_subplot(grid[len(methods), panel])
            for method, curve in roar_result.accuracy.items():
                style = dict(color="0.4", linestyle="--") if method == "random" else {}
                ax.plot(roar_result.fractions, curve, marker="o", label=method, **style)
            ax.set_xlabel("fraction of pixels removed", fontsize=8)
            ax.set_ylabel("test accuracy after retraining", fontsize=8)
            ax.set_title("ROAR (lower is faithful)", fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        return fig

    def _repr_png_(self) -> bytes:
        from mechlens.attribution.display import quiet_png

        return quiet_png(self.plot)

    def save(self, directory: Any) -> list[Path]:
        """Write ``report.csv``, ``report.json`` and ``report.png`` to ``directory``; returns the paths."""
        import warnings

        from mechlens.attribution.display import DegenerateMapWarning
        from mechlens.evaluation.plots import save_figure

        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        self.to_csv(folder / "report.csv")
        (folder / "report.json").write_text(self.to_json(indent=1))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DegenerateMapWarning)  # the panel title says it
            png = save_figure(self.plot(), folder / "report.png")
        return [folder / "report.csv", folder / "report.json", Path(png)]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}"
    if isinstance(value, list):
        return ",".join(map(str, value)) or "-"
    return str(value)


# ---------------------------------------------------------------------------- verdicts
def _verdict(row: dict[str, Any], info: MethodInfo, passing: set[str]) -> tuple[str, list[str]]:
    reasons: list[str] = []
    status = row.get("randomization")
    if status is None:  # the check was not run: what the registry measured on the reference model
        status = _registry_status(info.name)
        reasons.append(f"randomization not measured here; the registry says {info.randomization!r}")
    elif status == "fails":
        reasons.append(f"fails the randomization check (its maps keep Spearman {row['randomization_rho']:.2f} with "
                       "the trained model's after weights are randomized: they show the image more than the model)")
    elif status == "passes":
        reasons.append(f"passes the randomization check (Spearman <= {row['randomization_rho']:.2f})")
    else:
        reasons.append(f"randomization check inconclusive (Spearman up to {row.get('randomization_rho', float('nan')):.2f})")
    faithful = row.get("faithful")
    if "faithful" in row:
        gap = (f"insertion - deletion AUC {row['ins_minus_del']:.3g} vs {row['ins_minus_del_random']:.3g} for a random "
               f"map, p = {row['faithful_p']:.2g}")
        verdicts = {True: "faithful", False: "not faithful", None: "faithfulness not established"}
        reasons.append(f"{verdicts[faithful]} ({gap})")
    others = [m for m in row.get("agrees_with", []) if m in passing and m != row["method"]]
    if others:
        reasons.append(f"agrees with {', '.join(others)}")
    else:
        reasons.append("no other method that passes the randomization check agrees with it")
    manipulated = bool(row.get("manipulation_moved")) and bool(row.get("manipulation_preserved"))
    if "manipulation_moved" in row:
        change = f"Spearman {row['manipulation_spearman']:.2f} with its maps before, border mass {row['manipulation_mass_gain']:+.2f}"
        if manipulated:
            reasons.append(f"{MANIPULATION_REASON}: {change}")
        elif row["manipulation_moved"]:
            reasons.append(f"maps moved by the manipulation fine-tune, but it also changed the predictions ({change}): "
                           "not conclusive")
        else:
            reasons.append(f"maps not moved by the manipulation fine-tune ({change})")
    roar_faithful = row.get("roar_faithful")
    if "roar_faithful" in row and roar_faithful is None:
        reasons.append(f"ROAR inconclusive: retrained on the unmodified data the model reaches accuracy "
                       f"{row['roar_unmodified_accuracy']:.3g}, not above always answering the majority class "
                       f"(binomial p = {row['roar_chance_p']:.2g}); train longer (roar epochs) or on more images")
    drops = (f"accuracy drop {row.get('roar_drop', float('nan')):.3g} after removing its top pixels and retraining "
             f"vs {row.get('roar_random_drop', float('nan')):.3g} for a random ranking, p = {row.get('roar_gap_p', float('nan')):.2g}")
    if roar_faithful is not None:
        reasons.append(f"faithful under ROAR ({drops})" if roar_faithful else f"not faithful under ROAR ({drops})")
    elif "roar_faithful" in row and row.get("roar_chance_p", 1.0) < ROAR_CHANCE_ALPHA:
        reasons.append(f"faithfulness under ROAR not established ({drops})")
    if status == "fails":
        return "do not trust", reasons
    established = faithful is True or "faithful" not in row  # measured: only a significant gain counts
    if status == "passes" and established and others and not manipulated and roar_faithful is not False:
        return "trust", reasons
    return "use with care", reasons


def _summary(rows: list[dict[str, Any]]) -> str:
    trusted = [r["method"] for r in rows if r["verdict"] == "trust"]
    careful = [r["method"] for r in rows if r["verdict"] == "use with care"]
    failing = [r["method"] for r in rows if r["verdict"] == "do not trust"]
    parts = []
    if len(trusted) >= 2:
        parts.append(f"Trust on this model: {', '.join(trusted)}. Corroborate every claim with at least two of them "
                     "before saying what the model learned.")
    else:
        shown = f" (only {trusted[0]} qualifies)" if trusted else ""
        parts.append(f"Fewer than two methods can be trusted on this model{shown}: never trust a single attribution "
                     "method; corroborate with at least two, e.g. add a forward-only one such as occlusion.")
    if careful:
        parts.append(f"Use with care: {', '.join(careful)}.")
    if failing:
        parts.append(f"Do not trust: {', '.join(failing)} (they fail the randomization check).")
    moved = [r["method"] for r in rows if r.get("manipulation_moved") and r.get("manipulation_preserved")]
    if moved:
        parts.append(f"A fine-tune that kept the predictions moved the maps of {', '.join(moved)} (Heo et al. 2019): "
                     "they show how the function is computed as much as what it uses.")
    unfaithful = [r["method"] for r in rows if r.get("roar_faithful") is False]
    if unfaithful:
        parts.append(f"Under ROAR the top pixels of {', '.join(unfaithful)} carried no more of the class than random ones.")
    occlusion = next((r for r in rows if r["method"] == "occlusion"), None)
    if occlusion is not None:
        against = [r["method"] for r in rows if r["family"] in ("gradient", "cam", "smoothing")
                   and r["method"] not in occlusion.get("agrees_with", [])]
        if against:
            parts.append(f"Occlusion (forward-only) disagrees with {', '.join(against)}: when a gradient method and "
                         "occlusion disagree, suspect the gradient method and investigate before trusting it.")
    return " ".join(parts)


# ---------------------------------------------------------------------------- entry point
def evaluate_methods(
    model: Any,
    images: torch.Tensor,
    target: Any = None,
    methods: Sequence[str] = ("saliency", "integrated_gradients", "gradcam", "occlusion"),
    *,
    masks: Any = None,
    layer: str | None = None,
    checks: Mapping[str, Check] | Sequence[str] | None = None,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    randomization_layers: Sequence[str] | None = None,
    deletion_steps: int = 16,
    deletion_baseline: Any = "zeros",
    agreement_grid: int = 8,
    agreement_threshold: float = 0.5,
    seed: int = 0,
    progress: bool = False,
    manipulation_attack: str | Sequence[str] | None = None,
    manipulation_options: Mapping[str, Any] | None = None,
    roar_data: tuple[Any, Any] | None = None,
    roar_recipe: Any = None,
    roar_fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    cache_dir: str | Path | None = None,
) -> MethodReport:
    """Run the report's ``checks`` (default those of :data:`CHECKS` not in :data:`OPTIONAL_CHECKS`;
    names or a ``{name: check}`` mapping) for every method on ``images`` (pixels, as ``model`` takes
    them) and decide which methods to trust on this model (see the module docstring). ``target``:
    any feature (default the predicted class), resolved once. ``masks`` ``[B, H, W]``: ground truth
    for the pointing game / IoU. ``layer``: for CAMs (default the last spatial stage).
    ``method_kwargs``: per-method arguments. Two methods agree when the mean Spearman correlation
    of their |maps| pooled to ``agreement_grid`` cells a side (:func:`map_agreement`) reaches
    ``agreement_threshold``.

    The opt-in checks: ``manipulation`` attacks ``manipulation_attack`` (default
    :func:`default_attack`), fine-tuning on ``images``; ``manipulation_options`` go to
    :func:`~mechlens.evaluation.manipulation.manipulation_check` (``steps=``, ``eval_images=``,
    ``region=``, ``tolerance=``, a ready ``manipulated=``...). ``roar`` retrains on
    ``roar_data=(train, test)`` with ``roar_recipe`` (a :class:`~mechlens.evaluation.roar.RetrainRecipe`;
    default :meth:`~mechlens.evaluation.roar.RetrainRecipe.from_model`) at ``roar_fractions``,
    caching its maps and runs under ``cache_dir`` (a rerun resumes)."""
    started = time.perf_counter()
    infos = [get_method(name) for name in methods]  # unknown names fail before any work
    names = [info.name for info in infos]
    if not names:
        raise ValueError("give at least one method to evaluate (two or more to corroborate them)")
    if len(set(names)) != len(names):
        raise ValueError(f"methods {list(methods)} name a method twice")
    if isinstance(checks, Mapping):
        chosen = dict(checks)
    else:
        wanted = [c for c in CHECKS if c not in OPTIONAL_CHECKS] if checks is None else list(checks)
        unknown = [c for c in wanted if c not in CHECKS]
        if unknown:
            import difflib

            close = [m for c in unknown for m in difflib.get_close_matches(c, list(CHECKS), n=2)]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown check(s) {unknown}.{hint} Available: {', '.join(CHECKS)}")
        chosen = {c: CHECKS[c] for c in wanted}
    attack = _opt_in_settings(chosen, names, manipulation_attack, manipulation_options, roar_data, roar_recipe,
                              cache_dir)
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"images must be a float tensor [B, C, H, W], got {type(images).__name__} "
                         f"{tuple(getattr(images, 'shape', ()))}")
    images = images.detach()
    kwargs_of = {get_method(k).name: dict(v) for k, v in (method_kwargs or {}).items()}
    stray = sorted(set(kwargs_of) - set(names))
    if stray:
        raise ValueError(f"method_kwargs names {stray}, which are not among the methods {names}")
    with pixel_space(model) as net:
        resolved = resolve_target(net, images, target)
        if layer is None and any(info.needs_layer for info in infos):
            layer = suggest_cam_layer(net, tuple(images.shape[1:]))
    if masks is not None:
        masks = torch.as_tensor(masks).bool()
        if masks.dim() != 3 or masks.shape[0] != images.shape[0] or tuple(masks.shape[-2:]) != tuple(images.shape[-2:]):
            raise ValueError(f"masks must be [B, H, W] = {[images.shape[0], *images.shape[-2:]]}, got {list(masks.shape)}")
    ctx = CheckContext(model=model, images=images, target=resolved, layer=layer, masks=masks, seed=seed,
                       method_kwargs=kwargs_of, deletion_steps=deletion_steps, deletion_baseline=deletion_baseline,
                       randomization_layers=randomization_layers, methods=names, manipulation_attack=attack,
                       manipulation_options=dict(manipulation_options or {}),
                       roar_data=tuple(roar_data) if roar_data is not None else None, roar_recipe=roar_recipe,
                       roar_fractions=tuple(roar_fractions), cache_dir=cache_dir, user_target=target, progress=progress)
    rows: list[dict[str, Any]] = []
    from tqdm.auto import tqdm

    with tqdm(total=len(names) * (len(chosen) + 1), desc="evaluate", unit="check", disable=not progress,
              leave=False) as bar:
        for info in infos:
            t0 = time.perf_counter()
            bar.set_postfix_str(f"{info.name} maps", refresh=False)
            ctx.attribution(info.name)
            bar.update()
            row: dict[str, Any] = {"method": info.name, "family": info.family}
            for check_name, check in chosen.items():
                bar.set_postfix_str(f"{info.name} {check_name}", refresh=False)
                row.update(check(ctx, info.name))
                bar.update()
            if {"deletion_auc", "insertion_auc", "deletion_auc_random", "insertion_auc_random"} <= set(row):
                row["ins_minus_del"] = row["insertion_auc"] - row["deletion_auc"]
                row["ins_minus_del_random"] = row["insertion_auc_random"] - row["deletion_auc_random"]
                curves = ctx.details.get(info.name, {})
                if {"deletion", "insertion"} <= set(curves) and "random_curves" in ctx.cache:
                    row["faithful"], row["faithful_p"] = faithfulness_test(curves["deletion"], curves["insertion"],
                                                                           *ctx.cache["random_curves"])
                else:  # AUC columns from custom checks without per-image curves: nothing to test on
                    row["faithful"], row["faithful_p"] = None, float("nan")
            row["registry_randomization"] = info.randomization
            row["seconds"] = round(time.perf_counter() - t0, 3)
            rows.append(row)
    if "random_curves" in ctx.cache:
        ctx.details["(random)"] = {"deletion": ctx.cache["random_curves"][0], "insertion": ctx.cache["random_curves"][1]}
    heat = {name: ctx.attribution(name).heatmap(absolute=True).detach().float().cpu() for name in names}
    agreement = torch.eye(len(names), dtype=torch.float64)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            if i != j:
                agreement[i, j] = float(map_agreement(heat[a], heat[b], grid=agreement_grid).nanmean())
    passing = {r["method"] for r in rows if r.get("randomization", _registry_status(r["method"])) == "passes"}
    for i, row in enumerate(rows):
        others = [(float(agreement[i, j]), names[j]) for j in range(len(names))
                  if j != i and not math.isnan(float(agreement[i, j]))]
        row["agreement"] = max((v for v, _ in others), default=float("nan"))
        row["agrees_with"] = [name for v, name in sorted(others, reverse=True) if v >= agreement_threshold]
        row["verdict"], row["reasons"] = _verdict(row, infos[i], passing)
    settings = {"target": resolved.names[0] if len(set(resolved.names)) == 1 else "per image", "layer": layer,
                "images": int(images.shape[0]), "checks": list(chosen), "seed": seed,
                "agreement_grid": agreement_grid, "agreement_threshold": agreement_threshold,
                "deletion_steps": deletion_steps, "seconds": round(time.perf_counter() - started, 3)}
    if "manipulation" in ctx.cache:
        result = ctx.cache["manipulation"]
        settings["manipulation"] = {"attacked": list(result.attacked), "agreement": result.agreement,
                                    "tolerance": result.tolerance, "preserved": result.preserved,
                                    "max_logit_change": result.max_logit_change, "mean_kl": result.mean_kl,
                                    "measured_on": (f"{len(ctx.manipulation_options['eval_images'])} held-out images"
                                                    if ctx.manipulation_options.get("eval_images") is not None
                                                    else "the images it fine-tuned on")}
    if "roar" in ctx.cache:
        result = ctx.cache["roar"]
        settings["roar"] = {"fractions": list(result.fractions), "unmodified_accuracy": result.unmodified_accuracy,
                            "trained": result.trained, "from_cache": result.from_cache,
                            "cache_dir": None if cache_dir is None else str(cache_dir)}
    return MethodReport(rows=rows, summary=_summary(rows), agreement=agreement, methods=names, details=ctx.details,
                        attributions={n: ctx.attribution(n) for n in names}, images=images.cpu(), settings=settings)


def _opt_in_settings(chosen: Mapping[str, Check], names: list[str], attack: str | Sequence[str] | None,
                     manipulation_options: Mapping[str, Any] | None, roar_data: Any, roar_recipe: Any,
                     cache_dir: Any) -> list[str] | None:
    """Refuse, before any work, settings of an opt-in check that is not run (they would be silently
    ignored) and what the chosen ones cannot do; returns the methods to attack (resolved names)."""
    manipulation, roar = chosen.get("manipulation"), chosen.get("roar")
    if manipulation is None and (attack is not None or manipulation_options):
        raise ValueError("manipulation_attack / manipulation_options configure the manipulation check, which is not "
                         "run: add 'manipulation' to checks")
    if roar is None and (roar_data is not None or roar_recipe is not None or cache_dir is not None):
        raise ValueError("roar_data / roar_recipe / cache_dir configure the roar check, which is not run: add 'roar' "
                         "to checks")
    if roar is not None and roar_data is None:
        raise ValueError("the roar check retrains on labelled images: pass roar_data=(train, test), datasets of "
                         "(image, label) or (images, labels) tensors")
    if roar_data is not None and (not isinstance(roar_data, (tuple, list)) or len(roar_data) != 2):
        raise ValueError(f"roar_data must be a (train, test) pair, got {type(roar_data).__name__}")
    if manipulation is None:
        return None
    manip = _manipulation_module()
    if attack is None:
        return default_attack(names)
    attacked = [get_method(m).name for m in ([attack] if isinstance(attack, str) else list(attack))]
    refused = [m for m in attacked if m not in manip.ATTACKABLE]
    if refused or not attacked:
        raise ValueError(f"the manipulation check cannot attack {', '.join(refused) or 'nothing'}: it differentiates the "
                         f"maps of {', '.join(manip.ATTACKABLE)}")
    return attacked


def _manipulation_module() -> Any:
    import importlib

    # by name: ``mechlens.evaluation`` re-exports functions whose names could shadow its submodules
    return importlib.import_module("mechlens.evaluation.manipulation")


def _registry_status(method: str) -> str:
    registry = get_method(method).randomization
    return "passes" if registry.startswith("passes") else "fails" if registry.startswith("fails") else "inconclusive"

