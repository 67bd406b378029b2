"""Issue 15, items 4 and 6: never silently do the wrong thing with faults and bad input.

Non-finite model outputs are refused by attribution and capture unless explicitly allowed (then
counted); every JSON file the project writes is strict JSON; errors keep their cause (disk full)
and say in one line what to do (pickle weights, unknown store layer).
"""
from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from activation_store import ActivationStore, StoreWriter
from activation_store.jsonutil import dumps, json_safe
from mechlens.attribution import NonFiniteError, attribute
from mechlens.capture import capture_to_store
from mechlens.cli import main
from mechlens.data import SyntheticShapes
from mechlens.models import load_model, save_weights


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def strict_loads(text: str):
    """``json.loads`` that refuses NaN / Infinity (as every other JSON parser does)."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


class NaNLogits(nn.Module):
    """A tiny CNN whose logits are NaN (its gradient w.r.t. the input stays finite)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.relu(self.conv(x)).mean(dim=(2, 3))) + float("nan")


class NaNAtBaseline(nn.Module):
    """Finite everywhere except at the all-zeros input (0/0): IG's baseline value is NaN while its
    map stays finite, so only the completeness check can notice."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        norm = x.flatten(1).abs().sum(dim=1, keepdim=True)
        return self.fc(x.flatten(1)) * (norm / norm)


# ---------------------------------------------------------------------------- attribution
@pytest.mark.parametrize("method,kwargs", [
    ("saliency", {}), ("integrated_gradients", {"n_steps": 4}), ("gradcam", {"layer": "conv"}),
    ("smoothgrad", {"n_samples": 2}), ("occlusion", {"window": 4}),
])
def test_attribution_of_nan_outputs_is_an_error_unless_allowed(method, kwargs):
    model, x = NaNLogits(), torch.rand(2, 3, 8, 8)
    with pytest.raises(NonFiniteError) as caught:
        attribute(model, x, 1, method=method, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{method}: ") and "class:1" in message and "2 of 2 samples" in message
    assert "allow_nonfinite=True" in message and "--allow-nonfinite" in message
    result = attribute(model, x, 1, method=method, allow_nonfinite=True, **kwargs)
    assert result.extras["nonfinite_samples"] == 2
    assert result.summary()["nonfinite_samples"] == 2
    assert strict_loads(dumps(result.summary()))["feature_values"] == [None, None]


def test_ig_nan_completeness_is_no_longer_silent():
    model, x = NaNAtBaseline(), torch.rand(2, 3, 8, 8)
    with pytest.raises(NonFiniteError, match="integrated_gradients: the feature value at the baseline"):
        attribute(model, x, 0, method="ig", n_steps=4)
    result = attribute(model, x, 0, method="ig", n_steps=4, allow_nonfinite=True)
    assert torch.isfinite(result.map).all()  # the map alone looks fine...
    assert torch.isnan(result.completeness_error).all()  # ...its completeness check does not
    assert result.extras["nonfinite_samples"] == 2


def test_finite_attributions_report_zero_nonfinite_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    result = attribute(model, torch.rand(2, 3, 8, 8), 0, method="ig", n_steps=8)
    assert result.extras["nonfinite_samples"] == 0 and torch.isfinite(result.completeness_error).all()


@pytest.fixture(scope="module")
def nan_weights(tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("nan_attr")
    image = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    Image.fromarray(image).save(root / "img.png")
    loaded = load_model("mechlens:small_cnn_tiny")
    with torch.no_grad():
        loaded.model.head.weight.fill_(float("nan"))  # NaN logits, NaN gradients
    return root, root / "img.png", save_weights(loaded.model, root / "nan.safetensors")


def test_attribute_cli_refuses_nan_model_and_writes_strict_json_when_allowed(nan_weights, capsys):
    root, image, weights = nan_weights
    command = ["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--image", str(image),
               "--method", "saliency", "ig", "gradcam", "--steps", "4", "--target", "class:1"]
    assert main([*command, "--out", str(root / "refused")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or infinite" in err and "--allow-nonfinite" in err
    assert not (root / "refused" / "summary.json").exists()

    assert main([*command, "--out", str(root / "allowed"), "--allow-nonfinite"]) == 0
    assert "non-finite" in capsys.readouterr().err
    summary = strict_loads((root / "allowed" / "summary.json").read_text())
    assert summary["nonfinite_samples"] == {"saliency": 1, "integrated_gradients": 1, "gradcam": 1}
    ig = summary["methods"]["integrated_gradients"]
    assert ig["nonfinite_samples"] == 1 and ig["feature_values"] == [None] and ig["per_image"][0]["nonfinite"]


# ---------------------------------------------------------------------------- strict JSON
def test_json_helper_writes_null_for_nonfinite_and_converts_arrays():
    value = {"a": float("nan"), "b": [1.0, float("inf")], "c": np.float32(np.nan), "d": np.arange(2),
             "e": torch.tensor([0.5, float("-inf")]), "f": (np.int64(3), True, None, "x")}
    assert json_safe(value) == {"a": None, "b": [1.0, None], "c": None, "d": [0, 1], "e": [0.5, None],
                                "f": [3, True, None, "x"]}
    assert strict_loads(dumps(value, indent=1))["e"] == [0.5, None]


def test_no_json_dumps_in_the_packages_can_write_nan():
    """Every json.dump(s) in mechlens/ and activation_store/ goes through the strict helper, except
    where only values that cannot be NaN are written (manifests, fingerprints, configs)."""
    repo = Path(__file__).resolve().parents[2]
    allowed = {
        "activation_store/jsonutil.py",  # the helper itself
        "activation_store/manifest.py",  # store manifests: names, counts, checksums, the caller's cursor
        "activation_store/reader.py",  # statistics cache: moments of finite rows only
        "mechlens/models/shapes.py",  # hashes a recipe, writes nothing
        "mechlens/cli/capture.py",  # counts and rounded timings
        "mechlens/experiments.py",  # the configuration the user gave
    }
    offenders = []
    for package in ("mechlens", "activation_store"):
        for path in sorted((repo / package).rglob("*.py")):
            rel = path.relative_to(repo).as_posix()
            text = path.read_text()
            if rel not in allowed and ("json.dumps(" in text or "json.dump(" in text):
                offenders.append(rel)
    assert offenders == []


# ---------------------------------------------------------------------------- capture
class _PoisonChannel0(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        poison = torch.zeros_like(x)
        poison[:, 0] = float("nan")
        return x + poison


class NaNChannel(nn.Module):
    """Channel 0 of the layer ``feat`` is NaN for every image."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), _PoisonChannel0())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feat(x)


