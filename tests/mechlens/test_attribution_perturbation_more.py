"""RISE, feature ablation and Shapley value sampling (mechlens.attribution.perturbation).

Feature ablation and Shapley value sampling are checked against Captum on the same model,
inputs, masks and baselines (Shapley value sampling with the same permutations: Captum draws
them from the global RNG, we from a generator seeded the same way), and Shapley value sampling
also against the exact Shapley values of 4 groups (brute force over all 16 coalitions). RISE is
checked against a reference written from the paper and the authors' code (same masks, same
map), its masks against the reference's skimage upsampling, and on a model that reads one
region only.
"""
from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution.base import attribute, get_method
from mechlens.attribution.baselines import make_baseline
from mechlens.attribution.execution import exact_execution
from mechlens.attribution.perturbation import (
    _RiseMasks,
    feature_ablation,
    occlusion,
    rise,
    rise_masks,
    shapley_value_sampling,
)
from tests.mechlens._parity import TARGETS, parity_cnn, parity_images, rel_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")
captum_attr = pytest.importorskip("captum.attr")





@pytest.fixture(scope="module")
def model() -> nn.Module:
    return parity_cnn()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images()


def _patches(size: int, image: int = 32) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(image), torch.arange(image), indexing="ij")
    return ((ys // size) * math.ceil(image / size) + xs // size).view(1, 1, image, image)


def _per_sample_mask() -> torch.Tensor:
    """Per sample and per channel groups, with ids a sample lacks (2 in sample 1, 6 nowhere)."""
    mask = torch.randint(0, 6, (3, 3, 32, 32), generator=torch.Generator().manual_seed(5))
    mask[1][mask[1] == 2] = 3
    mask[2][mask[2] == 5] = 7
    return mask


class RowCounter:
    """Counts the images a model runs on (a forward pre-hook), for the ``n_forwards`` extras."""

    def __init__(self, net: nn.Module) -> None:
        self.rows = 0
        self.calls = 0
        self.handle = net.register_forward_pre_hook(self)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        self.rows += int(args[0].shape[0])
        self.calls += 1


# ---------------------------------------------------------------------------- feature ablation
# Tolerances: the same function evaluated on the same inputs; what differs is the batch
# composition (and, outside exact_execution, the channels-last layout), which moves the logits
# by float32 rounding. Measured: 1.0e-6 relative with the layout change, 0 without it.
@pytest.mark.parametrize("case", ["patches", "per_sample"])
def test_feature_ablation_matches_captum(model, images, case) -> None:
    target = torch.tensor(TARGETS)
    mask, baseline = (_patches(8), 0.0) if case == "patches" else (_per_sample_mask(), images * 0.3)
    theirs = captum_attr.FeatureAblation(model).attribute(images, target=target, feature_mask=mask,
                                                          baselines=baseline, perturbations_per_eval=1)
    ours = feature_ablation(model, images, target, feature_mask=mask, baseline=baseline, internal_batch_size=20)
    assert rel_error(ours.map, theirs) < 1e-5
    with exact_execution():
        exact = feature_ablation(model, images, target, feature_mask=mask, baseline=baseline, internal_batch_size=20)
    assert rel_error(exact.map, theirs) < 1e-6
    # groups differ in effect (not a constant map) and a group a sample lacks is credited nothing
    assert exact.map.flatten(1).std(dim=1).min() > 0
    if case == "per_sample":
        ids = exact.extras["group_ids"].tolist()
        assert ids == [0, 1, 2, 3, 4, 5, 7]
        assert exact.extras["group_attributions"][1, ids.index(2)] == 0


def test_feature_ablation_counts_its_forwards_and_takes_patch_sizes(model, images) -> None:
    counter = RowCounter(model)
    try:
        result = feature_ablation(model, images, 1, feature_mask=_per_sample_mask(), internal_batch_size=8)
    finally:
        counter.handle.remove()
    # 6 groups in samples 0 and 2 (ids 0-5 / 0-4 and 7), 5 in sample 1, plus f(x) of the batch
    assert result.extras["n_forwards"] == counter.rows == 6 + 5 + 6 + 3
    patch = feature_ablation(model, images, 1, feature_mask=8)
    assert torch.equal(patch.map, feature_ablation(model, images, 1, feature_mask=_patches(8)).map)
    # non-overlapping 8 x 8 windows are the same ablations as 8 x 8 patches
    windows = occlusion(model, images, 1, window=8, local=False)
    assert rel_error(patch.map, windows.map) < 1e-5


# ---------------------------------------------------------------------------- Shapley value sampling
@pytest.mark.parametrize("case", ["quadrants", "per_sample"])
def test_shapley_value_sampling_matches_captum_with_the_same_permutations(model, images, case) -> None:
    """Captum draws ``torch.randperm(n_groups)`` from the global RNG, one per sample; after
    ``torch.manual_seed(s)`` those are our draws for ``seed=s``. Same tolerance as feature
    ablation (measured 2.6e-7 and 6.2e-7: rounding only)."""
    target = torch.tensor(TARGETS)
    mask, baseline = (_patches(16), 0.0) if case == "quadrants" else (_per_sample_mask(), images * 0.3)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about id 6, which no sample has
        torch.manual_seed(7)
        theirs = captum_attr.ShapleyValueSampling(model).attribute(images, target=target, feature_mask=mask,
                                                                   baselines=baseline, n_samples=6)
    ours = shapley_value_sampling(model, images, target, feature_mask=mask, baseline=baseline, n_samples=6,
                                  seed=7, internal_batch_size=13)
    assert rel_error(ours.map, theirs) < 1e-5
    other = shapley_value_sampling(model, images, target, feature_mask=mask, baseline=baseline, n_samples=6, seed=8)
    assert rel_error(other.map, theirs) > 1e-2  # the permutations matter: the parity is not vacuous
    assert ours.extras["completeness_error"].max() < 1e-5  # telescoping sums to f(x) - f(baseline)


def _exact_shapley(model: nn.Module, images: torch.Tensor, targets: list[int], mask: torch.Tensor, groups: int) -> torch.Tensor:
    """Shapley values ``[B, groups]`` by the definition, over every coalition (baseline zeros)."""
    rows = torch.arange(images.shape[0])
    value = {}
    with torch.no_grad():
        for size in range(groups + 1):
            for coalition in itertools.combinations(range(groups), size):
                keep = torch.isin(mask, torch.tensor(coalition, dtype=torch.long))
                value[coalition] = model(torch.where(keep, images, torch.zeros_like(images)))[rows, targets].double()
    phi = torch.zeros(images.shape[0], groups, dtype=torch.float64)
    for g in range(groups):
        others = [h for h in range(groups) if h != g]
        for size in range(groups):
            weight = math.factorial(size) * math.factorial(groups - size - 1) / math.factorial(groups)
            for coalition in itertools.combinations(others, size):
                phi[:, g] += weight * (value[tuple(sorted((*coalition, g)))] - value[coalition])
    return phi


def test_shapley_value_sampling_converges_to_the_exact_shapley_values(model, images) -> None:
    """4 quadrants, 200 random orders. Tolerance 0.2 of the largest |value| per image: over 30
    seeds the worst image's error was 0.075 mean, 0.026 std, 0.138 max (24 orders: 0.25 mean,
    0.47 max), so 0.2 is mean + 4.9 std. Leave-one-out ablation, a different estimator, misses
    by more."""
    exact = _exact_shapley(model, images, TARGETS, _patches(16), 4)
    for seed in (0, 1):
        phi = shapley_value_sampling(model, images, TARGETS, feature_mask=_patches(16), n_samples=200, seed=seed,
                                     internal_batch_size=None).extras["shapley_values"].double()
        error = ((phi - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)).max().item()
        assert error < 0.2, (seed, error)
    loo = feature_ablation(model, images, TARGETS, feature_mask=_patches(16)).extras["group_attributions"].double()
    assert ((loo - exact).abs().amax(dim=1) / exact.abs().amax(dim=1)).max().item() > 0.2


def test_shapley_value_sampling_is_exact_on_an_additive_model_and_skips_needless_steps() -> None:
    """For a linear model every order gives each group its own contribution ``w . (x - b)``
    over the group, whatever the permutations."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 2))
    with torch.no_grad():
        net[1].weight.copy_(torch.randn(2, 768, generator=torch.Generator().manual_seed(2)))
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    mask = _patches(4, 16)
    phi = shapley_value_sampling(net, x, 1, feature_mask=mask, n_samples=3, seed=0).extras["shapley_values"]
    contribution = (net[1].weight[1].view(1, 3, 16, 16) * x).detach()
    expected = torch.zeros(2, 16).scatter_add_(1, mask.expand(2, 3, -1, -1).flatten(1), contribution.flatten(1))
    assert torch.allclose(phi, expected, atol=1e-5)
    counter = RowCounter(net)
    try:
        result = shapley_value_sampling(net, x, 1, feature_mask=mask, n_samples=3, seed=0)
    finally:
        counter.handle.remove()
    # f(x), f(baseline), and per order the 15 steps before the last group (the last is f(x))
    assert result.extras["n_forwards"] == counter.rows == 2 * 2 + 2 * 3 * 15


# ---------------------------------------------------------------------------- RISE
def _reference_rise(model: nn.Module, image: torch.Tensor, target: int, masks: torch.Tensor, p: float,
                    baseline: torch.Tensor) -> torch.Tensor:
    """The paper's estimator as the authors' code computes it: ``masks * x`` (here blended with a
    baseline), scores in batches, ``sal = scores^T masks / N / p1``."""
    stack = masks * image + (1 - masks) * baseline  # [N, C, H, W]
    with torch.no_grad():
        scores = torch.cat([model(chunk)[:, target] for chunk in stack.split(100)])
    return (scores.double() @ masks.flatten(1).double()).view(masks.shape[-2:]) / masks.shape[0] / p


@pytest.mark.parametrize("baseline", ["zeros", "blur"])
def test_rise_matches_a_reference_written_from_the_paper(model, images, baseline) -> None:
    """Same masks (``rise_masks`` with the same seed), same map. Tolerance 1e-5: float32 logits
    from other batch compositions and layouts, summed in another order (measured 4e-7)."""
    result = rise(model, images, TARGETS, n_masks=300, grid_size=5, p=0.4, baseline=baseline, seed=3,
                  internal_batch_size=50)
    masks = rise_masks(300, 32, grid_size=5, p=0.4, seed=3)
    base = make_baseline(images, baseline)
    for b, target in enumerate(TARGETS):
        reference = _reference_rise(model, images[b : b + 1], target, masks, 0.4, base[b : b + 1])
        assert rel_error(result.map[b, 0], reference) < 1e-5
        assert torch.equal(result.map[b, 0], result.map[b, 2])  # one value for all channels
    assert abs(result.extras["mask_mean"] - float(masks.double().mean())) < 1e-9
    assert abs(result.extras["mask_mean"] - 0.4) < 0.02  # E[M] = p


def test_rise_masks_are_the_reference_upsampling() -> None:
    """The reference draws an ``s x s`` grid, ``skimage.transform.resize(grid, (s + 1) * cell,
    order=1, mode='reflect', anti_aliasing=False)`` and crops at shift ``< cell``; our masks from
    the same grids and shifts agree to float32 rounding (skimage works on the float32 grid)."""
    transform = pytest.importorskip("skimage.transform")
    for (height, width), cells in [((32, 32), (7, 7)), ((31, 20), (4, 3))]:
        sampler = _RiseMasks(20, (height, width), cells, 0.5, torch.Generator().manual_seed(0), torch.device("cpu"))
        ours = sampler.masks(0, 20, torch.float64)
        up = ((cells[0] + 1) * math.ceil(height / cells[0]), (cells[1] + 1) * math.ceil(width / cells[1]))
        for i in range(20):
            grid = sampler.grids[i].numpy().astype("float32")
            y, x = int(sampler.shift_y[i]), int(sampler.shift_x[i])
            reference = transform.resize(grid, up, order=1, mode="reflect", anti_aliasing=False)[y : y + height, x : x + width]
            assert np.abs(ours[i].numpy() - reference).max() < 1e-6
        assert 0 < ours.std() and ours.min() >= 0 and ours.max() <= 1


def test_rise_is_seeded_shares_masks_across_the_batch_and_counts_forwards(model, images) -> None:
    kwargs = {"n_masks": 120, "grid_size": 4}
    a = rise(model, images, TARGETS, seed=5, **kwargs)
    assert torch.equal(a.map, rise(model, images, TARGETS, seed=5, **kwargs).map)
    assert torch.equal(a.map, rise(model, images, TARGETS, generator=torch.Generator().manual_seed(5), **kwargs).map)
    assert rel_error(rise(model, images, TARGETS, seed=6, **kwargs).map, a.map) > 1e-3
    # the chunking does not change the masks; one image alone sees the same masks as in the batch
    assert rel_error(rise(model, images, TARGETS, seed=5, internal_batch_size=7, **kwargs).map, a.map) < 1e-5
    assert rel_error(rise(model, images[1:2], TARGETS[1], seed=5, **kwargs).map[0], a.map[1]) < 1e-5
    counter = RowCounter(model)
    try:
        counted = rise(model, images, TARGETS, seed=5, internal_batch_size=30, **kwargs)
    finally:
        counter.handle.remove()
    assert counted.extras["n_forwards"] == counter.rows == 3 * (120 + 1)
    assert counted.extras["n_forward_passes"] == counter.calls == 1 + 12  # f(x), then 10 masks x 3 images per pass


class RegionMean(nn.Module):
    """Class 0 is the mean of the region rows 4-11, columns 18-29; nothing else matters."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value = x[:, :, 4:12, 18:30].mean(dim=(1, 2, 3))
        return torch.stack([value, -value], dim=1)


def test_rise_saliency_is_highest_where_the_feature_looks() -> None:
    """Thresholds from seeds 0-9 (500 masks): of the 96 highest pixels 65-88 % lie in the
    region, its mean exceeds the far pixels' by 0.038-0.060, and the debiased map's far mean is
    0.4-8.5 % of its mean in the region (the plain map's far mean is E[f], ~0.37)."""
    x = 0.5 + 0.5 * torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[4:12, 18:30] = True
    far = torch.ones(32, 32, dtype=torch.bool)
    far[0:20, 10:32] = False  # more than two cells (4 px) from the region
    plain = rise(RegionMean(), x, 0, n_masks=500, grid_size=8, seed=0)
    debiased = rise(RegionMean(), x, 0, n_masks=500, grid_size=8, seed=0, debias=True)
    for b in range(2):
        heat = plain.heatmap()[b]
        top = heat.flatten().topk(int(inside.sum())).indices
        assert inside.flatten()[top].float().mean() > 0.6
        assert heat[inside].mean() > heat[far].mean() + 0.02
        assert heat[far].mean() > 2 * (heat[inside].mean() - heat[far].mean())  # RISE's offset, E[f]
        # debiased: E[f | kept] - E[f | removed], about 0 where the mask is independent of f
        unbiased = debiased.heatmap()[b]
        assert unbiased[far].mean().abs() < 0.2 * unbiased[inside].mean()
    # the debiased map is (map - mean score) / (1 - p): the same masks, another weighting
    masks = rise_masks(500, 32, grid_size=8, seed=0)
    with torch.no_grad():
        mean_score = RegionMean()((x.unsqueeze(1) * masks.unsqueeze(0)).flatten(0, 1))[:, 0].view(2, 500).mean(dim=1)
    assert torch.allclose(plain.extras["mean_score"], mean_score, atol=1e-6)
    assert torch.allclose(debiased.map, (plain.map - mean_score.view(2, 1, 1, 1)) / 0.5, atol=1e-5)


def test_methods_take_any_feature_and_are_registered(model, images) -> None:
    assert get_method("rise").multiplies_batch
    assert get_method("ablation").name == "feature_ablation"
    assert get_method("shapley_sampling").name == "shapley_value_sampling"
    for method, kwargs in (("rise", {"n_masks": 40}), ("feature_ablation", {"feature_mask": 16}),
                           ("shapley_value_sampling", {"feature_mask": 16, "n_samples": 2})):
        result = attribute(model, images[:2], "channel:stage2:1", method=method, **kwargs)
        assert result.map.shape == (2, 3, 32, 32) and result.features == ["channel:stage2:1"] * 2
        assert result.map.abs().sum() > 0, method


def test_bad_arguments_get_one_line_errors(model, images) -> None:
    def fails(match: str, fn, **kwargs) -> None:
        with pytest.raises((ValueError, TypeError), match=match) as info:
            fn(model, images, 1, **kwargs)
        assert "\n" not in str(info.value)

    for fn in (feature_ablation, shapley_value_sampling):
        fails("needs feature_mask=", fn)
        fails("integer group ids", fn, feature_mask=_patches(8).float())
        fails("integer group ids", fn, feature_mask=_patches(8) > 3)
        fails(r"must be \[B or 1, 1 or C, H, W\]", fn, feature_mask=_patches(8).expand(2, 1, 32, 32))
        fails(r"segments\[:, None\]", fn, feature_mask=_patches(8)[0].expand(3, 32, 32))
        fails(r"must be \[B or 1", fn, feature_mask=torch.zeros(1, 1, 16, 16, dtype=torch.long))
        fails("non-negative", fn, feature_mask=_patches(8) - 1)
        fails("patch feature_mask", fn, feature_mask=0)
        fails("integer tensor", fn, feature_mask=[[0, 1]])
        fails("internal_batch_size", fn, feature_mask=8, internal_batch_size=0)
    fails("n_samples", shapley_value_sampling, feature_mask=8, n_samples=0)
    fails(r"p \(the probability", rise, p=0.0)
    fails(r"p \(the probability", rise, p=1.5)
    fails(r"p \(the probability", rise, p=float("nan"))
    fails("n_masks", rise, n_masks=0)
    fails("n_masks", rise, n_masks=10.5)
    fails("grid_size", rise, grid_size=0)
    fails("grid_size", rise, grid_size=40)
    fails("needs p < 1", rise, p=1.0, debias=True)
    with pytest.raises(ValueError, match="grid_size"):
        rise_masks(5, 16, grid_size=(2, 2, 2))
