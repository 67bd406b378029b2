"""DeepLIFT, DeepLiftShap and LRP (mechlens.attribution.propagation) against the peers on the same
models and inputs: Captum's ``DeepLift`` / ``DeepLiftShap`` and Zennit's ``Gradient`` attributor with
its composites and canonizers; plus summation-to-delta, relevance conservation and the refusals.

Tolerances: DeepLIFT runs the same float operations as Captum, so under ``exact_execution`` the maps
agree to float32 rounding (1e-6 of the map's scale); with the house's BatchNorm folding they differ by
the folding's rounding (1e-5). LRP without canonization runs Zennit's operations (1e-6). Canonized,
Zennit keeps each merged BatchNorm as a module with unit statistics that still divides by
``sqrt(1 + eps)``, a 5e-6 relative change per layer: the tight checks use BatchNorm ``eps=0`` copies
of the models (where both canonizations are the same function) and the models as they are get 3e-4.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mechlens.attribution.base import attribute, get_method, list_methods
from mechlens.attribution.baselines import make_baseline
from mechlens.attribution.execution import exact_execution
from mechlens.attribution.propagation import (
    LRP_COMPOSITES,
    CompletenessWarning,
    deeplift,
    deeplift_shap,
    lrp,
    lrp_rule_map,
)
from mechlens.models import small_cnn
from mechlens.models.loading import LoadedModel, Preprocessing
from tests.mechlens._parity import parity_cnn, parity_images, rel_error

captum_attr = pytest.importorskip("captum.attr")
zennit_attribution = pytest.importorskip("zennit.attribution")
from zennit import composites as zc  # noqa: E402
from zennit import rules as zr  # noqa: E402
from zennit.canonizers import SequentialMergeBatchNorm  # noqa: E402
from zennit.types import Convolution, Linear  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_torch_thread"),
    pytest.mark.filterwarnings("ignore:Setting forward, backward hooks and attributes:UserWarning"),  # Captum's notice
    pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients:UserWarning"),
]

TARGETS = torch.tensor([1, 4, 2])




def _randomize_batchnorm(net: nn.Module, seed: int) -> nn.Module:
    """Non-trivial eval-mode statistics, so that merging BatchNorm changes the weights."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.2, generator=gen)
                module.running_var.uniform_(0.5, 2.0, generator=gen)
                module.weight.uniform_(0.5, 1.5, generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
    return net


def _eps0(net: nn.Module) -> nn.Module:
    twin = copy.deepcopy(net)
    for module in twin.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.eps = 0.0
    return twin


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _randomize_batchnorm(parity_cnn(), 4)


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images()


def _zennit(net: nn.Module, composite, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Zennit's LRP, started from the logit (ours starts from f(x); Zennit's default from 1)."""
    net = copy.deepcopy(net)
    onehot = F.one_hot(target, net(x).shape[1]).to(x)
    with zennit_attribution.Gradient(net, composite) as attributor:
        _, relevance = attributor(x.clone(), lambda out: out * onehot)
    return relevance


# ---------------------------------------------------------------------------- DeepLIFT vs Captum
@pytest.mark.parametrize("baseline", ["zeros", "scaled", "blur"])
def test_deeplift_matches_captum(model, images, baseline) -> None:
    base = images * 0.25 if baseline == "scaled" else make_baseline(images, baseline)
    theirs, delta = captum_attr.DeepLift(model).attribute(images, baselines=base, target=TARGETS,
                                                          return_convergence_delta=True)
    with exact_execution():
        exact = deeplift(model, images, TARGETS, baseline=base if baseline == "scaled" else baseline)
    assert rel_error(exact.map, theirs) < 1e-6
    folded = deeplift(model, images, TARGETS, baseline=base, internal_batch_size=2)
    assert rel_error(folded.map, theirs) < 1e-5  # BatchNorm folded: the same function up to rounding
    # both satisfy summation-to-delta to float rounding: the deltas are rounding noise of the same size
    scale = exact.values.abs().max().item()
    assert exact.extras["convergence_delta"].abs().max().item() < 1e-5 * scale
    assert delta.abs().max().item() < 1e-5 * scale
    assert float(exact.completeness_error.max()) < 1e-4


def _smooth_net() -> nn.Sequential:
    """Every nonlinearity Captum has a rule for, BatchNorm and non-overlapping max pooling, with a
    linear layer between any two of them (see the Captum 0.9 discrepancies below)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.Sigmoid(), nn.Conv2d(6, 6, 1), nn.MaxPool2d(2),
        nn.Conv2d(6, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 1), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1), nn.ELU(), nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.1), nn.Conv2d(8, 8, 1),
        nn.Softplus(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )
    with torch.no_grad():  # weights large enough that the sigmoid / tanh layers do not flatten everything
        for module in net.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                module.weight.mul_(3.0)
    return _randomize_batchnorm(net, 5).eval()


