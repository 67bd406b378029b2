"""The rest of pytorch-grad-cam's core table in mechlens.attribution.cam: HiResCAM, XGrad-CAM,
EigenCAM, Eigen-Grad-CAM, Ablation-CAM, FullGrad and multi-layer fusion, checked against the real
pytorch-grad-cam on the same model and inputs (the house small CNN with a non-trivial head and
BatchNorm statistics, and a tiny timm ViT), against brute force for feature targets, and for
batching and errors.

Tolerances: 1e-5 relative to the reference's largest value. The two sides compute the same float32
formulas; what differs is rounding (BatchNorm folded into the convolutions for the gradient CAMs,
other batch sizes for Ablation-CAM, torch's bilinear resize vs cv2's), about 1e-6 measured.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.attribution.base import attribute, get_method
from mechlens.attribution.cam import (
    ablationcam,
    eigen_gradcam,
    eigencam,
    fullgrad,
    gradcam,
    hirescam,
    multilayer_cam,
    principal_projection,
    xgradcam,
)
from mechlens.attribution.execution import inference_copy
from mechlens.features import Channel
from mechlens.models import small_cnn
from tests.mechlens._parity import TARGETS, parity_images, rel_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

pgc = pytest.importorskip("pytorch_grad_cam")
from pytorch_grad_cam.ablation_layer import AblationLayerVit  # noqa: E402
from pytorch_grad_cam.utils.image import scale_cam_image  # noqa: E402
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget  # noqa: E402
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection_with_sign_correction  # noqa: E402

TOL = 1e-5




@pytest.fixture(scope="module")
def model() -> nn.Module:
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()
    gen = torch.Generator().manual_seed(3)
    nn.init.normal_(net.head.weight, std=1.0, generator=gen)  # non-trivial logits
    with torch.no_grad():
        # non-trivial BatchNorm statistics: FullGrad's BN bias terms are b - m * w / sqrt(v + eps)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
        # three dead channels of stage2 (constant zero after the ReLU): Ablation-CAM skips them
        net.stage2[0].bn.weight[:3] = 0.0
        net.stage2[0].bn.bias[:3] = -1.0
    # a conv bias before a BatchNorm: FullGrad counts it separately from the BN's (folding would merge them)
    net.stem.conv.bias = nn.Parameter(torch.randn(8, generator=gen) * 0.3)
    return net


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return parity_images()


def _theirs(cls, model, layers, images, targets, **kwargs):
    """pytorch-grad-cam's raw per-layer CAMs (``get_cam_image`` after its ReLU) and final output."""
    cam = cls(model=model, target_layers=layers, **kwargs)
    raw: list[np.ndarray] = []
    original = cam.get_cam_image

    def record(*args, **kw):
        out = original(*args, **kw)
        raw.append(np.maximum(out, 0))
        return out

    cam.get_cam_image = record
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            final = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
    return raw, final


def _scaled(cam: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """Our raw layer CAM through pytorch-grad-cam's own post-processing."""
    return scale_cam_image(scale_cam_image(cam.numpy(), size[::-1]))


# ---------------------------------------------------------------------------- gradient / eigen CAMs
@pytest.mark.parametrize("ours,name", [(hirescam, "HiResCAM"), (xgradcam, "XGradCAM"), (eigencam, "EigenCAM"),
                                       (eigen_gradcam, "EigenGradCAM")])
def test_cams_match_pytorch_grad_cam(model, images, ours, name) -> None:
    raw, final = _theirs(getattr(pgc, name), model, [model.stage2], images, TARGETS)
    result = ours(model, images, torch.tensor(TARGETS), layer="stage2")
    assert result.map.shape == (3, 4, 4) and result.kind == "layer"
    assert get_method(ours.__name__).family == "cam" and get_method(ours.__name__).needs_layer
    assert rel_error(result.map, raw[0]) < TOL
    assert np.abs(_scaled(result.map, (32, 32)) - final).max() < TOL


def test_methods_differ_from_gradcam(model, images) -> None:
    """The parity above is not Grad-CAM four times over."""
    base = gradcam(model, images, torch.tensor(TARGETS), layer="stage2").map
    for fn in (hirescam, xgradcam, eigencam, eigen_gradcam):
        assert rel_error(fn(model, images, torch.tensor(TARGETS), layer="stage2").map, base) > 0.05, fn.__name__


def test_eigen_sign_conventions(model, images) -> None:
    """``sign="numpy"`` is pytorch-grad-cam's sign (tested above); ``sign="max"`` (on the device)
    is its Seg-Eigen-CAM sign correction."""
    from mechlens.capture import capture

    with capture(model, "stage2") as cap, torch.no_grad():
        model(images)
    acts = cap["stage2"]
    theirs = get_2d_projection_with_sign_correction(acts.numpy())
    assert rel_error(principal_projection(acts, sign="max"), theirs) < TOL
    ours = eigencam(model, images, 1, layer="stage2", sign="max").map
    assert rel_error(ours, np.maximum(theirs, 0)) < TOL
    # the target does not change EigenCAM's map, only the reported values
    other = eigencam(model, images, 3, layer="stage2", sign="max")
    assert torch.equal(other.map, ours)
    assert not torch.allclose(other.values, eigencam(model, images, 1, layer="stage2").values)


@pytest.mark.parametrize("ours,weigh", [
    (hirescam, lambda a, g: (g * a).sum(1)),
    (xgradcam, lambda a, g: ((g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3), keepdim=True) * a).sum(1)),
])
def test_gradient_cams_explain_any_feature(model, images, ours, weigh) -> None:
    """A channel of a later layer as the target, against autograd by hand."""
    feature = Channel("stage3", 42)
    store = {}

    def keep(module, args, output):
        store["a"] = output
        return None

    handle = model.stage2.register_forward_hook(keep)
    try:
        x = images.clone().requires_grad_(True)
        h = model.stage3(model.stage2(model.stage1(model.stem(x))))
    finally:
        handle.remove()
    value = h[:, 42].mean(dim=(1, 2))
    (grad,) = torch.autograd.grad(value.sum(), store["a"])
    expected = weigh(store["a"].detach(), grad).clamp(min=0)
    result = ours(model, images, feature, layer="stage2")
    assert rel_error(result.map, expected) < TOL
    assert torch.allclose(result.values, value.detach(), atol=1e-6)


