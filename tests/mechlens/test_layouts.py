"""Layouts are taken from the model or the user, never guessed from a tensor's rank (issue 17).

A channels-last Swin stage ``[B, H, W, C]`` read as ``[B, C, H, W]`` gave store rows of width
``W`` instead of ``C`` with no error; these tests fail on that code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from activation_store import ActivationStore
from mechlens.capture import capture_to_store
from mechlens.features import Channel, feature_forward
from mechlens.features.layout import AmbiguousLayoutError, LayerLayout, as_position_rows, infer_layouts, layout_scope

timm = pytest.importorskip("timm")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_swin() -> nn.Module:
    from timm.models.swin_transformer import SwinTransformer

    torch.manual_seed(0)
    # C (16, 32) differs from H and W (8, 4): a transposed read would give rows of the wrong width
    return SwinTransformer(img_size=32, patch_size=4, window_size=2, embed_dim=16, depths=(1, 1),
                           num_heads=(1, 2), num_classes=3).eval()


class _FixedSizeChannelsLast(nn.Module):
    """A custom block that permutes to channels-last with a plain tensor op and accepts only one
    input size: nothing in the model says its layout and it cannot be measured."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.block = _Permute()
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 8:
            raise ValueError("this model takes 8x8 images")
        return self.head(self.block(self.conv(x)).mean(dim=(1, 2)))


class _Permute(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1) * 1.0


class _AnySizeChannelsLast(_FixedSizeChannelsLast):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.conv(x)).mean(dim=(1, 2)))


def _images(n: int, size: int) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def _direct(model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    out: dict[str, torch.Tensor] = {}
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, o: out.__setitem__("o", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out["o"]


def test_swin_nhwc_stage_is_captured_with_the_right_width_and_equals_a_direct_forward(tmp_path) -> None:
    model = _tiny_swin()
    x = _images(4, 32)
    direct = _direct(model, "layers.1", x)  # [B, 4, 4, 32] channels-last
    assert direct.shape == (4, 4, 4, 32)
    result = capture_to_store(model, torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long)), tmp_path / "s",
                              layers=["layers.1"], spatial="all", dtype="float32", batch_size=2, num_workers=0,
                              normalize=False, progress=False)
    assert result.rows["layers.1"] == 4 * 16
    view = ActivationStore(tmp_path / "s")["layers.1"]
    assert view.dim == 32
    meta = view.spec.meta
    assert meta["layout"] == "nhwc" and meta["spatial_shape"] == [4, 4] and "Swin" in meta["layout_source"]
    rows = view.read_rows(np.arange(view.num_rows)) if hasattr(view, "read_rows") else view[:]
    np.testing.assert_allclose(np.asarray(rows), direct.reshape(4 * 16, 32).numpy(), rtol=1e-6, atol=1e-6)
    # a feature on that layer reads channels from the last dim
    values = feature_forward(model, Channel("layers.1", 5), x, grads=False).values[:, 0]
    torch.testing.assert_close(values, direct[..., 5].mean(dim=(1, 2)))


def test_ambiguous_layout_is_an_error_with_the_fix_and_explicit_layout_works(tmp_path) -> None:
    torch.manual_seed(0)
    model = _FixedSizeChannelsLast().eval()
    x = _images(2, 8)
    with pytest.raises(AmbiguousLayoutError, match=r"'block'.*pass layout='nchw'.*or layout='nhwc'"):
        infer_layouts(model, ["block"], x)
    data = torch.utils.data.TensorDataset(x, torch.zeros(2, dtype=torch.long))
    with pytest.raises(AmbiguousLayoutError, match="--layout"):
        capture_to_store(model, data, tmp_path / "a", layers=["block"], dtype="float32", num_workers=0,
                         normalize=False, progress=False)
    assert not (tmp_path / "a" / "store.json").exists()  # refused before anything was written
    result = capture_to_store(model, data, tmp_path / "b", layers=["block"], dtype="float32", num_workers=0,
                              normalize=False, progress=False, layout={"block": "nhwc"})
    assert result.rows["block"] == 2 * 64
    view = ActivationStore(tmp_path / "b")["block"]
    assert view.dim == 6 and view.spec.meta["layout_source"] == "explicit"
    with pytest.raises(AmbiguousLayoutError):
        feature_forward(model, Channel("block", 1), x)  # a feature reading it needs the layout too
    value = feature_forward(model, Channel("block", 1, layout="nhwc"), x, grads=False).values[:, 0]
    torch.testing.assert_close(value, _direct(model, "block", x)[..., 1].mean(dim=(1, 2)))


