"""mechlens.evaluation: the randomization sanity check, faithfulness (deletion / insertion),
localisation (pointing game, IoU), stability and plots.

The tests on ``trained_shapes_model`` (a SmallCNN trained on shapes with a ruler planted on the
``square`` images; see tests/conftest.py) check that the metrics say what the literature says:
gradients and Grad-CAM pass the randomization check while Guided Backprop fails it, Grad-CAM of
"square" points at the ruler, and saliency / IG beat a random map at deletion."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution import gradcam, integrated_gradients, saliency
from mechlens.evaluation import (
    attribution_stability,
    boxes_to_masks,
    deletion_curve,
    insertion_curve,
    localization_iou,
    plot_curves,
    plot_methods,
    plot_overlay,
    plot_randomization,
    pointing_game,
    random_maps,
    randomization_check,
    randomization_layers,
    save_figure,
    shift_images,
    spearman,
    ssim,
)
from mechlens.models import small_cnn

SQUARE = 1  # class index of "square", the class that carries the ruler in training


@pytest.fixture(scope="module")
def shapes(trained_shapes_model):
    return trained_shapes_model.model.eval(), trained_shapes_model.test_dataset()


# ---------------------------------------------------------------------------- metric units
def test_similarity_measures() -> None:
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(spearman(a, a), torch.ones(3, dtype=torch.float64))
    assert torch.allclose(spearman(a, -a), -torch.ones(3, dtype=torch.float64))
    assert torch.allclose(spearman(a, 3 * a + 1), torch.ones(3, dtype=torch.float64))  # rank-based
    assert torch.isnan(spearman(a, torch.zeros_like(a))).all()  # constant map: undefined, not 0
    assert torch.allclose(ssim(a, a), torch.ones(3, dtype=torch.float64))
    assert (ssim(a, torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))) < 0.3).all()


def test_pointing_game_and_iou_on_known_maps() -> None:
    masks = boxes_to_masks([[2, 3, 6, 8], [10, 10, 16, 16]], (16, 16))
    assert masks.shape == (2, 16, 16) and masks[0].sum() == 4 * 5 and masks[0, 3, 2] and not masks[0, 8, 2]
    maps = torch.zeros(2, 16, 16)
    maps[0, 5, 4] = 1.0   # inside box 0
    maps[1, 8, 12] = 1.0  # two rows above box 1
    result = pointing_game(maps, masks)
    assert result.hits.tolist() == [1.0, 0.0] and result.rate == 0.5
    assert result.points.tolist() == [[5, 4], [8, 12]]
    assert pointing_game(maps, masks, tolerance=2).hits.tolist() == [1.0, 1.0]
    assert pointing_game(torch.ones(2, 16, 16), masks).rate == 0.0  # a flat map points nowhere
    assert abs(result.chance[0].item() - 20 / 256) < 1e-9
    assert torch.allclose(localization_iou(masks.float(), masks), torch.ones(2, dtype=torch.float64))
    assert torch.allclose(localization_iou(1 - masks.float(), masks), torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="empty"):
        pointing_game(maps, torch.zeros(2, 16, 16, dtype=torch.bool))


def test_pointing_game_ties_are_not_resolved_towards_the_top_left() -> None:
    """An upsampled CAM's maximum is a plateau. Resolving ties to the first pixel in raster order
    made maps that say nothing about the artefact 'hit' a top-left artefact; the fraction rule
    scores the share of the tied maxima inside the mask, so such maps score chance."""
    import torch.nn.functional as F

    masks = torch.zeros(64, 32, 32, dtype=torch.bool)
    masks[:, :8, :8] = True  # an artefact in the top-left corner
    coarse = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(0)).round()  # 0/1 cells: many ties
    maps = F.interpolate(coarse, size=(32, 32), mode="nearest")[:, 0]
    first = pointing_game(maps, masks, ties="first")
    fair = pointing_game(maps, masks)
    assert fair.tie_rule == "fraction" and int(fair.ties.min()) >= 64  # every maximum is a plateau of cells
    # the maximal cells are random: the fair rule scores about the chance 1/16 (measured 0.07),
    # the raster rule hits the top-left cell whenever it is maximal (about half of the maps)
    assert abs(fair.rate - fair.chance_rate) < 0.05, (fair.rate, fair.chance_rate)
    assert first.rate > 0.35 and first.rate > 4 * fair.rate
    assert pointing_game(maps, masks, ties="any").rate >= first.rate
    # the control (the same images without the evidence) is reported beside the hits
    clean = torch.zeros(64, 32, 32)
    clean[:, 20, 20] = 1.0
    with_control = pointing_game(maps, masks, control=clean)
    assert with_control.control_rate == 0.0 and with_control.rate == fair.rate
    with pytest.raises(ValueError, match="ties must be one of"):
        pointing_game(maps, masks, ties="random")


def test_deletion_and_insertion_curves_of_a_known_model() -> None:
    """The 'model' sums the red channel: deleting pixels in the map's order must give a curve that
    falls by exactly the deleted pixels' sum, and the oracle map beats the reversed one."""
    class RedSum(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :1].flatten(1).sum(1, keepdim=True)

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    oracle = x[:, 0]
    good = deletion_curve(RedSum(), x, 0, oracle, steps=8, internal_batch_size=5)
    bad = deletion_curve(RedSum(), x, 0, -oracle, steps=8)
    assert good.scores.shape == (2, 9) and torch.allclose(good.fractions, torch.linspace(0, 1, 9))
    assert torch.allclose(good.scores[:, 0], x[:, 0].sum((1, 2))) and torch.allclose(good.scores[:, -1], torch.zeros(2), atol=1e-5)
    top8 = oracle.flatten(1).sort(dim=1, descending=True).values[:, :8].sum(1)
    assert torch.allclose(good.scores[:, 0] - good.scores[:, 1], top8, atol=1e-5)
    assert (good.auc < bad.auc).all()
    ins = insertion_curve(RedSum(), x, 0, oracle, steps=8)
    assert (ins.auc > insertion_curve(RedSum(), x, 0, -oracle, steps=8).auc).all()
    assert torch.allclose(ins.scores[:, -1], x[:, 0].sum((1, 2)))