# ---------------------------------------------------------------------------- Ablation-CAM
@pytest.mark.parametrize("layer,their_batch", [("stage2", 32), ("stage3.0.conv", 1)])
def test_ablationcam_matches_pytorch_grad_cam(model, images, layer, their_batch) -> None:
    """stage2 is a ReLU output (min 0: channels are zeroed); the conv output is not, so both ablate
    to min - 1e7, which pytorch-grad-cam lowers by another 1e7 per row within a batch (an in-place
    artefact): its batch_size=1 results are the rule, whatever our internal_batch_size."""
    module = model.get_submodule(layer)
    raw, final = _theirs(pgc.AblationCAM, model, [module], images, TARGETS, batch_size=their_batch)
    result = ablationcam(model, images, torch.tensor(TARGETS), layer=layer, internal_batch_size=7)
    assert rel_error(result.map, raw[0]) < TOL
    assert np.abs(_scaled(result.map, (32, 32)) - final).max() < TOL
    values = result.extras["ablation_value"]
    assert (values == 0).all() if layer == "stage2" else (values < -9e6).all()


def test_ablationcam_is_batched_at_the_layer(model, images) -> None:
    """Each forward runs one sample up to the layer, then internal_batch_size ablated copies;
    dead channels are not run; the whole-network fallback gives the same map."""
    target = torch.tensor(TARGETS)
    ablationcam(model, images, target, layer="stage2")  # warm the layout cache: its probe forward is not counted
    counts = {"forwards": 0, "stem": 0, "head": 0}

    def forward(module, args):
        counts["forwards"] += 1

    def rows(name):
        def hook(module, args):
            counts[name] += args[0].shape[0]
        return hook

    handles = [model.register_forward_pre_hook(forward), model.stem.register_forward_pre_hook(rows("stem")),
               model.head.register_forward_pre_hook(rows("head"))]
    size, batch = 5, images.shape[0]
    try:
        result = ablationcam(model, images, target, layer="stage2", internal_batch_size=size)
        counted = dict(counts)
        for key in counts:
            counts[key] = 0
        whole = ablationcam(model, images, target, layer="stage2", internal_batch_size=size, expand_at_layer=False)
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        acts = model.stage2(model.stage1(model.stem(images)))
    live = acts.flatten(2).ne(0).any(dim=2).sum(dim=1).tolist()  # per sample
    assert min(live) <= 29  # the three dead channels (at least) are skipped
    run = [n + (1 if b == 0 else 0) for b, n in enumerate(live)]  # + the un-ablated check row, once
    expected_forwards = sum(math.ceil(n / size) for n in run)
    assert result.extras["forward_passes"] == expected_forwards < sum(run) / 4
    assert result.extras["ablated_copies_run"] == sum(run)
    # one first pass of the batch, then per forward one row up to the layer and `size` rows after it
    assert counted == {"forwards": 1 + expected_forwards, "stem": batch + expected_forwards, "head": batch + sum(run)}
    assert counts["stem"] == counts["head"] == batch + sum(live)  # the fallback runs every copy through the stem
    assert rel_error(whole.map, result.map) < TOL


