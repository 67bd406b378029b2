"""ROAR (Hooker et al. 2019): remove the top pixels of a method's maps from the training and test
images, retrain from scratch, and compare the test accuracy with a random ranking's.

The planted-shortcut setting, small enough for one core: 32x32 shapes (circle / square / stripes,
the ruler on 95% of the squares), 2000 training and 400 test images, a SmallCNN of width 8 with one
block per stage and a stride-2 stem, 10 epochs (~4 s per retrain). Removing the top pixels of
gradient x input hurts more than removing random pixels. Measured over seeds 0-4 (data, model and
retraining seed together), test accuracy unmodified / at 10% / at 30% removed:

    seed  unmodified  input_x_gradient  random         random - method (mean)
    0     0.962       0.928  0.873      0.960  0.935   0.032  0.062  (0.047)
    1     0.980       0.910  0.853      0.960  0.938   0.050  0.085  (0.068)
    2     0.960       0.900  0.905      0.962  0.930   0.062  0.025  (0.044)
    3     0.970       0.920  0.913      0.955  0.930   0.035  0.017  (0.026)
    4     0.970       0.915  0.865      0.925  0.892   0.010  0.027  (0.018)

At this scale random removal is not harmless (scattered mean-coloured pixels are noise a model
trained for 10 epochs has to learn to ignore), and coarse maps (occlusion windows, Grad-CAM) lose
to it: removing a blob leaves the rest of the image clean, and the blob's outline leaks the shape
(the ROAD critique). The test runs seed 0 and checks the mean gap against the smallest seen.
"""
from __future__ import annotations

import pytest
import torch

from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from mechlens.evaluation.roar import RetrainRecipe, RoarResult, pixel_ranks, remove_top_pixels, roar
from mechlens.models import small_cnn
from mechlens.models.training import train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CONFIG = SyntheticShapesConfig(num_samples=2000, image_size=32, classes=("circle", "square", "stripes"), seed=0,
                               split="train", artefact_class=1, artefact_probability=0.95)


def make_model() -> torch.nn.Module:
    return small_cnn(3, width=8, depth=3, blocks_per_stage=1, stem_stride=2, seed=0)


@pytest.fixture(scope="module")
def shortcut():
    train, test = SyntheticShapes(CONFIG), SyntheticShapes(CONFIG.replace(num_samples=400, split="test"))
    model = make_model()
    train_classifier(model, train, epochs=10, batch_size=64, seed=0, progress=False, channels_last=True)
    return model.eval(), train, test


@pytest.fixture(scope="module")
def roar_run(shortcut, tmp_path_factory):
    """One ROAR run in two goes, as a killed run would be resumed: first 10% only, then 10% and
    30%, reading back what the first go cached; then a third go that only reads."""
    model, train, test = shortcut
    cache = tmp_path_factory.mktemp("roar_cache")
    recipe = RetrainRecipe(make_model, epochs=10, seed=0)
    kw = dict(recipe=recipe, cache_dir=cache, seed=0)
    first = roar(model, train, test, ["input_x_gradient"], fractions=(0.1,), **kw)
    result = roar(model, train, test, ["input_x_gradient"], fractions=(0.1, 0.3), **kw)
    again = roar(model, train, test, ["input_x_gradient"], fractions=(0.1, 0.3), **kw)
    return first, result, again


def test_roar_faithful_ranking_hurts_more_than_random(roar_run, record_figures) -> None:
    _, result, _ = roar_run
    record_figures(**{m: v for m, v in result.accuracy.items()})
    assert result.fractions == [0.0, 0.1, 0.3]
    assert set(result.accuracy) == {"input_x_gradient", "random"} and result.methods == ["input_x_gradient"]
    assert result.unmodified_accuracy > 0.9  # the shortcut model learns the task (0.96-0.98 over seeds)
    gaps = result.vs_random("input_x_gradient")
    assert gaps[0] == 0.0  # the unmodified point is shared
    # random - method: 0.018-0.068 averaged over the two fractions, each 0.010-0.085 (seeds 0-4)
    assert sum(gaps[1:]) / 2 >= 0.01
    assert all(g > 0 for g in gaps[1:])
    assert result.mean_accuracy("input_x_gradient") < result.mean_accuracy("random")
    assert result.drop("input_x_gradient")[2] > result.drop("input_x_gradient")[0] == 0.0


def test_roar_caches_and_resumes(roar_run) -> None:
    first, result, again = roar_run
    assert (first.trained, first.from_cache) == (3, 0)  # unmodified, method at 10%, random at 10%
    assert (result.trained, result.from_cache) == (2, 3)  # only the 30% runs are new
    assert (again.trained, again.from_cache) == (0, 5)
    assert again.accuracy == result.accuracy
    assert first.accuracy["input_x_gradient"] == result.accuracy["input_x_gradient"][:2]


