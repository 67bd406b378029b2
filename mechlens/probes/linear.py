"""Linear probes on stored activations (scikit-learn estimator conventions) and the alignment
of CAVs with an SAE's decoder directions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

__all__ = ["CAVAlignment", "LinearProbe", "cav_sae_alignment", "probe_store"]


class LinearProbe(ClassifierMixin, BaseEstimator):
    """A linear classifier on activations: standardised features, then (multinomial) logistic
    regression, or SGD with ``partial_fit`` for stores larger than memory.

    Learnt attributes: ``classes_``, ``coef_`` ``[n_classes or 1, d]`` and ``intercept_`` in the
    *raw* activation space (the standardisation is folded in), ``mean_``, ``scale_``.
    """

    def __init__(self, *, C: float = 1.0, solver: str = "logistic", standardize: bool = True,
                 max_iter: int = 1000, random_state: int | None = 0) -> None:
        self.C = C
        self.solver = solver
        self.standardize = standardize
        self.max_iter = max_iter
        self.random_state = random_state

    def _estimator(self):
        from sklearn.linear_model import LogisticRegression, SGDClassifier

        if self.solver == "logistic":
            return LogisticRegression(C=self.C, max_iter=self.max_iter)
        if self.solver == "sgd":
            return SGDClassifier(loss="log_loss", alpha=1.0 / (self.C * 1000), random_state=self.random_state)
        raise ValueError(f"solver must be 'logistic' or 'sgd', got {self.solver!r}")

    def _scale(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) / self.scale_

    def fit(self, X: Any, y: Any) -> "LinearProbe":
        X = np.asarray(X, dtype=np.float64)
        y = np.asarray(y)
        if X.ndim != 2 or len(X) != len(y):
            raise ValueError(f"X must be [n, d] with one label per row, got X {X.shape} and y {y.shape}")
        if len(np.unique(y)) < 2:
            raise ValueError("a probe needs at least 2 distinct labels")
        self.mean_ = X.mean(axis=0) if self.standardize else np.zeros(X.shape[1])
        scale = X.std(axis=0) if self.standardize else np.ones(X.shape[1])
        self.scale_ = np.where(scale > 0, scale, 1.0)
        self.estimator_ = self._estimator().fit(self._scale(X), y)
        self._fold()
        return self

    def partial_fit(self, X: Any, y: Any, classes: Sequence[Any] | None = None) -> "LinearProbe":
        """One streaming step (``solver="sgd"``); the first call fixes the standardisation from its batch."""
        if self.solver != "sgd":
            raise ValueError("partial_fit needs solver='sgd'")
        X = np.asarray(X, dtype=np.float64)
        if not hasattr(self, "estimator_"):
            if classes is None:
                raise ValueError("the first partial_fit call needs classes=")
            self.mean_ = X.mean(axis=0) if self.standardize else np.zeros(X.shape[1])
            scale = X.std(axis=0) if self.standardize else np.ones(X.shape[1])
            self.scale_ = np.where(scale > 0, scale, 1.0)
            self.estimator_ = self._estimator()
            self.estimator_.partial_fit(self._scale(X), y, classes=classes)
        else:
            self.estimator_.partial_fit(self._scale(X), y)
        self._fold()
        return self

    def _fold(self) -> None:
        est = self.estimator_
        self.classes_ = est.classes_
        self.coef_ = est.coef_ / self.scale_
        self.intercept_ = est.intercept_ - self.coef_ @ self.mean_

    def decision_function(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.decision_function(self._scale(np.asarray(X, dtype=np.float64)))

    def predict(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict(self._scale(np.asarray(X, dtype=np.float64)))

    def predict_proba(self, X: Any) -> np.ndarray:
        check_is_fitted(self, "estimator_")
        return self.estimator_.predict_proba(self._scale(np.asarray(X, dtype=np.float64)))


def probe_store(view: Any, *, labels: np.ndarray | None = None, test_fraction: float = 0.25, seed: int = 0,
                probe: LinearProbe | None = None, max_rows: int | None = None) -> tuple[LinearProbe, float]:
    """Fit a probe on a store layer (``store[layer]``) against ``labels`` (one per row; the stored
    labels when None) and return it with its held-out accuracy. Rows are split by *sample id*,
    so positions of one image never sit on both sides of the split."""
    index = view.read_index()
    y = index.label if labels is None else np.asarray(labels)
    if len(y) != view.shape[0]:
        raise ValueError(f"{len(y)} labels for {view.shape[0]} rows")
    rows = np.arange(view.shape[0])
    if labels is None and (y < 0).all():
        raise ValueError("the store has no labels (all -1); pass labels=")
    rng = np.random.default_rng(seed)
    if max_rows is not None and len(rows) > max_rows:
        rows = np.sort(rng.choice(rows, max_rows, replace=False))
    samples = np.unique(index.sample_id[rows])
    test_samples = rng.choice(samples, max(1, int(len(samples) * test_fraction)), replace=False)
    is_test = np.isin(index.sample_id[rows], test_samples)
    X = view.read_rows(rows).astype(np.float32)
    probe = probe or LinearProbe()
    probe.fit(X[~is_test], y[rows][~is_test])
    return probe, float(probe.score(X[is_test], y[rows][is_test]))


@dataclass
class CAVAlignment:
    """SAE latents whose decoder directions best align with a CAV."""

    latents: np.ndarray  # [k] latent indices, best first
    cosines: np.ndarray  # [k]


def cav_sae_alignment(cav: Any, sae_or_decoder: Any, *, top_k: int = 10, absolute: bool = False) -> CAVAlignment:
    """Cosine of a CAV (or any vector) with every decoder row ``W_dec[i]`` of an SAE."""
    vector = np.asarray(getattr(cav, "vector", cav), dtype=np.float64).reshape(-1)
    decoder = getattr(sae_or_decoder, "W_dec", sae_or_decoder)
    decoder = decoder.detach().cpu().numpy() if hasattr(decoder, "detach") else np.asarray(decoder)
    decoder = decoder.astype(np.float64)
    if decoder.ndim != 2 or decoder.shape[1] != vector.size:
        raise ValueError(f"decoder {decoder.shape} does not match a CAV of {vector.size} dimensions "
                         "(the SAE and the CAV must be of the same layer, and the CAV not flattened)")
    cos = decoder @ vector / (np.linalg.norm(decoder, axis=1) * np.linalg.norm(vector) + 1e-12)
    key = np.abs(cos) if absolute else cos
    order = np.argsort(-key)[:top_k]
    return CAVAlignment(latents=order, cosines=cos[order])
