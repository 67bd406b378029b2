"""Scoped activation capture: values, in-place ReLU, gradients, hook cleanup, never-fired layers."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mechlens.capture import Capture, LayerNotFiredError, capture
from mechlens.models import LayerNotFoundError, load_model, small_cnn


def no_hooks_left(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.fixture()
def model() -> nn.Module:
    return small_cnn(5, width=8, seed=0).eval()


@pytest.fixture()
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_captured_values_match_a_manual_forward(model, images):
    with capture(model, ["stem", "stage2", "head"]) as cap:
        logits = model(images)
    assert isinstance(cap, Capture) and list(cap) == ["stem", "stage2", "head"]
    with torch.no_grad():
        stem = model.stem(images.clone())
        stage2 = model.stage2(model.stage1(stem.clone()))
    assert torch.allclose(cap["stem"], stem)
    assert torch.allclose(cap["stage2"], stage2)
    assert torch.equal(cap["head"], logits.detach())
    assert not cap["stage2"].requires_grad
    assert no_hooks_left(model) and not cap.active  # readable after the block, hooks gone


def test_inplace_relu_after_a_hooked_layer_does_not_corrupt_the_capture(model, images):
    """``bn`` is followed by ReLU(inplace=True): a stored reference would be all >= 0."""
    for grads in (False, True):
        with capture(model, ["stage1.0.bn", "stage1.0.relu"], grads=grads) as cap:
            model(images)
        with torch.no_grad():
            expected = model.stage1[0].bn(model.stage1[0].conv(model.stem(images)))
        bn = cap["stage1.0.bn"]
        assert (bn < 0).any(), f"grads={grads}: negative pre-ReLU values were overwritten"
        assert torch.allclose(bn.detach(), expected, atol=1e-6)
        assert torch.allclose(cap["stage1.0.relu"].detach(), expected.clamp(min=0), atol=1e-6)


def test_capture_does_not_change_the_model_output(model, images):
    with torch.no_grad():
        reference = model(images)
    for grads in (False, True):
        with capture(model, "**", grads=grads):
            out = model(images)
        assert torch.equal(out.detach(), reference)


def test_hooks_are_removed_when_the_forward_raises(model):
    with pytest.raises(ValueError, match="expects images"):
        with capture(model, ["stem", "stage1", "stage3"]) as cap:
            model(torch.rand(2, 4, 32, 32))  # wrong channel count
    assert no_hooks_left(model)
    assert not cap.active

    class Boom(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(3, 3)
            self.b = nn.Linear(3, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.a(x)
            raise ValueError("boom after layer a")

    boom = Boom()
    with pytest.raises(ValueError, match="boom"):
        with capture(boom, ["a", "b"]) as cap:
            boom(torch.rand(1, 3))
    assert no_hooks_left(boom)
    assert cap.fired == ["a"]


def test_unknown_layer_fails_before_registering_anything(model):
    with pytest.raises(LayerNotFoundError, match="stage3"):
        with capture(model, ["stem", "stage4"]):
            pass
    assert no_hooks_left(model)


def test_gradient_wrt_captured_activation_matches_finite_differences():
    net = small_cnn(5, width=8, seed=1).double().eval()
    x = torch.rand(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with capture(net, ["stage2.0.bn", "stage2"], grads=True) as cap:
        out = net(x)[:, 3].sum()
    assert cap["stage2"].requires_grad
    (grad,) = torch.autograd.grad(out, cap["stage2.0.bn"], retain_graph=True)
    helper = cap.gradients(out, "stage2.0.bn")
    assert torch.equal(helper["stage2.0.bn"], grad)
    assert grad.abs().sum() > 0

    # Finite differences: perturb the bn output (before its in-place ReLU) with a forward hook.
    eps = 1e-6
    gen = torch.Generator().manual_seed(2)
    coords = [tuple(int(torch.randint(0, s, (1,), generator=gen)) for s in grad.shape) for _ in range(6)]
    coords.append(tuple(int(v) for v in (grad.abs() == grad.abs().max()).nonzero()[0]))
    for coord in coords:
        def bump(sign: float):
            def hook(module, args, output):
                output = output.clone()
                output[coord] += sign * eps
                return output
            return hook

        values = []
        for sign in (1.0, -1.0):
            handle = net.stage2[0].bn.register_forward_hook(bump(sign))
            try:
                with torch.no_grad():
                    values.append(net(x)[:, 3].sum().item())
            finally:
                handle.remove()
        numeric = (values[0] - values[1]) / (2 * eps)
        assert numeric == pytest.approx(grad[coord].item(), rel=1e-4, abs=1e-7), coord


def test_gradients_through_residual_inplace_add_in_torchvision_resnet():
    """torchvision BasicBlock: bn2 -> `out += identity` (in place) -> shared in-place relu."""
    net = load_model("torchvision:resnet18").model.double()
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with capture(net, ["layer1.0.bn2", "layer1.0.bn1", "layer1.0.relu"], grads=True) as cap:
        score = net(x)[0, :10].sum()
    relu_calls = cap.outputs("layer1.0.relu")
    assert cap.calls("layer1.0.relu") == 2 and cap["layer1.0.relu"] is relu_calls[-1]
    assert torch.allclose(relu_calls[0], cap["layer1.0.bn1"].clamp(min=0))
    assert (cap["layer1.0.bn2"] < 0).any()  # not overwritten by `+=` or the relu
    grad = cap.gradients(score, "layer1.0.bn2")["layer1.0.bn2"]
    # Directional finite difference along the gradient itself.
    direction = grad / grad.norm()
    eps = 1e-5

    def shifted(sign: float) -> float:
        def hook(module, args, output):
            return output + sign * eps * direction

        handle = net.layer1[0].bn2.register_forward_hook(hook)
        try:
            with torch.no_grad():
                return net(x)[0, :10].sum().item()
        finally:
            handle.remove()

    numeric = (shifted(1.0) - shifted(-1.0)) / (2 * eps)
    assert numeric == pytest.approx(grad.norm().item(), rel=1e-4)
    assert no_hooks_left(net)


def test_gradients_need_grads_mode_and_an_enabled_graph(model, images):
    with capture(model, "stage3") as cap:
        out = model(images).sum()
    with pytest.raises(ValueError, match="grads=True"):
        cap.gradients(out)
    with capture(model, "stage3", grads=True) as cap:
        with torch.no_grad():
            out = model(images).sum()
    with pytest.raises(RuntimeError, match="no_grad"):
        cap.gradients(out)
    with pytest.raises(ValueError, match="detach"):
        with capture(model, "stage3", grads=True, detach=True):
            pass
    with pytest.raises(ValueError, match="to_cpu"):
        with capture(model, "stage3", grads=True, to_cpu=True):
            pass


def test_attached_copies_let_an_objective_backpropagate_to_the_input(model):
    x = torch.rand(1, 3, 32, 32, requires_grad=True)
    with capture(model, "stage2", detach=False) as cap:
        model(x)
    cap["stage2"][:, 0].mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.skipped = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, use_skipped: bool = False) -> torch.Tensor:
        x = self.used(x)
        return self.skipped(x) if use_skipped else x


def test_a_layer_that_never_fires_is_a_clear_error():
    net = Branchy()
    with capture(net, ["used", "skipped"]) as cap:
        with pytest.raises(LayerNotFiredError, match="not been run"):
            cap["used"]
        net(torch.rand(2, 4))
    assert cap["used"].shape == (2, 4)
    with pytest.raises(LayerNotFiredError, match=r"skipped of Branchy did not run.*layers that ran: used"):
        cap["skipped"]
    with pytest.raises(LayerNotFiredError, match="skipped"):
        cap.check_all_fired()
    with pytest.raises(KeyError, match="used"):
        cap["usd"]
    with capture(net, ["used", "skipped"]) as cap:
        net(torch.rand(2, 4), use_skipped=True)
    cap.check_all_fired()


def test_outputs_reset_at_each_forward_and_follow_the_latest_batch(model):
    with capture(model, "stage1") as cap:
        model(torch.rand(4, 3, 32, 32))
        model(torch.rand(2, 3, 32, 32))
        assert cap.forward_passes == 2
        assert cap.calls("stage1") == 1 and cap["stage1"].shape[0] == 2
        cap.clear()
        with pytest.raises(LayerNotFiredError):
            cap["stage1"]


def test_structured_outputs_and_loaded_models():
    attn = nn.MultiheadAttention(8, 2, batch_first=True)
    container = nn.ModuleDict({"attn": attn})
    x = torch.rand(2, 5, 8)
    with capture(container, "attn") as cap:
        attn(x, x, x)  # a submodule called directly: its outputs accumulate until clear()
        attn(x, x, x)
    assert cap.calls("attn") == 2 and cap.forward_passes == 0
    out, weights = cap["attn"]
    assert out.shape == (2, 5, 8) and weights.shape == (2, 5, 5) and not out.requires_grad

    loaded = load_model("small_cnn_tiny")
    with capture(loaded, "stage*", to_cpu=True) as cap:
        loaded.model(torch.rand(1, 3, 64, 64))
    assert [tuple(cap[n].shape) for n in cap] == [(1, 16, 16, 16), (1, 32, 8, 8), (1, 64, 4, 4)]
    assert cap["stage1"].device.type == "cpu"


def test_vit_token_activations_from_a_glob():
    vit = load_model("timm:vit_tiny_patch16_224").model
    with capture(vit, "blocks.*.mlp") as cap, torch.no_grad():
        vit(torch.rand(1, 3, 224, 224))
    assert len(cap) == 12 and all(cap[n].shape == (1, 197, 192) for n in cap)
    assert no_hooks_left(vit)
