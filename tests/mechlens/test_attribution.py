"""mechlens.attribution: targets are features, shapes and conventions, completeness, batching,
determinism, scoped hooks, superpixel surrogates and ViT attention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from mechlens.attribution import (
    Target,
    attention_maps,
    attention_rollout,
    attribute,
    get_method,
    gradcam,
    guided_backprop,
    integrated_gradients,
    kernel_shap,
    lime,
    list_methods,
    make_baseline,
    resolve_target,
    rollout,
    saliency,
    smoothgrad,
    vargrad,
    vit_cam_layer,
    weighted_ridge,
)
from mechlens.features import Channel, ClassLogit, Direction, SAELatent
from mechlens.models import small_cnn


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A random SmallCNN made genuinely non-linear along IG's path: at initialisation (BN shift 0,
    bias-free convs) a ReLU net is positively homogeneous, so IG from a zero baseline would be exact
    with a single step and completeness tests would be vacuous."""
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        torch.nn.init.normal_(net.head.weight, std=1.0, generator=gen)
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.copy_(0.3 * torch.randn(module.bias.shape, generator=gen))
                module.running_mean.copy_(0.3 * torch.randn(module.running_mean.shape, generator=gen))
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    from mechlens.data.synthetic import SyntheticShapes

    data = SyntheticShapes(num_samples=2, image_size=32, seed=4)
    return torch.stack([data[i][0] for i in range(2)])