def test_deeplift_matches_captum_on_every_captum_nonlinearity_and_max_pooling(images) -> None:
    net = _smooth_net()
    base = images.flip(-1)
    theirs, delta = captum_attr.DeepLift(net).attribute(images, baselines=base, target=2, return_convergence_delta=True)
    with exact_execution():
        ours = deeplift(net, images, 2, baseline=base)
    assert rel_error(ours.map, theirs) < 1e-5
    gap = (ours.values - ours.extras["baseline_values"]).abs()
    assert gap.min().item() > 1e-3  # a map worth comparing
    assert float((ours.extras["convergence_delta"].abs() / gap).max()) < 1e-4
    assert float((delta.abs() / gap).max()) < 1e-4  # Captum's own check: same up to rounding


@pytest.mark.parametrize("case", ["overlapping_pool", "adjacent_nonlinearities"])
def test_summation_to_delta_holds_where_captum_0_9_loses_it(images, case) -> None:
    """Two Captum 0.9 discrepancies: it scatters the max-pool multipliers with ``max_unpool``, which
    overwrites where overlapping windows share a winner (ours accumulates, the pool's own backward);
    and a nonlinear module right after another one reads a stale output gradient (captum#1104,
    fixed upstream after 0.9 by captum#1843): ReLU -> MaxPool, as in VGG."""
    torch.manual_seed(1)
    if case == "overlapping_pool":
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.MaxPool2d(3, 2, 1), nn.Conv2d(6, 6, 3), nn.ReLU(),
                            nn.Flatten(), nn.Linear(6 * 14 * 14, 3))
    else:
        net = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(6, 6, 3), nn.ReLU(),
                            nn.Flatten(), nn.Linear(6 * 14 * 14, 3))
    net = net.eval()
    base = images.flip(-1)
    ours = deeplift(net, images, 1, baseline=base)
    assert float(ours.completeness_error.max()) < 1e-4
    _, delta = captum_attr.DeepLift(net).attribute(images, baselines=base, target=1, return_convergence_delta=True)
    gap = (ours.values - ours.extras["baseline_values"]).abs()
    assert float((delta.abs() / gap).max()) > 0.05  # the discrepancy is real


def test_deeplift_shap_matches_captum(model, images) -> None:
    refs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    theirs = captum_attr.DeepLiftShap(model).attribute(images, baselines=refs, target=TARGETS)
    with exact_execution():
        ours = deeplift_shap(model, images, TARGETS, baselines=refs, internal_batch_size=5)  # chunks cut across samples
    assert rel_error(ours.map, theirs) < 1e-6
    with torch.no_grad():
        expected = model(refs)[:, TARGETS].mean(dim=0)
    torch.testing.assert_close(ours.extras["baseline_values"], expected, rtol=1e-5, atol=1e-6)
    assert float(ours.completeness_error.max()) < 1e-4  # sum(map) = f(x) - mean_m f(b_m)
    assert ours.extras["n_baselines"] == 4


def test_deeplift_explains_any_feature_and_matches_captum_on_a_channel(model, images) -> None:
    ours = deeplift(model, images, "channel:stage2:3", baseline="blur")
    assert float(ours.completeness_error.max()) < 1e-4
    # Captum on the truncated network that outputs the channel means (the same function)
    truncated = nn.Sequential(model.stem, model.stage1, model.stage2, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    theirs = captum_attr.DeepLift(truncated).attribute(images, baselines=make_baseline(images, "blur"), target=3)
    assert rel_error(ours.map, theirs) < 1e-5
    # a feature per sample, on different layers
    mixed = deeplift(model, images, ["channel:stage2:3", 4, "channel:stage1:0"], baseline="blur")
    torch.testing.assert_close(mixed.map[0], ours.map[0], rtol=1e-4, atol=1e-7)
    assert float(mixed.completeness_error.max()) < 1e-4


def test_deeplift_runs_models_with_shared_relus_and_residual_sums(images) -> None:
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    net = _randomize_batchnorm(net, 6).eval()
    ours = deeplift(net, images[:2], torch.tensor([1, 3]), baseline=images[:2] * 0.3)
    assert float(ours.completeness_error.max()) < 1e-3  # each call of the shared ReLU gets its own rule
    with pytest.raises(RuntimeError, match="used more than once"):  # Captum refuses the shared ReLU
        captum_attr.DeepLift(net).attribute(images[:2], baselines=images[:2] * 0.3, target=torch.tensor([1, 3]))


# ---------------------------------------------------------------------------- DeepLIFT refusals
class _FunctionalRelu(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.conv(x)).mean((2, 3)))


