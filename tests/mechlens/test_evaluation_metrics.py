"""mechlens.evaluation.metrics against Quantus 0.6 and captum.metrics on the same model, inputs,
maps and perturbations, plus properties that pin the definitions.

Randomness: where the peer draws from numpy's / torch's global RNG we replay its draws and hand
them to ours (Quantus' noise and subsets, its random class) or seed both identically (Captum's
noise, drawn in the same sample-major stream as ours). ROAD is compared with ``noise=0`` (the
imputation itself, deterministic) and its noise is tested separately.

Quantus normalises maps by the batch's max ``|a|`` by default; every compared metric is
invariant to that except infidelity, compared with ``normalise=False`` (Quantus' default there).
Quantus' ``ROAD`` indexes the noisy linear imputation with ranks over ``C*H*W`` elements but
the imputation with ``H*W`` pixels, so it raises IndexError on RGB inputs: the ROAD comparison
runs on a one-channel model, and the imputation alone is compared on RGB images."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution import gradcam, saliency
from mechlens.evaluation.metrics import (
    MetricResult,
    complexity,
    faithfulness_correlation,
    infidelity,
    max_sensitivity,
    noisy_linear_imputation,
    random_logit,
    relevance_mass_accuracy,
    relevance_rank_accuracy,
    road,
    sparseness,
)
from mechlens.features import Channel
from mechlens.models import small_cnn

quantus = pytest.importorskip("quantus")
captum_metrics = pytest.importorskip("captum.metrics")
captum_attr = pytest.importorskip("captum.attr")
from quantus.functions.perturb_func import noisy_linear_imputation as quantus_imputation  # noqa: E402
from quantus.functions.similarity_func import correlation_pearson  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
BATCH = 4


def _rel(ours, theirs) -> float:
    a = torch.as_tensor(np.asarray(ours, dtype=np.float64))
    b = torch.as_tensor(np.asarray(theirs, dtype=np.float64))
    assert a.shape == b.shape, (a.shape, b.shape)
    scale = b.abs().max().item()
    assert scale > 0, "the reference is all zeros: the comparison would be vacuous"
    return (a - b).abs().max().item() / scale


def _quiet(metric_cls, **kwargs):
    return metric_cls(disable_warnings=True, **kwargs)


def _net(in_channels: int = 3) -> nn.Module:
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0, in_channels=in_channels).eval()
    torch.nn.init.normal_(net.head.weight, std=1.0, generator=torch.Generator().manual_seed(3))  # non-trivial logits
    return net


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return _net()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(BATCH, 3, 32, 32, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def labels() -> torch.Tensor:
    return torch.tensor([1, 4, 2, 0])  # a different class per sample (the random model predicts class 0 for all)


@pytest.fixture(scope="module")
def maps() -> torch.Tensor:
    """Continuous random maps with both signs (no ties, so every peer's sort order agrees)."""
    return torch.rand(BATCH, 32, 32, generator=torch.Generator().manual_seed(1)) - 0.3


@pytest.fixture(scope="module")
def masks() -> torch.Tensor:
    out = torch.zeros(BATCH, 32, 32, dtype=torch.bool)
    for i in range(BATCH):
        out[i, 4 + i : 14 + 2 * i, 6 : 20 + i] = True  # a different size per sample
    return out


def _linear_model() -> nn.Module:
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3)).double().eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(3, 3 * 8 * 8, generator=torch.Generator().manual_seed(4), dtype=torch.float64))
    return net


# ---------------------------------------------------------------------------- ROAD
@pytest.mark.parametrize("count", [1, 37, 300, 1000])
def test_imputation_matches_quantus_on_rgb(count) -> None:
    rng = np.random.default_rng(count)
    x = rng.random((3, 32, 32))
    index = np.sort(rng.permutation(32 * 32)[:count])  # includes border and corner pixels at 300 / 1000
    theirs = quantus_imputation(x, index, noise=0.0)
    removed = np.zeros(32 * 32, dtype=bool)
    removed[index] = True
    ours = noisy_linear_imputation(torch.from_numpy(x)[None], torch.from_numpy(removed).view(1, 32, 32), noise=0.0)
    # both solve the same float64 system (theirs SuperLU, ours banded Cholesky)
    assert np.abs(ours[0].numpy() - theirs).max() < 1e-10