def test_shift_images_moves_content() -> None:
    x = torch.arange(25.0).view(1, 1, 5, 5)
    shifted = shift_images(x, 1, 2)
    assert shifted[0, 0, 1, 2] == x[0, 0, 0, 0] and shifted[0, 0, 4, 4] == x[0, 0, 3, 2]
    assert torch.equal(shift_images(shifted, -1, -2)[..., :4, :3], x[..., :4, :3])  # the part that survives


# ---------------------------------------------------------------------------- randomization check
def test_randomization_check_separates_methods_as_the_literature_says(shapes, record_figures) -> None:
    """Adebayo et al.: after re-initialising the top layers, the gradient's and Grad-CAM's maps
    decorrelate from the trained model's, Guided Backprop's do not."""
    model, data = shapes
    x = data.render(np.arange(8))
    layers = ["head", "stage3.1", "stage3.0"]
    before = {n: p.clone() for n, p in model.state_dict().items()}
    grad = randomization_check(model, x, None, "saliency", layers=layers, abs=False)
    cam = randomization_check(model, x, None, "gradcam", layers=layers, layer="stage3")
    guided = randomization_check(model, x, None, "guided_backprop", layers=layers)
    guided_cam = randomization_check(model, x, None, "guided_gradcam", layers=layers, layer="stage3", keep_maps=False)
    assert all(torch.equal(p, before[n]) for n, p in model.state_dict().items())  # the model itself is untouched
    assert grad.spearman.shape == (3, 8) and grad.maps.shape == (3, 8, 64, 64)
    rho_grad, rho_cam, rho_guided = grad.mean_spearman(), cam.mean_spearman(), guided.mean_spearman()
    record_figures(rho_grad=rho_grad, rho_cam=rho_cam, rho_guided=rho_guided, ssim_guided=guided.mean_ssim(),
                   ssim_cam=cam.mean_ssim(), rho_guided_cam=guided_cam.mean_spearman())
    # Thresholds from 7 trained models (training seeds 0-4 at 1 thread, seeds 0-1 at 2 threads;
    # each run's figures read with the record_figures fixture): |rho_grad| <= 0.31; rho_cam per
    # layer <= 0.59 (after re-initialising only the head it can stay high), its mean over the 3
    # layers <= 0.33;
    # rho_guided >= 0.86; guided Grad-CAM's mean exceeds Grad-CAM's by >= 0.35.
    assert (rho_grad.abs() < 0.45).all(), rho_grad
    assert (rho_cam < 0.75).all() and float(rho_cam.mean()) < 0.5, rho_cam
    assert (rho_guided > 0.75).all(), rho_guided             # Guided Backprop fails the check
    assert (rho_guided - rho_grad > 0.5).all()
    assert (guided.mean_ssim() > cam.mean_ssim()).all()
    assert float(guided_cam.mean_spearman().mean()) > float(rho_cam.mean()) + 0.15  # inherits the failure
    fig = plot_randomization(guided, image=x[0])
    assert len(fig.axes) == len(layers) + 2