class _Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head((self.conv(x) * self.gate(x)).mean((2, 3)))


def test_functional_nonlinearities_are_refused_or_reported(images) -> None:
    torch.manual_seed(0)
    net = _FunctionalRelu().eval()
    with pytest.raises(ValueError, match="'relu'.*check_functional=False"):
        deeplift(net, images, 1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = deeplift(net, images, 1, check_functional=False)
    assert any(issubclass(w.category, CompletenessWarning) for w in caught)
    assert float(result.completeness_error.max()) > 0.01  # plain gradients through F.relu: not DeepLIFT
    with pytest.raises(ValueError, match="summation-to-delta"):
        deeplift(net, images, 1, check_functional=False, on_incomplete="raise")
    with pytest.raises(ValueError, match="multiplies two activations"):
        deeplift(_Gated().eval(), images, 1)
    with pytest.raises(ValueError, match="product of two activations"):
        lrp(_Gated().eval(), images, 1)


@pytest.mark.parametrize("layer", [nn.Softmax(dim=1), nn.LayerNorm(4), nn.GELU()])
def test_modules_without_a_rule_are_refused(images, layer) -> None:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 4), layer, nn.Linear(4, 3)).eval()
    if isinstance(layer, nn.GELU):  # an elementwise activation: DeepLIFT rescales it, LRP passes relevance
        assert float(deeplift(net, images, 1).completeness_error.max()) < 1e-4
        assert lrp_rule_map(net)["2"] == "pass"
        return
    name = type(layer).__name__
    with pytest.raises(ValueError, match=f"deeplift has no rule for {name}"):
        deeplift(net, images, 1)
    with pytest.raises(ValueError, match=f"lrp has no rule for {name}"):
        lrp(net, images, 1)


def test_bad_arguments_say_what_to_pass(model, images) -> None:
    with pytest.raises(ValueError, match="unknown baseline 'nope'"):
        deeplift(model, images, 1, baseline="nope")
    with pytest.raises(ValueError, match="does not broadcast"):
        deeplift(model, images, 1, baseline=torch.zeros(2, 3, 8, 8))
    with pytest.raises(ValueError, match="needs baselines=.*use deeplift"):
        deeplift_shap(model, images, 1)
    with pytest.raises(ValueError, match=r"\[M, 3, 32, 32\]"):
        deeplift_shap(model, images, 1, baselines=torch.zeros(4, 3, 16, 16))
    with pytest.raises(ValueError, match="eps must be a positive number"):
        deeplift(model, images, 1, eps=0.0)
    with pytest.raises(ValueError, match="on_incomplete"):
        deeplift(model, images, 1, on_incomplete="shout")
    with pytest.raises(ValueError, match="unknown LRP composite 'epsilon_box'"):
        lrp(model, images, 1, composite="epsilon_box")
    with pytest.raises(ValueError, match="unknown LRP rule for module 'head'"):
        lrp(model, images, 1, rules={"head": "zminus"})
    with pytest.raises(ValueError, match="does not have"):
        lrp(model, images, 1, rules={"stage9": "epsilon"})
    with pytest.raises(ValueError, match="not ReLU"):
        lrp(model, images, 1, rules={"stem.relu": "epsilon"})
    with pytest.raises(ValueError, match="low <= inputs <= high"):
        lrp(model, images * 2 - 1, 1, composite="epsilon_gamma_box")


# ---------------------------------------------------------------------------- LRP vs Zennit
ZENNIT_COMPOSITES = {
    "epsilon_plus": lambda c: zc.EpsilonPlus(canonizers=c),
    "epsilon_gamma_box": lambda c: zc.EpsilonGammaBox(low=0.0, high=1.0, canonizers=c),
    "epsilon_alpha2_beta1": lambda c: zc.EpsilonAlpha2Beta1(canonizers=c),
    "epsilon_plus_flat": lambda c: zc.EpsilonPlusFlat(canonizers=c),
    "epsilon_alpha2_beta1_flat": lambda c: zc.EpsilonAlpha2Beta1Flat(canonizers=c),
}


