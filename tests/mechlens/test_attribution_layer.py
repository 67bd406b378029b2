"""Multi-baseline Integrated Gradients / Expected Gradients (mechlens.attribution.gradients) and
layer attribution (mechlens.attribution.layer_attribution): parity with Captum on the house CNN
and a small ViT, completeness, seeding and the convergence of Expected Gradients to
multi-baseline IG, and the errors for bad layers and baselines.

Tolerances: our runs use the inference copy (BatchNorm folded into the convolutions), Captum the
model as given, so maps agree up to float32 rounding (measured <= 7e-7 of the map's largest
entry); 1e-5 leaves room for other BLAS builds while any formula difference (a missing factor, a
shifted node) shows up at >= 1e-2.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution.base import attribute, get_method
from mechlens.attribution.baselines import gaussian_blur
from mechlens.attribution.gradients import baseline_set, expected_gradients, multi_baseline_ig
from mechlens.attribution.layer_attribution import layer_conductance, layer_integrated_gradients
from mechlens.features import Channel
from mechlens.models.layers import LayerNotFoundError
from tests.mechlens._parity import TARGETS, parity_cnn, parity_images, rel_error

captum_attr = pytest.importorskip("captum.attr")

pytestmark = pytest.mark.usefixtures("one_torch_thread")





@pytest.fixture(scope="module")
def model() -> nn.Module:
    return parity_cnn()


@pytest.fixture(scope="module")
def reference_model(model) -> nn.Module:
    """The same function for Captum: its layer hooks hand a leaf tensor to the next module, which
    an in-place ReLU may not modify (ours clones it)."""
    net = copy.deepcopy(model)
    for module in net.modules():
        if isinstance(module, nn.ReLU):
            module.inplace = False
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images()


@pytest.fixture(scope="module")
def refs() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------- multi-baseline IG
def _captum_ig_mean(model, images, baselines: list[torch.Tensor], n_steps: int) -> torch.Tensor:
    ig = captum_attr.IntegratedGradients(model)
    target = torch.tensor(TARGETS)
    return sum(ig.attribute(images, baselines=b, target=target, n_steps=n_steps) for b in baselines) / len(baselines)


def test_multi_baseline_ig_is_captum_ig_averaged_over_the_baselines(model, images, refs) -> None:
    target = torch.tensor(TARGETS)
    theirs = _captum_ig_mean(model, images, [refs[m:m + 1] for m in range(4)], 24)
    ours = multi_baseline_ig(model, images, target, baselines=refs, n_steps=24, internal_batch_size=50)
    assert rel_error(ours.map, theirs) < 1e-5
    # completeness against the mean over baselines of f(x) - f(b), computed here independently
    with torch.no_grad():
        f_x = model(images)[range(3), target]
        f_b = model(refs)[:, target].mean(dim=0)
    assert torch.allclose(ours.extras["baseline_values"], f_b, atol=1e-5)
    assert torch.allclose(ours.map.sum(dim=(1, 2, 3)), f_x - f_b, atol=0.1 * float((f_x - f_b).abs().min()))
    assert torch.allclose(ours.extras["convergence_delta"], ours.map.sum(dim=(1, 2, 3)) - (f_x - f_b), atol=1e-5)


def test_named_baseline_distributions_match_captum_on_the_same_baselines(model, images) -> None:
    """``blur`` is the input blurred at each sigma, ``mean`` one per-channel mean image: Captum's IG
    on those baselines, averaged, is the same map."""
    target = torch.tensor(TARGETS)
    sigmas = [0.7, 2.0, 5.0]
    theirs = _captum_ig_mean(model, images, [gaussian_blur(images, s) for s in sigmas], 16)
    ours = multi_baseline_ig(model, images, target, baselines="blur", blur_sigmas=sigmas, n_steps=16, internal_batch_size=40)
    assert ours.extras["n_baselines"] == 3 and ours.extras["baseline"] == "blur"
    assert rel_error(ours.map, theirs) < 1e-5
    mean = [0.2, 0.5, 0.7]
    theirs = _captum_ig_mean(model, images, [torch.tensor(mean).view(1, 3, 1, 1).expand(1, 3, 32, 32)], 16)
    assert rel_error(multi_baseline_ig(model, images, target, baselines="mean", mean=mean, n_steps=16).map, theirs) < 1e-5


def test_noise_distributions_are_seeded_and_stay_in_range(model, images) -> None:
    for name in ("uniform", "gaussian"):
        a = multi_baseline_ig(model, images, 1, baselines=name, n_baselines=3, n_steps=8, seed=5, noise_range=(0.0, 1.0))
        b = multi_baseline_ig(model, images, 1, baselines=name, n_baselines=3, n_steps=8, seed=5, noise_range=(0.0, 1.0))
        c = multi_baseline_ig(model, images, 1, baselines=name, n_baselines=3, n_steps=8, seed=6, noise_range=(0.0, 1.0))
        assert torch.equal(a.map, b.map) and not torch.allclose(a.map, c.map)
        dist = baseline_set(images, name, n_baselines=3, noise_range=(0.2, 0.6), generator=torch.Generator().manual_seed(0))
        rows = dist.rows(torch.tensor([0, 1, 2, 2]), torch.tensor([0, 1, 2, 0]))
        assert rows.shape == (4, 3, 32, 32) and float(rows.min()) >= 0.2 - 1e-6 and float(rows.max()) <= 0.6 + 1e-6
        assert float(rows.std()) > 0.05  # noise, not a constant clamped image
    near = baseline_set(images, "gaussian", n_baselines=2, stdevs=0.01, generator=torch.Generator().manual_seed(0))
    assert 0.005 < float((near.rows(torch.tensor([1]), torch.tensor([1])) - images[1]).std()) < 0.02  # around x


def test_expected_gradients_is_captums_gradient_shap_without_noise_on_the_same_draws(model, images, refs) -> None:
    """Expected Gradients = GradientSHAP with ``stdevs=0``: Captum draws baseline indices and
    alphas from numpy's global RNG; we replay them and pass them explicitly."""
    n, batch = 6, images.shape[0]
    target = torch.tensor(TARGETS)
    state = np.random.get_state()
    try:
        np.random.seed(7)
        theirs = captum_attr.GradientShap(model).attribute(images, baselines=refs, target=target, n_samples=n, stdevs=0.0)
        np.random.seed(7)
        index = np.random.choice(refs.shape[0], n * batch)
        alphas = np.random.uniform(0.0, 1.0, n * batch)
    finally:
        np.random.set_state(state)
    ours = expected_gradients(model, images, target, baselines=refs, n_samples=n, internal_batch_size=5,
                              baseline_index=torch.tensor(index).view(batch, n), alphas=torch.tensor(alphas).view(batch, n))
    assert rel_error(ours.map, theirs) < 1e-5
    with torch.no_grad():  # baseline_values: the mean of f over each sample's drawn baselines
        f_refs = model(refs)[:, target]  # [M, B]
    drawn = f_refs.T.gather(1, torch.tensor(index).view(batch, n)).mean(dim=1)
    assert torch.allclose(ours.extras["baseline_values"], drawn, atol=1e-5)


