"""The Feature protocol: readouts, layouts, the shared forward pass and spec parsing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mechlens.features import (
    Channel,
    ClassLogit,
    Direction,
    Feature,
    LayerEnergy,
    Neuron,
    SAELatent,
    as_position_rows,
    feature_forward,
    parse_feature,
)
from mechlens.features.layout import AmbiguousLayoutError
from mechlens.models import small_cnn


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return small_cnn(num_classes=5, width=8, depth=3).eval()


def test_layouts_agree_on_rows() -> None:
    act = torch.randn(2, 3, 4, 5)
    with pytest.raises(AmbiguousLayoutError, match="layout='nchw'"):
        as_position_rows(act)  # a 4-d tensor alone does not say where its channels are
    rows, spatial = as_position_rows(act, "nchw")
    assert spatial == (4, 5) and rows.shape == (2, 20, 3)
    # position y*W+x holds the channel vector at (y, x)
    assert torch.equal(rows[1, 2 * 5 + 3], act[1, :, 2, 3])
    rows_nhwc, _ = as_position_rows(act.permute(0, 2, 3, 1), "nhwc")
    assert torch.equal(rows, rows_nhwc)
    with pytest.raises(ValueError, match="expects a 3-d"):
        as_position_rows(act, "nlc")


def test_kinds_read_the_right_numbers() -> None:
    act = torch.randn(2, 6, 3, 3)
    assert torch.equal(Channel("l", 4, layout="nchw").readout(act), act[:, 4])
    assert torch.allclose(Channel("l", 4, layout="nchw").value(act), act[:, 4].mean(dim=(1, 2)))
    assert torch.equal(Neuron("l", 4, (1, 2), layout="nchw").value(act), act[:, 4, 1, 2])
    v = torch.randn(6)
    assert torch.allclose(Direction("l", v, layout="nchw").readout(act), torch.einsum("bchw,c->bhw", act, v), atol=1e-6)
    assert torch.allclose(LayerEnergy("l", layout="nchw").value(act), act.pow(2).mean(dim=(1, 2, 3)), atol=1e-6)
    logits = torch.randn(3, 5)
    assert torch.equal(ClassLogit(2).value(logits), logits[:, 2])
    assert torch.allclose(ClassLogit(2, "log_softmax").value(logits), logits.log_softmax(1)[:, 2])
    with pytest.raises(IndexError, match="class index 7 is out of range"):
        ClassLogit(7).value(logits)
    with pytest.raises(IndexError, match="channel index 6"):
        Channel("l", 6, layout="nchw").readout(act)


class _LinearEncoder:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight)


def test_sae_latent_encodes_every_position() -> None:
    act = torch.randn(2, 6, 3, 3)
    weight = torch.randn(6, 10)
    latent = SAELatent("l", _LinearEncoder(weight), 7, layout="nchw")
    expected = torch.relu(torch.einsum("bchw,ck->bhwk", act, weight))[..., 7]
    assert torch.allclose(latent.readout(act), expected, atol=1e-5)
    pooled = SAELatent("l", _LinearEncoder(weight), 7, pooling="mean", layout="nchw")
    assert torch.allclose(pooled.value(act), torch.relu(act.mean(dim=(2, 3)) @ weight)[:, 7], atol=1e-5)
    assert isinstance(latent, Feature)


def test_feature_forward_gradients_match_autograd(model: nn.Module) -> None:
    x = torch.randn(3, 3, 32, 32, requires_grad=True)
    features = [ClassLogit(1), Channel("stage2", 3)]
    result = feature_forward(model, features, x, keep_layers=["stage1"])
    assert result.values.shape == (3, 2)
    assert torch.allclose(result.values[:, 0], model(x)[:, 1], atol=1e-5)
    grad = torch.autograd.grad(result.values[:, 1].sum(), result.activations["stage1"])[0]
    assert grad.shape == result.activations["stage1"].shape and grad.abs().sum() > 0


def test_stop_early_skips_the_rest_but_reads_the_same(model: nn.Module) -> None:
    x = torch.randn(2, 3, 32, 32)
    calls = []
    handle = model.head.register_forward_hook(lambda *a: calls.append(1))
    try:
        full = feature_forward(model, Channel("stage1", 2), x, grads=False)
        early = feature_forward(model, Channel("stage1", 2), x, grads=False, stop_early=True)
    finally:
        handle.remove()
    assert len(calls) == 1 and early.output is None
    assert torch.allclose(full.values, early.values)
    assert not model._forward_hooks and all(not m._forward_hooks for m in model.modules())


def test_parse_feature_specs() -> None:
    assert isinstance(parse_feature("class:3"), ClassLogit)
    ch = parse_feature("channel:layer4.1:17")
    assert isinstance(ch, Channel) and ch.layer == "layer4.1" and ch.index == 17
    n = parse_feature("neuron:stage2:3:1,2")
    assert isinstance(n, Neuron) and n.position == (1, 2)
    for bad, message in [("channel:17", "expected channel"), ("class:x", "integer"), ("wat:1", "unknown feature kind"), ("3", "no kind")]:
        with pytest.raises(ValueError, match=message):
            parse_feature(bad)


def test_a_third_party_kind_gets_the_batched_read_in_featvis_and_attribution(model: nn.Module) -> None:
    """A feature kind defined outside mechlens overrides ``batch_key`` / ``read_diagonal`` and is
    read with one call per group by featvis (one image per feature) and attribution (one feature
    per sample); the results equal reading each feature on its own."""
    from dataclasses import dataclass

    from mechlens.attribution import attribute
    from mechlens.features import FeatureBase, positions_to_map
    from mechlens.featvis import Objective, render

    calls: list[int] = []

    @dataclass(frozen=True, eq=False)
    class ChannelContrast(FeatureBase):
        layer: str
        a: int
        b: int
        layout: str = "auto"
        reduce: str = "mean"

        @property
        def name(self) -> str:
            return f"contrast:{self.layer}:{self.a}-{self.b}"

        def readout(self, activation: torch.Tensor) -> torch.Tensor:
            rows, spatial = as_position_rows(activation, self.layout, layer=self.layer)
            return positions_to_map(rows[..., self.a] - rows[..., self.b], spatial)

        def batch_key(self):
            return (ChannelContrast, self.layer, self.layout, self.reduce)

        @classmethod
        def read_diagonal(cls, features, activation, samples=None, cache=None):
            calls.append(len(features))
            rows, _ = as_position_rows(activation, features[0].layout, layer=features[0].layer)
            rows = rows if samples is None else rows[samples]
            g = torch.arange(len(features))
            a, b = torch.tensor([f.a for f in features]), torch.tensor([f.b for f in features])
            return (rows[g, :, a] - rows[g, :, b]).mean(dim=1)

    features = [ChannelContrast("stage1", 0, 1), ChannelContrast("stage1", 2, 3), ChannelContrast("stage1", 4, 0)]
    result = render(model, Objective.per_image(features), size=32, steps=2, seed=0)
    assert calls and set(calls) == {3}  # one batched read of all three per forward
    for i, feature in enumerate(features):
        alone = feature_forward(model, feature, result.images[i:i + 1], grads=False).values[0, 0]
        torch.testing.assert_close(result.objective.reshape(-1)[i], alone, rtol=1e-4, atol=1e-5)

    calls.clear()
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    together = attribute(model, x, features, method="saliency")
    assert calls and set(calls) == {3}
    for i, feature in enumerate(features):
        alone = attribute(model, x[i:i + 1], feature, method="saliency")
        torch.testing.assert_close(together.map[i:i + 1], alone.map, rtol=1e-5, atol=1e-6)
