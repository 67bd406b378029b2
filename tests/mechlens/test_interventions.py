"""Interventions on features (issue 19, part 1): identity through an SAE plus its error term is
exact, each edit changes only its feature, patching copies the source's value, interventions
compose and mask, bad input is refused and no hook outlives an error."""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch
from torch import nn

from mechlens.features import Channel, Direction, Neuron, SAELatent
from mechlens.interventions import Intervention, ablate, clamp, intervene, intervened_forward, patch, scale, steer
from mechlens.models import small_cnn
from mechlens.sae import TopKConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return small_cnn(num_classes=5, width=8, depth=3, seed=0).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _hooked(model: nn.Module, x: torch.Tensor, name: str, interventions=None) -> torch.Tensor:
    from mechlens.engine import capture

    with torch.no_grad(), capture(model, name) as cap:
        if interventions is None:
            model(x)
        else:
            with intervene(model, interventions):
                model(x)
    return cap[name]


def _sae(d_in: int, layer: str) -> nn.Module:
    torch.manual_seed(0)
    sae = build_sae(TopKConfig(width=32, k=4, d_in=d_in, layer=layer, layout="nchw"))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return sae.eval()


def _hooks_left(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_identity_through_an_sae_and_its_error_term_is_exact(model, images) -> None:
    channels = _hooked(model, images, "stage2").shape[1]
    sae = _sae(channels, "stage2")
    latent = sae.feature(3)
    with torch.no_grad():
        clean = model(images)
        identity = intervened_forward(model, images, scale(latent, 1.0))
    assert (identity - clean).abs().max().item() <= 1e-5
    assert _hooks_left(model) == 0


def test_each_edit_changes_only_its_feature(model, images) -> None:
    clean = _hooked(model, images, "stage1")
    zeroed = _hooked(model, images, "stage1", ablate(Channel("stage1", 2)))
    assert torch.equal(zeroed[:, 2], torch.zeros_like(clean[:, 2]))
    assert torch.equal(torch.cat([zeroed[:, :2], zeroed[:, 3:]], 1), torch.cat([clean[:, :2], clean[:, 3:]], 1))
    held = _hooked(model, images, "stage1", clamp(Channel("stage1", 1), 3.5))
    assert torch.equal(held[:, 1], torch.full_like(clean[:, 1], 3.5))
    doubled = _hooked(model, images, "stage1", scale(Channel("stage1", 0), 2.0))
    torch.testing.assert_close(doubled[:, 0], 2 * clean[:, 0])
    # steering along a direction adds alpha to its value and nothing orthogonal to it
    vector = torch.randn(clean.shape[1], generator=torch.Generator().manual_seed(1))
    steered = _hooked(model, images, "stage1", steer(Direction("stage1", vector), 4.0))
    value = lambda act: torch.einsum("bchw,c->bhw", act, vector)  # noqa: E731
    torch.testing.assert_close(value(steered), value(clean) + 4.0, rtol=1e-5, atol=1e-4)
    orthogonal = steered - clean - (4.0 / vector.dot(vector)) * vector.view(1, -1, 1, 1)
    assert orthogonal.abs().max().item() < 1e-4
    # ablating a direction projects it out
    projected = _hooked(model, images, "stage1", ablate(Direction("stage1", vector)))
    assert value(projected).abs().max().item() < 1e-4


def test_patch_copies_the_source_value_sample_by_sample(model, images) -> None:
    source = images.flip(0)
    target = _hooked(model, images, "stage2", patch(Channel("stage2", 4), source))
    from_source = _hooked(model, source, "stage2")
    clean = _hooked(model, images, "stage2")
    torch.testing.assert_close(target[:, 4], from_source[:, 4])
    assert torch.equal(target[:, :4], clean[:, :4])
    with pytest.raises(ValueError, match="source batch"):
        intervened_forward(model, images, patch(Channel("stage2", 4), source[:2]))
    assert _hooks_left(model) == 0


def test_interventions_compose_and_masks_restrict_them(model, images) -> None:
    clean = _hooked(model, images, "stage1")
    mask = torch.zeros(clean.shape[-2:], dtype=torch.bool)
    mask[:4, :4] = True
    both = _hooked(model, images, "stage1", [ablate(Channel("stage1", 0), mask=mask), clamp(Channel("stage1", 1), 1.0)])
    assert torch.equal(both[:, 0, :4, :4], torch.zeros(4, 4, 4)) and torch.equal(both[:, 0, 4:], clean[:, 0, 4:])
    assert torch.equal(both[:, 1], torch.ones_like(clean[:, 1]))
    neuron = _hooked(model, images, "stage1", clamp(Neuron("stage1", 3, (2, 5)), -7.0))
    assert torch.equal(neuron[:, 3, 2, 5], torch.full((4,), -7.0))
    changed = (neuron != clean).nonzero()
    assert set(map(tuple, changed[:, 1:].tolist())) == {(3, 2, 5)}


def test_spec_strings_and_a_loaded_model_in_pixel_space(images) -> None:
    from mechlens.models import load_model

    loaded = load_model("mechlens:small_cnn_tiny")
    with torch.no_grad():
        clean = loaded.model(loaded.preprocessing.normalize(images))
        out = intervened_forward(loaded, images, scale("channel:stage1:0", 1.0))
    torch.testing.assert_close(out, clean)


def test_bad_input_is_refused_and_no_hook_survives(model, images) -> None:
    with pytest.raises(ValueError, match="finite number"):
        steer(Channel("stage1", 0), math.nan)
    with pytest.raises(ValueError, match="finite number"):
        clamp(Channel("stage1", 0), math.inf)
    with pytest.raises(ValueError, match="dimensions but layer 'stage1'"):
        intervened_forward(model, images, steer(Direction("stage1", torch.ones(99)), 1.0))
    assert _hooks_left(model) == 0
    with pytest.raises(IndexError, match="channel 99 is out of range"):
        intervened_forward(model, images, ablate(Channel("stage1", 99)))
    sae = _sae(_hooked(model, images, "stage2").shape[1], "stage2")
    with pytest.raises(ValueError, match="trained on layer 'stage2', not 'stage1'"):
        Intervention(SAELatent("stage1", sae, 0), "zero")
    with pytest.raises(TypeError, match="interventions edit"):
        ablate("class:1")

    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used, self.unused = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3)

        def forward(self, x):
            return self.used(x).mean(dim=(2, 3))

    net = Unused().eval()
    with pytest.raises(RuntimeError, match=r"layer\(s\) unused did not run"):
        intervened_forward(net, images, ablate(Channel("unused", 0, layout="nchw")))
    assert _hooks_left(net) == 0
    with pytest.raises(KeyError):
        with intervene(model, ablate(Channel("stage1", 0))):
            raise KeyError("an error inside the block")
    assert _hooks_left(model) == 0