def test_independent_randomization_on_a_copy() -> None:
    net = small_cnn(num_classes=3, width=8, depth=2, blocks_per_stage=1, seed=0).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    layers = randomization_layers(net)
    assert layers == ["head", "stage2", "stage1", "stem.bn", "stem.conv"]  # top first
    before = [p.clone() for p in net.parameters()]
    state = torch.random.get_rng_state()
    result = randomization_check(net, x, 1, "integrated_gradients", mode="independent", layers=["head", "stage1"], n_steps=8)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded, global RNG untouched
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    assert result.layers == ["head", "stage1"] and result.spearman.shape == (2, 2)
    again = randomization_check(net, x, 1, "integrated_gradients", mode="independent", layers=["head", "stage1"], n_steps=8)
    assert torch.equal(result.maps, again.maps)
    assert (result.mean_spearman() < 0.99).all()  # the maps did change
    with pytest.raises(ValueError, match="cascading"):
        randomization_check(net, x, 1, "saliency", mode="sideways")


def test_randomization_counts_constant_maps_and_keeps_the_methods_seed_apart() -> None:
    net = small_cnn(num_classes=3, width=8, depth=2, blocks_per_stage=1, seed=0).eval()
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    x[2] = 0.5  # a flat image
    # SmoothGrad has a seed of its own: it goes in method_kwargs, the re-initialisation's stays `seed`
    a = randomization_check(net, x, 1, "smoothgrad", layers=["head"], seed=1, method_kwargs={"seed": 5, "n_samples": 4})
    b = randomization_check(net, x, 1, "smoothgrad", layers=["head"], seed=1, method_kwargs={"seed": 6, "n_samples": 4})
    assert not torch.equal(a.original, b.original)  # the method's seed reached the method
    with pytest.raises(ValueError, match="given both"):
        randomization_check(net, x, 1, "smoothgrad", layers=["head"], n_samples=4, method_kwargs={"n_samples": 2})
    # a black image through conv (no bias) + ReLU has a zero gradient: its map is constant, its
    # similarity undefined; it is counted, not silently averaged away
    relu_net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
                                   torch.nn.Linear(4 * 14 * 14, 2)).eval()
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    images[1] = 0.0
    dead = randomization_check(relu_net, images, 1, "saliency", layers=["3"])
    assert dead.constant_maps.tolist() == [1] and dead.to_dict()["constant_maps"] == [1]
    assert not dead.mean_spearman().isnan().any()  # the other two samples still give a mean