def test_ablationcam_of_any_feature_matches_brute_force(model, images) -> None:
    """Per-sample targets (a class, channels of a later layer), one forward per channel by hand."""
    targets = [2, Channel("stage3", 42), Channel("stage3", 48)]
    result = ablationcam(model, images, targets, layer="stage2", relative=False, internal_batch_size=16)

    def value(x, b, ablate=None):
        def hook(module, args, output):
            if ablate is not None:
                output = output.clone()
                output[:, ablate] = 0
            return output

        handle = model.stage2.register_forward_hook(hook)
        try:
            with torch.no_grad():
                h = model.stage3(model.stage2(model.stage1(model.stem(x))))
                logits = model.head(model.flatten(model.pool(h)))
        finally:
            handle.remove()
        target = targets[b]
        return float(logits[0, target]) if isinstance(target, int) else float(h[0, target.index].mean())

    with torch.no_grad():
        acts = model.stage2(model.stage1(model.stem(images)))
    expected = []
    for b in range(3):
        x = images[b:b + 1]
        drops = torch.tensor([value(x, b) - value(x, b, k) for k in range(acts.shape[1])])
        expected.append((drops[:, None, None] * acts[b]).sum(0).clamp(min=0))
    assert rel_error(result.map, torch.stack(expected)) < 1e-4  # one forward per channel vs batched: rounding of drops
    assert result.extras["channel_weights"][1].abs().max() > 0


def test_ablationcam_expansion_is_checked() -> None:
    """A model mixing the layer's output with an earlier tensor in a way that does not broadcast
    is refused with the fallback named; the fallback then runs."""

    class Mixing(nn.Module):
        def __init__(self, how: str) -> None:
            super().__init__()
            gen = torch.Generator().manual_seed(0)
            self.how = how
            self.pre = nn.Conv2d(3, 4, 3, padding=1)
            self.layer = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
            self.head = nn.Linear(8 if how == "cat" else 4, 3)
            for p in self.parameters():
                nn.init.normal_(p, std=0.5, generator=gen)

        def forward(self, x):
            z = self.pre(x)
            h = self.layer(z)
            h = torch.cat([h, z], dim=1) if self.how == "cat" else h + z.mean(dim=0, keepdim=True)
            return self.head(h.mean(dim=(2, 3)))

    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="expand_at_layer=False"):
        ablationcam(Mixing("cat"), x, 0, layer="layer", relative=False)
    with pytest.raises(ValueError, match="changed the un-ablated feature value.*expand_at_layer=False"):
        ablationcam(Mixing("batch mean"), x, 0, layer="layer", relative=False)
    assert ablationcam(Mixing("cat"), x, 0, layer="layer", relative=False, expand_at_layer=False).map.abs().sum() > 0


# ---------------------------------------------------------------------------- FullGrad
def test_fullgrad_matches_pytorch_grad_cam(model, images) -> None:
    cam = pgc.FullGrad(model=model, target_layers=[])
    raw: list[np.ndarray] = []
    original = cam.compute_cam_per_layer

    def record(*args):
        out = original(*args)
        raw.append(out[:, 0])
        return out

    cam.compute_cam_per_layer = record
    try:
        final = cam(input_tensor=images, targets=[ClassifierOutputTarget(t) for t in TARGETS])
    finally:
        cam.activations_and_grads.release()
    result = fullgrad(model, images, torch.tensor(TARGETS))
    assert result.extras["bias_layers"] == ["stem.conv", "stem.bn", "stage1.0.bn", "stage2.0.bn", "stage3.0.bn"]
    assert result.map.shape == (3, 32, 32) and result.kind == "layer"
    assert rel_error(result.map, raw[0]) < TOL
    assert np.abs(scale_cam_image(result.map.numpy()) - final).max() < TOL
    # the bias terms matter: without them it is |x * grad| alone (3 scaled channels, sum <= 3)
    assert result.map.amax() > 3.5
    with pytest.raises(ValueError, match="pass the original model"):
        fullgrad(inference_copy(model), images, 1)


# ---------------------------------------------------------------------------- several layers
@pytest.mark.parametrize("method,theirs", [("gradcam", "GradCAM"), ("hirescam", "HiResCAM")])
def test_multilayer_mean_matches_pytorch_grad_cam(model, images, method, theirs) -> None:
    layers = ["stage1", "stage2", "stage3"]
    _, final = _theirs(getattr(pgc, theirs), model, [model.get_submodule(n) for n in layers], images, TARGETS)
    result = multilayer_cam(model, images, torch.tensor(TARGETS), layers=layers, cam=method)
    assert result.map.shape == (3, 32, 32) and result.extras["layer_maps"].shape == (3, 3, 32, 32)
    assert np.abs(scale_cam_image(result.map.numpy()) - final).max() < TOL
    single = multilayer_cam(model, images, torch.tensor(TARGETS), layers=["stage2"], cam=method).map
    assert np.abs(scale_cam_image(single.numpy()) - final).max() > 0.05  # the layers do contribute