class LinearEncoder:
    """A stand-in SAE: ``encode(rows) = rows @ W`` (no bias, no ReLU), so latent ``i`` is exactly
    the direction ``W[:, i]``."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows @ self.weight


class ReluEncoder(LinearEncoder):
    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return torch.relu(rows @ self.weight - 0.05)


# ---------------------------------------------------------------------------- registry and targets
def test_registry_lists_every_method_and_rejects_unknown_names() -> None:
    names = list_methods()
    for expected in ("saliency", "smoothgrad", "smoothgrad_sq", "vargrad", "integrated_gradients", "gradient_shap",
                     "guided_backprop", "guided_gradcam", "gradcam", "gradcam_plusplus", "scorecam", "layercam",
                     "occlusion", "lime", "kernel_shap", "attention", "rollout"):
        assert expected in names
    assert list_methods("grad*") == ["gradcam", "gradcam_plusplus", "gradient_shap"]
    assert set(list_methods(family="cam")) >= {"gradcam", "scorecam", "layercam"}
    assert get_method("ig").name == "integrated_gradients"
    assert get_method("guided_backprop").randomization == "fails"
    assert get_method("guided_gradcam").randomization == "fails"
    assert get_method("gradcam").needs_layer and get_method("scorecam").multiplies_batch
    with pytest.raises(ValueError, match="Did you mean gradcam"):
        get_method("gradcma")


def test_resolve_target_accepts_every_form(model, images) -> None:
    assert resolve_target(model, images, 3).names == ["class:3", "class:3"]
    assert resolve_target(model, images, "channel:stage2:4").names == ["channel:stage2:4"] * 2
    per = resolve_target(model, images, torch.tensor([1, 3]))
    assert per.names == ["class:1", "class:3"] and len(per.features) == 2
    same = resolve_target(model, images, [2, 2])
    assert len(same.features) == 1  # equal classes share one feature
    with torch.no_grad():
        predicted = model(images).argmax(1).tolist()
    assert resolve_target(model, images, None).names == [f"class:{c}" for c in predicted]
    with pytest.raises(ValueError, match="one entry per sample"):
        resolve_target(model, images, [1, 2, 3])
    with pytest.raises(TypeError, match="cannot use"):
        resolve_target(model, images, 1.5)
    with pytest.raises(ValueError, match="unknown feature kind"):
        resolve_target(model, images, "klass:3")


def test_per_sample_targets_equal_single_sample_runs(model, images) -> None:
    """Samples are independent: a batch with per-sample classes equals each sample on its own."""
    both = saliency(model, images, torch.tensor([1, 3]), abs=False).map
    first = saliency(model, images[:1], 1, abs=False).map
    second = saliency(model, images[1:], 3, abs=False).map
    assert torch.allclose(both, torch.cat([first, second]), atol=1e-7)
    cams = gradcam(model, images, torch.tensor([1, 3]), layer="stage2").map
    assert torch.allclose(cams[1:], gradcam(model, images[1:], 3, layer="stage2").map, atol=1e-7)


def test_input_methods_return_input_shaped_maps_and_cams_layer_maps(model, images) -> None:
    for name in ("saliency", "input_x_gradient", "integrated_gradients", "gradient_shap", "guided_backprop", "occlusion"):
        result = attribute(model, images, 1, method=name)
        assert result.map.shape == images.shape and result.kind == "input", name
        assert result.heatmap().shape == (2, 32, 32)
        assert result.map.abs().sum() > 0, name
    for name in ("gradcam", "gradcam_plusplus", "layercam", "scorecam"):
        result = attribute(model, images, 1, method=name, layer="stage2")
        assert result.map.shape == (2, 4, 4) and result.kind == "layer", name
        assert result.heatmap().shape == (2, 32, 32)
        assert (result.map >= 0).all()
    guided = attribute(model, images, 1, method="guided_gradcam", layer="stage2")
    assert guided.map.shape == images.shape


def test_cam_without_layer_is_an_actionable_error(model, images) -> None:
    with pytest.raises(TypeError):
        gradcam(model, images, 1)  # layer is a required keyword
    with pytest.raises(LookupError, match="Closest"):
        gradcam(model, images, 1, layer="stage9")
    with pytest.raises(RuntimeError, match="do not depend on layer"):
        gradcam(model, images, Channel("stage1", 0), layer="stage2")  # feature read before the layer


# ---------------------------------------------------------------------------- features as targets
def test_channel_direction_and_sae_latent_targets_agree(model, images) -> None:
    """A channel is the direction e_k, which is latent k of a linear 'SAE' with W = I: all three
    targets must give identical maps, for gradient, IG and CAM methods."""
    channels = 32  # stage2 of width 8
    k = 5
    eye = torch.eye(channels)
    targets = [Channel("stage2", k), Direction("stage2", eye[:, k]), SAELatent("stage2", LinearEncoder(eye), k)]
    for method, kwargs in (("saliency", {"abs": False}), ("integrated_gradients", {"n_steps": 8}),
                           ("gradcam", {"layer": "stage1"}), ("scorecam", {"layer": "stage1"})):
        maps = [attribute(model, images, t, method=method, **kwargs).map for t in targets]
        assert maps[0].abs().sum() > 0, method
        for other in maps[1:]:
            assert torch.allclose(maps[0], other, atol=1e-6), method


def test_sae_latent_target_with_relu_encoder(model, images) -> None:
    weight = torch.randn(32, 12, generator=torch.Generator().manual_seed(0))
    sae = ReluEncoder(weight)
    feature = SAELatent("stage2", sae, 7, source="stand_in")
    result = integrated_gradients(model, images, feature, n_steps=64)
    assert result.features == ["sae:stand_in:7"] * 2
    assert result.completeness_error.max() < 0.01
    assert gradcam(model, images, feature, layer="stage1", relu=False).map.abs().sum() > 0


# ---------------------------------------------------------------------------- integrated gradients
@pytest.mark.parametrize("baseline", ["zeros", "blur", "uniform", "mean"])
def test_integrated_gradients_completeness_below_one_percent(model, images, baseline) -> None:
    result = integrated_gradients(model, images, torch.tensor([1, 3]), baseline=baseline, n_steps=128,
                                  mean=[0.5, 0.4, 0.3], internal_batch_size=96)
    error = result.completeness_error
    assert error is not None and error.shape == (2,)
    assert error.max() < 0.01, error
    gap = (result.values - result.extras["baseline_values"]).abs()
    assert (gap > 1e-3).all()  # the completeness check is not vacuous


def test_integrated_gradients_converges_with_steps_and_is_batching_invariant(model, images) -> None:
    coarse = integrated_gradients(model, images, 1, n_steps=4, integration="riemann_right")
    fine = integrated_gradients(model, images, 1, n_steps=96, integration="riemann_right", internal_batch_size=100)
    assert fine.completeness_error.max() < coarse.completeness_error.max()
    whole = integrated_gradients(model, images, 1, n_steps=16)
    chunked = integrated_gradients(model, images, 1, n_steps=16, internal_batch_size=5)
    assert torch.allclose(whole.map, chunked.map, atol=1e-7)


def test_baselines(images) -> None:
    assert torch.equal(make_baseline(images, "zeros"), torch.zeros_like(images))
    blurred = make_baseline(images, "blur", blur_sigma=2.0)
    assert blurred.shape == images.shape and blurred.std() < images.std()
    assert torch.allclose(blurred.mean(dim=(2, 3)), images.mean(dim=(2, 3)), atol=0.02)
    mean = make_baseline(images, "mean", mean=[0.1, 0.2, 0.3])
    assert torch.equal(mean[1, :, 5, 7], torch.tensor([0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match="needs the dataset mean"):
        make_baseline(images, "mean")
    with pytest.raises(ValueError, match="unknown baseline"):
        make_baseline(images, "gray")


# ---------------------------------------------------------------------------- smoothgrad
def test_smoothgrad_is_the_mean_over_seeded_noise(model, images) -> None:
    n = 6
    result = smoothgrad(model, images, 1, n_samples=n, stdev_spread=0.1, seed=5)
    # rebuild the same noise: one draw of [n, B, C, H, W] from a generator seeded with 5
    noise = torch.randn((n, *images.shape), generator=torch.Generator().manual_seed(5))
    sigma = 0.1 * (images.flatten(1).amax(1) - images.flatten(1).amin(1))
    expected = torch.stack([
        saliency(model, images + sigma.view(-1, 1, 1, 1) * noise[i], 1).map for i in range(n)
    ]).mean(0)
    assert torch.allclose(result.map, expected, atol=1e-7)
    chunked = smoothgrad(model, images, 1, n_samples=n, stdev_spread=0.1, seed=5, internal_batch_size=4)
    assert torch.allclose(chunked.map, result.map, atol=1e-7)
    assert not torch.allclose(smoothgrad(model, images, 1, n_samples=n, seed=6).map, result.map)
    var = vargrad(model, images, 1, n_samples=n, stdev_spread=0.1, seed=5)
    sq = attribute(model, images, 1, method="smoothgrad_sq", n_samples=n, stdev_spread=0.1, seed=5)
    assert torch.allclose(var.map, sq.map - result.map**2, atol=1e-9)
    assert (var.map >= -1e-9).all()


def test_smoothgrad_wraps_other_methods(model, images) -> None:
    ig = smoothgrad(model, images, 1, base="integrated_gradients", n_samples=2, n_steps=8)
    assert ig.method == "smoothgrad(integrated_gradients)" and ig.map.shape == images.shape
    cam = smoothgrad(model, images, 1, base="gradcam", n_samples=2, layer="stage2")
    assert cam.kind == "layer" and cam.map.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="itself a noise wrapper"):
        smoothgrad(model, images, 1, base="vargrad")


# ---------------------------------------------------------------------------- hooks, modes
class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom")


def _hook_count(net: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in net.modules()
    )


@pytest.mark.parametrize("method,kwargs,target", [
    ("saliency", {}, Channel("stage2", 1)),
    ("guided_backprop", {}, 1),
    ("gradcam", {"layer": "stage2"}, 1),
    ("scorecam", {"layer": "stage2"}, 1),
    ("integrated_gradients", {"n_steps": 4}, Direction("stage2", torch.ones(32))),
    ("occlusion", {}, 1),
])
def test_no_hook_survives_an_exception_and_training_is_restored(images, method, kwargs, target) -> None:
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0)
    net.head = Exploding()
    net.train()
    net.stage1.eval()  # a mixed state must come back exactly
    with pytest.raises(RuntimeError, match="boom"):
        attribute(net, images, Target((ClassLogit(1) if isinstance(target, int) else target,), torch.zeros(2, dtype=torch.long)),
                  method=method, **kwargs)
    assert _hook_count(net) == 0
    assert net.training and net.stem.training and not net.stage1.training


def test_training_flag_restored_after_success(model, images) -> None:
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).train()
    before = {n: p.clone() for n, p in net.named_parameters()}
    stats = net.stem.bn.running_mean.clone()
    guided_backprop(net, images, 1)
    gradcam(net, images, 1, layer="stage2")
    assert net.training and _hook_count(net) == 0
    assert torch.equal(net.stem.bn.running_mean, stats)  # ran in eval mode: BN statistics untouched
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in net.named_parameters())


def test_guided_backprop_needs_relu_modules(images) -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(3))
    net(images)
    with pytest.raises(ValueError, match="has none"):
        guided_backprop(net, images, 1)


# ---------------------------------------------------------------------------- superpixel methods
class LinearPixels(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 16 * 16, 3)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(3, 768, generator=torch.Generator().manual_seed(2)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def _blocks(batch: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    return ((ys // 4) * 4 + xs // 4).expand(batch, 16, 16)  # 16 square "superpixels"


def test_kernel_shap_and_lime_recover_an_additive_model() -> None:
    """On a model linear in the pixels, the contribution of superpixel s is exactly
    sum_{pixels in s} w * (x - baseline); KernelSHAP (and LIME without shrinkage) must find it."""
    net = LinearPixels().eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    segments = _blocks(2)
    contrib = (net.fc.weight[2].view(3, 16, 16) * x)  # [B, 3, 16, 16], baseline zeros
    expected = torch.stack([torch.stack([contrib[b][:, segments[b] == s].sum() for s in range(16)]) for b in range(2)])
    shap = kernel_shap(net, x, 2, segments=segments, n_samples=80, internal_batch_size=50)
    assert torch.allclose(shap.extras["coefficients"], expected, atol=1e-3)
    assert shap.completeness_error.max() < 1e-4
    local = lime(net, x, 2, segments=segments, n_samples=120, alpha=1e-8)
    assert torch.allclose(local.extras["coefficients"], expected, atol=1e-3)
    assert local.map.shape == x.shape and local.heatmap().shape == (2, 16, 16)
    # the map repeats each superpixel's coefficient over its pixels
    assert torch.allclose(local.map[0, 1][segments[0] == 5], expected[0, 5].expand(16), atol=1e-3)


def test_weighted_ridge_matches_scikit_learn() -> None:
    from sklearn.linear_model import Ridge

    gen = torch.Generator().manual_seed(0)
    z = (torch.rand(2, 60, 7, generator=gen) < 0.5).double()
    y = torch.randn(2, 60, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 60, generator=gen, dtype=torch.float64)
    fit = weighted_ridge(z, y, w, alpha=1.0)
    for b in range(2):
        ref = Ridge(alpha=1.0).fit(z[b].numpy(), y[b].numpy(), sample_weight=w[b].numpy())
        assert torch.allclose(fit.coefficients[b], torch.from_numpy(ref.coef_), atol=1e-8)
        assert abs(float(fit.intercept[b]) - ref.intercept_) < 1e-8


def test_lime_on_slic_superpixels_is_seeded(model) -> None:
    from mechlens.data.synthetic import SyntheticShapes

    ds = SyntheticShapes(num_samples=2, image_size=32)
    x = torch.stack([ds[i][0] for i in range(2)])
    a = lime(model, x, 1, n_samples=48, n_segments=20, seed=3)
    b = lime(model, x, 1, n_samples=48, n_segments=20, seed=3)
    assert torch.equal(a.map, b.map)
    segments = a.extras["segments"]
    assert segments.shape == (2, 32, 32) and int(segments.max()) >= 5  # SLIC found several superpixels
    assert a.extras["coefficients"].shape[1] == int(segments.max()) + 1


# ---------------------------------------------------------------------------- vision transformers
@pytest.fixture(scope="module")
def vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):  # timm initialises from the global RNG: seed it, leave it as it was
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                                 num_classes=5).eval()


def test_vit_attention_maps_are_real_probabilities(vit, images) -> None:
    from mechlens.capture import capture

    assert vit.blocks[0].attn.fused_attn  # timm's default: fused attention (nothing to hook)
    maps = attention_maps(vit, images)
    assert vit.blocks[0].attn.fused_attn and _hook_count(vit) == 0  # flag and hooks restored
    assert maps.attentions.shape == (2, 3, 3, 17, 17) and maps.grid == (4, 4) and maps.num_prefix_tokens == 1
    assert torch.allclose(maps.attentions.sum(-1), torch.ones(2, 3, 3, 17), atol=1e-5)
    assert maps.attentions.std() > 0
    # equal to the attention recomputed from block 0's queries and keys
    with capture(vit, "blocks.0.norm1") as cap, torch.no_grad():
        vit(images)
    attn = vit.blocks[0].attn
    qkv = attn.qkv(cap["blocks.0.norm1"]).reshape(2, 17, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    expected = ((qkv[0] * attn.scale) @ qkv[1].transpose(-2, -1)).softmax(-1)
    assert torch.allclose(maps.attentions[:, 0], expected, atol=1e-5)
    heads = attribute(vit, images, 1, method="attention")
    assert heads.map.shape == (2, 4, 4) and heads.extras["heads"].shape == (2, 3, 4, 4)
    assert torch.allclose(heads.extras["heads"][:, :, 0, 0], maps.attentions[:, -1, :, 0, 1])


def test_vit_rollout_rows_sum_to_one(vit, images) -> None:
    result = rollout(vit, images, 1)
    joint = result.extras["rollout"]
    assert joint.shape == (2, 17, 17)
    assert torch.allclose(joint.sum(-1), torch.ones(2, 17), atol=1e-5)
    assert result.map.shape == (2, 4, 4) and (result.map > 0).all()
    # one layer: rollout is 0.5 A + 0.5 I of the head-averaged attention (rows already sum to 1)
    maps = attention_maps(vit, images, layers="blocks.0.attn")
    single = attention_rollout(maps)
    a = maps.attentions[:, 0].mean(1)
    assert torch.allclose(single, 0.5 * a + 0.5 * torch.eye(17), atol=1e-6)
    assert torch.allclose(attention_rollout(maps.attentions, discard_ratio=0.5).sum(-1), torch.ones(2, 17), atol=1e-5)


def test_vit_gradcam_on_patch_tokens(vit, images) -> None:
    result = gradcam(vit, images, 3, layer=vit_cam_layer(vit), relu=False)
    assert result.map.shape == (2, 4, 4) and result.map.abs().sum() > 0
    with pytest.raises(ValueError, match="only the prefix"):
        gradcam(vit, images, 3, layer="blocks.2")  # after the last block only CLS reaches the head
    with pytest.raises(ValueError, match="nn.ReLU"):
        guided_backprop(vit, images, 3)


def test_vit_hooks_and_flags_restored_on_error(images) -> None:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2, num_classes=5)
    net.head = Exploding()
    with pytest.raises(RuntimeError, match="boom"):
        attention_maps(net, images)
    assert all(block.attn.fused_attn for block in net.blocks) and _hook_count(net) == 0