# ---------------------------------------------------------------------------- localisation, faithfulness
def test_gradcam_of_square_points_at_the_ruler(shapes, record_figures) -> None:
    model, data = shapes
    idx = np.nonzero(data.has_artefact & (data.labels == SQUARE))[0][:64]
    assert len(idx) >= 32
    x = data.render(idx)
    ruler = data.artefact_masks(idx)
    cam = gradcam(model, x, SQUARE, layer="stage3")
    result = pointing_game(cam, ruler, tolerance=4)  # 4 px = a quarter of a stage3 cell
    clean = data.with_artefact(False).render(idx)
    without = pointing_game(gradcam(model, clean, SQUARE, layer="stage3"), ruler, tolerance=4)
    iou_cam = localization_iou(cam, ruler).mean()
    iou_random = localization_iou(random_maps((len(idx), 64, 64)), ruler).mean()
    saliency_rate = pointing_game(saliency(model, x, SQUARE), ruler).rate
    record_figures(rate=result.rate, chance=result.chance_rate, without=without.rate, iou_cam=iou_cam,
                   iou_random=iou_random, saliency_rate=saliency_rate)
    # Over 7 trained models (training seeds 0-4, 1 and 2 threads) Grad-CAM at stage3 hits the ruler
    # on 6%-80% of these images (chance 9%): how much of the square evidence it puts on the ruler
    # varies with the training run, so a hit rate is not asserted. What held on every model:
    # counterfactual twins (the same images with the ruler removed) get fewer hits (0-3%), the
    # CAM overlaps the ruler more than random maps do (IoU 0.025-0.26 vs 0.018), and the
    # full-resolution gradient points at the ruler on 64%-91% of the images.
    assert torch.equal(clean[~ruler.unsqueeze(1).expand_as(clean)], x[~ruler.unsqueeze(1).expand_as(x)])
    assert without.rate < result.rate, (without.rate, result.rate)
    assert without.rate <= result.chance_rate, (without.rate, result.chance_rate)
    assert iou_cam > iou_random
    assert saliency_rate > 4 * result.chance_rate, (saliency_rate, result.chance_rate)  # 0.38 = 4x chance


def test_deletion_auc_beats_a_random_map(shapes, record_figures) -> None:
    model, data = shapes
    x = data.render(np.arange(12))
    with torch.no_grad():
        predicted = model(x).argmax(1)
    random_auc = deletion_curve(model, x, predicted, random_maps((12, 64, 64), seed=1), steps=10).mean_auc
    grad = saliency(model, x, predicted)
    ig = integrated_gradients(model, x, predicted, n_steps=24)
    grad_auc = deletion_curve(model, x, predicted, grad, steps=10).mean_auc
    ig_auc = deletion_curve(model, x, predicted, ig, steps=10, baseline="zeros").mean_auc
    record_figures(grad_auc=grad_auc, ig_auc=ig_auc, random_auc=random_auc)
    # Over 7 trained models (training seeds 0-4, 1 and 2 threads) IG's deletion AUC was below the
    # random map's on every one (by 0.12-1.4) and below the raw gradient's (by 0.13-1.25); the raw
    # gradient itself beat the random map on only 3 of 7, so it is not asserted.
    assert ig_auc < random_auc and ig_auc < grad_auc, (grad_auc, ig_auc, random_auc)
    blur = deletion_curve(model, x[:4], predicted[:4], grad.heatmap()[:4], steps=4, baseline="blur")
    assert blur.baseline == "blur" and blur.scores.shape == (4, 5)
    assert plot_curves({"saliency": blur}).axes


def test_stability_under_shifts_and_noise(shapes) -> None:
    model, data = shapes
    x = data.render(np.arange(8))
    cam = attribution_stability(model, x, None, "gradcam", shifts=((0, 1), (1, 0)), noise_std=0.01, n_noise=2, layer="stage3")
    grad = attribution_stability(model, x, None, "saliency", shifts=((0, 1), (1, 0)), noise_std=0.01, n_noise=2)
    assert cam.spearman.shape == (4, 8) and cam.augmentations[0] == "shift(0,1)"
    assert cam.mean > 0.9  # measured 0.98
    # one-pixel shifts change the phase of the stride-2 grid: raw gradients are much less stable
    assert grad.spearman[:2].mean() < cam.spearman[:2].mean()
    assert grad.spearman[2:].mean() > 0.7  # but faint noise barely moves them (measured 0.88)