def test_multilayer_max(model, images) -> None:
    layers = ["stage1", "stage2", "stage3"]
    top = multilayer_cam(model, images, 1, layers=layers, aggregate="max")
    mean = multilayer_cam(model, images, 1, layers=layers)
    assert torch.equal(top.map, top.extras["layer_maps"].amax(dim=1))
    via_registry = attribute(model, images, 1, method="multilayer_cam", layers=layers, cam="gradcam", aggregate="max")
    assert torch.equal(via_registry.map, top.map)
    assert (top.map >= mean.map - 1e-7).all() and (top.map > mean.map + 0.1).any()
    # method kwargs reach every layer
    signed = multilayer_cam(model, images, 1, layers=layers, cam="eigencam", sign="max")
    assert not torch.equal(signed.map, multilayer_cam(model, images, 1, layers=layers, cam="eigencam").map)


# ---------------------------------------------------------------------------- tiny ViT
@pytest.fixture(scope="module")
def vit() -> nn.Module:
    timm = pytest.importorskip("timm")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=3,
                                 num_classes=5).eval()


def _tokens_to_grid(tokens: torch.Tensor) -> torch.Tensor:
    return tokens[:, 1:].reshape(tokens.shape[0], 4, 4, tokens.shape[2]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("ours,name", [(hirescam, "HiResCAM"), (xgradcam, "XGradCAM"), (eigencam, "EigenCAM"),
                                       (eigen_gradcam, "EigenGradCAM"), (ablationcam, "AblationCAM")])
def test_vit_patch_token_cams_match_pytorch_grad_cam(vit, ours, name) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    extra = {"ablation_layer": AblationLayerVit(), "batch_size": 1} if name == "AblationCAM" else {}
    raw, _ = _theirs(getattr(pgc, name), vit, [vit.blocks[-1].norm1], images, [2, 3],
                     reshape_transform=_tokens_to_grid, **extra)
    result = ours(vit, images, torch.tensor([2, 3]), layer="blocks.2.norm1")
    assert result.map.shape == (2, 4, 4)
    assert rel_error(result.map, raw[0]) < TOL


def test_vit_fullgrad_matches_pytorch_grad_cam(vit) -> None:
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    cam = pgc.FullGrad(model=vit, target_layers=[])
    raw: list[np.ndarray] = []
    original = cam.compute_cam_per_layer
    cam.compute_cam_per_layer = lambda *args: raw.append(original(*args)) or raw[-1]
    try:
        cam(input_tensor=images, targets=[ClassifierOutputTarget(2)] * 2)
    finally:
        cam.activations_and_grads.release()
    result = fullgrad(vit, images, 2)
    assert result.extras["bias_layers"] == ["patch_embed.proj"]
    assert rel_error(result.map, raw[0][:, 0]) < TOL


# ---------------------------------------------------------------------------- errors
@pytest.mark.parametrize("fn", [hirescam, xgradcam, eigencam, eigen_gradcam, ablationcam])
def test_bad_layers_are_actionable_errors(model, images, fn) -> None:
    with pytest.raises(ValueError, match="needs layer='NAME'"):
        fn(model, images, 1, layer="")
    with pytest.raises(ValueError, match="spatial layer"):
        fn(model, images, 1, layer="flatten")


def test_bad_arguments_are_actionable_errors(model, images) -> None:
    with pytest.raises(ValueError, match="sign must be one of"):
        eigencam(model, images, 1, layer="stage2", sign="positive")
    with pytest.raises(ValueError, match="ablation_value must be 'auto' or a number"):
        ablationcam(model, images, 1, layer="stage2", ablation_value="zero")
    with pytest.raises(RuntimeError, match="do not depend on layer"):
        ablationcam(model, images, Channel("stage1", 0), layer="stage2")
    # a dead channel's value is 0: the relative drop is undefined
    with pytest.raises(ValueError, match="relative=False"):
        ablationcam(model, images, Channel("stage2", 0), layer="stage1")
    assert ablationcam(model, images, Channel("stage2", 0), layer="stage1", relative=False).map.abs().max() == 0
    with pytest.raises(ValueError, match=r"needs layers=\[NAME"):
        multilayer_cam(model, images, 1)
    with pytest.raises(ValueError, match=r"needs layers=\[NAME"):
        multilayer_cam(model, images, 1, layers="stage2")
    with pytest.raises(ValueError, match="not one. Use one of: ablationcam"):
        multilayer_cam(model, images, 1, layers=["stage2"], cam="saliency")
    with pytest.raises(ValueError, match="aggregate must be"):
        multilayer_cam(model, images, 1, layers=["stage2"], aggregate="sum")
