"""Concept activation vectors (CAVs): a linear classifier separating a concept's activations from
a counterpart set's; the CAV is its unit normal, pointing towards the concept.

Classifiers as in tensorflow/tcav: logistic regression (default), a linear SVM, or SGD. The
classes are balanced (the larger set is subsampled, seeded), a stratified held-out split gives
the accuracy reported with every CAV, and a CAV below ``min_accuracy`` is flagged: its
direction may not mean anything.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from activation_store.jsonutil import dumps as json_dumps

__all__ = ["CAV", "CAVNotFoundError", "CAV_CLASSIFIERS", "ConstantActivationsError", "cav_file_stem", "save_cavs", "train_cav"]

CAV_CLASSIFIERS = ("logistic", "linear_svm", "sgd")


class CAVNotFoundError(FileNotFoundError, ValueError):
    """No saved CAV at the given path (a ``FileNotFoundError`` that is also a ``ValueError``, so a bad
    ``cav:PATH`` feature spec fails like every other bad spec)."""


class ConstantActivationsError(ValueError):
    """Activations do not vary, so no direction separates the sets (the CAV is undefined)."""


@dataclass
class CAV:
    """A unit direction at ``layer`` pointing from ``negative`` towards ``concept``."""

    concept: str
    negative: str
    layer: str
    vector: np.ndarray  # [d], unit norm
    intercept: float
    accuracy: float  # held-out accuracy of the classifier
    pooling: str = "mean"
    classifier: str = "logistic"
    n_train: int = 0
    n_test: int = 0
    min_accuracy: float = 0.7
    seed: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def flagged(self) -> bool:
        """True when the held-out accuracy is below ``min_accuracy``."""
        return self.accuracy < self.min_accuracy

    def feature(self):
        """This CAV as a :class:`mechlens.features.Direction` (projection onto the CAV)."""
        from mechlens.features import Direction

        pooling = "all" if self.pooling == "flatten" else self.pooling
        if self.pooling == "flatten":
            raise ValueError("a CAV on flattened activations has no per-position direction; use pooling='mean'")
        return Direction(self.layer, torch.from_numpy(self.vector.astype(np.float32)), label=f"cav:{self.concept}",
                         pooling=pooling)

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``PATH.safetensors`` (the vector) and ``PATH.json`` (everything else)."""
        from safetensors.numpy import save_file

        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        base.parent.mkdir(parents=True, exist_ok=True)
        save_file({"vector": np.ascontiguousarray(self.vector, dtype=np.float32)}, str(base) + ".safetensors")
        meta = {k: v for k, v in asdict(self).items() if k != "vector"}
        meta["format"] = "mechlens.cav/1"
        Path(str(base) + ".json").write_text(json_dumps(meta, indent=2))
        return base

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CAV":
        """Read a CAV written by :meth:`save` (``PATH``, ``PATH.json`` or ``PATH.safetensors``)."""
        from safetensors.numpy import load_file

        base = Path(path)
        base = base.with_suffix("") if base.suffix in (".json", ".safetensors") else base
        meta_path = Path(str(base) + ".json")
        if not meta_path.is_file():
            raise CAVNotFoundError(f"no CAV at {base} (expected {meta_path} and {base}.safetensors)")
        meta = json.loads(meta_path.read_text())
        if meta.pop("format", None) != "mechlens.cav/1":
            raise ValueError(f"{meta_path} is not a mechlens CAV")
        vector = load_file(str(base) + ".safetensors")["vector"]
        return cls(vector=vector, **meta)


def cav_file_stem(cav: CAV) -> str:
    """``{concept}-{layer}-vs-{negative}``: the file name (without suffix) :func:`save_cavs` uses.

    Each part must pass :func:`activation_store.check_name` (letters, digits, ``_ . : -``; dotted
    layer names such as ``layer1.0.conv1`` are fine); a name that could leave the folder
    (``../x``, ``a/b``) raises ``ValueError`` instead of being rewritten.
    """
    from activation_store.manifest import check_name

    stem = f"{check_name(cav.concept, 'concept')}-{check_name(cav.layer, 'layer')}-vs-{check_name(cav.negative, 'negative set')}"
    check_name(stem, "CAV file")
    if Path(stem).suffix in (".json", ".safetensors"):  # CAV.save would take it for a suffix and drop it
        raise ValueError(f"CAV file name {stem!r} ends in {Path(stem).suffix!r}; rename the negative set {cav.negative!r}")
    return stem


def save_cavs(cavs, directory: str | os.PathLike) -> list[Path]:
    """Save each CAV as ``directory/{concept}-{layer}-vs-{negative}`` (see :meth:`CAV.save`).

    Every name is checked before anything is written, and two CAVs whose file names would
    coincide are refused rather than one overwriting the other. Returns the paths (no suffix).
    """
    from activation_store.manifest import safe_join

    directory = Path(directory)
    cavs = list(cavs)
    stems = [cav_file_stem(cav) for cav in cavs]
    seen: dict[str, CAV] = {}
    for cav, stem in zip(cavs, stems):
        if stem in seen:
            other = seen[stem]
            raise ValueError(f"CAVs ({cav.concept!r}, {cav.layer!r}, {cav.negative!r}) and ({other.concept!r}, "
                             f"{other.layer!r}, {other.negative!r}) would both be saved as {stem!r}; rename a concept")
        seen[stem] = cav
    directory.mkdir(parents=True, exist_ok=True)
    paths = [safe_join(directory, stem, "CAV file") for stem in stems]  # also refuses a symlink leading out
    return [cav.save(path) for cav, path in zip(cavs, paths)]


