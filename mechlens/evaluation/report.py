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
  ``ins_minus_del_random``): a random order deletes and inserts symmetrically (deleting a fraction
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

The heavier evidence is separate: :func:`mechlens.evaluation.roar.roar` (remove the top pixels and
retrain) and :func:`mechlens.evaluation.manipulation.manipulation_check` (can a fine-tune move the
maps while keeping the predictions?).

Verdicts: ``trust`` (passes the randomization check, is faithful, and agrees with another method
that passes), ``use with care`` (passes, but is not
faithful or not corroborated: the reasons say which), ``do not trust`` (fails the randomization
check: its maps show the image more than the model).
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

import torch

from mechlens.attribution.base import Attribution, MethodInfo, Target, attribute, get_method, pixel_space, resolve_target
from mechlens.attribution.layers import suggest_cam_layer
from mechlens.evaluation.faithfulness import deletion_curve, insertion_curve, localization_iou, pointing_game, random_maps
from mechlens.evaluation.metrics import faithfulness_correlation, max_sensitivity, relevance_mass_accuracy, sparseness
from mechlens.evaluation.randomization import randomization_check
from mechlens.evaluation.similarity import spearman
from mechlens.evaluation.stability import attribution_stability

__all__ = ["CHECKS", "Check", "CheckContext", "MethodReport", "evaluate_methods", "map_agreement", "VERDICTS"]

VERDICTS = ("trust", "use with care", "do not trust")
PASS_BELOW, FAIL_AT = 0.5, 0.6  # the registry's randomization thresholds (mechlens.attribution.base.MethodInfo)
COLUMNS = ("method", "family", "verdict", "randomization", "randomization_rho", "faithful", "ins_minus_del",
           "ins_minus_del_random", "deletion_auc", "deletion_auc_random", "insertion_auc", "insertion_auc_random",
           "agreement", "agrees_with",
           "pointing_game", "pointing_chance", "iou", "stability", "registry_randomization", "seconds", "reasons")


# ---------------------------------------------------------------------------- the checks
@dataclass
class CheckContext:
    """What a check sees: the model (as given: ``nn.Module`` or ``LoadedModel``), the images
    (pixels), the target resolved once on the model, the CAM ``layer``, optional ``masks``
    ``[B, H, W]``, the ``seed``, per-method keyword arguments and a scratch ``cache`` shared by
    the checks (e.g. the random map's curves)."""

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
}


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
        shown = ("method", "verdict", "randomization", "randomization_rho", "faithful", "ins_minus_del",
                 "ins_minus_del_random", "faithfulness_corr", "agreement", "pointing_game", "max_sensitivity")
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
        cascade (mean Spearman per step) and the deletion curves of every method and of a random map."""
        from mechlens.attribution.display import as_rgb, draw_map, figure

        methods = list(self.methods)
        n = min(n, self.images.shape[0]) if self.images is not None else 0
        cols = max(n, 2)
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
    if faithful is not None:
        gap = f"insertion - deletion AUC {row['ins_minus_del']:.3g} vs {row['ins_minus_del_random']:.3g} for a random map"
        reasons.append(f"faithful ({gap})" if faithful else f"not faithful ({gap})")
    others = [m for m in row.get("agrees_with", []) if m in passing and m != row["method"]]
    if others:
        reasons.append(f"agrees with {', '.join(others)}")
    else:
        reasons.append("no other method that passes the randomization check agrees with it")
    if status == "fails":
        return "do not trust", reasons
    if status == "passes" and faithful is not False and others:
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
) -> MethodReport:
    """Run the report's ``checks`` (default all of :data:`CHECKS`; names or a ``{name: check}``
    mapping) for every method on ``images`` (pixels, as ``model`` takes them) and decide which
    methods to trust on this model (see the module docstring). ``target``: any feature (default
    the predicted class), resolved once. ``masks`` ``[B, H, W]``: ground truth for the pointing
    game / IoU. ``layer``: for CAMs (default the last spatial stage). ``method_kwargs``:
    per-method arguments. Two methods agree when the mean Spearman correlation of their |maps|
    pooled to ``agreement_grid`` cells a side (:func:`map_agreement`) reaches
    ``agreement_threshold``."""
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
        wanted = list(CHECKS) if checks is None else list(checks)
        unknown = [c for c in wanted if c not in CHECKS]
        if unknown:
            import difflib

            close = [m for c in unknown for m in difflib.get_close_matches(c, list(CHECKS), n=2)]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown check(s) {unknown}.{hint} Available: {', '.join(CHECKS)}")
        chosen = {c: CHECKS[c] for c in wanted}
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
                       randomization_layers=randomization_layers)
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
                row["faithful"] = bool(row["ins_minus_del"] > row["ins_minus_del_random"])
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
    return MethodReport(rows=rows, summary=_summary(rows), agreement=agreement, methods=names, details=ctx.details,
                        attributions={n: ctx.attribution(n) for n in names}, images=images.cpu(), settings=settings)


def _registry_status(method: str) -> str:
    registry = get_method(method).randomization
    return "passes" if registry.startswith("passes") else "fails" if registry.startswith("fails") else "inconclusive"

