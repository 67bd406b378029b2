"""TCAV: how much a concept direction drives a feature, with the statistical test of
tensorflow/tcav (Kim et al., 2018).

The directional derivative of a target feature ``f`` (a class logit by default, or any
:class:`mechlens.features.Feature`: an SAE latent, a channel) along a CAV ``v`` at layer ``l`` is
``S = grad_a f(x) . v``, with the gradient taken w.r.t. the layer activation kept *attached* to the
graph (the seed tutorial's hook detached it and got ``None``). For a CAV learnt on pooled
activations the direction is added at every position, so ``S = sum_p grad_{a_p} f . v``.

The gradient does not depend on the CAV, so it is computed once per (layer, target) and every CAV
is scored with one matrix product: many CAVs cost one backward pass.

Scores: ``sign`` = fraction of examples with ``S > 0`` (the TCAV score); ``magnitude`` =
``sum(S+) / sum(|S|)``.

Significance (``test="exchangeable"``, the default). The null hypothesis is that the concept set
is just another random set. The concept and the N random sets form a pool of N + 1 sets; one CAV
is trained for every pair of the pool (the CAV from B to A is the negated CAV from A to B), and
each set's statistic is its mean TCAV score against the N other sets of the pool. Under the null
the N + 1 statistics are exchangeable, so the concept's statistic is compared with the N random
sets' statistics, which have exactly the concept's structure (N CAVs sharing one positive set):
``t = (T_concept - mean T_random) / (sd T_random * sqrt(1 + 1/N))`` against Student's t with
N - 1 degrees of freedom (``test="rank"``: the exact, distribution-free rank of the concept among
the N + 1, whose smallest p-value is 1 / (N + 1)). A result is significant only when the
Bonferroni-corrected p (over concepts x layers x targets) is below alpha *and* most of the
concept's CAVs separate it from the random sets better than chance (held-out accuracy, one-sided
binomial test at 0.05): a concept whose CAVs are at chance has no direction to test.
``test="ttest"`` keeps tensorflow/tcav's scheme (concept scores against random-vs-random scores,
``ttest_ind``) for comparison; benchmarks/tcav_calibration.py measures both.
"""
from __future__ import annotations

import csv
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from activation_store.jsonutil import dumps as json_dumps
from mechlens.features.base import Feature
from mechlens.features.forward import feature_forward
from mechlens.features.parse import as_feature, as_features
from mechlens.engine import eval_mode, replace_output, unwrap_with_preprocessing
from mechlens.features.layout import as_position_rows, infer_layouts, layout_scope, resolve_layout
from mechlens.models.layers import resolve_layers
from mechlens.models.loading import LoadedModel, Preprocessing
from mechlens.probes.cav import CAV, train_cav
from mechlens.probes.concepts import ConceptSet, _batches, concept_activations, prepare_images

__all__ = [
    "RelativeTCAVResult",
    "TCAVReport",
    "TCAVResult",
    "directional_derivatives",
    "finite_difference_derivative",
    "relative_tcav",
    "run_tcav",
    "target_gradients",
    "ExchangeableTest",
    "PairScores",
    "TCAV_TESTS",
    "exchangeable_test",
    "pair_scores",
    "tcav_scores",
    "tcav_test",
]

TCAV_TESTS = ("exchangeable", "rank", "ttest")
CHANCE_LEVEL = 0.05  # one-sided binomial test of a CAV's held-out accuracy against 1/2


def _reduce_gradient(grad: torch.Tensor, pooling: str, layer: str) -> torch.Tensor:
    if pooling == "flatten":
        return grad.reshape(grad.shape[0], -1)
    rows, _ = as_position_rows(grad, layer=layer)
    return rows.sum(dim=1)  # the CAV is added at every position


