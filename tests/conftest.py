"""Shared fixtures.

``trained_shapes_model``: the reference SmallCNN trained on SyntheticShapes with a ruler planted
on 95% of the ``square`` images (``mechlens.models.ShapesRecipe()``), trained once and cached
across sessions in pytest's cache directory (``.pytest_cache/d/mechlens_shapes_model``). The
cache key hashes the recipe, the code that determines the weights and the torch version, so a
change to any of them retrains (about a minute on 2 CPU cores). Its reliance figures are
measured afresh every session.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

# Validity thresholds must hold for any machine, not only for the model trained on the machine
# the test was written on. CPUs differ in float results, and so do the trained weights; the
# spread over training seeds (and 1 vs 2 threads) stands in for that. To measure it:
#   MECHLENS_TEST_SHAPES_SEED=3 MECHLENS_RECORD_FIGURES=figures.jsonl python -m pytest -p no:cacheprovider ...
# (benchmarks/validity_spread.py runs that over several seeds and thread counts and prints the table).
SHAPES_SEED = int(os.environ.get("MECHLENS_TEST_SHAPES_SEED", "0"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op thread for a module's tests: CI and dev machines are shared, and torch's
    threads spin badly under contention (use ``pytestmark = pytest.mark.usefixtures(...)``)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def record_figures(request: pytest.FixtureRequest):
    """``record_figures(**values)``: append the test's measured figures to the JSON-lines file named
    by ``MECHLENS_RECORD_FIGURES`` (a no-op without it), before the test asserts on them."""
    path = os.environ.get("MECHLENS_RECORD_FIGURES")

    def record(**values) -> None:
        if path:
            line = {"test": request.node.name, "seed": SHAPES_SEED, "threads": _threads(), **values}
            with open(path, "a") as handle:
                handle.write(json.dumps(line, default=_plain) + "\n")

    return record


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _plain(value):
    tolist = getattr(value, "tolist", None)
    return tolist() if tolist is not None else str(value)


@pytest.fixture(scope="session")
def trained_shapes_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A :class:`mechlens.models.ShapesClassifier` (``.model``, ``.loaded``, ``.recipe``,
    ``.reliance``, ``.train_dataset()``, ``.test_dataset()``, ``.checkpoint``)."""
    from mechlens.models.shapes import ShapesRecipe, load_or_train_shapes_classifier

    cache = getattr(request.config, "cache", None)  # absent with -p no:cacheprovider
    if cache is not None:
        cache_dir = cache.mkdir("mechlens_shapes_model")
    else:
        cache_dir = tmp_path_factory.mktemp("mechlens_shapes_model")
    recipe = ShapesRecipe(seed=SHAPES_SEED, model_seed=SHAPES_SEED) if SHAPES_SEED else ShapesRecipe()
    return load_or_train_shapes_classifier(recipe, cache_dir=cache_dir)
