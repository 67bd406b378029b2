"""Parity of mechlens.attribution with the peers on the same model and inputs: Captum
(saliency, IG, GradientSHAP, occlusion, Guided Backprop) and pytorch-grad-cam (Grad-CAM,
Grad-CAM++, Score-CAM, Layer-CAM, also on ViT patch tokens).

pytorch-grad-cam returns maps min-max scaled and resized to the input; we compare the raw CAM
(their ``get_cam_image`` output after their ReLU) with ours, and also their final output with ours
scaled by their own ``scale_cam_image``."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from mechlens.attribution import (
    gradcam,
    gradcam_plusplus,
    gradient_shap,
    guided_backprop,
    integrated_gradients,
    layercam,
    occlusion,
    saliency,
    scorecam,
    vit_cam_layer,
)
from mechlens.models import small_cnn
from tests.mechlens._parity import TARGETS, parity_images, rel_error

captum_attr = pytest.importorskip("captum.attr")
pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402





@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    torch.nn.init.normal_(net.head.weight, std=1.0, generator=gen)  # non-trivial logits
    # Kill three channels of stage2 (BN scale 0, shift -1: constant zero after the ReLU) so Score-CAM's
    # shared forward for dead channels is exercised in the parity check.
    with torch.no_grad():
        net.stage2[0].bn.weight[:3] = 0.0
        net.stage2[0].bn.bias[:3] = -1.0
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images()


def test_saliency_matches_captum(model, images) -> None:
    target = torch.tensor(TARGETS)
    for absolute in (True, False):
        theirs = captum_attr.Saliency(model).attribute(images.clone(), target=target, abs=absolute)
        assert rel_error(saliency(model, images, target, abs=absolute).map, theirs) < 1e-6


@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_trapezoid", "riemann_left"])
def test_integrated_gradients_matches_captum(model, images, integration) -> None:
    target = torch.tensor(TARGETS)
    baseline = images * 0.25
    theirs, delta = captum_attr.IntegratedGradients(model).attribute(
        images, baselines=baseline, target=target, n_steps=24, method=integration, return_convergence_delta=True,
    )
    ours = integrated_gradients(model, images, target, baseline=baseline, n_steps=24, integration=integration,
                                internal_batch_size=20)
    if integration == "riemann_trapezoid":
        # Captum's trapezoid weights are 1/n (they sum to (n-1)/n); ours are 1/(n-1) and sum to 1
        theirs = theirs * 24 / 23
        delta = (theirs.sum(dim=(1, 2, 3)) - (ours.values - ours.extras["baseline_values"]).to(theirs.dtype))
    assert rel_error(ours.map, theirs) < 1e-5
    # same convergence delta (sum of attributions minus f(x) - f(baseline))
    assert torch.allclose(ours.extras["convergence_delta"], delta.float(), atol=1e-4 * ours.values.abs().max().item())


@pytest.mark.parametrize("integration", ["gausslegendre", "riemann_trapezoid", "riemann_left", "riemann_right",
                                         "riemann_middle"])
def test_quadrature_weights_sum_to_one_so_linear_models_are_complete(integration) -> None:
    from mechlens.attribution.base import quadrature

    steps, alphas = quadrature(integration, 7)
    assert abs(sum(steps) - 1.0) < 1e-12 and len(alphas) == 7
    linear = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2)).double()
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    result = integrated_gradients(linear, x, 1, n_steps=7, integration=integration)
    assert float(result.extras["completeness_error"].max()) < 1e-9  # trapezoid was off by 1/7


def test_gradient_shap_matches_captum_with_the_same_draws(model, images) -> None:
    """Captum draws baseline indices and alphas from numpy's global RNG; we replay the same draws
    and hand them to ours explicitly (stdevs=0, so Captum's torch noise is zero)."""
    refs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    n, batch = 6, images.shape[0]
    target = torch.tensor(TARGETS)
    state = np.random.get_state()
    try:
        np.random.seed(7)
        theirs = captum_attr.GradientShap(model).attribute(images, baselines=refs, target=target, n_samples=n, stdevs=0.0)
        np.random.seed(7)
        index = np.random.choice(refs.shape[0], n * batch)  # Captum: baseline draws, then alphas
        alphas = np.random.uniform(0.0, 1.0, n * batch)
    finally:
        np.random.set_state(state)
    ours = gradient_shap(model, images, target, baselines=refs, n_samples=n,
                         baseline_index=torch.tensor(index).view(batch, n), alphas=torch.tensor(alphas).view(batch, n),
                         internal_batch_size=5)
    assert rel_error(ours.map, theirs) < 1e-5


def test_gradient_shap_own_draws_are_seeded(model, images) -> None:
    refs = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    a = gradient_shap(model, images, 1, baselines=refs, n_samples=4, stdevs=0.05, seed=11).map
    b = gradient_shap(model, images, 1, baselines=refs, n_samples=4, stdevs=0.05, seed=11).map
    c = gradient_shap(model, images, 1, baselines=refs, n_samples=4, stdevs=0.05, seed=12).map
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("window,strides", [((3, 8, 8), (3, 8, 8)), ((3, 6, 6), (3, 4, 4)), ((1, 8, 8), (1, 8, 8))])
def test_occlusion_matches_captum(model, images, window, strides) -> None:
    target = torch.tensor(TARGETS)
    theirs = captum_attr.Occlusion(model).attribute(images, target=target, sliding_window_shapes=window,
                                                     strides=strides, baselines=0.0,
                                                     perturbations_per_eval=16)
    ours = occlusion(model, images, target, window=window, strides=strides, baseline=0.0, internal_batch_size=32)
    assert rel_error(ours.map, theirs) < 1e-5


def test_guided_backprop_matches_captum(model, images) -> None:
    target = torch.tensor(TARGETS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns about setting requires_grad on the input
        theirs = captum_attr.GuidedBackprop(model).attribute(images.clone(), target=target)
    ours = guided_backprop(model, images, target)
    assert rel_error(ours.map, theirs) < 1e-6
    # and it is not the plain gradient (the test would be vacuous otherwise)
    assert rel_error(saliency(model, images, target, abs=False).map, theirs) > 0.1


def _pytorch_grad_cam(cls, model, layer_module, images, targets, reshape_transform=None):
    cam = cls(model=model, target_layers=[layer_module], reshape_transform=reshape_transform)
    raw: list[np.ndarray] = []
    original = cam.get_cam_image

    def record(*args, **kwargs):
        out = original(*args, **kwargs)
        raw.append(out)
        return out

    cam.get_cam_image = record
    try:
        final = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return np.maximum(raw[0], 0), final


@pytest.mark.parametrize(
    "ours,theirs_name",
    [(gradcam, "GradCAM"), (gradcam_plusplus, "GradCAMPlusPlus"), (layercam, "LayerCAM"), (scorecam, "ScoreCAM")],
)
def test_cams_match_pytorch_grad_cam(model, images, ours, theirs_name, capsys) -> None:
    theirs_cls = getattr(pgc, theirs_name)
    raw, final = _pytorch_grad_cam(theirs_cls, model, model.stage2, images, TARGETS)
    result = ours(model, images, torch.tensor(TARGETS), layer="stage2")
    assert result.map.shape == (3, 4, 4) and result.kind == "layer"
    assert rel_error(result.map, raw) < 1e-5
    scaled = scale_cam_image(scale_cam_image(result.map.numpy(), images.shape[-2:][::-1]))
    assert np.abs(scaled - final).max() < 1e-5


def test_scorecam_runs_dead_channels_once(model, images) -> None:
    from mechlens.capture import capture

    with capture(model, "stage2") as cap, torch.no_grad():
        model(images)
    flat = cap["stage2"].flatten(2)
    constant = (flat.amax(dim=2) == flat.amin(dim=2))
    assert constant[:, :3].all()  # the three killed channels (and maybe a few naturally dead ones)
    result = scorecam(model, images, torch.tensor(TARGETS), layer="stage2", internal_batch_size=7)
    # every constant map of every image shares one forward pass of the zero image
    assert result.extras["masked_inputs_run"] == int((~constant).sum()) + 1
    assert result.extras["masked_inputs_run"] <= images.shape[0] * (flat.shape[1] - 3) + 1


def test_vit_patch_token_gradcam_matches_pytorch_grad_cam() -> None:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                                num_classes=5).eval()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)

    layer = vit_cam_layer(vit)
    assert layer == "blocks.2.norm1"
    raw, _ = _pytorch_grad_cam(pgc.GradCAM, vit, vit.blocks[-1].norm1, images, [2, 2], reshape_transform=reshape)
    ours = gradcam(vit, images, 2, layer=layer)
    assert ours.map.shape == (2, 4, 4)
    assert rel_error(ours.map, raw) < 1e-5
