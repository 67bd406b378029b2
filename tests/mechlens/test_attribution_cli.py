"""``mechlens attribute`` end to end: images in, overlays (PNG) and a JSON summary out."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mechlens.cli import main
from mechlens.data.synthetic import SyntheticShapes
from mechlens.models import load_model, save_weights


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, list[str], Path]:
    root = tmp_path_factory.mktemp("attr_cli")
    data = SyntheticShapes(num_samples=2, image_size=64, seed=3)
    paths = []
    for i in range(2):
        array = (data[i][0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        path = root / f"shape{i}.png"
        Image.fromarray(array).save(path)
        paths.append(str(path))
    loaded = load_model("mechlens:small_cnn_tiny")
    with torch.no_grad():
        torch.nn.init.normal_(loaded.model.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    weights = save_weights(loaded.model, root / "tiny.safetensors")
    return root, paths, weights


def test_attribute_cli_writes_pngs_and_json(setup, capsys) -> None:
    root, paths, weights = setup
    out = root / "out"
    code = main([
        "attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", *paths,
        "--method", "gradcam", "ig", "smoothgrad", "--target", "class:3", "--layer", "stage2",
        "--steps", "32", "--samples", "4", "--out", str(out), "--save-maps",
    ])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target"] == "class:3" and summary["layer"] == "stage2" and summary["input_shape"] == [2, 3, 64, 64]
    assert set(summary["methods"]) == {"gradcam", "integrated_gradients", "smoothgrad"}
    ig = summary["methods"]["integrated_gradients"]
    assert ig["shape"] == [2, 3, 64, 64] and ig["feature"] == "class:3"
    assert len(ig["completeness_error"]) == 2 and max(ig["completeness_error"]) < 0.05
    assert all("completeness_error" in row for row in ig["per_image"])
    cam = summary["methods"]["gradcam"]
    assert cam["shape"] == [2, 8, 8] and cam["min"] >= 0 and cam["max"] > 0
    for stem in ("00_shape0", "01_shape1"):
        for suffix in ("gradcam", "integrated_gradients", "smoothgrad", "methods"):
            png = out / f"{stem}_{suffix}.png"
            assert png.read_bytes()[:4] == b"\x89PNG", png
    from safetensors.torch import load_file

    maps = load_file(str(out / "maps.safetensors"))
    assert maps["gradcam"].shape == (2, 8, 8)
    # the JSON describes the raw map that was saved
    assert abs(float(maps["gradcam"].max()) - cam["max"]) < 1e-6
    assert "wrote" in capsys.readouterr().out


def test_attribute_cli_channel_target_and_default_layer(setup) -> None:
    root, paths, weights = setup
    out = root / "channel"
    assert main(["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", paths[0],
                 "--method", "saliency", "scorecam", "--target", "channel:stage2:3", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layer"] == "stage3"  # the last spatial stage, chosen for the CAM
    assert summary["methods"]["saliency"]["feature"] == "channel:stage2:3"
    assert (out / "shape0_scorecam.png").exists() and (out / "shape0_methods.png").exists()


def test_attribute_cli_sae_latent_target(setup) -> None:
    sae_module = pytest.importorskip("mechlens.sae")
    root, paths, weights = setup
    sae = sae_module.create_sae("relu", width=16, d_in=16, layer="stage1")  # small_cnn_tiny: stage1 has 16 channels
    sae_dir = sae.save(root / "sae")
    out = root / "sae_out"
    assert main(["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", paths[0],
                 "--method", "ig", "--steps", "16", "--target", f"sae:{sae_dir}:5", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["methods"]["integrated_gradients"]["feature"] == f"sae:{sae_dir}:5"


def test_attribute_cli_errors_are_one_readable_line(setup, capsys) -> None:
    root, paths, _ = setup
    code = main(["attribute", "--model", "mechlens:small_cnn_tiny", "--image", paths[0], "--method", "gradcma",
                 "--out", str(root / "bad")])
    assert code == 2
    err = capsys.readouterr().err
    assert "unknown attribution method 'gradcma'" in err and "Did you mean gradcam" in err
    assert main(["attribute", "--model", "mechlens:small_cnn_tiny", "--image", str(root / "missing.png"),
                 "--out", str(root / "bad")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_attribute_cli_multilayer_cam_takes_layers_and_cam(setup) -> None:
    root, paths, weights = setup
    out = root / "multilayer"
    assert main(["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", paths[0],
                 "--method", "multilayer_cam", "saliency", "--layers", "stage2", "stage3", "--cam", "layercam",
                 "--out", str(out), "--save-maps"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == ["stage2", "stage3"] and summary["layer"] is None
    assert summary["methods"]["multilayer_cam"]["shape"] == [1, 64, 64]  # fused at input resolution
    assert (out / "shape0_multilayer_cam.png").exists()
    # one layer: the layer of the one-layer CAMs and the single layer multilayer_cam fuses
    one = root / "multilayer_one"
    assert main(["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", paths[0],
                 "--method", "multilayer_cam", "gradcam", "--layer", "stage3", "--out", str(one)]) == 0
    summary = json.loads((one / "summary.json").read_text())
    assert summary["layer"] == "stage3" and summary["layers"] == ["stage3"]


@pytest.mark.parametrize("extra,message", [
    (["--method", "multilayer_cam"], "multilayer_cam fuses the CAMs of several layers: pass --layers L1 L2"),
    (["--method", "saliency", "--layers", "stage2", "stage3"], "none of the methods saliency takes a layer"),
    (["--method", "saliency", "--layer", "stage2"], "none of the methods saliency takes a layer"),
    (["--method", "gradcam", "multilayer_cam", "--layers", "stage2", "stage3"], "gradcam takes one --layer"),
    (["--method", "gradcam", "--cam", "layercam"], "--cam names the CAM that multilayer_cam fuses"),
    (["--method", "multilayer_cam", "--layers", "stage2", "--cam", "saliency"], "'saliency' is not one"),
])
def test_attribute_cli_layer_errors_are_one_line(setup, capsys, extra, message) -> None:
    root, paths, _ = setup
    code = main(["attribute", "--model", "mechlens:small_cnn_tiny", "--image", paths[0], *extra, "--out", str(root / "bad")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (root / "bad").exists()
