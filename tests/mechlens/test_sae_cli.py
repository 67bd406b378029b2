"""``mechlens sae train|eval|stats`` end to end on a tiny store."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from activation_store import LayerSpec, StoreWriter
from mechlens.cli import main
from mechlens.sae import SAE
from mechlens.sae.stats import FeatureStatistics


# The SAEs here are tiny: one intra-op thread is as fast on an idle machine and immune to the
# OpenMP barrier stalls of two threads on two shared cores (measured on the project's 2-core
# machine with one other busy process: 0.8 s vs 13-45 s for the same 150-step training).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    """Per-position rows of ``stage1`` of a small random CNN on 48 synthetic 32x32 images."""
    from mechlens.capture import capture
    from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig
    from mechlens.features import as_position_rows
    from mechlens.models import save_checkpoint, small_cnn

    root = tmp_path_factory.mktemp("sae-cli")
    model = small_cnn(num_classes=5, width=8, seed=0).eval()
    save_checkpoint(root / "model", model, spec="mechlens:small_cnn", model_kwargs={"num_classes": 5, "width": 8})
    data = SyntheticShapes(SyntheticShapesConfig(num_samples=48, image_size=32, seed=0))
    with torch.no_grad(), capture(model, ["stage1"]) as cap:
        model(data.render(np.arange(48)))
    rows, spatial = as_position_rows(cap["stage1"], "nchw")
    b, p, c = rows.shape
    meta = {"spatial": "all", "layout": "nchw", "spatial_shape": list(spatial)}
    with StoreWriter(root / "store", model="mechlens:small_cnn", layers={"stage1": LayerSpec(c, "float16", meta=meta)}) as w:
        w.write({"stage1": rows.reshape(b * p, c).numpy().astype(np.float16)}, sample_ids=np.repeat(np.arange(b), p),
                positions=np.tile(np.arange(p), b), labels=np.repeat(data.labels, p))
    return root


def test_cli_train_eval_stats_end_to_end(tiny_store, tmp_path, capsys):
    store, out = str(tiny_store / "store"), tmp_path / "sae"
    args = ["sae", "train", "--store", store, "--layer", "stage1", "--arch", "topk", "--width", "32", "--k", "2,6",
            "--steps", "40", "--batch-size", "256", "--lr", "3e-3", "--out", str(out), "--no-progress",
            "--log", str(tmp_path / "log.jsonl"), "--log-every", "10", "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained 2 SAE(s) for 40 steps" in printed
    dirs = sorted(p for p in out.iterdir())
    assert [d.name for d in dirs] == ["topk-w32-k2", "topk-w32-k6"]
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 8 and {r["sae"] for r in log} == {0, 1}
    sae = SAE.load(dirs[1])
    assert sae.config.layer == "stage1" and sae.config.pooling == "all" and sae.config.layout == "nchw"

    plot = tmp_path / "fvu_l0.png"
    args = ["sae", "eval", *map(str, dirs), "--store", store, "--model", str(tiny_store / "model"),
            "--data", "synthetic:shapes?n=24&size=32&split=test", "--samples", "24", "--plot", str(plot), "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["l0"] for r in report] == [pytest.approx(2.0), pytest.approx(6.0)]
    assert report[1]["fvu"] < report[0]["fvu"] < 1.0
    assert report[0]["spliced"]["samples"] == 24 and report[0]["spliced"]["kl"] >= 0
    assert plot.read_bytes()[:4] == b"\x89PNG"

    assert main(["sae", "stats", str(dirs[1]), "--store", store, "--top-k", "4", "--no-progress"]) == 0
    assert "feature statistics of 32 latents over 3,072 rows" in capsys.readouterr().out
    stats = FeatureStatistics.load(dirs[1])
    assert stats.top_rows.shape == (32, 4) and stats.distinct_samples
    assert 5.0 < stats.frequency.sum() <= 6.0  # k=6 latents per row (fewer where a kept pre-activation is < 0)


def test_cli_errors_are_one_readable_line(tiny_store, tmp_path, capsys):
    store = str(tiny_store / "store")
    base = ["sae", "train", "--store", store, "--out", str(tmp_path / "x"), "--steps", "5", "--no-progress"]
    assert main([*base, "--layer", "stage9"]) == 2
    assert "layer 'stage9' is not in the store" in capsys.readouterr().err
    assert main([*base, "--layer", "stage1", "--width", "16", "--k", "32"]) == 2
    assert "k=32 is larger than the width 16" in capsys.readouterr().err
    assert main(["sae", "eval", str(tmp_path / "nothing"), "--store", store]) == 2
    assert "is not a saved SAE" in capsys.readouterr().err


def test_cli_rerun_after_a_kill_needs_resume_and_resumes(tiny_store, tmp_path, capsys):
    """The README's recipe: a killed `sae train` is rerun with --resume; without it the rerun is refused
    (it once restarted from scratch, silently). Checkpoints are written every 1000 steps by default."""
    from mechlens.sae import TopKConfig, TrainConfig, train_sae

    store, ckpt = str(tiny_store / "store"), tmp_path / "ck"
    assert TrainConfig().checkpoint_every == 1000
    # the state a kill at step 7 leaves behind
    train_sae(store, "stage1", TopKConfig(width=32, k=2), TrainConfig(steps=12, batch_size=256, lr=3e-3, device="cpu",
                                                                       checkpoint_every=1000),
              checkpoint_dir=ckpt, until_step=7, progress=False)
    args = ["sae", "train", "--store", store, "--layer", "stage1", "--arch", "topk", "--width", "32", "--k", "2",
            "--steps", "12", "--batch-size", "256", "--lr", "3e-3", "--out", str(tmp_path / "sae"), "--no-progress",
            "--device", "cpu", "--checkpoint-dir", str(ckpt)]
    assert main(args) == 2
    assert "pass resume=True (--resume)" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "for 12 steps" in capsys.readouterr().out