@pytest.mark.parametrize("name", sorted(ZENNIT_COMPOSITES))
def test_lrp_composites_match_zennit(model, images, name) -> None:
    make = ZENNIT_COMPOSITES[name]
    tight = _eps0(model)  # Zennit's merged BatchNorm then is the identity too (see the module docstring)
    assert rel_error(lrp(tight, images, TARGETS, composite=name).map,
                _zennit(tight, make([SequentialMergeBatchNorm()]), images, TARGETS)) < 1e-6
    ours = lrp(model, images, TARGETS, composite=name, internal_batch_size=2)
    assert rel_error(ours.map, _zennit(model, make([SequentialMergeBatchNorm()]), images, TARGETS)) < 3e-4
    assert len(ours.extras["canonized"]) == 4  # every ConvBlock's BatchNorm merged into its conv
    # without canonization a BatchNorm passes relevance on unchanged, in both
    plain = lrp(model, images, TARGETS, composite=name, canonize=False)
    assert rel_error(plain.map, _zennit(model, make(None), images, TARGETS)) < 1e-6
    assert rel_error(plain.map, ours.map) > 1e-3  # and canonizing matters on this model


def _layer_map(rule, first=None):
    layer_map = zc.layer_map_base() + [(Convolution, rule), (nn.Linear, rule)]
    if first is None:
        return zc.LayerMapComposite(layer_map=layer_map, canonizers=[SequentialMergeBatchNorm()])
    return zc.SpecialFirstLayerMapComposite(layer_map=layer_map, first_map=[(Linear, first)],
                                            canonizers=[SequentialMergeBatchNorm()])


@pytest.mark.parametrize("composite,first_rule,theirs", [
    ("epsilon", None, lambda: _layer_map(zr.Epsilon())),
    ("gamma", None, lambda: _layer_map(zr.Gamma())),
    ("zplus", None, lambda: _layer_map(zr.ZPlus())),
    ("alpha1_beta0", None, lambda: _layer_map(zr.AlphaBeta(alpha=1.0, beta=0.0))),
    ("alpha2_beta1", None, lambda: _layer_map(zr.AlphaBeta(alpha=2.0, beta=1.0))),
    ("epsilon", "wsquare", lambda: _layer_map(zr.Epsilon(), zr.WSquare())),
    ("gamma", "flat", lambda: _layer_map(zr.Gamma(), zr.Flat())),
    ("zplus", "zbox", lambda: _layer_map(zr.ZPlus(), zr.ZBox(low=-1.0, high=1.0))),
])
def test_lrp_rules_match_zennit(model, images, composite, first_rule, theirs) -> None:
    """On signed inputs, so the first layer exercises the rules' negative parts too (after a ReLU
    every input is non-negative)."""
    tight = _eps0(model)
    signed = images * 2 - 1
    ours = lrp(tight, signed, TARGETS, composite=composite, first_rule=first_rule, low=-1.0, high=1.0)
    assert rel_error(ours.map, _zennit(tight, theirs(), signed, TARGETS)) < 1e-6


def test_lrp_resnet_matches_zennit_resnet_canonizer(images) -> None:
    """Residual ``out += identity`` gets Zennit's Sum/Norm rule (its ResNet canonizer rewrites the
    block's forward; ours sees the addition through the functional watch)."""
    torchvision = pytest.importorskip("torchvision")
    from zennit.torchvision import ResNetCanonizer

    net = torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1], num_classes=5)
    net = _eps0(_randomize_batchnorm(net, 7).eval())
    x, target = images[:2], torch.tensor([1, 3])
    for name in ("epsilon_plus", "epsilon_gamma_box"):
        ours = lrp(net, x, target, composite=name)
        assert rel_error(ours.map, _zennit(net, ZENNIT_COMPOSITES[name]([ResNetCanonizer()]), x, target)) < 2e-5
    # without the Sum rule the residual relevance is counted twice: it is not the same map
    plain = lrp(net, x, target, composite="epsilon_plus", check_functional=False)
    assert rel_error(plain.map, ours.map if name == "epsilon_plus" else lrp(net, x, target).map) > 1e-2


