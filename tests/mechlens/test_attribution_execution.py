"""The inference copy attribution methods run: BatchNorm folded, channels-last weights, same function."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mechlens.attribution import attribute
from mechlens.attribution import execution
from mechlens.attribution.execution import exact_execution, fold_batchnorm_pairs, inference_copy, inference_model
from mechlens.features import Channel
from mechlens.models import small_cnn


def _model() -> nn.Module:
    """SmallCNN with non-trivial BatchNorm statistics (at init BN is nearly the identity, which
    would let a wrong fold pass)."""
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(0.5 + torch.rand(module.weight.shape, generator=gen))
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=gen))
                module.running_var.copy_(0.2 + torch.rand(module.running_var.shape, generator=gen))
    return net


def _images(n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2))


def test_inference_copy_folds_every_batchnorm_and_computes_the_same_function() -> None:
    net = _model()
    x = _images()
    bn_names = {n for n, m in net.named_modules() if isinstance(m, nn.BatchNorm2d)}
    pairs = fold_batchnorm_pairs(net)
    assert {bn for _, bn in pairs} == bn_names and len(bn_names) >= 3
    originals = {n: p for n, p in net.named_parameters()}
    copies = {n: p.detach().clone() for n, p in net.named_parameters()}
    twin = inference_copy(net, channels_last=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in twin.modules())
    with torch.no_grad():
        expected, got = net(x), twin(x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # the original is untouched: same parameter objects, values, layout; its BatchNorms still there
    assert {n: p for n, p in net.named_parameters()} == originals
    assert all(torch.equal(p, copies[n]) and p.is_contiguous() for n, p in net.named_parameters())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == len(bn_names)
    # tensors the fold does not change are shared, not copied
    assert twin.head.weight is net.head.weight
    assert any(m.weight.is_contiguous(memory_format=torch.channels_last) and not m.weight.is_contiguous()
               for m in twin.modules() if isinstance(m, nn.Conv2d))


def test_observed_convolutions_are_not_folded() -> None:
    net = _model()
    conv, bn = fold_batchnorm_pairs(net)[0]
    twin = inference_copy(net, keep=[conv])
    named = dict(twin.named_modules())
    assert isinstance(named[bn], nn.BatchNorm2d)  # its conv is observed: a hook there must see the raw conv output
    seen = {}
    x = _images()
    handles = [dict(m.named_modules())[conv].register_forward_hook(lambda mod, i, o, key=key: seen.__setitem__(key, o))
               for key, m in (("original", net), ("copy", twin))]
    try:
        with torch.no_grad():
            net(x), twin(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(seen["copy"], seen["original"], rtol=1e-5, atol=1e-6)


def test_models_with_their_own_hooks_or_without_convolutions_run_as_given() -> None:
    net = _model()
    handle = net.stem.register_forward_hook(lambda *args: None)
    try:
        with inference_model(net) as run:
            assert run is net
    finally:
        handle.remove()
    mlp = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with inference_model(mlp) as run:
        assert run is mlp
    with exact_execution(), inference_model(_model()) as run:
        assert any(isinstance(m, nn.BatchNorm2d) for m in run.modules())


def test_training_flags_come_back_and_batchnorm_in_train_mode_is_never_folded_in_place() -> None:
    net = _model().train()
    net.stage1.eval()
    with inference_model(net) as run:
        assert run is not net and not run.training
    assert net.training and not net.stage1.training
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) > 0


@pytest.mark.parametrize("method,kwargs,exact_equal", [
    ("saliency", {}, False),
    ("integrated_gradients", {"n_steps": 8}, False),
    ("gradcam", {"layer": "stage2"}, False),
    ("occlusion", {"window": 8}, False),
    ("scorecam", {"layer": "stage2"}, False),
])
def test_methods_on_the_inference_copy_match_the_unmodified_model(method, kwargs, exact_equal) -> None:
    net = _model()
    x = _images()
    for target in (2, Channel("stage2", 3)):
        fast = attribute(net, x, target, method=method, **kwargs)
        with exact_execution():
            exact = attribute(net, x, target, method=method, **kwargs)
        assert fast.map.is_contiguous()
        torch.testing.assert_close(fast.map, exact.map, rtol=1e-4, atol=1e-5 * float(exact.map.abs().max()))
        torch.testing.assert_close(fast.values, exact.values, rtol=1e-5, atol=1e-5)


def test_smoothgrad_makes_one_copy_for_all_its_noise_batches(monkeypatch) -> None:
    calls = []
    original = execution.inference_copy

    def counting(model, **kwargs):
        calls.append(type(model).__name__)
        return original(model, **kwargs)

    monkeypatch.setattr(execution, "inference_copy", counting)
    attribute(_model(), _images(2), 1, method="smoothgrad", n_samples=6, internal_batch_size=4)
    assert len(calls) == 1


class _NormThenAct(nn.BatchNorm2d):
    """Like timm's BatchNormAct2d: a BatchNorm subclass that does more than normalise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(super().forward(x))


class _Block(nn.Module):
    """A parent whose forward fx traces (conv -> bn -> relu, plus a residual read of the raw conv
    output in ``shared``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv_shared = nn.Conv2d(3, 3, 3, padding=1)
        self.bn_shared = nn.BatchNorm2d(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn(self.conv(x)))
        z = self.conv_shared(y)
        return self.bn_shared(z) + z  # z is read twice: folding would change the residual


def test_only_exact_batchnorm_after_an_unshared_conv_is_folded() -> None:
    net = nn.Sequential(_Block(), nn.Conv2d(3, 4, 1), _NormThenAct(4)).eval()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
    assert fold_batchnorm_pairs(net) == [("0.conv", "0.bn")]
    twin = inference_copy(net)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(twin(x), net(x), rtol=1e-5, atol=1e-5)


def test_a_copy_made_once_is_reused_and_refuses_observing_a_folded_layer(monkeypatch) -> None:
    net = _model()
    fast = inference_copy(net)
    calls = []
    monkeypatch.setattr(execution, "inference_copy", lambda *a, **k: calls.append(1))
    x = _images(2)
    with exact_execution():
        reference = attribute(net, x, 2, method="gradcam", layer="stage2")
    result = attribute(fast, x, 2, method="gradcam", layer="stage2")
    assert not calls
    torch.testing.assert_close(result.map, reference.map, rtol=1e-4, atol=1e-6)
    conv, _ = fold_batchnorm_pairs(net)[0]
    with pytest.raises(ValueError, match="folded"):
        attribute(fast, x, 2, method="gradcam", layer=conv)


def test_no_copy_when_it_would_change_nothing(monkeypatch) -> None:
    """A model with nothing to fold whose conv weights are already laid out (or, off the CPU, need
    no layout) runs as given: the deep copy would be its whole cost (13 ms a call for a small ViT
    on a GPU). With a BatchNorm to fold, or a conv weight to lay out on CPU, the copy is made."""
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with inference_model(plain) as run:
        assert run is not plain  # CPU: the conv weight is made channels-last in a copy
    plain = plain.to(memory_format=torch.channels_last)
    with inference_model(plain) as run:
        assert run is plain
    monkeypatch.setattr(execution, "_copy_plan", lambda model, keep, channels_last: ([], False))  # as on a GPU
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)).eval()
    with inference_model(plain) as run:
        assert run is plain
    monkeypatch.undo()
    with_bn = small_cnn(2, width=4, depth=2, blocks_per_stage=1, seed=0).eval().to(memory_format=torch.channels_last)
    with inference_model(with_bn) as run:
        assert run is not with_bn and run._mechlens_folded  # noqa: SLF001
