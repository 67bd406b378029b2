"""CaptureConfig: typed, JSON round trip, unknown keys refused, the existing value checks, the
keyword form of ``capture_to_store`` equal to the config form, the config in the store's
provenance, and ``mechlens capture --config``."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activation_store import ActivationStore, CommitPolicy
from mechlens.capture import CaptureConfig, capture_to_store
from mechlens.models import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("mechlens:small_cnn_tiny")


@pytest.fixture(scope="module")
def shapes() -> str:
    return "synthetic:shapes?n=24&size=64"  # a spec string: the job builds the dataset


def _store_rows(path: Path) -> dict[str, tuple[np.ndarray, ...]]:
    store = ActivationStore(path)
    out = {}
    for info in store.info().layers:
        view = store[info.name]
        index = view.read_index()
        out[info.name] = (view.read_rows(np.arange(view.shape[0])), index.sample_id, index.position, index.label)
    return out


def _assert_same_rows(a: Path, b: Path) -> None:
    rows_a, rows_b = _store_rows(a), _store_rows(b)
    assert rows_a.keys() == rows_b.keys() and rows_a
    for name in rows_a:
        for x, y in zip(rows_a[name], rows_b[name]):
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), name


# ----------------------------------------------------------------------------- the config itself
def test_round_trip_through_dict_and_json():
    config = CaptureConfig(layers=["stage2", "stage3"], spatial="random", k=5, dtype="bfloat16", batch_size=7,
                           num_workers=0, device=torch.device("cpu"), autocast=None, channels_last=False,
                           normalize=False, on_size_mismatch="resize", on_unreadable="error", max_images=10,
                           seed=3, backend="hdf5", compression="zstd", chunk_bytes=1 << 20, nonfinite="count",
                           model_name="m", commit_every="5s,2000rows", layout={"stage2": "nchw"},
                           num_prefix_tokens=1, progress=False)
    assert config.layers == ("stage2", "stage3") and config.device == "cpu"
    assert config.commit_every == CommitPolicy(seconds=5.0, rows=2000, bytes=None)
    data = config.to_dict()
    assert data["commit_every"] == "5s,2000rows" and data["layers"] == ["stage2", "stage3"]
    assert json.loads(json.dumps(data)) == data  # plain JSON values
    assert CaptureConfig.from_dict(data) == config
    assert CaptureConfig.from_json(config.to_json()) == config
    assert CaptureConfig.from_json(config.to_json(indent=2)) == config
    default = CaptureConfig(layers="stage*")
    assert CaptureConfig.from_dict(default.to_dict()) == default
    assert CaptureConfig.from_dict({"layers": "stage*"}) == default  # missing keys take their defaults
    assert default.replace(k=3).k == 3 and default.k == 16


def test_unknown_keys_are_refused_in_one_line_naming_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown capture config key\(s\): 'batchsize' \(did you mean "
                                         r"'batch_size'\?\); valid: layers, spatial, k, ") as info:
        CaptureConfig.from_dict({"layers": ["stage2"], "batchsize": 8})
    assert "\n" not in str(info.value)
    with pytest.raises(TypeError, match="unknown capture option.*'sptial'.*valid: layers"):
        CaptureConfig(layers="stage2").replace(sptial="mean")


@pytest.mark.parametrize("changes, message", [
    ({"spatial": "middle"}, "spatial must be one of all, mean, max, cls, random, got 'middle'"),
    ({"spatial": "random", "k": 0}, "spatial='random' needs k >= 1 positions per image, got 0"),
    ({"dtype": "int8"}, "dtype must be one of float16, bfloat16, float32, got 'int8'"),
    ({"on_size_mismatch": "crop"}, "on_size_mismatch must be 'error' or 'resize', got 'crop'"),
    ({"on_unreadable": "ignore"}, "on_unreadable must be 'skip' or 'error', got 'ignore'"),
    ({"batch_size": 0}, "batch_size must be >= 1, got 0"),
    ({"nonfinite": "drop"}, "nonfinite must be 'error' or 'count', got 'drop'"),
    ({"autocast": "fp8"}, "autocast must be 'auto', 'bf16', 'fp16' or None, got 'fp8'"),
    ({"max_images": 0}, "max_images must be >= 1, got 0"),
    ({"commit_every": "5 parsecs"}, "cannot read commit spec"),
])
def test_bad_values_are_refused_with_the_existing_messages(changes, message, tmp_path, tiny, shapes):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CaptureConfig(layers="stage2", **changes)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        CaptureConfig.from_dict({"layers": "stage2", **changes})
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):  # the keyword form
        capture_to_store(tiny, shapes, tmp_path / "s", layers="stage2", progress=False, **changes)
    assert not (tmp_path / "s").exists()


def test_wrong_types_are_refused():
    with pytest.raises(TypeError, match="batch_size must be an integer, got '64'"):
        CaptureConfig.from_dict({"layers": "stage2", "batch_size": "64"})
    with pytest.raises(TypeError, match="progress must be true or false"):
        CaptureConfig(layers="stage2", progress="yes")
    with pytest.raises(TypeError, match="layers must be a layer name or a sequence of names"):
        CaptureConfig(layers=3)
    assert CaptureConfig(layers="stage2", k=np.int64(4)).k == 4


# ----------------------------------------------------------------------------- the job
def test_keyword_form_and_config_form_write_identical_stores(tmp_path, tiny, shapes):
    options = dict(layers=["stage2", "stage3"], spatial="random", k=3, seed=5, batch_size=5, num_workers=0,
                   progress=False, dtype="float32")
    capture_to_store(tiny, shapes, tmp_path / "kw", **options)
    config = CaptureConfig(**options)
    capture_to_store(tiny, shapes, tmp_path / "cfg", config)
    _assert_same_rows(tmp_path / "kw", tmp_path / "cfg")
    # keywords override the config's fields
    capture_to_store(tiny, shapes, tmp_path / "over", CaptureConfig(**{**options, "k": 9, "seed": 1}), k=3, seed=5)
    _assert_same_rows(tmp_path / "kw", tmp_path / "over")


def test_keywords_that_are_not_options_are_a_type_error(tmp_path, tiny, shapes):
    with pytest.raises(TypeError, match=r"unknown capture_to_store\(\) keyword\(s\): 'batchsize' \(did you mean "
                                        r"'batch_size'\?\); valid: layers, spatial"):
        capture_to_store(tiny, shapes, tmp_path / "s", layers="stage2", batchsize=4)
    with pytest.raises(TypeError, match="unknown capture option"):
        capture_to_store(tiny, shapes, tmp_path / "s", CaptureConfig(layers="stage2"), batchsize=4)
    with pytest.raises(TypeError, match="needs the layers to capture"):
        capture_to_store(tiny, shapes, tmp_path / "s", spatial="mean")
    with pytest.raises(TypeError, match="config must be a CaptureConfig, got dict"):
        capture_to_store(tiny, shapes, tmp_path / "s", {"layers": "stage2"})
    assert not (tmp_path / "s").exists()


def test_provenance_records_the_config_and_reruns_the_capture(tmp_path, tiny, shapes):
    config = CaptureConfig(layers=["stage3"], spatial="mean", batch_size=6, num_workers=0, progress=False,
                           commit_every="100rows", max_images=20)
    capture_to_store(tiny, shapes, tmp_path / "a", config)
    recorded = ActivationStore(tmp_path / "a").manifest.provenance["capture"]["config"]
    assert recorded == config.to_dict()
    again = CaptureConfig.from_dict(recorded)
    assert again == config
    capture_to_store(tiny, shapes, tmp_path / "b", again)
    _assert_same_rows(tmp_path / "a", tmp_path / "b")
    assert ActivationStore(tmp_path / "b")["stage3"].shape[0] == 20


# ----------------------------------------------------------------------------- the CLI
def test_cli_config_file_with_flags_on_top(tmp_path, capsys, tiny, shapes):
    from mechlens.cli import main

    data = "synthetic:shapes?n=12&size=64"
    base = ["capture", "--model", "mechlens:small_cnn_tiny", "--data", data, "--json"]
    config = CaptureConfig(layers=["stage2"], spatial="random", k=2, seed=4, batch_size=5, num_workers=0,
                           progress=False, dtype="float32")
    path = tmp_path / "capture.json"
    path.write_text(config.to_json(indent=2))
    assert main([*base, "--config", str(path), "--out", str(tmp_path / "file")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["rows"] == {"stage2": 24}
    recorded = ActivationStore(tmp_path / "file").manifest.provenance["capture"]["config"]
    assert CaptureConfig.from_dict(recorded) == config
    # the same capture from flags only
    flags = ["--layer", "stage2", "--spatial", "random", "--k", "2", "--seed", "4", "--batch-size", "5",
             "--workers", "0", "--no-progress", "--dtype", "float32"]
    assert main([*base, *flags, "--out", str(tmp_path / "flags")]) == 0
    capsys.readouterr()
    _assert_same_rows(tmp_path / "file", tmp_path / "flags")
    # explicit flags override the file (a value equal to CaptureConfig's default too: --k 16)
    assert main([*base, "--config", str(path), "--k", "16", "--spatial", "mean", "--layer", "stage3",
                 "--autocast", "none", "--out", str(tmp_path / "over")]) == 0
    capsys.readouterr()
    recorded = ActivationStore(tmp_path / "over").manifest.provenance["capture"]["config"]
    assert CaptureConfig.from_dict(recorded) == config.replace(k=16, spatial="mean", layers=("stage3",),
                                                               autocast=None)


def test_cli_config_errors_are_one_line(tmp_path, capsys):
    from mechlens.cli import main

    base = ["capture", "--model", "mechlens:small_cnn_tiny", "--data", "digits", "--out", str(tmp_path / "s")]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"layers": ["stage2"], "spatail": "mean"}))
    assert main([*base, "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"--config {bad}: unknown capture config key(s): 'spatail' (did you mean 'spatial'?)" in err
    assert err.count("\n") == 1
    assert main([*base, "--config", str(tmp_path / "missing.json")]) == 2
    assert "cannot read --config" in capsys.readouterr().err
    nolayers = tmp_path / "nolayers.json"
    nolayers.write_text("{}")
    assert main([*base, "--config", str(nolayers)]) == 2
    assert "no layers to capture" in capsys.readouterr().err
    assert main(base) == 2
    assert "no layers to capture" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