def test_expected_gradients_is_seeded(model, images, refs) -> None:
    a = expected_gradients(model, images, 1, baselines=refs, n_samples=8, seed=3)
    b = expected_gradients(model, images, 1, baselines=refs, n_samples=8, seed=3, internal_batch_size=7)
    c = expected_gradients(model, images, 1, baselines=refs, n_samples=8, seed=4)
    assert torch.allclose(a.map, b.map, rtol=1e-5, atol=1e-7)  # chunking does not change the draws
    assert torch.equal(a.map, expected_gradients(model, images, 1, baselines=refs, n_samples=8, seed=3).map)
    assert not torch.allclose(a.map, c.map)


@pytest.mark.parametrize("baselines", ["refs", "blur"])
def test_expected_gradients_converges_to_multi_baseline_ig(model, images, refs, baselines) -> None:
    """EG is an unbiased one-draw estimate of multi-baseline IG over the same baselines, so its
    error shrinks like 1/sqrt(draws). Measured here over seeds 0-7 (relative L2 error to
    multi-baseline IG with 32 Gauss-Legendre steps): 512 draws give 0.048-0.062 (4 reference
    images) and 0.020-0.034 (4 blur sigmas); 32 draws 0.17-0.25 and 0.07-0.10; the ratio of the
    two is 0.21-0.41 per seed (0.25 expected). Bounds: 0.10 at 512 draws (1.6x the largest) and
    a ratio below 0.6. A biased estimator (a wrong alpha range, a missing (x - b) factor) keeps
    an error that does not shrink and fails either."""
    target = torch.tensor(TARGETS[:2])
    x = images[:2]
    kw = dict(baselines=refs) if baselines == "refs" else dict(baselines="blur", blur_sigmas=[0.7, 2.0, 5.0, 9.0])
    exact = multi_baseline_ig(model, x, target, n_steps=32, **kw).map

    def error(n: int, seed: int) -> float:
        m = expected_gradients(model, x, target, n_samples=n, seed=seed, **kw).map
        return float((m - exact).norm() / exact.norm())

    for seed in (0, 1):
        many, few = error(512, seed), error(32, seed)
        assert many < 0.10, (seed, many)
        assert many < 0.6 * few, (seed, many, few)


