"""Feature visualization mechanics: parameterizations, transforms, objectives, render plumbing
(determinism, scoped hooks, early stop, normalization, results). Validity lives in
test_featvis_validity.py, the command line in test_featvis_cli.py."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mechlens.features import (
    Channel,
    ClassLogit,
    Direction,
    LayerEnergy,
    Neuron,
    SAELatent,
    feature_forward,
)
from mechlens.featvis import (
    Compose,
    FourierImage,
    Jitter,
    Objective,
    Pad,
    PixelImage,
    RandomRotate,
    RandomScale,
    Regularizers,
    Resize,
    color_matrix,
    diagonal_values,
    diversity,
    l2,
    render,
    standard_transforms,
    total_variation,
)
from mechlens.featvis.objectives import blur
from mechlens.features.layout import LayerLayout, layout_scope


@pytest.fixture(autouse=True)
def _synthetic_layers_are_conv_maps():
    """Tests that evaluate objectives on hand-made activation dicts (layers "l", "a", "b") say
    what an entry point with the model would know: those maps are [B, C, H, W] ("t": tokens)."""
    with layout_scope({**{name: LayerLayout("nchw") for name in ("l", "a", "b")}, "t": LayerLayout("nlc", 0)}):
        yield
from mechlens.models import load_model, small_cnn


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    return load_model("mechlens:small_cnn_tiny")


def _all_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


# ---------------------------------------------------------------------------- parameterizations
def test_params_are_images_and_seeded() -> None:
    for cls in (FourierImage, PixelImage):
        a = cls(3, (20, 24), generator=torch.Generator().manual_seed(1))()
        b = cls(3, (20, 24), generator=torch.Generator().manual_seed(1))()
        c = cls(3, (20, 24), generator=torch.Generator().manual_seed(2))()
        a, b, c = a.detach(), b.detach(), c.detach()
        assert a.shape == (3, 3, 20, 24) and float(a.min()) > 0 and float(a.max()) < 1
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_fourier_param_has_one_over_f_spectrum() -> None:
    param = FourierImage(8, 64, sd=1.0, decorrelate=False, sigmoid=False, generator=torch.Generator().manual_seed(0))
    amplitude = torch.fft.rfft2(param().detach()).abs().mean(dim=(0, 1))  # [64, 33]
    low = amplitude[1:4, 1:4].mean()      # frequencies ~1/64 .. 3/64
    high = amplitude[24:40, 24:].mean()   # frequencies ~0.4 .. 0.7
    assert low > 8 * high                 # 1/f: ~10-20x between these bands; white noise would be ~1x


def test_colour_decorrelation_matrices() -> None:
    svd, chol = color_matrix("svd"), color_matrix("cholesky")
    assert torch.allclose(svd.norm(dim=0).max(), torch.tensor(1.0))
    assert torch.equal(chol, torch.tril(chol))                              # lower triangular
    cov_svd, cov_chol = svd @ svd.T, chol @ chol.T
    assert torch.allclose(cov_svd / cov_svd.max(), cov_chol / cov_chol.max(), atol=1e-5)  # same covariance
    assert torch.equal(color_matrix("none"), torch.eye(3))
    with pytest.raises(ValueError, match="decorrelation"):
        color_matrix("pca")


# ---------------------------------------------------------------------------- transforms
def test_transforms_sizes_and_determinism() -> None:
    x = torch.rand(2, 3, 16, 16)
    assert Pad(3)(x).shape == (2, 3, 22, 22) and float(Pad(3)(x)[0, 0, 0, 0]) == 0.5
    assert Jitter(4)(x, torch.Generator().manual_seed(0)).shape == x.shape
    assert Resize(9)(x).shape == (2, 3, 9, 9)
    assert RandomScale([1.5])(x).shape == (2, 3, 24, 24)
    t = Compose(standard_transforms())
    a = t(x, torch.Generator().manual_seed(3))
    b = t(x, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert len(t) == 5 and isinstance(t.transforms[0], Pad) and t.transforms[0].width == 12


def test_rotation_is_exact_for_right_angles_and_identity_for_zero() -> None:
    x = torch.rand(2, 3, 7, 7)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(RandomRotate([0])(x, g), x)
    assert torch.allclose(RandomRotate([90])(x, g), torch.rot90(x, 1, dims=(2, 3)), atol=1e-5)
    # per-image angles: one batched grid_sample, images rotated independently
    mixed = RandomRotate([0, 90])(x.repeat(8, 1, 1, 1), torch.Generator().manual_seed(1))
    same = [bool(torch.allclose(m, x[i % 2], atol=1e-5)) for i, m in enumerate(mixed)]
    assert any(same) and not all(same)


def test_plain_callables_compose() -> None:
    t = Compose([Pad(1), lambda im: im * 2])
    assert torch.allclose(t(torch.ones(1, 1, 2, 2))[0, 0, 1, 1], torch.tensor(2.0))


# ---------------------------------------------------------------------------- objectives
def test_objective_algebra_matches_by_hand() -> None:
    act = {"l": torch.randn(3, 4, 5, 5), "": torch.randn(3, 6)}
    images = torch.rand(3, 3, 8, 8)
    a, b, c = Channel("l", 1), ClassLogit(2), Neuron("l", 0, (2, 3))
    obj = 2 * Objective(a) - Objective(b) / 4 + (-Objective(c)) - 0.5 * total_variation()
    expected = (2 * a.value(act["l"]) - b.value(act[""]) / 4 - c.value(act["l"])
                - 0.5 * total_variation()(act, images))
    assert torch.allclose(obj(act, images), expected, atol=1e-6)
    assert obj.layers == ["l", ""]
    assert repr(obj).startswith("Objective(2*channel:l:1 - 0.25*class:2 - 1*neuron:l:0:2,3")
    assert torch.allclose((Objective(a) + b)(act, images), a.value(act["l"]) + b.value(act[""]))
    assert torch.allclose(sum([Objective(a), Objective(a)])(act, images), 2 * a.value(act["l"]))
    with pytest.raises(TypeError, match="number"):
        Objective(a) * Objective(b)


def test_batch_index_and_per_image_semantics() -> None:
    act = {"l": torch.randn(4, 5, 3, 3)}
    images = torch.rand(4, 3, 8, 8)
    only_2 = Objective.feature(Channel("l", 1), batch=2)(act, images)
    assert torch.count_nonzero(only_2) == 1 and torch.isclose(only_2[2], act["l"][2, 1].mean())
    per = Objective.per_image([Channel("l", c) for c in (4, 0, 3, 1)])
    assert per.batch_size == 4
    assert torch.allclose(per(act, images), torch.stack([act["l"][i, c].mean() for i, c in enumerate((4, 0, 3, 1))]))
    with pytest.raises(ValueError, match="needs a batch of 4"):
        per({"l": act["l"][:3]}, images[:3])
    with pytest.raises(ValueError, match="different batch sizes"):
        per + Objective.per_image([Channel("l", 0)])
    assert per.image_names(4) == ["channel:l:4", "channel:l:0", "channel:l:3", "channel:l:1"]


class _Encoder:
    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.weight)


class _Custom:
    """A feature kind mechlens does not know: exercises the per-image fallback."""

    def __init__(self, layer: str, index: int) -> None:
        self.layer, self.index = layer, index

    @property
    def name(self) -> str:
        return f"custom:{self.index}"

    def readout(self, activation: torch.Tensor) -> torch.Tensor:
        return activation[:, self.index].pow(2)

    def value(self, activation: torch.Tensor) -> torch.Tensor:
        return self.readout(activation).flatten(1).amax(dim=1)


def test_diagonal_fast_paths_match_reading_each_image() -> None:
    gen = torch.Generator().manual_seed(0)
    act = {"a": torch.randn(9, 6, 4, 4, generator=gen), "t": torch.randn(9, 5, 6, generator=gen),
           "": torch.randn(9, 7, generator=gen)}
    sae = _Encoder(torch.randn(6, 10, generator=gen))
    features = [
        Channel("a", 2), Channel("a", 5, reduce="max"), Neuron("a", 1, (3, 0)), Direction("a", torch.randn(6, generator=gen)),
        SAELatent("a", sae, 7), ClassLogit(4, "log_softmax"), LayerEnergy("a"), Channel("t", 3), _Custom("a", 0),
    ]
    fast = diagonal_values(features, act)
    slow = torch.stack([f.value(act[f.layer][i:i + 1])[0] for i, f in enumerate(features)])
    assert torch.allclose(fast, slow, atol=1e-5)
    # one kind over a whole batch (the atlas case) takes the single-gather path
    many = [Channel("a", c % 6) for c in range(9)]
    assert torch.allclose(diagonal_values(many, act), torch.stack([act["a"][i, i % 6].mean() for i in range(9)]))
    with pytest.raises(IndexError, match="channel index 6 is out of range"):
        diagonal_values([Channel("a", 6)] + many[1:], act)


def test_diversity_rewards_different_images() -> None:
    base = torch.rand(1, 4, 5, 5)
    same = {"l": base.repeat(3, 1, 1, 1)}
    different = {"l": torch.rand(3, 4, 5, 5) * torch.tensor([1.0, 0.0, 0.0, 1.0]).view(1, 4, 1, 1)}
    different["l"][1] = torch.rand(4, 5, 5) * torch.tensor([0.0, 1.0, 1.0, 0.0]).view(4, 1, 1)
    d = diversity("l")
    assert torch.allclose(d(same, None), torch.full((3,), -2 / 3), atol=1e-5)  # cosine 1 with both others
    assert bool((d(different, None) > d(same, None)).all())
    assert float(d({"l": base}, None)) == 0.0


def test_regularizers_are_zero_on_flat_images_and_positive_on_noise() -> None:
    flat = torch.full((2, 3, 8, 8), 0.5)
    noisy = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    for term in (total_variation(), l2(), blur()):
        assert torch.allclose(term({}, flat), torch.zeros(2), atol=1e-7)
        assert bool((term({}, noisy) > 0).all())


# ---------------------------------------------------------------------------- render plumbing
def test_render_is_deterministic_for_a_seed(tiny) -> None:
    kw = dict(size=40, steps=4, transforms="standard")
    feats = [Channel("stage2", 0), Channel("stage2", 1)]
    a, b = render(tiny, feats, seed=5, **kw), render(tiny, feats, seed=5, **kw)
    c = render(tiny, feats, seed=6, **kw)
    assert torch.equal(a.images, b.images) and torch.equal(a.losses, b.losses)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (2, 3, 40, 40) and a.losses.shape == (4, 2)
    assert a.names == ["channel:stage2:0", "channel:stage2:1"]


def test_hooks_released_and_mode_restored_when_interrupted(tiny) -> None:
    model = tiny.model
    model.train()
    model.stem.eval()  # a mixed state (e.g. frozen batch norm) must survive too
    calls = []

    def interrupt(step, images, scores):
        calls.append(step)
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        render(tiny, Objective(Channel("stage3", 1)) + diversity("stage2"), batch=2, size=32, steps=10,
               callback=interrupt)
    assert calls == [0, 1, 2]
    assert _all_hooks(model) == 0
    assert model.training and model.stage1.training and not model.stem.training  # restored per module
    model.eval()
    # the same after a normal run and after an error inside the forward
    render(tiny, Channel("stage3", 1), size=32, steps=1)
    with pytest.raises(IndexError, match="channel index 999"):
        render(tiny, Channel("stage3", 999), size=32, steps=1)
    assert _all_hooks(model) == 0 and not model.training
    assert all(p.grad is None for p in model.parameters())  # only the image is optimized


def test_render_stops_after_the_last_needed_layer(tiny) -> None:
    head_calls = []
    handle = tiny.model.head.register_forward_pre_hook(lambda m, a: head_calls.append(1))
    try:
        result = render(tiny, Channel("stage1", 3), size=32, steps=5)
        assert result.stopped_early and len(head_calls) == 1  # the first (checking) forward only
        head_calls.clear()
        result = render(tiny, ClassLogit(2), size=32, steps=5)
        assert not result.stopped_early and len(head_calls) == 6  # 5 steps + the final evaluation
    finally:
        handle.remove()


class _SharedReLU(nn.Module):
    """One ReLU module called twice per forward: stopping at its first call would be wrong."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv2(self.relu(self.conv1(x))))


