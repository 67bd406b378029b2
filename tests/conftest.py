"""Shared fixtures.

``trained_shapes_model``: the reference SmallCNN trained on SyntheticShapes with a ruler planted
on 95% of the ``square`` images (``mechlens.models.ShapesRecipe()``), trained once and cached
across sessions in pytest's cache directory (``.pytest_cache/d/mechlens_shapes_model``). The
cache key hashes the recipe, the code that determines the weights and the torch version, so a
change to any of them retrains (about a minute on 2 CPU cores). Its reliance figures are
measured afresh every session.
"""
from __future__ import annotations

import pytest


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
    return load_or_train_shapes_classifier(ShapesRecipe(), cache_dir=cache_dir)