# ---------------------------------------------------------------------------- plots
def test_plots_write_pngs(tmp_path) -> None:
    net = small_cnn(num_classes=3, width=8, depth=2, blocks_per_stage=1, seed=0).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    sal = saliency(net, x, 1)
    cam = gradcam(net, x, 1, layer="stage1")
    fig = plot_overlay(x[1], sal, index=1)
    assert len(fig.axes) == 2  # image + colour bar
    path = save_figure(fig, tmp_path / "a" / "overlay.png")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"
    fig = plot_methods(x[0], {"saliency": sal, "gradcam": cam, "raw": torch.rand(2, 4, 4)})
    assert len(fig.axes) == 1 + 3 + 3  # input, three maps, three colour bars
    assert save_figure(fig, tmp_path / "methods.png").stat().st_size > 1000


@pytest.mark.parametrize("method,kwargs", [("saliency", {}), ("saliency", {"abs": False}),
                                           ("smoothgrad", {"n_samples": 4}), ("gradcam", {"layer": "stage3"}),
                                           ("layercam", {"layer": "stage3"}), ("hirescam", {"layer": "stage3"}),
                                           ("eigencam", {"layer": "stage3"}),
                                           ("deeplift", {}), ("lrp", {}), ("rise", {"n_masks": 300})])
def test_registry_randomization_labels_match_what_the_check_measures(shapes, method, kwargs, record_figures) -> None:
    """The registry's label is per variant. Worst mean Spearman over the top-3-layer cascade, over
    7 trained models (seeds 0-4, 1 and 2 threads): saliency |grad| 0.77-0.89, signed -0.03-0.25,
    smoothgrad |grad| 0.72-0.85, Grad-CAM 0.21-0.59 ("mixed"), LayerCAM 0.93-0.98. Issue 22's
    methods, over 3 trained models (seeds 0-2): HiResCAM 0.34-0.59 (equal to Grad-CAM at a layer
    read through global average pooling, so "mixed" like it), EigenCAM 1.00, DeepLIFT -0.02-0.26,
    LRP -0.05-0.29, RISE (500 masks) 0.23-0.33. AblationCAM is not tested here: 0.55-0.89 by
    trained model (seed 0 trained with 1 and 2 threads gave 0.89 and 0.55), across both bands."""
    from mechlens.attribution import get_method

    model, data = shapes
    x = data.render(np.arange(8))
    check = randomization_check(model, x, None, method, layers=["head", "stage3.1", "stage3.0"], keep_maps=False,
                                method_kwargs=kwargs)
    worst = float(check.mean_spearman().max())
    record_figures(worst=worst)
    label = get_method(method).randomization
    variant = label.split(";")[1 if kwargs.get("abs") is False and ";" in label else 0]
    if "fails" in variant:
        assert worst >= 0.6, (label, worst)
    elif variant.startswith("mixed"):
        assert 0.05 < worst < 0.75, (label, worst)
    else:
        assert "passes" in variant and worst < 0.5, (label, worst)


def test_faithfulness_test_is_one_sided_over_images() -> None:
    """True only when the per-image gain over the random map is significant (exact one-sided
    Wilcoxon), False when the mean gain is not positive, None (not established) in between."""
    from types import SimpleNamespace

    from mechlens.evaluation.report import faithfulness_test

    def curves(insertion_minus_deletion):
        gap = torch.as_tensor(insertion_minus_deletion, dtype=torch.float64)
        return SimpleNamespace(auc=torch.zeros_like(gap)), SimpleNamespace(auc=gap)  # deletion, insertion

    control = curves([0.0] * 8)
    faithful, p = faithfulness_test(*curves([0.3, 0.2, 0.4, 0.1, 0.5, 0.2, 0.3, 0.25]), *control)
    assert faithful is True and abs(p - 1 / 256) < 1e-12  # 8 positive gains: the exact minimum
    faithful, p = faithfulness_test(*curves([-0.3, -0.2, -0.4, -0.1, -0.5, -0.2, -0.3, -0.25]), *control)
    assert faithful is False and p > 0.99
    faithful, p = faithfulness_test(*curves([0.3, -0.2, 0.4, -0.1, 0.05, -0.2, 0.3, 0.01]), *control)
    assert faithful is None and 0.05 <= p < 1
    assert faithfulness_test(*curves([0.0] * 8), *control) == (False, 1.0)
    assert faithfulness_test(*curves([0.3, 0.2, 0.4]), *curves([0.0] * 3))[0] is None  # 3 images: p >= 1/8