@pytest.fixture(scope="module")
def shapes() -> SyntheticShapes:
    return SyntheticShapes(num_samples=12, image_size=16, seed=2)


def test_capture_of_nan_activations_is_an_error_by_default(tmp_path, shapes):
    with pytest.raises(ValueError) as caught:
        capture_to_store(NaNChannel(), shapes, tmp_path / "s", layers="feat", spatial="mean", batch_size=4,
                         num_workers=0, progress=False)
    message = str(caught.value)
    assert "\n" not in message
    assert "'feat'" in message and "NaN or Inf" in message and "sample ids 0, 1, 2, 3" in message
    assert "nonfinite='count'" in message and "--allow-nonfinite" in message
    assert ActivationStore(tmp_path / "s")["feat"].num_rows == 0  # nothing of the bad batch was written


def test_capture_counts_nan_rows_when_allowed(tmp_path, shapes):
    result = capture_to_store(NaNChannel(), shapes, tmp_path / "s", layers="feat", spatial="mean", batch_size=5,
                              num_workers=0, progress=False, nonfinite="count")
    assert result.nonfinite_rows == {"feat": 12} and result.rows == {"feat": 12}
    assert ActivationStore(tmp_path / "s").info().layers[0].nonfinite_rows == 12  # the store agrees


def test_finite_capture_reports_zero_nonfinite_rows(tmp_path, shapes):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1))
    result = capture_to_store(model, shapes, tmp_path / "s", layers="0", spatial="mean", batch_size=5,
                              num_workers=0, progress=False)
    assert result.nonfinite_rows == {"0": 0}


def test_capture_cli_allow_nonfinite_switch_and_summary(tmp_path, capsys):
    loaded = load_model("mechlens:small_cnn_tiny")
    first_conv = next(p for p in loaded.model.parameters() if p.dim() == 4)
    with torch.no_grad():
        first_conv.fill_(float("nan"))  # every activation downstream is NaN
    weights = save_weights(loaded.model, tmp_path / "nan.safetensors")
    command = ["capture", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--layers", "stage1",
               "--data", "synthetic:shapes?n=6", "--spatial", "mean", "--batch-size", "3", "--workers", "0",
               "--no-progress"]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN or Inf" in err and "--allow-nonfinite" in err
    assert main([*command, "--out", str(tmp_path / "kept"), "--allow-nonfinite", "--json"]) == 0
    summary = strict_loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["nonfinite_rows"] == {"stage1": 6}