def test_imputation_keeps_pixels_and_adds_seeded_noise() -> None:
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    removed = torch.rand(2, 32, 32, generator=torch.Generator().manual_seed(3)) < 0.6
    clean = noisy_linear_imputation(x, removed, noise=0.0)
    noisy = noisy_linear_imputation(x, removed, noise=0.05, seed=7)
    kept = ~removed.unsqueeze(1).expand_as(x)
    assert torch.equal(noisy[kept], x[kept]) and torch.equal(clean[kept], x[kept])
    residual = (noisy - clean)[~kept]
    assert abs(float(residual.std()) - 0.05) < 0.005 and abs(float(residual.mean())) < 0.005
    assert torch.equal(noisy, noisy_linear_imputation(x, removed, noise=0.05, seed=7))
    assert not torch.equal(noisy, noisy_linear_imputation(x, removed, noise=0.05, seed=8))
    # a removed pixel is the weighted mean of its neighbours: a constant image stays constant
    flat = noisy_linear_imputation(torch.full_like(x, 0.25), removed, noise=0.0)
    assert (flat - 0.25).abs().max() < 1e-6


def test_imputation_refuses_bad_masks() -> None:
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="every pixel removed"):
        noisy_linear_imputation(x, torch.ones(2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"removed must be \[N, H, W\]"):
        noisy_linear_imputation(x, torch.zeros(2, 4, 4, dtype=torch.bool))


def test_road_matches_quantus_on_one_channel() -> None:
    net = _net(in_channels=1)
    x = torch.rand(BATCH, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = net(x).argmax(dim=1)
    heat = torch.rand(BATCH, 32, 32, generator=torch.Generator().manual_seed(6))
    percentages = list(range(5, 100, 10))
    theirs = _quiet(quantus.ROAD, percentages=percentages, noise=0.0)(
        model=net, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=heat.numpy())
    ours = road(net, x, y, heat, percentages=percentages, orders=("morf",), noise=0.0, internal_batch_size=9)
    # the accuracy (share still predicted as the label) at each percentage, exactly
    assert ours.accuracy("morf").tolist() == [float(theirs[p]) for p in percentages]
    assert len(set(ours.accuracy("morf").tolist())) > 1  # the curve moves: the comparison is not vacuous
    # and the feature curve is the logit of the imputed image
    removed = torch.zeros(BATCH, 32 * 32, dtype=torch.bool)
    removed.scatter_(1, heat.flatten(1).argsort(dim=1, descending=True)[:, : int(1024 * 45 / 100)], True)
    with torch.no_grad():
        direct = net(noisy_linear_imputation(x, removed.view(BATCH, 32, 32), noise=0.0))[torch.arange(BATCH), y]
    assert torch.allclose(ours.scores["morf"][:, 4].float(), direct, atol=1e-5)


def test_road_orders_chunks_and_feature_targets(model, images, labels, maps) -> None:
    pct = [10, 40, 70, 95]
    both = road(model, images, labels, maps, percentages=pct, internal_batch_size=None, seed=3)
    chunked = road(model, images, labels, maps, percentages=pct, internal_batch_size=5, seed=3)
    assert torch.equal(both.scores["morf"], chunked.scores["morf"]) and torch.equal(both.kept["lerf"], chunked.kept["lerf"])
    # LeRF of a map removes the same pixels as MoRF of its negation (same seed, same noise draws)
    lerf = road(model, images, labels, maps, percentages=pct, orders=("lerf",), seed=3)
    morf_of_negated = road(model, images, labels, -maps, percentages=pct, orders=("morf",), seed=3)
    assert torch.equal(lerf.scores["lerf"], morf_of_negated.scores["morf"])
    assert not torch.equal(both.scores["morf"], both.scores["lerf"])
    assert both.auc("morf").shape == (BATCH,) and np.isfinite(both.gap)
    # any feature: a channel of stage2 (no accuracy curve then)
    channel = road(model, images, Channel("stage2", 3), maps, percentages=pct, orders=("morf",))
    assert channel.kept is None and channel.scores["morf"].shape == (BATCH, len(pct))
    with pytest.raises(ValueError, match="class targets"):
        channel.accuracy("morf")
    assert "ROAD" in both._repr_html_() and "morf" in repr(both)
    assert both.to_dict()["lerf"]["accuracy"] == both.accuracy("lerf").tolist()
    # a layer map (Grad-CAM, 4x4 at stage2) as an Attribution: its heatmap is upsampled to the input
    cam = road(model, images, labels, gradcam(model, images, labels, layer="stage2"), percentages=[20], orders=("morf",))
    assert cam.scores["morf"].shape == (BATCH, 1)


def test_road_refuses_bad_arguments(model, images, labels, maps) -> None:
    with pytest.raises(ValueError, match=r"percentages must be .* \[0, 100\)"):
        road(model, images, labels, maps, percentages=[50, 100])
    with pytest.raises(ValueError, match="orders must be"):
        road(model, images, labels, maps, orders=("most",))
    with pytest.raises(ValueError, match="do not match the inputs"):
        road(model, images, labels, maps[:, :16, :16], percentages=[10])
    with pytest.raises(ValueError, match="got 2 maps for 4 inputs"):
        road(model, images, labels, maps[:2], percentages=[10])


# ---------------------------------------------------------------------------- infidelity
@pytest.mark.parametrize("normalize", [False, True])
def test_infidelity_matches_captum_with_the_same_noise(model, images, labels, maps, normalize) -> None:
    def perturb(inputs):  # Captum: (perturbation I, inputs - I), from the global RNG
        noise = torch.randn(inputs.shape) * 0.1
        return noise, inputs - noise

    element_maps = maps.unsqueeze(1).expand_as(images).contiguous()
    torch.manual_seed(5)
    theirs = captum_metrics.infidelity(model, perturb, images, element_maps, target=labels, n_perturb_samples=6,
                                       normalize=normalize)
    ours = infidelity(model, images, labels, maps, n_perturb_samples=6, noise_std=0.1, seed=5, normalize=normalize,
                      internal_batch_size=7)  # chunks cut across samples: the noise stream is the same
    assert _rel(ours.values, theirs) < 1e-5  # float32 sums of 3072 products on both sides
    assert ours.details["explained"].shape == (BATCH, 6)


def test_infidelity_matches_quantus_patch_schedule(model, images, labels, maps) -> None:
    """Quantus replaces 4x4 patches (row-major, cumulatively) by the image's minimum; the same
    perturbations passed explicitly give its numbers."""
    floor = images.amin(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    current, steps = images.clone(), []
    for by in range(8):
        for bx in range(8):
            current = current.clone()
            current[:, :, 4 * by : 4 * by + 4, 4 * bx : 4 * bx + 4] = floor
            steps.append(images - current)
    theirs = _quiet(quantus.Infidelity, n_perturb_samples=1, perturb_patch_sizes=[4])(
        model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=maps.numpy())
    ours = infidelity(model, images, labels, maps, perturbations=torch.stack(steps, dim=1), internal_batch_size=50)
    assert _rel(ours.values, theirs) < 1e-5


@pytest.mark.parametrize("perturbation", ["gaussian", "square"])
def test_infidelity_is_zero_for_the_gradient_of_a_linear_model(perturbation) -> None:
    net = _linear_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gradient = saliency(net, x, 1, abs=False)
    exact = infidelity(net, x, 1, gradient, perturbation=perturbation, patch_size=3, n_perturb_samples=8)
    assert float(exact.values.max()) < 1e-18
    noisy = infidelity(net, x, 1, gradient.map * 0.5, perturbation=perturbation, patch_size=3, n_perturb_samples=8)
    assert float(noisy.values.min()) > 1e-3
    rescued = infidelity(net, x, 1, gradient.map * 0.5, perturbation=perturbation, patch_size=3, n_perturb_samples=8,
                         normalize=True)  # the optimal scale undoes the factor 0.5
    assert float(rescued.values.max()) < 1e-18 and torch.allclose(rescued.details["beta"], torch.full((3,), 2.0, dtype=torch.float64))


def test_infidelity_refuses_bad_arguments(model, images, labels, maps) -> None:
    with pytest.raises(ValueError, match="perturbation must be one of"):
        infidelity(model, images, labels, maps, perturbation="salt")
    with pytest.raises(ValueError, match=r"perturbations must be \[B, K, C, H, W\]"):
        infidelity(model, images, labels, maps, perturbations=torch.zeros(BATCH, 2, 1, 32, 32))
    with pytest.raises(ValueError, match="do not match the inputs"):
        infidelity(model, images, labels, torch.zeros(BATCH, 2, 32, 32))
    with pytest.raises(ValueError, match="returned"):
        infidelity(model, images, labels, maps, perturbation=lambda rows, gen: rows[:, :1])


# ---------------------------------------------------------------------------- max-sensitivity
@pytest.mark.filterwarnings("ignore:Input Tensor 0 did not already require gradients")
def test_max_sensitivity_matches_captum_with_the_same_noise(model, images, labels) -> None:
    def explain(inputs, target):
        return captum_attr.Saliency(model).attribute(inputs, target=target)

    torch.manual_seed(9)
    theirs = captum_metrics.sensitivity_max(explain, images, target=labels, n_perturb_samples=5, perturb_radius=0.05)
    ours = max_sensitivity(model, images, labels, "saliency", n_perturb_samples=5, radius=0.05, seed=9,
                           internal_batch_size=7)
    assert _rel(ours.values, theirs) < 1e-5
    assert ours.details["sensitivities"].shape == (BATCH, 5) and float(ours.values.min()) > 0


def test_max_sensitivity_matches_quantus_with_replayed_noise(model, images, labels) -> None:
    def explain(model, inputs, targets, **kwargs):
        return saliency(model, torch.as_tensor(inputs), torch.as_tensor(targets)).map.numpy()

    n, bound = 4, 0.05
    np.random.seed(11)
    theirs = _quiet(quantus.MaxSensitivity, nr_samples=n, lower_bound=bound)(
        model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=explain(model, images, labels),
        explain_func=explain)
    np.random.seed(11)  # Quantus: one U(-bound, bound) draw [B, C*H*W] per step, added in float32
    noise = np.stack([np.random.uniform(-bound, bound, (BATCH, 3 * 32 * 32)) for _ in range(n)], axis=1)
    replayed = torch.from_numpy((images.numpy().reshape(BATCH, 1, -1) + noise).astype(np.float32)).view(-1, 3, 32, 32)
    ours = max_sensitivity(model, images, labels, n_perturb_samples=n, perturb_func=lambda rows, gen: replayed)
    assert _rel(ours.values, theirs) < 1e-5


def test_max_sensitivity_properties_and_errors(model, images, labels) -> None:
    tiny = max_sensitivity(model, images, labels, n_perturb_samples=3, radius=1e-6, abs=False)
    large = max_sensitivity(model, images, labels, n_perturb_samples=3, radius=0.3, abs=False)
    assert float(tiny.values.max()) < float(large.values.min())  # more noise, larger change of the map
    inf = max_sensitivity(model, images, labels, n_perturb_samples=3, radius=0.3, norm="inf", abs=False)
    assert inf.values.shape == (BATCH,) and not torch.equal(inf.values, large.values)
    with pytest.raises(ValueError, match="norm must be"):
        max_sensitivity(model, images, labels, norm="nuclear")
    with pytest.raises(ValueError, match="unknown attribution method"):
        max_sensitivity(model, images, labels, method="gradcamm")
    with pytest.raises(ValueError, match="n_perturb_samples must be at least 1"):
        max_sensitivity(model, images, labels, n_perturb_samples=0)


# ---------------------------------------------------------------------------- random logit
def test_random_logit_matches_quantus_with_its_class_draw(model, images, labels) -> None:
    def explain(model, inputs, targets, **kwargs):
        return saliency(model, torch.as_tensor(inputs), torch.as_tensor(targets)).heatmap().unsqueeze(1).numpy()

    theirs = _quiet(quantus.RandomLogit, num_classes=5, seed=42, similarity_func=correlation_pearson)(
        model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=explain(model, images, labels),
        explain_func=explain)
    np.random.seed(42)  # Quantus' draw: an index among the 4 other classes
    slot = np.random.randint(0, 4, BATCH)
    others = torch.from_numpy(slot) + (torch.from_numpy(slot) >= labels).long()
    ours = random_logit(model, images, labels, "saliency", others=others, similarity="pearson")
    assert _rel(ours.values, theirs) < 1e-5


@pytest.mark.parametrize("size", [(32, 32), (9, 12), (5, 6)])
def test_batched_ssim_matches_the_house_ssim(size) -> None:
    from mechlens.evaluation.metrics import _ssim
    from mechlens.evaluation.similarity import ssim

    gen = torch.Generator().manual_seed(sum(size))
    a = torch.rand(5, *size, generator=gen)
    b = 0.5 * a + torch.rand(5, *size, generator=gen)  # partly similar
    assert _rel(_ssim(a, b), ssim(a, b)) < 1e-5  # theirs: scikit-image in float32, per map


def test_random_logit_draws_other_classes_and_needs_classes(model, images, labels) -> None:
    many = images.repeat(15, 1, 1, 1)
    target = torch.arange(60) % 5
    result = random_logit(model, many, target, "saliency", seed=1)
    drawn = result.details["others"]
    assert bool((drawn != target).all()) and set(drawn.tolist()) == set(range(5))
    assert bool(((result.values >= -1) & (result.values <= 1)).all())  # SSIM
    assert torch.equal(result.values, random_logit(model, many, target, "saliency", seed=1).values)
    given = saliency(model, many, target)  # the target's maps passed in: only the other class is explained
    assert torch.allclose(random_logit(model, many, target, "saliency", seed=1, saliency=given).values, result.values,
                          atol=1e-6)
    with pytest.raises(ValueError, match="pass others="):
        random_logit(model, images, Channel("stage2", 1), "saliency")
    with pytest.raises(ValueError, match="similarity must be one of"):
        random_logit(model, images, labels, "saliency", similarity="cosine")


# ---------------------------------------------------------------------------- map properties
def test_sparseness_and_complexity_match_quantus(model, images, labels, maps) -> None:
    for metric, ours_fn in ((quantus.Sparseness, sparseness), (quantus.Complexity, complexity)):
        theirs = _quiet(metric)(model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=maps.numpy())
        # Quantus adds 1e-7 (Gini) / 1e-12 (log) to normalised maps; we do not: 1e-6 relative
        assert _rel(ours_fn(maps).values, theirs) < 1e-6, metric.__name__


def test_sparseness_and_complexity_extremes() -> None:
    uniform = torch.ones(1, 16, 16)
    peak = torch.zeros(1, 16, 16)
    peak[0, 3, 5] = -2.0  # absolute values by default
    assert abs(float(sparseness(uniform).values[0])) < 1e-12
    assert abs(float(sparseness(peak).values[0]) - 255 / 256) < 1e-12
    assert abs(float(complexity(uniform).values[0]) - np.log(256)) < 1e-9
    assert abs(float(complexity(peak).values[0])) < 1e-12
    assert torch.isnan(sparseness(torch.zeros(1, 4, 4)).values).all()
    with pytest.raises(ValueError, match="float tensor"):
        sparseness(torch.ones(4, dtype=torch.long))


def test_relevance_mass_and_rank_accuracy_match_quantus(model, images, labels, maps, masks) -> None:
    s_batch = masks.unsqueeze(1).numpy().astype(float)
    kwargs = dict(model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=maps.numpy(), s_batch=s_batch)
    mass = _quiet(quantus.RelevanceMassAccuracy)(**kwargs)
    rank = _quiet(quantus.RelevanceRankAccuracy)(**kwargs)
    assert _rel(relevance_mass_accuracy(maps, masks).values, mass) < 1e-6
    assert _rel(relevance_rank_accuracy(maps, masks).values, rank) < 1e-12
    assert _rel(relevance_mass_accuracy(maps, masks.unsqueeze(1)).values, mass) < 1e-6  # Quantus' [B, 1, H, W] masks


def test_relevance_accuracies_on_known_maps(masks) -> None:
    inside_only = masks.double() * torch.rand(masks.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.allclose(relevance_mass_accuracy(inside_only, masks).values, torch.ones(BATCH, dtype=torch.float64))
    assert torch.allclose(relevance_rank_accuracy(inside_only + 1e-3, masks).values, torch.ones(BATCH, dtype=torch.float64))
    # a constant map: every pixel tied, the expected rank accuracy is the mask's area fraction
    constant = relevance_rank_accuracy(torch.ones(BATCH, 32, 32), masks).values
    assert torch.allclose(constant, masks.flatten(1).double().mean(dim=1))


def test_mask_metrics_refuse_mismatched_shapes(maps, masks) -> None:
    with pytest.raises(ValueError, match="do not match the masks"):
        relevance_mass_accuracy(maps[:, :16, :16], masks)
    with pytest.raises(ValueError, match=r"masks must be \[B, H, W\] with B=4"):
        relevance_rank_accuracy(maps, masks[:2])
    empty = masks.clone()
    empty[1] = False
    with pytest.raises(ValueError, match="are empty"):
        relevance_mass_accuracy(maps, empty)


# ---------------------------------------------------------------------------- faithfulness correlation
def test_faithfulness_correlation_matches_quantus_with_its_subsets(model, images, labels, maps) -> None:
    runs, size = 12, 200
    np.random.seed(21)
    theirs = _quiet(quantus.FaithfulnessCorrelation, nr_runs=runs, subset_size=size, return_aggregate=False)(
        model=model, x_batch=images.numpy(), y_batch=labels.numpy(), a_batch=maps.numpy())
    # Quantus' draws, per run: subset_size of the C*H*W elements for each sample, then B uniform
    # numbers its baseline lookup draws (for a "uniform" baseline it does not use)
    np.random.seed(21)
    subsets = torch.zeros(BATCH, runs, 3 * 32 * 32, dtype=torch.bool)
    for r in range(runs):
        for b in range(BATCH):
            subsets[b, r, np.random.choice(3 * 32 * 32, size, replace=False)] = True
        np.random.uniform(size=BATCH)
    black = images.amin(dim=(1, 2, 3), keepdim=True)  # Quantus' "black": the image's minimum
    ours = faithfulness_correlation(model, images, labels, maps, subsets=subsets.view(BATCH, runs, 3, 32, 32),
                                    baseline=black, internal_batch_size=10)
    assert _rel(ours.values, theirs) < 1e-5


def test_faithfulness_correlation_is_one_for_gradient_times_input_of_a_linear_model() -> None:
    net = _linear_model()
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    gradient = saliency(net, x, 2, abs=False).map
    exact = faithfulness_correlation(net, x, 2, (gradient * x).sum(dim=1), n_runs=20, subset_size=10)
    assert torch.allclose(exact.values, torch.ones(3, dtype=torch.float64), atol=1e-12)
    shuffled = faithfulness_correlation(net, x, 2, torch.rand(3, 8, 8, dtype=torch.float64), n_runs=20, subset_size=10)
    assert float(shuffled.values.max()) < 0.9
    again = faithfulness_correlation(net, x, 2, (gradient * x).sum(dim=1), n_runs=20, subset_size=10,
                                     internal_batch_size=7)
    assert torch.equal(exact.details["drops"], again.details["drops"])  # chunking changes nothing
    assert isinstance(exact, MetricResult) and "faithfulness_correlation" in exact._repr_html_()
    with pytest.raises(ValueError, match="subset_size must be between 1 and 63"):
        faithfulness_correlation(net, x, 2, gradient.sum(dim=1), subset_size=64)
    with pytest.raises(ValueError, match="subsets must be boolean masks"):
        faithfulness_correlation(net, x, 2, gradient.sum(dim=1), subsets=torch.zeros(3, 4, 4, 4, dtype=torch.bool))


def test_metrics_run_without_warnings(model, images, labels, maps) -> None:
    """Ours run silently on ordinary inputs (Quantus warns on every call unless told not to)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparseness(maps)
        complexity(maps)
        infidelity(model, images, labels, maps, n_perturb_samples=2)


def test_auto_rows_per_pass_keeps_large_cpu_images_in_cache_and_changes_no_result(model, images, labels, maps) -> None:
    from mechlens.attribution.base import rows_per_pass

    big = torch.zeros(2, 3, 224, 224)
    assert rows_per_pass("auto", big) == (1 << 21) // (3 * 224 * 224) == 13
    assert rows_per_pass("auto", images) == 256  # 32-px images: the cap
    assert rows_per_pass(None, big) is None and rows_per_pass(40, big) == 40
    with pytest.raises(ValueError, match="None or 'auto'"):
        rows_per_pass("max", big)
    auto = faithfulness_correlation(model, images, labels, maps, n_runs=20, subset_size=64)
    whole = faithfulness_correlation(model, images, labels, maps, n_runs=20, subset_size=64, internal_batch_size=None)
    assert torch.allclose(auto.values, whole.values, atol=1e-6)
    with pytest.raises(ValueError, match="None or 'auto'"):
        infidelity(model, images, labels, maps, internal_batch_size="max")


def test_metrics_that_run_a_layer_method_by_name_take_attributes_default_layer(model, images, labels) -> None:
    """max_sensitivity / random_logit / stability / randomization with a CAM and no layer= pick the
    layer attribute() picks (before: a TypeError from deep inside the method)."""
    from mechlens.attribution import attribute, suggest_cam_layer
    from mechlens.evaluation import attribution_stability, randomization_check

    layer = suggest_cam_layer(model, tuple(images.shape[1:]))
    assert attribute(model, images, labels, method="gradcam").extras["layer"] == layer
    implicit = random_logit(model, images, labels, "gradcam", seed=3)
    explicit = random_logit(model, images, labels, "gradcam", seed=3, layer=layer)
    assert torch.equal(implicit.values, explicit.values)
    implicit = max_sensitivity(model, images, labels, "gradcam", n_perturb_samples=2)
    explicit = max_sensitivity(model, images, labels, "gradcam", n_perturb_samples=2, layer=layer)
    assert torch.equal(implicit.values, explicit.values)
    assert attribution_stability(model, images[:2], labels[:2], "gradcam", shifts=[(1, 0)], n_noise=0) is not None
    checked = randomization_check(model, images[:2], labels[:2], "gradcam", layers=["head"])
    assert checked.spearman.shape[0] == 1
