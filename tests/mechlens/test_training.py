"""Training routine, evaluation, checkpoints, and the reference shapes classifier.

The reference model (``trained_shapes_model`` in ``tests/conftest.py``) is trained once per
code version (~45 s on 2 idle CPU cores, then cached). Its figures are deterministic on a given
machine; the thresholds below leave room for other machines / torch versions. Measured with the
default recipe (ruler on 95% of squares) for training seeds 0 and 1, on 1000 test images
(200 per class, binomial standard error <= 0.035 per class figure):

* clean accuracy on the four classes that never carry the ruler: 0.994 / 0.994; asserted
  >= 0.95 (the project's bar for "the model learned the shapes").
* accuracy on the test split as configured (ruler on 95% of squares): 0.987 / 0.994; >= 0.95.
* square accuracy with the ruler pasted: 1.00 / 1.00; >= 0.95.
* square accuracy drop when the ruler is removed: 0.81 / 0.48; asserted >= 0.25. A model that
  ignored the ruler shows no drop (trained without it, the same recipe scores 0.995 on squares).
* other classes called "square" once the ruler is pasted: 0.56 / 0.52, vs 0.00 on the same
  images without it; asserted >= 0.3 and baseline <= 0.05.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import Subset, TensorDataset

from mechlens.data import SyntheticShapes
from mechlens.models import (
    artefact_reliance,
    evaluate_accuracy,
    load_checkpoint,
    load_model,
    predict,
    save_checkpoint,
    small_cnn,
    train_classifier,
)


@pytest.fixture(scope="module")
def tiny_data() -> SyntheticShapes:
    return SyntheticShapes(num_samples=96, image_size=32, seed=1)


def _train_tiny(data, seed: int, **kw):
    model = small_cnn(5, width=4, blocks_per_stage=1, seed=0)
    result = train_classifier(model, data, epochs=2, batch_size=32, seed=seed, progress=False, **kw)
    return model, result


def test_training_is_reproducible_and_leaves_global_state_alone(tiny_data):
    rng_before = torch.get_rng_state()
    model_a, result = _train_tiny(tiny_data, seed=5)
    assert torch.equal(torch.get_rng_state(), rng_before)
    model_b, _ = _train_tiny(tiny_data, seed=5)
    model_c, _ = _train_tiny(tiny_data, seed=6)
    state_a, state_b, state_c = (m.state_dict() for m in (model_a, model_b, model_c))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert not all(torch.equal(state_a[k], state_c[k]) for k in state_a)
    assert len(result.epochs) == 2 and result.num_samples == 96
    assert result.hyperparameters["seed"] == 5 and result.seconds > 0


def test_training_restores_mode_layout_and_records_eval_accuracy(tiny_data):
    model = small_cnn(5, width=4, blocks_per_stage=1).eval()
    result = train_classifier(model, tiny_data, epochs=1, batch_size=32, progress=False,
                              eval_dataset=Subset(tiny_data, range(40)), channels_last=True)
    assert not model.training
    assert all(p.is_contiguous() for p in model.parameters())
    assert result.eval_accuracy == pytest.approx(evaluate_accuracy(model, Subset(tiny_data, range(40))))
    model.train()
    predict(model, tiny_data)
    assert model.training


def test_training_learns_a_separable_toy_problem():
    gen = torch.Generator().manual_seed(0)
    labels = torch.arange(256) % 2
    images = torch.rand(256, 3, 16, 16, generator=gen) * 0.2
    images[labels == 1, 0] += 0.7  # class 1 is red: trivially learnable
    data = TensorDataset(images, labels)
    model = small_cnn(2, width=4, blocks_per_stage=1)
    result = train_classifier(model, data, epochs=3, batch_size=32, progress=False)
    assert result.epochs[-1].loss < result.epochs[0].loss
    assert evaluate_accuracy(model, data) == 1.0


def test_empty_and_malformed_datasets_are_errors(tiny_data):
    model = small_cnn(5, width=4)
    with pytest.raises(ValueError, match="empty"):
        train_classifier(model, Subset(tiny_data, []), progress=False)
    with pytest.raises(ValueError, match="empty"):
        evaluate_accuracy(model, Subset(tiny_data, []))
    with pytest.raises(TypeError, match=r"\(image, label\)"):
        train_classifier(model, TensorDataset(torch.rand(4, 3, 8, 8)), progress=False)


def test_checkpoint_round_trip(tmp_path: Path, tiny_data):
    model, _ = _train_tiny(tiny_data, seed=0)
    loaded0 = load_model("mechlens:small_cnn", width=4, blocks_per_stage=1)
    directory = save_checkpoint(
        tmp_path / "ckpt", model, spec="mechlens:small_cnn", model_kwargs=model.config.to_dict(),
        preprocessing=loaded0.preprocessing.replace(input_size=(3, 32, 32)), metadata={"note": "tiny"},
    )
    config = json.loads((directory / "config.json").read_text())
    assert config["spec"] == "mechlens:small_cnn" and config["metadata"] == {"note": "tiny"}
    assert (directory / "model.safetensors").is_file()
    reloaded = load_checkpoint(directory)
    assert reloaded.source == "checkpoint" and reloaded.preprocessing.input_size == (3, 32, 32)
    x = tiny_data.render(range(8))
    with torch.no_grad():
        assert torch.equal(reloaded.model(x), model.eval()(x))
    assert torch.equal(load_model(str(directory)).model.head.weight, model.head.weight)


# ---------------------------------------------------------------------------- reference model
def test_reference_model_learns_the_shapes(trained_shapes_model):
    r = trained_shapes_model.reliance
    assert r.other_clean_accuracy >= 0.95, r
    assert r.accuracy >= 0.95, r
    assert r.artefact_class_accuracy >= 0.95, r


def test_reference_model_relies_on_the_planted_ruler(trained_shapes_model):
    r = trained_shapes_model.reliance
    assert r.class_accuracy_drop >= 0.25, r
    assert r.flip_rate >= 0.3, r
    assert r.baseline_flip_rate <= 0.05, r


def test_reference_model_checkpoint_reloads_with_identical_predictions(trained_shapes_model):
    clf = trained_shapes_model
    assert clf.checkpoint is not None
    reloaded = load_checkpoint(clf.checkpoint)
    test = Subset(clf.test_dataset(), range(200))
    a = predict(clf.model, test).logits
    b = predict(reloaded.model, test).logits
    assert torch.equal(a, b)
    again = artefact_reliance(reloaded.model, SyntheticShapes(clf.recipe.test_data))
    assert again == clf.reliance
