"""Model loading (timm / torchvision / mechlens / user factories), weights, preprocessing,
layer resolution and shapes, and the ``mechlens layers`` command."""
from __future__ import annotations

import argparse
import io
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from mechlens.features import layer_shapes
from mechlens.models import (
    LayerNotFoundError,
    Preprocessing,
    PretrainedWeightsUnavailableError,
    layer_names,
    list_models,
    load_model,
    match_layer_pattern,
    register_model,
    resolve_layers,
    small_cnn,
)
from mechlens.models.loading import _REGISTRY, _unreachable


# ---------------------------------------------------------------------------- loading
def test_mechlens_registry_model_and_preprocessing():
    loaded = load_model("mechlens:small_cnn", num_classes=3)
    assert loaded.spec == "mechlens:small_cnn" and loaded.source == "mechlens"
    assert not loaded.model.training  # returned in eval mode
    assert loaded.preprocessing.input_size == (3, 64, 64)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(loaded.preprocessing.normalize(x), x)  # identity normalisation
    assert loaded.model(x).shape == (2, 3)
    assert load_model("small_cnn_tiny").spec == "mechlens:small_cnn_tiny"  # bare registry names


def test_unknown_names_suggest_the_right_library():
    with pytest.raises(ValueError, match=r"timm:resnet18.*|torchvision:resnet18"):
        load_model("resnet18")
    with pytest.raises(ValueError, match="timm:resnet18"):
        load_model("timm:resnet81")
    with pytest.raises(ValueError, match="torchvision:resnet18"):
        load_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="small_cnn"):
        load_model("mechlens:small_ccn")


def test_timm_model_with_random_weights_and_data_config():
    loaded = load_model("timm:resnet18", num_classes=7)
    pre = loaded.preprocessing
    assert pre.source == "timm data config"
    assert pre.input_size == (3, 224, 224) and pre.interpolation == "bicubic"
    assert pre.mean == pytest.approx((0.485, 0.456, 0.406)) and pre.crop_pct == pytest.approx(0.95)
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 64, 64)).shape == (1, 7)


def test_torchvision_model_preprocessing_from_weights_meta_without_download():
    loaded = load_model("torchvision:resnet18")
    pre = loaded.preprocessing
    assert "IMAGENET1K" in pre.source
    assert pre.input_size == (3, 224, 224) and pre.interpolation == "bilinear"
    assert pre.crop_pct == pytest.approx(224 / 256)
    assert pre.std == pytest.approx((0.229, 0.224, 0.225))


def test_preprocessing_overrides_and_transform():
    loaded = load_model("timm:resnet18", input_size=96, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                        interpolation="bilinear")
    pre = loaded.preprocessing
    assert pre.input_size == (3, 96, 96) and "overrides" in pre.source
    from PIL import Image

    image = Image.new("RGB", (200, 150), (255, 128, 0))
    out = pre.transform()(image)
    assert out.shape == (3, 96, 96)
    assert out[0].mean().item() == pytest.approx((1.0 - 0.5) / 0.25, abs=1e-3)
    raw = pre.transform(normalize=False)(image)
    assert torch.allclose(pre.normalize(raw), out, atol=1e-6)
    assert torch.allclose(pre.denormalize(out), raw, atol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        pre.normalize(torch.rand(2, 1, 8, 8))
    with pytest.raises(ValueError, match="one value per channel"):
        Preprocessing((3, 8, 8), (0.5, 0.5), (1.0,))


@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18"])
def test_pretrained_offline_fails_fast_and_plainly(spec: str):
    host = "https://huggingface.co" if spec.startswith("timm") else "https://download.pytorch.org"
    if _unreachable(host) is None:
        pytest.skip("network reachable: the offline error cannot be exercised here")
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsUnavailableError) as info:
        load_model(spec, pretrained=True)
    message = str(info.value)
    assert "offline" in message and "could not be downloaded" in message
    assert "weights=PATH" in message and "pretrained=False" in message
    assert time.perf_counter() - start < 15  # no minute of download retries
    with pytest.raises(PretrainedWeightsUnavailableError, match="no downloadable pretrained"):
        load_model("mechlens:small_cnn", pretrained=True)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_weights_file_round_trip(tmp_path: Path, suffix: str):
    source = load_model("small_cnn_tiny", seed=1).model
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        from mechlens.models import save_weights

        save_weights(source, path)
    else:  # a DDP-style checkpoint: wrapped and prefixed
        torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, path)
    fresh = load_model("small_cnn_tiny", seed=2)
    assert not torch.equal(fresh.model.head.weight, source.head.weight)
    loaded = load_model("small_cnn_tiny", seed=2, weights=path)
    assert loaded.weights == str(path)
    x = torch.rand(3, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), source.eval()(x))