def test_bad_baselines_are_clear_errors(model, images, refs) -> None:
    with pytest.raises(ValueError, match=r"do not match the inputs .*\[M, 3, 32, 32\]"):
        multi_baseline_ig(model, images, 1, baselines=refs[:, :1])
    with pytest.raises(ValueError, match=r"do not match the inputs"):
        expected_gradients(model, images, 1, baselines=refs[..., :16])
    with pytest.raises(ValueError, match="unknown baseline distribution 'black'.*uniform, gaussian, blur, mean"):
        multi_baseline_ig(model, images, 1, baselines="black")
    with pytest.raises(ValueError, match="needs the dataset mean: pass mean="):
        multi_baseline_ig(model, images, 1, baselines="mean")
    with pytest.raises(ValueError, match="n_baselines must be a positive integer"):
        multi_baseline_ig(model, images, 1, n_baselines=0)
    with pytest.raises(ValueError, match="blur_sigmas must be positive"):
        multi_baseline_ig(model, images, 1, baselines="blur", blur_sigmas=[1.0, -2.0])
    with pytest.raises(ValueError, match=r"baseline_index must lie in \[0, 4\)"):
        expected_gradients(model, images, 1, baselines=refs, n_samples=2, baseline_index=torch.full((3, 2), 4))
    with pytest.raises(ValueError, match="n_samples must be a positive integer"):
        expected_gradients(model, images, 1, baselines=refs, n_samples=0)


# ---------------------------------------------------------------------------- layer attribution
@pytest.mark.parametrize("layer", ["stage2", "stage2.0.conv", "stage1.0.bn"])
@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_trapezoid"])
def test_layer_methods_match_captum(model, reference_model, images, layer, integration) -> None:
    """``stage2.0.conv`` is folded with its BatchNorm in the inference copy unless the method keeps
    it (a folded conv outputs conv+bn); ``stage1.0.bn`` is followed by an in-place ReLU."""
    target = torch.tensor(TARGETS)
    baseline = images * 0.25
    module = reference_model.get_submodule(layer)
    theirs = captum_attr.LayerIntegratedGradients(reference_model, module).attribute(
        images, baselines=baseline, target=target, n_steps=12, method=integration)
    ours = layer_integrated_gradients(model, images, target, layer=layer, baseline=baseline, n_steps=12,
                                      integration=integration, internal_batch_size=20)
    if integration == "riemann_trapezoid":  # Captum's trapezoid weights sum to (n-1)/n, ours to 1 (see quadrature)
        theirs = theirs * 12 / 11
    full = ours.extras["layer_attributions"]
    assert full.shape == theirs.shape and full.dim() == 4
    assert rel_error(full, theirs) < 1e-5
    assert ours.kind == "layer" and ours.map.shape == (3, *full.shape[2:])
    assert torch.allclose(ours.map, full.sum(dim=1))
    assert ours.heatmap().shape == (3, 32, 32)

    theirs = captum_attr.LayerConductance(reference_model, module).attribute(
        images, baselines=baseline, target=target, n_steps=12, method=integration)
    ours = layer_conductance(model, images, target, layer=layer, baseline=baseline, n_steps=12,
                             integration=integration, internal_batch_size=7)  # chunks end mid-node
    assert rel_error(ours.extras["layer_attributions"], theirs) < 1e-5
    whole = layer_conductance(model, images, target, layer=layer, baseline=baseline, n_steps=12, integration=integration)
    assert torch.allclose(whole.map, ours.map, rtol=1e-5, atol=1e-6 * float(ours.map.abs().max()))


def _smooth(model: nn.Module) -> nn.Module:
    """The model with Softplus for ReLU: a smooth path integrand, on which Gauss-Legendre with 16
    nodes is exact to float rounding (with ReLU kinks IG's quadrature error decays slowly: 1-3 %
    at 64 nodes here)."""
    net = copy.deepcopy(model)
    for parent in list(net.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ReLU):
                setattr(parent, name, nn.Softplus(beta=4))
    return net