def test_lrp_explains_features_from_where_they_are_read(model, images) -> None:
    """A channel feature's relevance starts at its layer as ``a * df/da``: Zennit with the
    network cut there and an average pool (Norm rule) as the readout gives the same map."""
    tight = _eps0(model)
    ours = lrp(tight, images, "channel:stage2:3", composite="epsilon_plus")
    truncated = nn.Sequential(tight.stem, tight.stage1, tight.stage2, nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    theirs = _zennit(truncated, zc.EpsilonPlus(canonizers=[SequentialMergeBatchNorm()]), images, torch.tensor([3] * 3))
    assert rel_error(ours.map, theirs) < 1e-5
    torch.testing.assert_close(ours.extras["relevance_seed"], ours.values, rtol=1e-5, atol=1e-7)  # sum(a/hw) = mean
    mixed = lrp(tight, images, ["channel:stage2:3", 4, 2], composite="epsilon_plus")
    torch.testing.assert_close(mixed.map[0], ours.map[0], rtol=1e-5, atol=1e-7)
    logits = lrp(tight, images, torch.tensor([0, 4, 2]), composite="epsilon_plus")
    torch.testing.assert_close(mixed.map[1:], logits.map[1:], rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------- conservation
def test_epsilon_rule_conserves_relevance_in_a_bias_free_network(images) -> None:
    torch.manual_seed(2)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3, bias=False),
    ).eval()
    result = lrp(net, images, 1, composite="epsilon", epsilon=1e-9)
    torch.testing.assert_close(result.map.flatten(1).sum(dim=1), result.values, rtol=1e-4, atol=0)
    torch.testing.assert_close(result.extras["relevance_seed"], result.values)  # the logit goes in
    assert float(result.extras["conservation_error"].max()) < 1e-4
    # z+ conserves as well without biases, up to its stabilizer (1e-6 by default: ~2e-4 here)
    assert float(lrp(net, images, 1, composite="zplus", stabilizer=1e-9).extras["conservation_error"].max()) < 1e-4


def test_epsilon_rule_on_a_biased_layer_keeps_the_bias_share(images) -> None:
    """One linear layer: R_i = x_i w_i f / (z + eps sign z) with z = f, so the bias keeps
    f (b + eps) / (z + eps): exactly what the docstring says is not conserved."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2)).eval()
    with torch.no_grad():
        net[1].bias.fill_(0.5)
    eps = 0.01
    result = lrp(net, images, 0, composite="epsilon", epsilon=eps)
    z = result.values
    expected = images * net[1].weight[0].view(3, 32, 32) * (z / (z + eps * z.sign())).view(-1, 1, 1, 1)
    torch.testing.assert_close(result.map, expected, rtol=1e-5, atol=1e-8)
    kept = z * (0.5 + eps * z.sign()) / (z + eps * z.sign())
    torch.testing.assert_close(z - result.map.flatten(1).sum(dim=1), kept, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------- house conventions
def test_lrp_of_a_loaded_model_is_the_relevance_of_its_pixels(images) -> None:
    """The normalization of a LoadedModel is an elementwise relabelling of the input: relevance
    passes through it unchanged, and the z-box bounds (pixels in [0, 1]) are normalized too."""
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    net = _randomize_batchnorm(small_cnn(num_classes=3, width=8, depth=2, blocks_per_stage=1, seed=0), 8).eval()
    loaded = LoadedModel(model=net, spec="test:normalized", source="test",
                         preprocessing=Preprocessing(input_size=(3, 32, 32), mean=mean, std=std))
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    ours = attribute(loaded, images, 2, method="lrp", composite="epsilon_gamma_box")
    expected = lrp(net, (images - m) / s, 2, composite="epsilon_gamma_box", low=(0 - m) / s, high=(1 - m) / s)
    torch.testing.assert_close(ours.map, expected.map, rtol=1e-5, atol=1e-7)
    assert not net._forward_pre_hooks and not net._forward_hooks  # nothing left on the model


def test_registry_rule_map_and_chunking(model, images) -> None:
    assert set(list_methods(family="propagation")) >= {"deeplift", "deeplift_shap", "lrp"}
    assert get_method("deepshap").name == "deeplift_shap" and get_method("deep_lift").name == "deeplift"
    assert get_method("deeplift_shap").multiplies_batch
    plan = lrp_rule_map(model, "epsilon_gamma_box")
    assert plan["stem.conv"] == "zbox" and plan["stage1.0.conv"] == "gamma" and plan["head"] == "epsilon"
    assert plan["stem.relu"] == "pass" and plan["stem.bn"] == "pass" and plan["pool"] == "norm"
    assert lrp_rule_map(model, "epsilon_plus_flat", rules={"head": "zplus"})["head"] == "zplus"
    assert set(LRP_COMPOSITES) >= set(ZENNIT_COMPOSITES)
    whole = attribute(model, images, TARGETS, method="deeplift", baseline="blur")
    chunked = deeplift(model, images, TARGETS, baseline="blur", internal_batch_size=1)
    torch.testing.assert_close(whole.map, chunked.map, rtol=1e-5, atol=1e-8)
    assert whole.map.shape == images.shape and whole.features == ["class:1", "class:4", "class:2"]
    first = lrp(model, images, None)  # the predicted class
    torch.testing.assert_close(first.values, model(images).max(dim=1).values, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were taken