def test_roar_result_displays(roar_run) -> None:
    _, result, _ = roar_run
    rows = result.rows()
    assert len(rows) == 2 * 3 and {"method", "fraction", "accuracy", "drop", "vs_random"} <= set(rows[0])
    assert "<table>" in result._repr_html_() and "input_x_gradient" in result._repr_html_()
    assert result._repr_png_()[:4] == b"\x89PNG"
    frame = result.to_pandas()
    assert list(frame.columns) == ["method", "fraction", "accuracy", "drop", "vs_random"]
    data = result.to_dict()
    assert data["settings"]["target"] == "predicted" and data["settings"]["train_images"] == 2000
    assert len(data["settings"]["fill"]) == 3


def test_pixel_removal_on_known_maps() -> None:
    heat = torch.arange(16.0).view(1, 4, 4)  # pixel 15 most important, then 14, ...
    ranks = pixel_ranks(heat)
    assert ranks[0, 15] == 0 and ranks[0, 0] == 15
    images = torch.ones(1, 3, 4, 4)
    out = remove_top_pixels(images, ranks, 0.25, torch.tensor([0.1, 0.2, 0.3]))
    removed = (out[0, 0] != 1).flatten()
    assert removed.nonzero().flatten().tolist() == [12, 13, 14, 15]
    assert torch.allclose(out[0, :, 3, 3], torch.tensor([0.1, 0.2, 0.3]))
    # ties (a constant map) are broken by a seeded random order: reproducible, not raster order
    flat = pixel_ranks(torch.zeros(2, 4, 4), seed=3)
    assert torch.equal(flat, pixel_ranks(torch.zeros(2, 4, 4), seed=3))
    assert not torch.equal(flat[0], torch.arange(16))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        remove_top_pixels(images, ranks, 1.5, torch.zeros(3))


def test_roar_refuses_bad_requests(shortcut) -> None:
    model, train, test = shortcut
    recipe = RetrainRecipe(make_model, epochs=1)
    with pytest.raises(ValueError, match="unknown attribution method 'salency'.*Did you mean.*saliency"):
        roar(model, train, test, ["salency"], recipe=recipe)
    with pytest.raises(ValueError, match=r"in \(0, 1\)"):
        roar(model, train, test, ["saliency"], recipe=recipe, fractions=(0.0, 0.5))
    with pytest.raises(ValueError, match="increasing"):
        roar(model, train, test, ["saliency"], recipe=recipe, fractions=(0.5, 0.3))
    with pytest.raises(ValueError, match="target must be one of predicted, label"):
        roar(model, train, test, ["saliency"], recipe=recipe, target="labels")
    with pytest.raises(ValueError, match="method_kwargs names.*occlusion"):
        roar(model, train, test, ["saliency"], recipe=recipe, method_kwargs={"occlusion": {"window": 4}})
    unseeded = RetrainRecipe(lambda: small_cnn(3, width=8, depth=3, blocks_per_stage=1, seed=None))
    with pytest.raises(ValueError, match="different initial weights.*seed it"):
        roar(model, train, test, ["saliency"], recipe=unseeded)


def test_retrain_recipe_from_shapes() -> None:
    from mechlens.models.shapes import ShapesRecipe

    recipe = RetrainRecipe.from_shapes(ShapesRecipe(), epochs=2)
    assert recipe.epochs == 2 and recipe.lr == ShapesRecipe().lr
    net, transform = recipe.build()
    assert isinstance(net, torch.nn.Module) and transform is not None  # a LoadedModel normalizes its batches
    assert recipe.fingerprint() == recipe.fingerprint()
    assert RetrainRecipe.from_shapes(ShapesRecipe(), epochs=3).fingerprint() != recipe.fingerprint()
    assert isinstance(RoarResult(fractions=[0.0, 0.5], accuracy={"a": [1.0, 0.5]}).drop("a"), list)


def test_retrain_recipe_from_model_builds_the_same_fresh_copy() -> None:
    from mechlens.models import load_model

    trained = make_model()
    with torch.no_grad():
        trained.head.weight.add_(1.0)  # "trained": differs from a fresh initialisation
    recipe = RetrainRecipe.from_model(trained, model_seed=0, epochs=1)
    net, transform = recipe.build()
    assert transform is None and recipe.epochs == 1
    assert not torch.equal(net.head.weight, trained.head.weight)  # re-initialised, not the trained weights
    assert recipe.fingerprint() == recipe.fingerprint()  # the same fresh weights on every call
    assert RetrainRecipe.from_model(trained, model_seed=1).fingerprint() != RetrainRecipe.from_model(trained).fingerprint()
    loaded = load_model("mechlens:small_cnn_tiny")
    net, transform = RetrainRecipe.from_model(loaded).build()
    assert isinstance(net, torch.nn.Module) and net is not loaded.model and transform is not None
    with pytest.raises(ValueError, match="no parameters"):
        RetrainRecipe.from_model(torch.nn.Identity())
    with pytest.raises(TypeError, match="nn.Module or a LoadedModel"):
        RetrainRecipe.from_model("resnet18")