def _channel_mean(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = {}
    handle = model.stage3.register_forward_hook(lambda mod, a, o: out.setdefault("a", o.clone()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        handle.remove()
    return out["a"][:, 5].mean(dim=(1, 2))


def test_layer_attributions_are_complete(model, images) -> None:
    """Every path from the input to the feature runs through a stage of this sequential CNN, so
    layer IG sums to f(x) - f(baseline) up to the quadrature: 1e-5 relative measured on the smooth
    model, bound 1e-4. Conductance summed over the layer is a left Riemann sum along the input path:
    with nodes at 0 and 1 its error is first order, measured 0.25x from 16 to 64 nodes (bound
    0.35x) and <= 0.0044 at 64 nodes (bound 0.01). Also for a channel of a later layer."""
    net = _smooth(model)
    baseline = torch.full_like(images, 0.5)
    target = torch.tensor(TARGETS)
    with torch.no_grad():
        logit = net(images)[range(3), target] - net(baseline)[range(3), target]
    channel = _channel_mean(net, images) - _channel_mean(net, baseline)
    for feature, gap in ((target, logit), (Channel("stage3", 5), channel)):
        assert float(gap.abs().min()) > 1e-3  # a comparison that could fail
        lig = layer_integrated_gradients(net, images, feature, layer="stage1", baseline=baseline, n_steps=16)
        total = lig.extras["layer_attributions"].sum(dim=(1, 2, 3))
        assert torch.allclose(total, gap, rtol=1e-4, atol=1e-7), (total, gap)
        assert torch.allclose(lig.map.sum(dim=(1, 2)), total, rtol=1e-5, atol=1e-7)
        assert torch.allclose(lig.extras["convergence_delta"], total - gap, atol=1e-6)
        errors = []
        for n_steps in (16, 64):
            cond = layer_conductance(net, images, feature, layer="stage1", baseline=baseline, n_steps=n_steps,
                                     integration="riemann_trapezoid")
            errors.append(((cond.map.sum(dim=(1, 2)) - gap).abs() / gap.abs()).max().item())
            assert abs(float(cond.extras["completeness_error"].max()) - errors[-1]) < 1e-4
        assert errors[1] < 0.35 * errors[0] and errors[1] < 0.01, errors


def test_layer_integrated_gradients_on_vit_tokens_matches_captum() -> None:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                                num_classes=5).eval()
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    theirs = captum_attr.LayerIntegratedGradients(vit, vit.blocks[1]).attribute(x, target=2, n_steps=12)
    ours = layer_integrated_gradients(vit, x, 2, layer="blocks.1", n_steps=12)
    full = ours.extras["layer_attributions"]  # [B, 1 + 16, D]: CLS first
    assert full.shape == theirs.shape == (2, 17, 192)
    assert rel_error(full, theirs) < 1e-5
    # map: the patch tokens' sums on the 4x4 grid (row-major); the CLS token's share apart
    assert ours.map.shape == (2, 4, 4)
    assert torch.allclose(ours.map.flatten(1), full[:, 1:].sum(dim=2), atol=1e-7)
    assert torch.allclose(ours.extras["prefix_attribution"], full[:, 0].sum(dim=1), atol=1e-7)
    # after the last block only CLS feeds the head: an empty map is refused, naming a usable layer
    with pytest.raises(ValueError, match=r"prefix \(CLS\) tokens.*'blocks.2.norm1'"):
        layer_integrated_gradients(vit, x, 2, layer="blocks.2", n_steps=2)


class _SharedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv2(self.relu(self.conv1(x))))
        return self.head(x.mean(dim=(2, 3)))


def test_bad_layers_are_clear_errors(model, images) -> None:
    with pytest.raises(LayerNotFoundError, match="no layer named 'stage9'.*Closest"):
        layer_integrated_gradients(model, images, 1, layer="stage9")
    with pytest.raises(ValueError, match="needs layer='NAME'"):
        layer_conductance(model, images, 1, layer="")
    with pytest.raises(ValueError, match=r"need a spatial layer.*'flatten' gives \(6, 64\)"):
        layer_integrated_gradients(model, images, 1, layer="flatten", n_steps=2)
    with pytest.raises(RuntimeError, match="do not depend on layer 'stage2'"):
        layer_integrated_gradients(model, images, Channel("stage1", 0), layer="stage2", n_steps=2)
    with pytest.raises(RuntimeError, match="do not depend on layer 'stage2'"):
        layer_conductance(model, images, Channel("stage1", 0), layer="stage2", n_steps=2)
    shared = _SharedReLU().eval()
    for method in (layer_integrated_gradients, layer_conductance):
        with pytest.raises(ValueError, match="'relu' runs 2 times per forward"):
            method(shared, images, 1, layer="relu", n_steps=2)


def test_registry_entries_and_default_layer(model, images) -> None:
    for name, alias in (("layer_integrated_gradients", "layer_ig"), ("layer_conductance", "conductance"),
                        ("expected_gradients", "eg"), ("multi_baseline_ig", "multi_baseline_integrated_gradients")):
        info = get_method(alias)
        assert info.name == name and info.multiplies_batch and info.family == "gradient"
        assert info.needs_layer == name.startswith("layer_") and info.kind == ("layer" if name.startswith("layer_") else "input")
    result = attribute(model, images[:1], 1, method="layer_ig", n_steps=4)
    assert result.extras["layer"] == "stage3" and result.map.shape == (1, 2, 2)