def test_weights_file_errors_are_actionable(tmp_path: Path):
    path = tmp_path / "ten.safetensors"
    from mechlens.models import save_weights

    save_weights(small_cnn(10, width=8, blocks_per_stage=1), path)
    with pytest.raises(ValueError, match=r"head.weight: file \(10, 64\) vs model \(5, 64\).*num_classes"):
        load_model("small_cnn_tiny", weights=path)
    pickled = tmp_path / "module.pt"
    torch.save(small_cnn(5), pickled)  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match="refuses to unpickle.*convert it once to safetensors"):
        load_model("small_cnn", weights=pickled)
    with pytest.raises(FileNotFoundError):
        load_model("small_cnn", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="is a file"):
        load_model(str(path))


def test_user_factory_spec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "my_models_pkg.py").write_text(textwrap.dedent("""
        from torch import nn

        def tiny(num_classes=4):
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, num_classes))

        def tiny_with_preprocessing(num_classes=4):
            return tiny(num_classes)

        tiny_with_preprocessing.mechlens_preprocessing = {
            "input_size": [3, 40, 40], "mean": [0.1], "std": [0.2]}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    loaded = load_model("my_models_pkg:tiny", num_classes=6)
    assert loaded.source == "module" and loaded.model(torch.rand(1, 3, 16, 16)).shape == (1, 6)
    assert "default" in loaded.preprocessing.source
    declared = load_model("my_models_pkg:tiny_with_preprocessing").preprocessing
    assert declared.input_size == (3, 40, 40) and declared.mean == (0.1, 0.1, 0.1)
    with pytest.raises(ValueError, match="tiny"):
        load_model("my_models_pkg:tinny")
    with pytest.raises(ValueError, match="cannot import"):
        load_model("no_such_pkg_xyz.models:tiny")
    with pytest.raises(ValueError, match="pretrained"):
        load_model("my_models_pkg:tiny", pretrained=True)
    sys.modules.pop("my_models_pkg", None)


def test_registry_and_list_models():
    assert {"small_cnn", "small_cnn_tiny", "small_cnn_wide"} <= set(list_models("small_cnn*"))
    assert list_models("nothing_like_this*") == []
    assert "timm:resnet18" in list_models("resnet1*", source="timm")
    assert "torchvision:resnet18" in list_models("resnet1*", source="torchvision")

    @register_model("test_only_linear", input_size=(1, 4, 4), mean=(0.0,), std=(1.0,))
    def _factory(num_classes: int = 2) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(16, num_classes))

    try:
        loaded = load_model("mechlens:test_only_linear", num_classes=3)
        assert loaded.preprocessing.input_size == (1, 4, 4)
        assert loaded.model(torch.rand(2, 1, 4, 4)).shape == (2, 3)
        with pytest.raises(ValueError, match="already registered"):
            register_model("test_only_linear", _factory)
    finally:
        _REGISTRY.pop("test_only_linear", None)


# ---------------------------------------------------------------------------- layers
def test_glob_semantics_are_per_segment():
    assert match_layer_pattern("stage1.*", "stage1.0")
    assert not match_layer_pattern("stage1.*", "stage1.0.conv")
    assert match_layer_pattern("stage1.**", "stage1") and match_layer_pattern("stage1.**", "stage1.0.conv")
    assert match_layer_pattern("**.bn", "stage2.1.bn") and not match_layer_pattern("**.bn", "stage2.1.conv")
    assert match_layer_pattern("stage[12].?.relu", "stage2.0.relu")


def test_resolve_layers_expands_globs_in_order_without_duplicates():
    model = small_cnn(5)
    assert resolve_layers(model, "stage*") == ["stage1", "stage2", "stage3"]
    assert resolve_layers(model, ["stage2.*", "stage2.0"]) == ["stage2.0", "stage2.1"]
    assert resolve_layers(model, ["head", "stage1.*.bn"]) == ["head", "stage1.0.bn", "stage1.1.bn"]
    assert len(resolve_layers(model, "**.relu")) == 7
    assert set(resolve_layers(model, "stage3.**")) == {n for n in layer_names(model) if n.startswith("stage3")}


def test_unknown_layer_error_lists_close_names():
    model = small_cnn(5)
    with pytest.raises(LayerNotFoundError) as info:
        resolve_layers(model, ["stage1", "stage3.1.bnn"])
    assert "stage3.1.bn" in str(info.value) and "Top-level layers: stem, stage1" in str(info.value)
    with pytest.raises(LayerNotFoundError, match=r"pattern 'stages\.\*' matches no layer.*stage"):
        resolve_layers(model, "stages.*")
    with pytest.raises(ValueError, match="empty"):
        resolve_layers(model, [])


def test_timm_resnet_and_vit_layer_globs_and_token_shapes():
    resnet = load_model("timm:resnet18").model
    assert resolve_layers(resnet, "layer4.*") == ["layer4.0", "layer4.1"]
    vit = load_model("timm:vit_tiny_patch16_224").model
    mlps = resolve_layers(vit, "blocks.*.mlp")
    assert mlps == [f"blocks.{k}.mlp" for k in range(12)]
    infos = layer_shapes(vit, (3, 224, 224), ["blocks.0.mlp", "patch_embed", "head"])
    shapes = {i.name: i.output_shape for i in infos}
    assert shapes == {"blocks.0.mlp": (1, 197, 192), "patch_embed": (1, 196, 192), "head": (1, 1000)}


class _TupleModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.unused = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        out, _ = self.attn(h, h, h)
        return out


def test_layer_shapes_handles_tuples_unused_modules_and_restores_state():
    model = _TupleModel().train()
    infos = {i.name: i for i in layer_shapes(model, (5, 8), batch_size=2)}
    assert infos["attn"].output_shape == ((2, 5, 8), (2, 5, 5))
    assert infos["unused"].calls == 0 and infos["unused"].output_shape is None
    assert infos["proj"].num_params == 72 and infos["attn"].type == "MultiheadAttention"
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    with pytest.raises(RuntimeError, match="input_size"):
        layer_shapes(model, (5, 7))
    assert all(not m._forward_hooks for m in model.modules()) and model.training


def test_small_cnn_family_shapes():
    shapes = {i.name: i.output_shape for i in layer_shapes(small_cnn(5), (3, 64, 64), "stage*")}
    assert shapes == {"stage1": (1, 32, 16, 16), "stage2": (1, 64, 8, 8), "stage3": (1, 128, 4, 4)}
    wide = load_model("small_cnn_32", width=8).model
    assert layer_shapes(wide, (3, 32, 32), "stem")[0].output_shape == (1, 8, 32, 32)
    with pytest.raises(ValueError, match="positive integer"):
        small_cnn(5, width=0)


# ---------------------------------------------------------------------------- CLI
def _run_cli(*argv: str) -> str:
    from mechlens.cli import layers as layers_cli

    parser = argparse.ArgumentParser()
    layers_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["layers", *argv])
    out = io.StringIO()
    assert args.handler(args, out) == 0
    return out.getvalue()


def test_cli_layers_table():
    text = _run_cli("mechlens:small_cnn_tiny", "--filter", "stage*", "--filter", "head")
    lines = text.splitlines()
    assert lines[0].startswith("mechlens:small_cnn_tiny  (SmallCNN, 24,973 parameters, input [3, 64, 64]")
    rows = {line.split()[0]: line for line in lines[3:-1]}
    assert list(rows) == ["stage1", "stage2", "stage3", "head"]
    assert "Sequential" in rows["stage2"] and "[32, 8, 8]" in rows["stage2"]
    assert "[5]" in rows["head"] and rows["head"].rstrip().endswith("325")
    assert lines[-1].startswith("4 layers")


def test_cli_layers_custom_input_size_repeated_calls_and_errors():
    text = _run_cli("torchvision:resnet18", "--input-size", "3", "64", "64", "--filter", "layer1.0.relu")
    assert "[64, 16, 16]  x2 calls" in text
    with pytest.raises(LayerNotFoundError, match="layer4"):
        _run_cli("timm:resnet18", "--filter", "layer5.*")