# ---------------------------------------------------------------------------- causes kept
def _disk_full(monkeypatch):
    from activation_store import backends

    def write_chunk(self, layer, chunk, data, index, rows):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"seg-000000.zarr/{layer}")

    for cls in (backends._ZarrSegmentWriter, backends._Hdf5SegmentWriter):
        monkeypatch.setattr(cls, "write_chunk", write_chunk)


def test_disk_full_in_the_background_writer_names_the_cause(tmp_path, monkeypatch):
    _disk_full(monkeypatch)
    writer = StoreWriter(tmp_path / "s", model="m", layers={"a": 4})
    writer.write({"a": np.ones((3, 4), np.float16)}, sample_ids=np.arange(3))
    with pytest.raises(Exception) as caught:
        writer.flush()
    message = str(caught.value)
    assert "No space left on device" in message and "[Errno 28]" in message and "\n" not in message
    assert "rows committed before the failure are intact" in message
    with pytest.raises(Exception, match="No space left on device"):
        writer.close()


def test_disk_full_during_capture_cli_prints_the_cause_once(tmp_path, monkeypatch, capsys):
    _disk_full(monkeypatch)
    code = main(["capture", "--model", "mechlens:small_cnn_tiny", "--layers", "stage1", "--data",
                 "synthetic:shapes?n=6", "--spatial", "mean", "--batch-size", "3", "--workers", "0", "--no-progress",
                 "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.count("No space left on device") == 1


def test_pickle_weights_are_refused_in_one_line_pointing_to_safetensors(tmp_path, capsys):
    pickled = tmp_path / "W.pt"
    torch.save(load_model("mechlens:small_cnn_tiny").model, pickled)  # a whole pickled module
    with pytest.raises(ValueError) as caught:
        load_model("mechlens:small_cnn_tiny", weights=pickled)
    message = str(caught.value)
    assert "\n" not in message and "st.save_file" in message and "W.safetensors" in message and "trust" in message
    code = main(["attribute", "--model", "mechlens:small_cnn_tiny", "--weights", str(pickled), "--image", "x.png",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "safetensors" in err
    assert "add_safe_globals" not in err and "Weights only load failed" not in err
    assert "weights_only=False" not in err.split("python -c")[0]  # only inside the conversion command


def test_pickle_conversion_command_works(tmp_path):
    pickled = tmp_path / "W.pt"
    torch.save(load_model("mechlens:small_cnn_tiny").model, pickled)
    with pytest.raises(ValueError) as caught:
        load_model("mechlens:small_cnn_tiny", weights=pickled)
    code = str(caught.value).split("python -c ")[1].split(" and pass")[0].strip('"')
    exec(code, {})  # what the user would run, for a file they trust
    assert load_model("mechlens:small_cnn_tiny", weights=tmp_path / "W.safetensors") is not None


# ---------------------------------------------------------------------------- CLI error lines
@pytest.fixture()
def tiny_store(tmp_path) -> Path:
    with StoreWriter(tmp_path / "store", model="m", layers={"stage3": 4, "stage2": 2}) as writer:
        writer.write({"stage3": np.ones((2, 4), np.float16), "stage2": np.ones((2, 2), np.float16)},
                     sample_ids=np.arange(2))
    return tmp_path / "store"


def test_store_verify_unknown_layer_is_one_readable_line(tiny_store, capsys):
    assert main(["store", "verify", str(tiny_store), "--layer", "stage33", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("mechlens store: error: layer 'stage33' is not in the store")
    assert "did you mean" in err and "'stage3'" in err  # not just the KeyError's repr "'stage33'"


def test_cli_error_line_appends_the_cause_and_collapses_newlines():
    from mechlens.cli import error_line

    try:
        try:
            raise OSError(errno.EACCES, "Permission denied", "/x/y")
        except OSError as inner:
            raise RuntimeError("could not write\nthe report") from inner
    except RuntimeError as outer:
        line = error_line(outer)
    assert line == "could not write the report (cause: PermissionError: [Errno 13] Permission denied: '/x/y')"
    assert error_line(KeyError("layer 'x' is not here")) == "layer 'x' is not here"


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_flag_before_or_after_the_command_reraises(tiny_store, where):
    command = ["store", "verify", str(tiny_store), "--layer", "stage33", "--no-progress"]
    argv = ["--debug", *command] if where == "before" else [*command, "--debug"]
    with pytest.raises(KeyError):
        main(argv)


def test_debug_before_a_command_with_its_own_debug_flag(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["--debug", "attribute", "--model", "mechlens:small_cnn_tiny", "--image", str(tmp_path / "none.png"),
              "--method", "saliency", "--out", str(tmp_path / "o")])