def test_modules_called_twice_read_their_last_call() -> None:
    torch.manual_seed(0)
    model = _SharedReLU().eval()
    result = render(model, Channel("relu", 1), size=16, steps=3, transforms=None)
    assert not result.stopped_early
    expected = feature_forward(model, Channel("relu", 1), result.images, grads=False).values[:, 0]
    assert torch.allclose(result.target_values, expected, atol=1e-5)


def test_model_normalization_is_applied_inside() -> None:
    loaded = load_model("mechlens:small_cnn_tiny", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    seen = []

    class Spy:
        def normalize(self, x):
            seen.append((float(x.detach().min()), float(x.detach().max())))
            return loaded.preprocessing.normalize(x)

    a = render(loaded, Channel("stage2", 0), size=24, steps=3, transforms=None)
    b = render(loaded, Channel("stage2", 0), size=24, steps=3, transforms=None, preprocessing=Spy())
    c = render(loaded, Channel("stage2", 0), size=24, steps=3, transforms=None, preprocessing=False)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    assert len(seen) == 4 and all(0 <= lo and hi <= 1 for lo, hi in seen)  # images in [0,1] go in


def test_regularizer_lowers_total_variation(tiny) -> None:
    kw = dict(size=32, steps=12, transforms=None, param="pixel", lr=0.1)
    plain = render(tiny, Channel("stage1", 2), **kw)
    smooth = render(tiny, Channel("stage1", 2), regularizers={"tv": 5.0}, **kw)
    tv = total_variation()
    assert float(tv({}, smooth.images)) < 0.5 * float(tv({}, plain.images))
    assert "total_variation" in smooth.activations and smooth.settings["regularizers"]["tv"] == 5.0
    assert isinstance(Regularizers(tv=1).apply(Objective(Channel("stage1", 2))), Objective)


def test_result_snapshots_pngs_and_json(tiny, tmp_path) -> None:
    from PIL import Image

    result = render(tiny, [Channel("stage2", 0), Neuron("stage2", 1, (2, 2))], size=24, steps=3, thresholds=(1, 3))
    assert sorted(result.snapshots) == [1, 3] and torch.equal(result.snapshots[3], result.images)
    paths = result.save(tmp_path)
    assert [p.name for p in paths] == ["000_channel_stage2_0.png", "001_neuron_stage2_1_2_2.png"]
    with Image.open(paths[1]) as im:
        assert im.size == (24, 24) and im.mode == "RGB"
    data = json.loads(json.dumps(result.to_dict()))
    assert data["names"][1] == "neuron:stage2:1:2,2" and len(data["loss_curve"]["loss"]) == 2
    assert data["target_values"] == pytest.approx(result.target_values.tolist())


def test_bad_arguments_fail_loudly(tiny) -> None:
    with pytest.raises(ValueError, match="renders 2 images"):
        render(tiny, [Channel("stage2", 0), Channel("stage2", 1)], batch=3, size=16, steps=1)
    with pytest.raises(Exception, match="stage9"):
        render(tiny, Channel("stage9", 0), size=16, steps=1)
    with pytest.raises(TypeError, match="cannot make an objective"):
        render(tiny, 3, size=16, steps=1)
    assert _all_hooks(tiny.model) == 0


def test_bare_module_and_small_cnn_factory() -> None:
    model = small_cnn(num_classes=3, width=4, depth=2, blocks_per_stage=1)
    result = render(model, "channel:stage2:1", size=24, steps=2, transforms=[Jitter(2)])
    assert result.images.shape == (1, 3, 24, 24) and result.settings["device"] == "cpu"


def test_any_feature_kind_renders_sae_latents_and_directions(tiny) -> None:
    encoder = nn.Sequential(nn.Linear(32, 12), nn.ReLU())  # stands in for an SAE trained on stage2 rows
    encoder.encode = encoder.forward  # the LatentEncoder protocol
    features = [SAELatent("stage2", encoder, 3), SAELatent("stage2", encoder, 5),
                Direction("stage2", torch.randn(32, generator=torch.Generator().manual_seed(0)), label="cav")]
    result = render(tiny, features, size=32, steps=3)
    assert result.names == ["sae:stage2:3", "sae:stage2:5", "cav:stage2"]
    expected = feature_forward(tiny.model, features, result.images, grads=False).values.diagonal()
    assert torch.allclose(result.target_values, expected, atol=1e-5)
    assert all(p.grad is None for p in encoder.parameters())
