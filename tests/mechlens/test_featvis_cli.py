"""``mechlens visualize`` / ``mechlens dream`` end to end, and the Lucent benchmark's --quick run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mechlens.cli import main

ROOT = Path(__file__).resolve().parents[2]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_visualize_writes_pngs_and_json(tmp_path, capsys) -> None:
    from PIL import Image

    out = tmp_path / "vis"
    code = main([
        "visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "channel:stage2:3", "class:1",
        "neuron:stage3:0:1,1", "--size", "32", "--steps", "3", "--batch-size", "2", "--tv", "0.1",
        "--out", str(out), "--json",
    ])
    assert code == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [f["png"] for f in printed["features"]] == [
        "000_channel_stage2_3.png", "001_class_1.png", "002_neuron_stage3_0_1_1.png"]
    report = json.loads((out / "featvis.json").read_text())
    assert [f["feature"] for f in report["features"]] == ["channel:stage2:3", "class:1", "neuron:stage3:0:1,1"]
    for entry in report["features"]:
        assert isinstance(entry["activation"], float) and len(entry["loss_curve"]["loss"]) == 3
        with Image.open(out / entry["png"]) as im:
            assert im.size == (32, 32)
    assert report["settings"]["regularizers"]["tv"] == 0.1


def test_dream_on_a_user_photo_writes_png_and_json(tmp_path, capsys) -> None:
    from PIL import Image

    from mechlens.featvis import load_image, save_png

    photo = save_png(load_image("skimage:chelsea", max_side=120), tmp_path / "cat.png")  # a user's file
    out = tmp_path / "dream.png"
    code = main(["dream", "--model", "mechlens:small_cnn_tiny", "--image", str(photo), "--layer", "stage2",
                 "--octaves", "2", "--steps", "2", "--out", str(out), "--json"])
    assert code == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with Image.open(out) as im, Image.open(photo) as original:
        assert im.size == original.size
    assert summary["tiles"] > 1 and len(summary["octave_sizes"]) == 2
    assert json.loads(out.with_suffix(".json").read_text())["objective_after"] == summary["objective_after"]


def test_cli_errors_are_one_line(tmp_path, capsys) -> None:
    code = main(["visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "chanel:stage2:3",
                 "--out", str(tmp_path / "x")])
    assert code == 2 and "unknown feature kind 'chanel'" in capsys.readouterr().err
    code = main(["dream", "--model", "mechlens:small_cnn_tiny", "--image", str(tmp_path / "missing.jpg"),
                 "--layer", "stage2", "--out", str(tmp_path / "d.png")])
    assert code == 2 and "no image file" in capsys.readouterr().err


def test_benchmark_quick_prints_one_json_line() -> None:
    pytest.importorskip("lucent")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "featvis_vs_lucent.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    last = json.loads(proc.stdout.strip().splitlines()[-1])
    assert last["benchmark"] == "featvis_vs_lucent"
    assert last["figures"]["lucent_s_per_step"] > 0 and last["figures"]["mechlens_s_per_step"] > 0
    assert set(last["ratios"]) >= {"mechlens_vs_lucent_time_per_step", "batched_vs_one_at_a_time_throughput"}