def test_features_edited_together_share_one_encoding_or_one_span(model, images) -> None:
    from mechlens.interventions import decoder_directions

    clean = _hooked(model, images, "stage2")
    sae = _sae(clean.shape[1], "stage2")
    rows = clean.permute(0, 2, 3, 1).reshape(-1, clean.shape[1])
    # latents of one SAE: one encoding, each latent set to its own value, one decode, error kept
    group = _hooked(model, images, "stage2", clamp([sae.feature(1), sae.feature(5)], [0.5, 2.0]))
    z = sae.encode(rows).detach()
    edited = z.clone()
    edited[:, 1], edited[:, 5] = 0.5, 2.0
    expected = rows + sae.decode(edited) - sae.decode(z)
    torch.testing.assert_close(group.permute(0, 2, 3, 1).reshape(-1, clean.shape[1]), expected.detach(), rtol=1e-5, atol=1e-5)
    # decoder space: the span of the decoder directions is projected out of the whole activation,
    # error term included, and nothing orthogonal to it moves
    directions = decoder_directions(sae, [1, 5])
    out = _hooked(model, images, "stage2", ablate([sae.feature(1), sae.feature(5)], space="decoder"))
    out_rows = out.permute(0, 2, 3, 1).reshape(-1, clean.shape[1])
    assert (out_rows @ directions.T).abs().max().item() < 1e-4
    basis, _ = torch.linalg.qr(directions.T)
    torch.testing.assert_close(out_rows - out_rows @ basis @ basis.T, rows - rows @ basis @ basis.T, rtol=1e-5, atol=1e-5)
    # several directions: the same, as a span; patching copies the source's coordinates in it
    vectors = [Direction("stage2", d) for d in directions]
    torch.testing.assert_close(_hooked(model, images, "stage2", ablate(vectors)), out, rtol=1e-5, atol=1e-5)
    source = images.flip(0)
    patched = _hooked(model, images, "stage2", patch(vectors, source)).permute(0, 2, 3, 1).reshape(-1, clean.shape[1])
    from_source = _hooked(model, source, "stage2").permute(0, 2, 3, 1).reshape(-1, clean.shape[1])
    torch.testing.assert_close(patched @ basis, from_source @ basis, rtol=1e-4, atol=1e-4)
    # channels: a list of channels at once
    both = _hooked(model, images, "stage2", ablate(["channel:stage2:0", "channel:stage2:3"]))
    assert both[:, [0, 3]].abs().max().item() == 0 and torch.equal(both[:, 1:3], clean[:, 1:3])