def target_gradients(model: LoadedModel | nn.Module, layer: str | Sequence[str], examples: ConceptSet | torch.Tensor,
                     target: Feature | int | str = 0, *, pooling: str = "mean", batch_size: int = 32,
                     preprocessing: Preprocessing | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """``[N, d]``: the gradient of ``target`` w.r.t. ``layer``'s activation for every example,
    reduced to the CAV's space (summed over positions, or flattened for ``pooling="flatten"``).
    ``examples``: a :class:`ConceptSet` or images ``[N, C, H, W]`` in ``[0, 1]``. With a list of
    layers: a dict, from one backward pass per batch."""
    net, preprocessing = unwrap_with_preprocessing(model, preprocessing)
    layers = [layer] if isinstance(layer, str) else list(layer)
    feature = as_feature(target)
    device = next(net.parameters()).device
    if isinstance(examples, ConceptSet) and examples.dataset is None:
        raise ValueError(f"examples {examples.name!r} hold only activations; gradients need the images")
    batches = _batches(examples.dataset, batch_size) if isinstance(examples, ConceptSet) else examples.split(batch_size)
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with eval_mode(net):
        for images in batches:
            x = prepare_images(images, preprocessing, device).requires_grad_(True)
            result = feature_forward(net, feature, x, grads=True, keep_layers=layers)
            grads = torch.autograd.grad(result.values[:, 0].sum(), [result.activations[n] for n in layers])
            with layout_scope(infer_layouts(net, layers, x) if pooling != "flatten" else {}):
                for name, grad in zip(layers, grads):
                    out[name].append(_reduce_gradient(grad.float(), pooling, name).cpu().numpy())
    merged = {name: np.concatenate(parts) for name, parts in out.items()}
    return merged[layer] if isinstance(layer, str) else merged


def directional_derivatives(gradients: np.ndarray, cavs: Sequence[CAV] | np.ndarray) -> np.ndarray:
    """``[N, K]`` directional derivatives of N examples along K CAVs (or ``[K, d]`` vectors)."""
    vectors = np.stack([c.vector for c in cavs]) if not isinstance(cavs, np.ndarray) else cavs
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.shape[1] != gradients.shape[1]:
        raise ValueError(f"CAVs have {vectors.shape[1]} dimensions, gradients {gradients.shape[1]}: "
                         "were they made at the same layer with the same pooling?")
    return gradients.astype(np.float64) @ vectors.astype(np.float64).T


def tcav_scores(derivatives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per CAV (columns of ``[N, K]`` derivatives): the sign score (fraction > 0) and the
    magnitude score (positive mass over total mass; 0.5 when every derivative is 0)."""
    sign = (derivatives > 0).mean(axis=0)
    total = np.abs(derivatives).sum(axis=0)
    positive = np.clip(derivatives, 0, None).sum(axis=0)
    magnitude = np.where(total > 0, positive / np.where(total > 0, total, 1), 0.5)
    return sign, magnitude


class _AddDirection:
    """``output + scale * vector`` at every position (the edit :func:`replace_output` applies)."""

    def __init__(self, vector: torch.Tensor, pooling: str, layout: str = "auto") -> None:
        self.vector = vector
        self.pooling = pooling
        self.layout = layout
        self.scale = 0.0

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        v = self.vector.to(output.device, output.dtype)
        if self.pooling == "flatten":
            return output + self.scale * v.reshape(output.shape[1:])
        layout = resolve_layout(output, self.layout)
        shape = {"nchw": (1, -1, 1, 1), "nhwc": (1, 1, 1, -1), "nlc": (1, 1, -1), "ncl": (1, -1, 1), "nc": (1, -1)}[layout]
        return output + self.scale * v.reshape(shape)


def finite_difference_derivative(model: LoadedModel | nn.Module, layer: str, images: torch.Tensor,
                                 target: Feature | int | str, vector: np.ndarray | torch.Tensor, *, pooling: str = "mean",
                                 eps: float = 1e-3, preprocessing: Preprocessing | None = None) -> np.ndarray:
    """``(f(a + eps v) - f(a - eps v)) / 2 eps`` per example: the check of :func:`target_gradients`."""
    net, preprocessing = unwrap_with_preprocessing(model, preprocessing)
    feature = as_feature(target)
    device = next(net.parameters()).device
    name = resolve_layers(net, [layer])[0]
    x = prepare_images(images, preprocessing, device)
    layout = infer_layouts(net, [name], x)[name].layout if pooling != "flatten" else "auto"
    hook = _AddDirection(torch.as_tensor(np.asarray(vector), dtype=torch.float64), pooling, layout)
    values = []
    with replace_output(net, name, hook), torch.no_grad():
        for scale in (eps, -eps):
            hook.scale = scale
            values.append(feature_forward(net, feature, x, grads=False).values[:, 0].double())
    return ((values[0] - values[1]) / (2 * eps)).cpu().numpy()


# ----------------------------------------------------------------------------- experiments
@dataclass
class TCAVResult:
    """One (concept, layer, target): scores against N random sets and the significance test."""

    concept: str
    layer: str
    target: str
    scores: list[float]  # sign scores, one per random counterpart
    magnitudes: list[float]
    random_scores: list[float]  # random-vs-random sign scores
    random_magnitudes: list[float]
    cav_accuracies: list[float]
    p_value: float
    p_adjusted: float  # Bonferroni over concepts x layers x targets
    significant: bool
    alpha: float
    score_kind: str = "sign"
    flagged_cavs: int = 0  # CAVs below min_accuracy
    test: str = "ttest"
    effect_size: float = 0.0  # concept mean score minus the random baseline's mean
    effect_z: float = 0.0  # effect size in units of the baseline's standard deviation
    cavs_at_chance: int = 0  # concept CAVs not better than chance (binomial test of held-out accuracy)

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores if self.score_kind == "sign" else self.magnitudes))

    @property
    def std(self) -> float:
        return float(np.std(self.scores if self.score_kind == "sign" else self.magnitudes))

    @property
    def random_mean(self) -> float:
        return float(np.mean(self.random_scores if self.score_kind == "sign" else self.random_magnitudes))

    @property
    def random_std(self) -> float:
        return float(np.std(self.random_scores if self.score_kind == "sign" else self.random_magnitudes))

    def row(self) -> dict[str, Any]:
        """A flat row for tables."""
        return {
            "concept": self.concept, "layer": self.layer, "target": self.target, "score_kind": self.score_kind,
            "tcav_mean": round(self.mean, 4), "tcav_std": round(self.std, 4),
            "random_mean": round(self.random_mean, 4), "random_std": round(self.random_std, 4),
            "p_value": self.p_value, "p_adjusted": self.p_adjusted, "significant": self.significant,
            "cav_accuracy_mean": round(float(np.mean(self.cav_accuracies)), 4), "flagged_cavs": self.flagged_cavs,
            "cavs_at_chance": self.cavs_at_chance, "effect_size": round(self.effect_size, 4),
            "effect_z": round(self.effect_z, 3), "test": self.test, "n_random": len(self.scores),
        }


@dataclass
class TCAVReport:
    """Every :class:`TCAVResult` of a :func:`run_tcav` call, with tables and a plot."""

    results: list[TCAVResult]
    alpha: float
    num_tests: int
    cavs: list[CAV] = field(default_factory=list, repr=False)

    def get(self, concept: str, layer: str | None = None, target: str | None = None) -> TCAVResult:
        for r in self.results:
            if r.concept == concept and layer in (None, r.layer) and target in (None, r.target):
                return r
        raise KeyError(f"no result for concept={concept!r} layer={layer!r} target={target!r}")

    def rows(self) -> list[dict[str, Any]]:
        return [r.row() for r in self.results]

    def __repr__(self) -> str:
        significant = sum(r.significant for r in self.results)
        return (f"TCAVReport({len(self.results)} results, {significant} significant at {self.alpha} "
                f"(Bonferroni over {self.num_tests} tests))")

    def to_pandas(self) -> Any:
        """:meth:`rows` as a ``pandas.DataFrame`` (pandas is optional)."""
        from mechlens._display import to_pandas

        return to_pandas(self.rows())

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        return html_table(self.rows(), caption=repr(self))

    def to_csv(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        rows = self.rows()
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return path

    def to_json(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        payload = {"alpha": self.alpha, "num_tests": self.num_tests, "correction": "bonferroni",
                   "test": self.results[0].test if self.results else None,
                   "results": [asdict(r) for r in self.results]}
        path.write_text(json_dumps(payload, indent=2))
        return path

    def plot(self, path: str | os.PathLike | None = None):
        """Bar plot: mean score ± std per concept (grouped by layer and target), the random
        baseline as grey bars, ``*`` over significant results (``n.s.`` otherwise)."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        groups = sorted({(r.layer, r.target) for r in self.results})
        fig, axes = plt.subplots(1, len(groups), figsize=(max(4.0, 2.2 * len(self.results) / len(groups) + 2) * len(groups), 3.8),
                                 squeeze=False)
        for ax, (layer, target) in zip(axes[0], groups):
            chosen = [r for r in self.results if r.layer == layer and r.target == target]
            x = np.arange(len(chosen))
            ax.bar(x - 0.2, [r.mean for r in chosen], 0.4, yerr=[r.std for r in chosen], capsize=4, label="concept")
            ax.bar(x + 0.2, [r.random_mean for r in chosen], 0.4, yerr=[r.random_std for r in chosen], capsize=4,
                   color="0.7", label="random")
            for xi, r in zip(x, chosen):
                ax.text(xi - 0.2, min(1.02, r.mean + r.std + 0.03), "*" if r.significant else "n.s.", ha="center",
                        fontsize=12 if r.significant else 8)
            ax.set_xticks(x, [r.concept for r in chosen], rotation=20)
            ax.set_ylim(0, 1.12)
            ax.axhline(0.5, color="0.4", lw=0.8, ls=":")
            ax.set_title(f"{target} @ {layer}")
            ax.set_ylabel(f"TCAV score ({chosen[0].score_kind})")
        axes[0][0].legend(loc="lower right", fontsize=8)
        fig.suptitle(f"TCAV (* = Bonferroni-corrected p < {self.alpha}, {self.num_tests} tests)", fontsize=10)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _ttest(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy import stats

    import warnings

    a, b = np.asarray(a, float), np.asarray(b, float)
    if np.ptp(np.concatenate([a, b])) == 0:
        return 1.0  # identical constant samples: no evidence of a difference
    with warnings.catch_warnings():  # nearly constant samples: scipy warns, the p-value is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        p = stats.ttest_ind(a, b).pvalue
    return float(p) if math.isfinite(p) else 1.0


@dataclass
class PairScores:
    """TCAV scores of one CAV per pair of a pool of sets (:func:`pair_scores`).

    ``sign[a, b]`` / ``magnitude[a, b]``: the score of the CAV pointing from set ``b`` to set ``a``
    (NaN on the diagonal); ``accuracy[a, b]`` / ``n_test[a, b]``: its held-out accuracy and test
    size (symmetric); ``cavs[(a, b)]`` for ``a < b``: the trained CAV (``cavs[(b, a)]`` is its
    negation)."""

    names: list[str]
    sign: np.ndarray
    magnitude: np.ndarray
    accuracy: np.ndarray
    n_test: np.ndarray
    cavs: dict[tuple[int, int], CAV]

    def subset(self, indices: Sequence[int]) -> "PairScores":
        """The scores among some sets of the pool, in the given order (with the CAVs whose pair
        keeps its order; the others are the negation of a CAV not listed)."""
        idx = np.asarray(indices)
        where = {int(i): k for k, i in enumerate(idx)}
        cavs = {(where[a], where[b]): cav for (a, b), cav in self.cavs.items()
                if a in where and b in where and where[a] < where[b]}
        return PairScores([self.names[i] for i in idx], self.sign[np.ix_(idx, idx)],
                          self.magnitude[np.ix_(idx, idx)], self.accuracy[np.ix_(idx, idx)],
                          self.n_test[np.ix_(idx, idx)], cavs)

    def scores(self, kind: str) -> np.ndarray:
        return self.sign if kind == "sign" else self.magnitude

    def better_than_chance(self) -> np.ndarray:
        """``[M, M]`` bool: the pair's CAV separates the two sets better than chance (one-sided
        binomial test of its held-out accuracy against 1/2 at :data:`CHANCE_LEVEL`)."""
        from scipy import stats

        n = np.maximum(self.n_test, 0)
        hits = np.rint(self.accuracy * n)
        p = np.where(n > 0, stats.binom.sf(hits - 1, np.maximum(n, 1), 0.5), 1.0)
        return (p < CHANCE_LEVEL) & (n > 0)


def pair_scores(gradients: np.ndarray, sets: Sequence[tuple[str, np.ndarray]], *, layer: str = "",
                pooling: str = "mean", classifier: str = "logistic", cav_alpha: float = 0.01,
                min_accuracy: float = 0.7, seed: int = 0, pairs: Sequence[tuple[int, int]] | None = None,
                known: dict[tuple[int, int], CAV] | None = None, progress: bool = False) -> PairScores:
    """Train one CAV per pair ``a < b`` of ``sets`` (``(name, activations [n, d])``) and score all of
    them on the target ``gradients`` ``[N, d]`` with one matrix product. ``pairs``: only these
    (default: every pair). The CAV from ``b`` to ``a`` is the negation of the one from ``a`` to ``b``,
    so a pool of M sets costs M (M - 1) / 2 CAVs; ``known`` CAVs (keyed by pair) are reused."""
    m = len(sets)
    if pairs is None:
        pairs = [(a, b) for a in range(m) for b in range(a + 1, m)]
    sign = np.full((m, m), np.nan)
    magnitude = np.full((m, m), np.nan)
    accuracy = np.full((m, m), np.nan)
    n_test = np.zeros((m, m), dtype=np.int64)
    cavs: dict[tuple[int, int], CAV] = {}
    from tqdm.auto import tqdm

    for a, b in tqdm(pairs, desc=f"CAVs {layer}", unit="cav", disable=not progress, leave=False):
        if known is not None and (a, b) in known:
            cavs[(a, b)] = known[(a, b)]
            continue
        (name_a, acts_a), (name_b, acts_b) = sets[a], sets[b]
        cavs[(a, b)] = train_cav(acts_a, acts_b, concept=name_a, negative=name_b, layer=layer, pooling=pooling,
                                 classifier=classifier, alpha=cav_alpha, min_accuracy=min_accuracy,
                                 seed=seed + 7919 * a + b)
    if cavs:
        keys = list(cavs)
        derivatives = directional_derivatives(gradients, [cavs[key] for key in keys])
        forward_sign, forward_magnitude = tcav_scores(derivatives)
        backward_sign, backward_magnitude = tcav_scores(-derivatives)
        for k, (a, b) in enumerate(keys):
            sign[a, b], sign[b, a] = forward_sign[k], backward_sign[k]
            magnitude[a, b], magnitude[b, a] = forward_magnitude[k], backward_magnitude[k]
            accuracy[a, b] = accuracy[b, a] = cavs[(a, b)].accuracy
            n_test[a, b] = n_test[b, a] = cavs[(a, b)].n_test
    return PairScores([name for name, _ in sets], sign, magnitude, accuracy, n_test, cavs)


@dataclass(frozen=True)
class ExchangeableTest:
    """The concept's statistic against the random sets' (see the module docstring)."""

    p_value: float
    statistic: float  # Student's t (test="exchangeable") or the concept's rank distance (test="rank")
    concept_mean: float  # T of the concept: its mean score against the N random sets
    random_means: np.ndarray  # T of each random set: its mean score against the N other sets of the pool
    effect_size: float
    effect_z: float


def exchangeable_test(scores: np.ndarray, *, test: str = "exchangeable", concept: int = 0) -> ExchangeableTest:
    """Test set ``concept`` of a pool against the pool's other sets from ``[M, M]`` pair scores
    (``scores[a, b]``: the score of the CAV from set ``b`` to set ``a``). ``test="exchangeable"``:
    Student's t of the concept's mean score among the random sets' mean scores; ``"rank"``: its
    exact rank (distance from the pool's mean score)."""
    from scipy import stats

    if test not in ("exchangeable", "rank"):
        raise ValueError(f"test must be 'exchangeable' or 'rank', got {test!r}")
    scores = np.asarray(scores, dtype=np.float64)
    m = scores.shape[0]
    if scores.shape != (m, m) or m < 4:
        raise ValueError(f"need the [M, M] pair scores of a concept and at least 3 random sets, got {scores.shape}")
    means = np.nanmean(np.where(np.eye(m, dtype=bool), np.nan, scores), axis=1)
    others = np.delete(means, concept)
    n = len(others)
    effect = float(means[concept] - others.mean())
    spread = float(others.std(ddof=1))
    z = effect / spread if spread > 0 else (0.0 if effect == 0 else math.copysign(math.inf, effect))
    distance = np.abs(means - means.mean())
    rank_p = float((distance >= distance[concept] - 1e-12).sum() / m)
    if test == "rank" or spread == 0:  # a constant baseline has no spread to scale by: use the exact rank
        return ExchangeableTest(rank_p, float(distance[concept]), float(means[concept]), others, effect, z)
    t = effect / (spread * math.sqrt(1 + 1 / n))
    p = float(2 * stats.t.sf(abs(t), df=n - 1))
    return ExchangeableTest(p, t, float(means[concept]), others, effect, z)


def _check_distinct(concepts: Sequence[ConceptSet], randoms: Sequence[ConceptSet]) -> None:
    random_ids = {r.identity: r.name for r in randoms if r.identity}
    for c in concepts:
        if c.identity and c.identity in random_ids:
            raise ValueError(
                f"concept set {c.name!r} is the same set of examples as random set {random_ids[c.identity]!r}; "
                "a concept must differ from its random counterparts"
            )
    names = [c.name for c in concepts]
    if len(set(names)) != len(names):
        raise ValueError(f"concept names must be unique, got {names}")


def tcav_test(gradients: np.ndarray, concept: tuple[str, np.ndarray], randoms: Sequence[tuple[str, np.ndarray]],
              counterpart: tuple[str, np.ndarray] | None = None, *, layer: str = "", target: str = "", pooling: str = "mean",
              classifier: str = "logistic", cav_alpha: float = 0.01, min_accuracy: float = 0.7, score: str = "sign",
              alpha: float = 0.05, num_tests: int = 1, seed: int = 0, test: str = "exchangeable",
              known: dict[tuple[int, int], CAV] | None = None) -> tuple[TCAVResult, list[CAV]]:
    """The statistical test of one (concept, layer, target) from precomputed pieces.

    ``gradients``: ``[N, d]`` target gradients of the examples (:func:`target_gradients`);
    ``concept``: ``(name, activations [n, d])``; ``randoms``: N such pairs. ``test``:
    ``"exchangeable"`` (default) or ``"rank"``: the pool test of the module docstring (needs
    N >= 3); the result is significant only when most concept CAVs beat chance. ``"ttest"``:
    tensorflow/tcav's scheme kept for comparison: CAVs of the concept against each random set give
    N concept scores; the random-vs-random baseline comes from a ``counterpart`` set's CAVs
    against each random set, or without one from CAVs of random set ``i`` against set ``i + 1``
    (mod N); ``ttest_ind`` compares the two (it treats the concept's N correlated scores as
    independent, which makes it anti-conservative). P-values are multiplied by ``num_tests``
    (Bonferroni). Returns the result and the concept's CAVs (then the baseline's). ``known``:
    CAVs of the pool (index 0 the concept, 1..N the random sets) already trained, reused.
    """
    if test not in TCAV_TESTS:
        raise ValueError(f"test must be one of {', '.join(TCAV_TESTS)}, got {test!r}")
    if test != "ttest":
        if counterpart is not None:
            raise ValueError("a counterpart set belongs to test='ttest'; the exchangeable test uses the random sets only")
        if len(randoms) < 3:
            raise ValueError(f"the exchangeable test needs at least 3 random sets, got {len(randoms)}")
        pool = pair_scores(gradients, [concept, *randoms], layer=layer, pooling=pooling, classifier=classifier,
                           cav_alpha=cav_alpha, min_accuracy=min_accuracy, seed=seed, known=known)
        return _pool_result(pool, concept[0], layer=layer, target=target, score=score, alpha=alpha,
                            num_tests=num_tests, test=test)
    def cavs_of(name: str, positive: np.ndarray) -> list[CAV]:
        return [train_cav(positive, negative, concept=name, negative=negative_name, layer=layer, pooling=pooling,
                          classifier=classifier, alpha=cav_alpha, min_accuracy=min_accuracy, seed=seed + i)
                for i, (negative_name, negative) in enumerate(randoms)]

    if len(randoms) < 2:
        raise ValueError(f"the t-test needs at least 2 random sets, got {len(randoms)}")
    concept_cavs = cavs_of(concept[0], concept[1])
    if counterpart is not None:
        counterpart_cavs = cavs_of(counterpart[0], counterpart[1])
    else:
        counterpart_cavs = [
            train_cav(positive, randoms[(i + 1) % len(randoms)][1], concept=name, negative=randoms[(i + 1) % len(randoms)][0],
                      layer=layer, pooling=pooling, classifier=classifier, alpha=cav_alpha, min_accuracy=min_accuracy,
                      seed=seed + i)
            for i, (name, positive) in enumerate(randoms)
        ]
    sign, magnitude = tcav_scores(directional_derivatives(gradients, concept_cavs))
    random_sign, random_magnitude = tcav_scores(directional_derivatives(gradients, counterpart_cavs))
    chosen, baseline = (sign, random_sign) if score == "sign" else (magnitude, random_magnitude)
    p = _ttest(chosen, baseline)
    p_adjusted = min(1.0, p * num_tests)
    result = TCAVResult(
        concept=concept[0], layer=layer, target=target, scores=sign.tolist(), magnitudes=magnitude.tolist(),
        random_scores=random_sign.tolist(), random_magnitudes=random_magnitude.tolist(),
        cav_accuracies=[cav.accuracy for cav in concept_cavs], p_value=p, p_adjusted=p_adjusted,
        significant=p_adjusted < alpha, alpha=alpha, score_kind=score,
        flagged_cavs=sum(cav.flagged for cav in concept_cavs), test="ttest",
        effect_size=float(np.mean(chosen) - np.mean(baseline)),
        effect_z=float((np.mean(chosen) - np.mean(baseline)) / max(float(np.std(baseline, ddof=1)), 1e-12)),
        cavs_at_chance=int(sum(not _beats_chance(cav) for cav in concept_cavs)),
    )
    return result, concept_cavs + counterpart_cavs


def _pool_keys(cavs: list[CAV], n: int) -> list[tuple[tuple[int, int], CAV]]:
    """The pool pair of each CAV a pool test returned: the N concept CAVs first, then the random
    pairs in the order :func:`pair_scores` trains them."""
    keys = [(0, b) for b in range(1, n + 1)] + [(a, b) for a in range(1, n + 1) for b in range(a + 1, n + 1)]
    return list(zip(keys, cavs))


def _beats_chance(cav: CAV) -> bool:
    from scipy import stats

    if cav.n_test <= 0:
        return False
    hits = round(cav.accuracy * cav.n_test)
    return bool(stats.binom.sf(hits - 1, cav.n_test, 0.5) < CHANCE_LEVEL)


def _pool_result(pool: PairScores, name: str, *, layer: str, target: str, score: str, alpha: float,
                 num_tests: int, test: str) -> tuple[TCAVResult, list[CAV]]:
    """The TCAV result of set 0 of ``pool`` against the pool's other (random) sets."""
    outcome = exchangeable_test(pool.scores(score), test=test)
    n = len(pool.names) - 1
    concept_cavs = [pool.cavs[(0, i)] for i in range(1, n + 1)]
    random_cavs = [cav for (a, _), cav in pool.cavs.items() if a > 0]
    at_chance = int((~pool.better_than_chance()[0, 1:]).sum())
    p_adjusted = min(1.0, outcome.p_value * num_tests)
    result = TCAVResult(
        concept=name, layer=layer, target=target, scores=pool.sign[0, 1:].tolist(),
        magnitudes=pool.magnitude[0, 1:].tolist(),
        random_scores=exchangeable_test(pool.sign, test=test).random_means.tolist(),
        random_magnitudes=exchangeable_test(pool.magnitude, test=test).random_means.tolist(),
        cav_accuracies=[cav.accuracy for cav in concept_cavs], p_value=outcome.p_value, p_adjusted=p_adjusted,
        # a concept whose CAVs mostly cannot tell it from random images has no direction to test
        significant=bool(p_adjusted < alpha and at_chance < n / 2), alpha=alpha, score_kind=score,
        flagged_cavs=sum(cav.flagged for cav in concept_cavs), test=test, effect_size=outcome.effect_size,
        effect_z=outcome.effect_z, cavs_at_chance=at_chance,
    )
    return result, concept_cavs + random_cavs


def run_tcav(model: LoadedModel | nn.Module, *, layers: str | Sequence[str], concepts: Sequence[ConceptSet],
             random_sets: Sequence[ConceptSet], examples: ConceptSet, targets: Sequence[Feature | int | str] | Feature | int | str = 0,
             pooling: str = "mean", classifier: str = "logistic", alpha: float = 0.05, score: str = "sign",
             min_accuracy: float = 0.7, cav_alpha: float = 0.01, batch_size: int = 32, seed: int = 0,
             baseline: str = "pairs", test: str = "exchangeable",
             preprocessing: Preprocessing | None = None, progress: bool = False) -> TCAVReport:
    """TCAV of every concept x layer x target, with a calibrated significance test.

    ``random_sets``: the N >= 3 random sets (at least 10 recommended; the calibration and power
    figures are in the README). ``test``: ``"exchangeable"`` (default), ``"rank"`` or
    ``"ttest"`` (see :func:`tcav_test`); for ``"ttest"`` only, ``baseline="pairs"`` takes the
    random-vs-random scores from CAVs of set i against set i + 1 and ``"counterpart"`` holds out
    the first set as tensorflow/tcav's random counterpart. ``targets`` take features or spec
    strings (``"class:4"``). ``progress``: a bar over the sets' forwards, the targets' backwards
    and the tests (each test trains the pool's CAVs).
    """
    if test not in TCAV_TESTS:
        raise ValueError(f"test must be one of {', '.join(TCAV_TESTS)}, got {test!r}")

    if score not in ("sign", "magnitude"):
        raise ValueError(f"score must be 'sign' or 'magnitude', got {score!r}")
    if not concepts:
        raise ValueError("run_tcav needs at least one concept set")
    if baseline not in ("pairs", "counterpart"):
        raise ValueError(f"baseline must be 'pairs' or 'counterpart', got {baseline!r}")
    if test != "ttest" and baseline != "pairs":
        raise ValueError("baseline= belongs to test='ttest'; the exchangeable test builds its null from the random sets")
    if len(random_sets) < 3:
        raise ValueError(f"run_tcav needs at least 3 random sets, got {len(random_sets)}")
    _check_distinct(concepts, random_sets)
    net, preprocessing = unwrap_with_preprocessing(model, preprocessing)
    layer_names = [layers] if isinstance(layers, str) else list(layers)
    for layer in layer_names:
        resolve_layers(net, [layer])  # an unknown layer fails here, with close names
    features = as_features(targets)
    counterpart = random_sets[0] if baseline == "counterpart" else None
    randoms = list(random_sets[1:]) if baseline == "counterpart" else list(random_sets)
    num_tests = len(concepts) * len(layer_names) * len(features)
    results: list[TCAVResult] = []
    all_cavs: list[CAV] = []

    def acts(s: ConceptSet) -> dict[str, np.ndarray]:
        if s.activations is not None:
            return {s.layer: concept_activations(net, s, s.layer, pooling=pooling)}  # type: ignore[dict-item]
        return concept_activations(net, s, layer_names, pooling=pooling, batch_size=batch_size,  # type: ignore[return-value]
                                   preprocessing=preprocessing)

    def at(s_acts: dict[str, np.ndarray], s: ConceptSet, layer: str) -> np.ndarray:
        if layer not in s_acts:
            raise ValueError(f"set {s.name!r} holds activations of layer {s.layer!r} only; TCAV at {layer!r} needs images")
        return s_acts[layer]

    concept_pairs: dict[tuple[str, str], dict[tuple[int, int], CAV]] = {}
    saved: set[tuple[str, str]] = set()
    from tqdm.auto import tqdm

    steps = len(randoms) + (counterpart is not None) + len(concepts) + len(features) + num_tests
    bar = tqdm(total=steps, desc="tcav", unit="step", disable=not progress)

    def step(value: Any) -> Any:
        bar.update(1)
        return value

    # One forward pass per set (all layers at once) and one backward pass per target.
    random_acts = [step(acts(r)) for r in randoms]
    counterpart_acts = step(acts(counterpart)) if counterpart is not None else None
    concept_acts = [step(acts(c)) for c in concepts]
    gradients = {id(f): step(target_gradients(net, layer_names, examples, f, pooling=pooling, batch_size=batch_size,
                                              preprocessing=preprocessing)) for f in features}
    for layer in layer_names:
        randoms_here = [(r.name, at(ra, r, layer)) for r, ra in zip(randoms, random_acts)]
        counterpart_here = (counterpart.name, at(counterpart_acts, counterpart, layer)) if counterpart else None
        random_pairs: dict[tuple[int, int], CAV] = {}  # shared by every concept and target at this layer
        for feature in features:
            for c, ca in zip(concepts, concept_acts):
                known = {**random_pairs, **concept_pairs.get((c.name, layer), {})}
                result, cavs = tcav_test(
                    gradients[id(feature)][layer], (c.name, at(ca, c, layer)), randoms_here, counterpart_here,
                    layer=layer, target=feature.name, pooling=pooling, classifier=classifier, cav_alpha=cav_alpha,
                    min_accuracy=min_accuracy, score=score, alpha=alpha, num_tests=num_tests, seed=seed, test=test,
                    known=known if test != "ttest" else None,
                )
                results.append(step(result))
                if test != "ttest":
                    n = len(randoms_here)
                    random_pairs.update({(a, b): cav for (a, b), cav in _pool_keys(cavs, n) if a > 0})
                    concept_pairs[(c.name, layer)] = {(0, b): cav for (a, b), cav in _pool_keys(cavs, n) if a == 0}
                if (c.name, layer) not in saved:  # each CAV once, whatever the number of targets
                    saved.add((c.name, layer))
                    all_cavs += cavs
    bar.close()
    return TCAVReport(results=results, alpha=alpha, num_tests=num_tests, cavs=all_cavs)


@dataclass
class RelativeTCAVResult:
    """TCAV of concept A against concept B (instead of random): > 0.5 means A drives the target more."""

    concept: str
    other: str
    layer: str
    target: str
    scores: list[float]
    p_value: float  # one-sample t-test of the scores against 0.5

    @property
    def mean(self) -> float:
        return float(np.mean(self.scores))


def relative_tcav(model: LoadedModel | nn.Module, *, layer: str, concept: ConceptSet, other: ConceptSet,
                  examples: ConceptSet, target: Feature | int | str = 0, runs: int = 10, subsample: float = 0.8,
                  pooling: str = "mean", classifier: str = "logistic", batch_size: int = 32, seed: int = 0,
                  preprocessing: Preprocessing | None = None) -> RelativeTCAVResult:
    """Relative TCAV: ``runs`` CAVs of ``concept`` vs ``other`` on seeded subsamples of both sets."""
    from scipy import stats

    _check_distinct([concept], [other])
    net, preprocessing = unwrap_with_preprocessing(model, preprocessing)
    a = concept_activations(net, concept, layer, pooling=pooling, batch_size=batch_size, preprocessing=preprocessing)
    b = concept_activations(net, other, layer, pooling=pooling, batch_size=batch_size, preprocessing=preprocessing)
    rng = np.random.default_rng(seed)
    cavs = []
    for run in range(runs):
        pick_a = rng.choice(len(a), max(2, int(len(a) * subsample)), replace=False)
        pick_b = rng.choice(len(b), max(2, int(len(b) * subsample)), replace=False)
        cavs.append(train_cav(a[pick_a], b[pick_b], concept=concept.name, negative=other.name, layer=layer,
                              pooling=pooling, classifier=classifier, seed=seed + run))
    feature = as_feature(target)
    grads = target_gradients(net, layer, examples, feature, pooling=pooling, batch_size=batch_size,
                             preprocessing=preprocessing)
    sign, _ = tcav_scores(directional_derivatives(grads, cavs))
    import warnings

    with warnings.catch_warnings():  # nearly constant scores: scipy warns, the p-value is still defined
        warnings.simplefilter("ignore", RuntimeWarning)
        p = 1.0 if np.ptp(sign) == 0 and sign[0] == 0.5 else float(stats.ttest_1samp(sign, 0.5).pvalue)
    if not math.isfinite(p):
        p = 0.0 if sign[0] != 0.5 else 1.0  # constant scores away from 0.5: unanimous
    return RelativeTCAVResult(concept.name, other.name, layer, feature.name, sign.tolist(), p)