def test_a_layout_the_model_states_cannot_be_contradicted() -> None:
    torch.manual_seed(0)
    model = _AnySizeChannelsLast().eval()
    with pytest.raises(ValueError, match="contradicts layer 'conv'.*nchw"):
        infer_layouts(model, ["conv"], _images(1, 8), layout="nhwc")


def test_a_layout_the_model_does_not_state_is_measured_at_another_input_size() -> None:
    torch.manual_seed(0)
    model = _AnySizeChannelsLast().eval()
    known = infer_layouts(model, ["block"], _images(1, 8))["block"]
    assert known.layout == "nhwc" and known.source.startswith("measured")


def test_square_maps_whose_height_equals_the_channel_count_are_not_misread() -> None:
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 1))  # [B, 8, 8, 8]
    known = infer_layouts(conv, ["0", "1", "2", ""], _images(1, 8))
    assert {name: k.layout for name, k in known.items()} == {"0": "nchw", "1": "nchw", "2": "nchw"}


@pytest.mark.parametrize("name, kwargs, prefix", [
    ("vit_tiny_patch16_224", {}, 1),
    ("deit_tiny_distilled_patch16_224", {}, 2),  # CLS + distillation token
    ("vit_tiny_patch16_224", {"reg_tokens": 4}, 5),  # CLS + 4 registers
    ("vit_tiny_patch16_224", {"class_token": False, "global_pool": "avg"}, 0),
])
def test_token_maps_know_their_prefix_tokens(tmp_path, name, kwargs, prefix) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, img_size=32, depth=2, num_classes=3, **kwargs).eval()
    x = _images(2, 32)
    known = infer_layouts(model, ["blocks.1", "patch_embed"], x)
    assert known["blocks.1"] == LayerLayout("nlc", prefix, known["blocks.1"].source)
    assert known["patch_embed"].layout == "nlc" and known["patch_embed"].num_prefix_tokens == 0
    data = torch.utils.data.TensorDataset(x, torch.zeros(2, dtype=torch.long))
    if prefix == 0:
        with pytest.raises(ValueError, match="CLS token.*no prefix tokens"):
            capture_to_store(model, data, tmp_path / "c", layers=["blocks.1"], spatial="cls", num_workers=0,
                             normalize=False, progress=False)
        return
    capture_to_store(model, data, tmp_path / "c", layers=["blocks.1"], spatial="cls", dtype="float32",
                     num_workers=0, normalize=False, progress=False)
    view = ActivationStore(tmp_path / "c")["blocks.1"]
    assert view.spec.meta["num_prefix_tokens"] == prefix
    rows = np.asarray(view[:])
    np.testing.assert_allclose(rows, _direct(model, "blocks.1", x)[:, 0].numpy(), rtol=1e-5, atol=1e-5)


def test_a_plain_token_model_without_declared_prefix_refuses_cls_pooling(tmp_path) -> None:
    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Conv2d(3, 8, 4, stride=4)
            self.norm = nn.LayerNorm(8)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            t = self.embed(x).flatten(2).transpose(1, 2)
            return self.head(self.norm(t).mean(dim=1))

    torch.manual_seed(0)
    model = Tokens().eval()
    x = _images(2, 16)
    known = infer_layouts(model, ["norm"], x)["norm"]
    assert known.layout == "nlc"
    # measured at two sizes: 16 tokens at 16x16, 64 at 32x32, so no prefix tokens
    assert known.num_prefix_tokens == 0
    with layout_scope({"norm": known}):
        rows, spatial = as_position_rows(_direct(model, "norm", x), layer="norm")
    assert rows.shape == (2, 16, 8) and spatial == (16,)


def test_layers_cli_shows_each_layout(capsys) -> None:
    from mechlens.cli import main

    assert main(["layers", "timm:swin_tiny_patch4_window7_224", "--input-size", "3", "224", "224",
                 "--max-depth", "2"]) == 0
    out = capsys.readouterr().out
    line = next(row for row in out.splitlines() if row.startswith("layers.3 "))
    assert "[7, 7, 768]" in line and "nhwc" in line
    assert next(row for row in out.splitlines() if row.startswith("patch_embed.proj ")).split()[-2] == "nchw"
