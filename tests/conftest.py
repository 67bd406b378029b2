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


@pytest.fixture(scope="session")
def shapes_saes(trained_shapes_model, tmp_path_factory: pytest.TempPathFactory):
    """TopK SAEs (512 latents, k=8) on ``stage2`` and ``stage3`` of ``trained_shapes_model``, trained
    as the demo trains its SAE, on 1000 images of the training distribution (the ruler on the
    squares): ``.stage2``, ``.stage3``, ``.store``, ``.captured`` (the images' dataset). ~30 s."""
    import types

    from mechlens.capture import capture_to_store
    from mechlens.data import build_dataset
    from mechlens.sae import TopKConfig, TrainConfig, train_sae

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recipe = trained_shapes_model.recipe
        data = recipe.train_data
        spec = (f"synthetic:shapes?n=1000&size={data.image_size}&seed={SHAPES_SEED + 7}&split=capture"
                f"&artefact_class={data.artefact_class}&artefact_p={data.artefact_probability}")
        out = tmp_path_factory.mktemp("shapes_saes")
        capture_to_store(trained_shapes_model.loaded, spec, out / "store", layers=["stage2", "stage3"], spatial="all",
                         dtype="float16", batch_size=128, progress=False)
        saes = {}
        for layer in ("stage2", "stage3"):
            # lr 4e-4: the recipe these SAEs had when the validity thresholds that use them were measured
            # over seeds (TrainConfig's default became lr="rule" later)
            result = train_sae(out / "store", layer, TopKConfig(width=512, k=8),
                               TrainConfig(steps=1500, batch_size=1024, seed=0, lr=4e-4, lr_warmup_fraction=100 / 1500),
                               out=out / f"sae-{layer}", progress=False)
            saes[layer] = (result.sae if hasattr(result, "sae") else result.saes[0]).eval()
        return types.SimpleNamespace(store=out / "store", captured=build_dataset(spec), **saes)
    finally:
        torch.set_num_threads(before)
