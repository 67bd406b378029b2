"""One input space for every entry point: images in [0, 1]; a LoadedModel's normalization is applied
inside. Each entry point is called with a model whose normalization is far from the identity and
must agree with the same computation on an explicit normalize-then-model network."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution import attribute
from mechlens.evaluation import deletion_curve
from mechlens.features import Channel, feature_forward
from mechlens.models import small_cnn
from mechlens.models.loading import LoadedModel, Preprocessing

MEAN, STD = (0.3, 0.6, 0.1), (0.2, 0.1, 0.3)


class Normalized(nn.Module):
    """What 'normalization inside' means, written out: the reference for every check."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    net = small_cnn(num_classes=3, width=8, depth=2, blocks_per_stage=1, seed=0).eval()
    loaded = LoadedModel(model=net, spec="test:normalized", source="test",
                         preprocessing=Preprocessing(input_size=(3, 32, 32), mean=MEAN, std=STD))
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    return loaded, Normalized(net).eval(), x


@pytest.mark.parametrize("method,kwargs", [("saliency", {}), ("integrated_gradients", {"n_steps": 8}),
                                           ("gradcam", {"layer": "stage2"}), ("occlusion", {"window": 8, "strides": 8})])
def test_attribute_explains_pixels_of_a_loaded_model(setup, method, kwargs):
    loaded, reference, x = setup
    ours = attribute(loaded, x, "class:1", method=method, **kwargs)
    expected = attribute(reference, x, "class:1", method=method, **{k: (f"net.{v}" if k == "layer" else v)
                                                                    for k, v in kwargs.items()})
    torch.testing.assert_close(ours.values, expected.values, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.map, expected.map, rtol=1e-4, atol=1e-6)
    # the bare module on the same pixels is another model: the map it gives is not this one
    bare = attribute(loaded.model, x, "class:1", method=method, **kwargs)
    assert not torch.allclose(bare.values, ours.values)
    assert not loaded.model._forward_pre_hooks  # the normalization hook never outlives the call


def test_evaluation_runs_the_loaded_model_on_pixels(setup):
    loaded, reference, x = setup
    maps = torch.rand(4, 32, 32, generator=torch.Generator().manual_seed(2))
    ours = deletion_curve(loaded, x, 1, maps, steps=4)
    expected = deletion_curve(reference, x, 1, maps, steps=4)
    torch.testing.assert_close(ours.scores, expected.scores)


def test_capture_tcav_and_featvis_read_the_same_activations(setup, tmp_path):
    from activation_store import ActivationStore
    from mechlens.capture import capture_to_store
    from mechlens.featvis import Objective, render
    from mechlens.probes import ConceptSet, concept_activations

    loaded, reference, x = setup
    with torch.no_grad():
        expected = feature_forward(reference, [Channel("net.stage2", c) for c in range(4)], x, grads=False).values
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long))
    capture_to_store(loaded, dataset, tmp_path / "s", layers="stage2", spatial="mean", dtype="float32",
                     num_workers=0, progress=False)
    stored = ActivationStore(tmp_path / "s")["stage2"][:]
    np.testing.assert_allclose(stored[:, :4], expected.numpy(), rtol=1e-5, atol=1e-6)
    tcav_rows = concept_activations(loaded, ConceptSet.from_dataset("c", dataset), "stage2", pooling="mean")
    np.testing.assert_allclose(tcav_rows[:, :4], expected.numpy(), rtol=1e-5, atol=1e-6)
    result = render(loaded, Objective.per_image([Channel("stage2", 0)]), size=32, steps=2, seed=0)
    with torch.no_grad():
        again = feature_forward(reference, [Channel("net.stage2", 0)], result.images, grads=False).values[:, 0]
    torch.testing.assert_close(result.target_values, again, rtol=1e-4, atol=1e-5)


def test_atlas_logit_effects_read_the_loaded_model_on_pixels(setup):
    from mechlens.atlas.build import logit_effects

    loaded, reference, x = setup
    directions = torch.eye(16)[:3]  # three channels of stage1 (the gradient there depends on the input)
    ours = logit_effects(loaded, "stage1", x, directions)
    expected = logit_effects(reference, "net.stage1", x, directions)
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-6)
    bare = logit_effects(loaded.model, "stage1", x, directions)
    assert not np.allclose(bare, ours)
