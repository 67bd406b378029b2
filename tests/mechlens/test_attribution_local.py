"""Receptive-field-local occlusion: the same maps as the full forward, with less work."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from mechlens.attribution import exact_execution, occlusion
from mechlens.attribution.local import local_split
from mechlens.attribution.perturbation import balanced_ranges
from mechlens.features import Channel
from mechlens.models import small_cnn


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-trivial BatchNorm: its shift makes zero padding of inner maps matter
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return net


def _images(n: int, size: int) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("target,kwargs", [
    (3, {"window": 16, "strides": 12}),  # overlapping windows, last one clipped at the border
    (Channel("layer3", 5), {"window": (3, 16, 24), "strides": (3, 16, 16), "baseline": "blur", "blur_sigma": 2.0}),
    (1, {"window": (1, 32, 32), "strides": (1, 32, 32), "internal_batch_size": 7}),  # per-channel windows
])
def test_local_recompute_gives_the_full_forward_maps(resnet, target, kwargs) -> None:
    x = _images(2, 160)
    fast = occlusion(resnet, x, target, **kwargs)
    plain = occlusion(resnet, x, target, local=False, **kwargs)
    info = fast.extras["local_recompute"]
    assert info is not None and info["saved_fraction"] >= 0.25 and info["cuts"][:2] == ["add", "add_1"]
    assert plain.extras["local_recompute"] is None
    # BatchNorm folded into the crops' convolutions rounds differently: ~1e-4 of the map's scale
    torch.testing.assert_close(fast.map, plain.map, rtol=1e-4, atol=5e-4 * float(plain.map.abs().max()))
    torch.testing.assert_close(fast.values, plain.values, rtol=1e-4, atol=1e-5)


def test_crops_hold_the_receptive_field_of_the_changed_region(resnet) -> None:
    """Running a segment on the planned crop reproduces the full map on the changed region, for
    windows in the middle, at an edge and in a corner."""
    x = _images(1, 160)
    split = local_split(resnet, x, (16, 16))
    assert split is not None
    for box in (((72, 88), (72, 88)), ((0, 16), (40, 56)), ((144, 160), (144, 160))):
        current = x.clone()
        current[:, :, box[0][0] : box[0][1], box[1][0] : box[1][1]] = 0  # occlude
        clean = x
        for segment, ((cy, cx), (ry, rx)) in zip(split.segments, split.plan(box)):
            with torch.no_grad():
                full = segment.module(current)
                local = segment.module(current[:, :, cy[0] : cy[1], cx[0] : cx[1]])
                clean = segment.module(clean)
            oy, ox = cy[0] // segment.out_stride, cx[0] // segment.out_stride
            torch.testing.assert_close(local[:, :, ry[0] - oy : ry[1] - oy, rx[0] - ox : rx[1] - ox],
                                       full[:, :, ry[0] : ry[1], rx[0] : rx[1]], rtol=1e-4, atol=1e-5)
            outside = torch.ones_like(full, dtype=torch.bool)
            outside[:, :, ry[0] : ry[1], rx[0] : rx[1]] = False
            torch.testing.assert_close(full[outside], clean[outside], rtol=1e-5, atol=1e-6)  # nothing changed outside
            current = full


def test_models_that_cannot_be_split_run_the_full_forward(resnet) -> None:
    cnn = small_cnn(num_classes=3, width=8, depth=2, seed=0).eval()  # its input check does not trace
    assert local_split(cnn, _images(1, 64), (8, 8)) is None
    assert occlusion(cnn, _images(1, 64), 1, window=8).extras["local_recompute"] is None
    assert local_split(resnet, _images(1, 96), (16, 16)) is None  # too small to save a quarter of the work
    assert local_split(resnet, _images(1, 160), (16, 16), keep=["layer1"]) is None  # the feature reads layer1


def test_uniform_plans_widen_crops_to_one_aligned_size_inside_the_map(resnet) -> None:
    split = local_split(resnet, _images(1, 160), (16, 16))
    boxes = [((y, y + 16), (x, x + 16)) for y in range(0, 145, 12) for x in range(0, 145, 12)]
    raw, uniform = [split.plan(b) for b in boxes], split.uniform_plans(boxes)
    for level, segment in enumerate(split.segments):
        size = segment.sizes[segment.nodes[0].name]
        extents = {tuple(c[1] - c[0] for c in plan[level][0]) for plan in uniform}
        assert len(extents) == 1  # one crop size per level: every window stacks into one batch
        for before, after in zip(raw, uniform):
            assert after[level][1] == before[level][1]  # same changed region
            for d in range(2):
                (a0, a1), (b0, b1) = after[level][0][d], before[level][0][d]
                assert 0 <= a0 <= b0 and b1 <= a1 <= size[d] and a0 % segment.align == 0
    assert len({tuple(c[1] - c[0] for c in plan[0][0]) for plan in raw}) > 1  # the raw crops did differ


def test_batchnorm_is_folded_into_copies_of_the_prefix_convolutions(resnet) -> None:
    x = _images(1, 160)
    before = {k: v.clone() for k, v in resnet.state_dict().items()}
    folded, plain = local_split(resnet, x, (16, 16)), local_split(resnet, x, (16, 16), fold=False)
    count = lambda split: sum(isinstance(m, nn.BatchNorm2d) for s in split.segments for m in s.module.modules())  # noqa: E731
    assert count(plain) > 0 and count(folded) == 0
    with torch.no_grad():
        a, b = x, x
        for fs, ps in zip(folded.segments, plain.segments):
            a, b = fs.module(a), ps.module(b)
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for key, value in resnet.state_dict().items():  # the model itself is untouched
        assert torch.equal(value, before[key]), key
    with exact_execution():  # bit-for-bit mode: no crops, no folding
        assert occlusion(resnet, x, 3, window=16, strides=16).extras["local_recompute"] is None


@pytest.mark.parametrize("total,size", [(169, 32), (10, 3), (5, 8), (64, 16), (1, 1)])
def test_balanced_ranges_cover_everything_in_equal_pieces(total, size) -> None:
    ranges = balanced_ranges(total, size)
    assert ranges[0][0] == 0 and ranges[-1][1] == total
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [b - a for a, b in ranges]
    assert len(ranges) == -(-total // size) and max(sizes) <= size and max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)