def _make_classifier(kind: str, seed: int, alpha: float):
    from sklearn.linear_model import LogisticRegression, SGDClassifier
    from sklearn.svm import LinearSVC

    if kind == "logistic":
        return LogisticRegression(C=1.0 / alpha, max_iter=2000)
    if kind == "linear_svm":
        return LinearSVC(C=1.0 / alpha, max_iter=5000, random_state=seed)
    if kind == "sgd":
        return SGDClassifier(alpha=alpha * 1e-2, max_iter=2000, tol=1e-4, random_state=seed)
    raise ValueError(f"unknown CAV classifier {kind!r}; expected one of {', '.join(CAV_CLASSIFIERS)}")


def train_cav(concept_acts: np.ndarray, negative_acts: np.ndarray, *, concept: str = "concept",
              negative: str = "random", layer: str = "", pooling: str = "mean", classifier: str = "logistic",
              test_fraction: float = 0.33, alpha: float = 0.01, min_accuracy: float = 0.7,
              seed: int = 0) -> CAV:
    """Fit a CAV separating ``concept_acts`` ``[N, d]`` from ``negative_acts`` ``[M, d]``."""
    from sklearn.model_selection import train_test_split

    pos = np.asarray(concept_acts, dtype=np.float64)
    neg = np.asarray(negative_acts, dtype=np.float64)
    for name, acts in ((concept, pos), (negative, neg)):
        if acts.ndim != 2:
            raise ValueError(f"activations of {name!r} must be [N, d], got shape {acts.shape}")
        if len(acts) < 2:
            raise ValueError(f"set {name!r} has {len(acts)} example(s); a CAV needs at least 2 per set")
        if not np.isfinite(acts).all():
            raise ValueError(f"activations of {name!r} hold NaN or Inf")
    if pos.shape[1] != neg.shape[1]:
        raise ValueError(f"concept activations have width {pos.shape[1]} but {negative!r} has {neg.shape[1]}")
    rng = np.random.default_rng(seed)
    n = min(len(pos), len(neg))  # balanced classes: subsample the larger set
    pos = pos[np.sort(rng.choice(len(pos), n, replace=False))]
    neg = neg[np.sort(rng.choice(len(neg), n, replace=False))]
    x = np.concatenate([pos, neg])
    y = np.concatenate([np.ones(n, dtype=int), np.zeros(n, dtype=int)])
    if np.ptp(x, axis=0).max() == 0:
        raise ConstantActivationsError(
            f"activations of {concept!r} and {negative!r} at layer {layer!r} are all identical (constant); "
            "no direction separates them, so the CAV is undefined. Pick another layer or other examples."
        )
    if np.array_equal(np.unique(pos, axis=0), np.unique(neg, axis=0)):
        raise ValueError(f"concept {concept!r} and {negative!r} have identical activations: they are the same set")
    n_test = max(2, int(round(2 * n * test_fraction))) if n >= 3 else 0
    if n_test:
        x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=n_test, stratify=y, random_state=seed)
    else:  # 2 examples per set: nothing to hold out, accuracy is measured on the training data
        x_train, x_test, y_train, y_test = x, x, y, y
    # Standardised inputs make the solvers converge in a few iterations whatever the layer's
    # scale; the boundary is mapped back to raw activation space below.
    mean = x_train.mean(axis=0)
    scale = x_train.std(axis=0)
    scale = np.where(scale > 0, scale, 1.0)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # tiny problems: BLAS threads only add overhead (7x here)
        model = _make_classifier(classifier, seed, alpha).fit((x_train - mean) / scale, y_train)
    accuracy = float((model.predict((x_test - mean) / scale) == y_test).mean())
    # positive side = concept (label 1); w.(x-m)/s + b = (w/s).x + (b - (w/s).m)
    weights = np.asarray(model.coef_, dtype=np.float64).reshape(-1) / scale
    intercept = float(np.asarray(model.intercept_).reshape(-1)[0] - weights @ mean)
    norm = np.linalg.norm(weights)
    if not np.isfinite(norm) or norm == 0:
        raise ConstantActivationsError(f"the {classifier} classifier for {concept!r} learnt a zero direction")
    return CAV(concept=concept, negative=negative, layer=layer, vector=(weights / norm).astype(np.float32),
               intercept=intercept / norm, accuracy=accuracy,
               pooling=pooling, classifier=classifier, n_train=len(x_train), n_test=len(x_test) if n_test else 0,
               min_accuracy=min_accuracy, seed=seed)