def test_groups_refuse_what_they_cannot_mean(model, images) -> None:
    sae = _sae(_hooked(model, images, "stage2").shape[1], "stage2")
    with pytest.raises(ValueError, match="share a layer"):
        ablate([Channel("stage1", 0), Channel("stage2", 0)])
    with pytest.raises(ValueError, match="one kind"):
        ablate([Channel("stage2", 0), sae.feature(0)])
    with pytest.raises(ValueError, match="ambiguous"):
        steer([Direction("stage2", torch.ones(4)), Direction("stage2", torch.arange(4.0))], 1.0)
    with pytest.raises(ValueError, match="2 value"):
        clamp([sae.feature(0), sae.feature(1)], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="finite number"):
        clamp([sae.feature(0), sae.feature(1)], [1.0, math.nan])
    with pytest.raises(ValueError, match="space='decoder' is for SAE latents"):
        ablate(Channel("stage2", 0), space="decoder")
    with pytest.raises(ValueError, match="unknown space"):
        ablate(sae.feature(0), space="pixels")
    with pytest.raises(IndexError, match="out of range"):
        intervened_forward(model, images, ablate([sae.feature(0), sae.feature(99)], space="decoder"))
    assert _hooks_left(model) == 0


def test_attribution_patching_and_circuits_refuse_bad_input(model, images) -> None:
    from mechlens.interventions import ablation_effects, attribution_patching, feature_circuit

    stage1 = _hooked(model, images, "stage1").shape[1]
    sae1, sae2 = _sae(stage1, "stage1"), _sae(_hooked(model, images, "stage2").shape[1], "stage2")
    with pytest.raises(ValueError, match="needs means="):
        attribution_patching(model, sae2, images, "class:0", ablation="mean")
    with pytest.raises(ValueError, match="one image per image"):
        attribution_patching(model, sae2, images, "class:0", ablation="source", source=images[:2])
    with pytest.raises(ValueError, match="trained on layer 'stage2', not 'stage1'"):
        attribution_patching(model, sae2, images, "class:0", layer="stage1")
    with pytest.raises(IndexError, match="latents must lie in"):
        ablation_effects(model, sae2, images, "class:0", latents=[0, 999])
    with pytest.raises(ValueError, match="two or more layers"):
        feature_circuit(model, [sae2], images, "class:0")
    with pytest.raises(ValueError, match="either nodes_per_layer= or faithfulness="):
        feature_circuit(model, [sae1, sae2], images, "class:0", nodes_per_layer=2, faithfulness=0.8)
    assert _hooks_left(model) == 0
    # zeroing a latent that never fires changes nothing: exactly 0 in both, and never run exactly
    estimated = attribution_patching(model, sae2, images, "class:0")
    exact = ablation_effects(model, sae2, images, "class:0")
    silent = exact.active == 0
    assert silent.any() and (~silent).any()
    assert np.all(exact.effects[silent] == 0) and np.all(estimated.effects[silent] == 0)
    assert estimated.forwards == 1 and exact.forwards == 1 + int((~silent).sum())


def test_resample_ablation_gives_each_image_another_images_value(model, images) -> None:
    clean = _hooked(model, images, "stage1")
    out = _hooked(model, images, "stage1", ablate(Channel("stage1", 2), "resample", seed=3))
    shifts = [s for s in range(1, len(images)) if torch.equal(out[:, 2], clean[:, 2].roll(s, dims=0))]
    assert len(shifts) == 1  # a derangement: no image keeps its own value
    assert torch.equal(out[:, :2], clean[:, :2]) and torch.equal(out[:, 3:], clean[:, 3:])
    again = _hooked(model, images, "stage1", ablate(Channel("stage1", 2), "resample", seed=3))
    assert torch.equal(again, out)  # seeded
    with pytest.raises(ValueError, match="at least 2 images"):
        intervened_forward(model, images[:1], ablate(Channel("stage1", 2), "resample"))
    with pytest.raises(ValueError, match="'resample'"):
        ablate(Channel("stage1", 2), "shuffle")
    assert _hooks_left(model) == 0
