"""Capture jobs into the store: values, spatial modes, resume, distributed ranks, bad input, CLI."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from activation_store import ActivationStore
from activation_store.errors import IncompatibleStoreError
from mechlens.capture import LayerNotFiredError, capture_to_store, random_positions
from mechlens.data import SyntheticShapes
from mechlens.models import load_model

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return load_model("mechlens:small_cnn_tiny")


@pytest.fixture(scope="module")
def shapes() -> SyntheticShapes:
    return SyntheticShapes(num_samples=40, image_size=64, seed=1)


def rows_by_key(store_path: Path, layer: str) -> dict[tuple[int, int], np.ndarray]:
    view = ActivationStore(store_path)[layer]
    data = view.read_rows(np.arange(view.shape[0]))
    index = view.read_index()
    keys = list(zip(index.sample_id.tolist(), index.position.tolist()))
    assert len(set(keys)) == len(keys), "a (sample, position) pair was written twice"
    return dict(zip(keys, data))


def test_all_positions_match_a_direct_forward(tmp_path, tiny, shapes):
    result = capture_to_store(tiny, shapes, tmp_path / "s", layers=["stage2", "stage3"], batch_size=16,
                              num_workers=0, progress=False)
    assert result.complete and result.images_captured == 40 and result.early_stop
    images = shapes.render(range(40))
    acts = {}
    hooks = [getattr(tiny.model, n).register_forward_hook(lambda m, a, o, n=n: acts.__setitem__(n, o.clone()))
             for n in ("stage2", "stage3")]
    with torch.no_grad():
        tiny.model(tiny.preprocessing.normalize(images))
    for h in hooks:
        h.remove()
    store = ActivationStore(tmp_path / "s")
    for name in ("stage2", "stage3"):
        b, c, h, w = acts[name].shape
        view = store[name]
        assert view.shape == (b * h * w, c)
        index = view.read_index()
        expected = acts[name].permute(0, 2, 3, 1).reshape(-1, c)  # dataset order, position y*W+x
        order = np.lexsort((index.position, index.sample_id))
        got = view.read_rows(order)
        np.testing.assert_allclose(got, expected.numpy(), rtol=2e-3, atol=2e-3)  # float16 storage
        assert np.array_equal(index.sample_id[order], np.repeat(np.arange(b), h * w))
        assert np.array_equal(index.label[order], np.repeat(shapes.labels[:40], h * w))
        meta = {info.name: info.meta for info in store.info().layers}[name]
        assert meta["spatial_shape"] == [h, w] and meta["spatial"] == "all" and meta["layout"] == "nchw"


def test_pooled_and_random_modes(tmp_path, tiny, shapes):
    mean = capture_to_store(tiny, shapes, tmp_path / "mean", layers="stage3", spatial="mean", num_workers=0,
                            progress=False, dtype="float32")
    rnd = capture_to_store(tiny, shapes, tmp_path / "rnd", layers="stage3", spatial="random", k=5, seed=7,
                           num_workers=0, progress=False, dtype="float32", batch_size=7)
    full = capture_to_store(tiny, shapes, tmp_path / "all", layers="stage3", num_workers=0, progress=False,
                            dtype="float32")
    assert mean.rows["stage3"] == 40 and rnd.rows["stage3"] == 200 and full.rows["stage3"] == 40 * 16
    every = rows_by_key(tmp_path / "all", "stage3")
    pooled = rows_by_key(tmp_path / "mean", "stage3")
    for sample in (0, 17, 39):
        stack = np.stack([every[(sample, p)] for p in range(16)])
        np.testing.assert_allclose(pooled[(sample, -1)], stack.mean(0), rtol=1e-5, atol=1e-5)
    picked = rows_by_key(tmp_path / "rnd", "stage3")
    expected_positions = random_positions(np.arange(40), 16, 5, seed=7)
    for sample in range(40):
        positions = sorted(p for s, p in picked if s == sample)
        assert positions == expected_positions[sample].tolist() and len(set(positions)) == 5
        for p in positions:
            np.testing.assert_array_equal(picked[(sample, p)], every[(sample, p)])
    # the positions depend on the seed, not on the batch an image fell into
    assert not np.array_equal(random_positions(np.arange(40), 16, 5, seed=8), expected_positions)


def test_cls_and_token_maps_of_a_vit(tmp_path):
    import timm

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, num_classes=3).eval()
    data = SyntheticShapes(num_samples=6, image_size=32, seed=0)
    cls = capture_to_store(vit, data, tmp_path / "cls", layers="blocks.1", spatial="cls", num_workers=0,
                           progress=False, dtype="float32")
    tokens = capture_to_store(vit, data, tmp_path / "tok", layers="blocks.1", num_workers=0, progress=False,
                              dtype="float32")
    assert cls.rows["blocks.1"] == 6 and tokens.rows["blocks.1"] == 6 * 5  # CLS + 2x2 patches
    every = rows_by_key(tmp_path / "tok", "blocks.1")
    first = rows_by_key(tmp_path / "cls", "blocks.1")
    for sample in range(6):
        np.testing.assert_array_equal(first[(sample, 0)], every[(sample, 0)])
    with pytest.raises(ValueError, match="needs token maps"):
        capture_to_store(load_model("mechlens:small_cnn_tiny"), data, tmp_path / "bad", layers="stage1",
                         spatial="cls", num_workers=0, progress=False, on_size_mismatch="resize")


class _Interrupting(torch.utils.data.Dataset):
    """Raises KeyboardInterrupt when item ``at`` is read (Ctrl-C in the middle of a job)."""

    def __init__(self, base, at: int) -> None:
        self.base, self.at = base, at

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.at:
            raise KeyboardInterrupt
        return self.base[i]


def test_interrupted_job_resumes_to_the_same_rows(tmp_path, tiny, shapes):
    reference = capture_to_store(tiny, shapes, tmp_path / "ref", layers=["stage2", "stage3"], batch_size=8,
                                 num_workers=0, progress=False)
    with pytest.raises(KeyboardInterrupt):
        capture_to_store(tiny, _Interrupting(shapes, 21), tmp_path / "s", layers=["stage2", "stage3"],
                         batch_size=8, num_workers=0, progress=False)
    partial = ActivationStore(tmp_path / "s")
    assert partial["stage3"].shape[0] == 16 * 16  # two whole batches of 8 images committed
    resumed = capture_to_store(tiny, shapes, tmp_path / "s", layers=["stage2", "stage3"], batch_size=8,
                               num_workers=0, progress=False)
    assert resumed.images_before == 16 and resumed.images_captured == 24 and resumed.complete
    for layer in ("stage2", "stage3"):
        got, want = rows_by_key(tmp_path / "s", layer), rows_by_key(tmp_path / "ref", layer)
        assert got.keys() == want.keys()
        assert all(np.array_equal(got[key], want[key]) for key in want)
    again = capture_to_store(tiny, shapes, tmp_path / "s", layers=["stage2", "stage3"], num_workers=0, progress=False)
    assert again.images_captured == 0 and ActivationStore(tmp_path / "s")["stage3"].shape[0] == 40 * 16
    assert reference.rows == {"stage2": 40 * 64, "stage3": 40 * 16}


def _committed_rows(out: Path, layer: str) -> int:
    manifest = out / "shards" / "rank-00000" / "manifest.json"
    try:
        segments = json.loads(manifest.read_text())["segments"]
    except (OSError, ValueError, KeyError):
        return 0
    return sum(seg["layers"].get(layer, {}).get("rows", 0) for seg in segments)


def test_sigterm_then_rerun_of_the_cli_resumes(tmp_path):
    out = tmp_path / "s"
    # --commit-every 512rows: a commit after every batch (32 images x 16 positions), whatever the
    # machine's speed; the signal follows the first commit (an event), not a guessed delay
    command = [str(BIN / "mechlens"), "capture", "--model", "mechlens:small_cnn_tiny", "--layers", "stage3",
               "--data", "synthetic:shapes?n=3000&size=64", "--out", str(out), "--batch-size", "32",
               "--workers", "0", "--no-progress", "--json", "--commit-every", "512rows"]
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while _committed_rows(out, "stage3") == 0 and job.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert job.poll() is None, "the capture ended before its first commit was seen"
    job.send_signal(signal.SIGTERM)
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err  # interrupted, not finished
    committed = ActivationStore(out)["stage3"].shape[0]
    assert committed > 0 and committed % (32 * 16) == 0  # whole batches only
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["images_before"] == committed // 16
    assert summary["images_before"] + summary["images_captured"] == 3000
    index = ActivationStore(out)["stage3"].read_index()
    ids, counts = np.unique(index.sample_id, return_counts=True)
    assert np.array_equal(ids, np.arange(3000)) and set(counts.tolist()) == {16}


def test_torchrun_two_gloo_ranks_match_a_single_process_run(tmp_path):
    common = ["--model", "mechlens:small_cnn_tiny", "--layers", "stage2", "stage3", "--data",
              "synthetic:shapes?n=50&size=64", "--spatial", "random", "--k", "3", "--workers", "0",
              "--no-progress", "--dtype", "float32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([str(BIN / "mechlens"), "capture", *common, "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr
    multi = subprocess.run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m", "mechlens",
                            "capture", *common, "--out", str(tmp_path / "two")],
                           capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    shards = sorted(p.name for p in (tmp_path / "two" / "shards").iterdir())
    assert shards == ["rank-00000", "rank-00001"]
    for layer in ("stage2", "stage3"):
        one, two = rows_by_key(tmp_path / "one", layer), rows_by_key(tmp_path / "two", layer)
        assert one.keys() == two.keys() and len(one) == 150
        assert all(np.allclose(one[key], two[key], atol=1e-5) for key in one)


# ----------------------------------------------------------------------------- bad input
class _WithUnusedBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.unused = nn.Conv2d(4, 4, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_layer_that_never_fires_is_an_error_before_anything_is_written(tmp_path, shapes):
    with pytest.raises(LayerNotFiredError, match="unused"):
        capture_to_store(_WithUnusedBranch(), shapes, tmp_path / "s", layers=["conv", "unused"], num_workers=0,
                         progress=False)
    assert not (tmp_path / "s").exists()


def test_empty_dataset_and_wrong_size_are_clear_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="empty|size 0"):
        capture_to_store(tiny, torch.utils.data.TensorDataset(torch.zeros(0, 3, 64, 64)), tmp_path / "e",
                         layers="stage3", num_workers=0, progress=False)
    small = SyntheticShapes(num_samples=8, image_size=32, seed=0)
    with pytest.raises(ValueError, match="32x32 but the model expects 64x64"):
        capture_to_store(tiny, small, tmp_path / "w", layers="stage3", num_workers=0, progress=False)
    assert not (tmp_path / "w").exists()
    resized = capture_to_store(tiny, small, tmp_path / "r", layers="stage3", num_workers=0, progress=False,
                               on_size_mismatch="resize")
    assert resized.rows["stage3"] == 8 * 16


def test_resume_with_another_model_or_layer_set_is_refused_and_keeps_rows(tmp_path, tiny, shapes):
    capture_to_store(tiny, shapes, tmp_path / "s", layers="stage3", num_workers=0, progress=False)
    before = rows_by_key(tmp_path / "s", "stage3")
    other = load_model("mechlens:small_cnn_tiny", seed=123)  # same architecture, other weights
    with pytest.raises(IncompatibleStoreError, match="model is"):
        capture_to_store(other, shapes, tmp_path / "s", layers="stage3", num_workers=0, progress=False)
    with pytest.raises(IncompatibleStoreError, match="layer set differs"):
        capture_to_store(tiny, shapes, tmp_path / "s", layers=["stage2", "stage3"], num_workers=0, progress=False)
    with pytest.raises(IncompatibleStoreError, match="written with"):
        capture_to_store(tiny, shapes, tmp_path / "s", layers="stage3", spatial="mean", num_workers=0, progress=False)
    after = rows_by_key(tmp_path / "s", "stage3")
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)


def _image_folder(root: Path, n: int = 6) -> Path:
    from PIL import Image

    data = SyntheticShapes(num_samples=n, image_size=64, seed=2)
    for i in range(n):
        folder = root / data.class_names[int(data.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        array = (data[i][0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
        Image.fromarray(array).save(folder / f"img{i}.jpg", quality=95)
    return root


def test_unreadable_images_are_skipped_and_counted_or_stop_the_job(tmp_path, tiny):
    root = _image_folder(tmp_path / "imgs")
    victim = sorted(root.rglob("*.jpg"))[2]
    raw = victim.read_bytes()
    victim.write_bytes(raw[: len(raw) // 2])  # header intact (passes the scan), pixels truncated
    (root / next(iter(os.listdir(root))) / "notes.jpg").write_bytes(b"not an image")
    result = capture_to_store(tiny, f"folder:{root}", tmp_path / "s", layers="stage3", num_workers=0,
                              progress=False, batch_size=4)
    # the garbage file is left out when the folder is scanned; the truncated one when decoded
    assert [s.sample_id for s in result.skipped] == [2] and "truncated" in result.skipped[0].reason
    assert [Path(f.path).name for f in result.files_skipped] == ["notes.jpg"]  # counted, not lost
    index = ActivationStore(tmp_path / "s")["stage3"].read_index()
    assert sorted(set(index.sample_id.tolist())) == [0, 1, 3, 4, 5]
    # on_unreadable='error' reaches the folder scan too (it once only reached the decode step)
    with pytest.raises(OSError, match="notes.jpg"):
        capture_to_store(tiny, f"folder:{root}", tmp_path / "s2", layers="stage3", num_workers=0,
                         progress=False, on_unreadable="error")
    (root / next(iter(os.listdir(root))) / "notes.jpg").unlink()
    with pytest.raises(OSError, match="truncated"):
        capture_to_store(tiny, f"folder:{root}", tmp_path / "s3", layers="stage3", num_workers=0,
                         progress=False, on_unreadable="error")
    assert not (tmp_path / "s2").exists()


def test_cli_image_folder_flags_reach_the_dataset(tmp_path, capsys):
    """--on-unreadable error and the absence of --resize are honoured for image folders."""
    from PIL import Image

    from mechlens.cli import main

    root = _image_folder(tmp_path / "imgs")
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    common = ["capture", "--model", "mechlens:small_cnn_tiny", "--layers", "stage3", "--spatial", "mean",
              "--workers", "0", "--no-progress", "--batch-size", "4"]
    assert main(common + ["--data", str(root), "--out", str(tmp_path / "a"), "--on-unreadable", "error"]) == 2
    assert "corrupt.jpg" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    # skipping is the default, and the skipped file is counted in the summary
    assert main(common + ["--data", str(root), "--out", str(tmp_path / "b"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["skipped"] == 1 and summary["rows"] == {"stage3": 6}
    (first_class / "corrupt.jpg").unlink()
    # mixed sizes: the small_cnn_tiny input is 64 px; an 80 px image is an error without --resize
    Image.new("RGB", (80, 80), (10, 200, 10)).save(first_class / "big.jpg")
    assert main(common + ["--data", str(root), "--out", str(tmp_path / "c")]) == 2
    assert "big.jpg is 80x80" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()
    assert main(common + ["--data", str(root), "--out", str(tmp_path / "d"), "--resize", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["files_resized"] == 1 and summary["rows"] == {"stage3": 7}
    # a spec that contradicts a flag is refused rather than one of them silently winning
    assert main(common + ["--data", f"folder:{root}?on_size_mismatch=skip", "--out", str(tmp_path / "e"),
                          "--resize"]) == 2
    assert "say it once" in capsys.readouterr().err


def test_cli_capture_with_workers(tmp_path):
    from mechlens.cli import main

    out = tmp_path / "s"
    code = main(["capture", "--model", "mechlens:small_cnn_tiny", "--layers", "stage*", "--data",
                 "synthetic:shapes?n=24", "--out", str(out), "--spatial", "max", "--workers", "2",
                 "--batch-size", "5", "--no-progress"])
    assert code == 0
    store = ActivationStore(out)
    assert sorted(info.name for info in store.info().layers) == ["stage1", "stage2", "stage3"]
    assert all(store[n].shape[0] == 24 for n in ("stage1", "stage2", "stage3"))
    assert main(["capture", "--model", "mechlens:small_cnn_tiny", "--layers", "nope", "--data", "digits",
                 "--out", str(tmp_path / "x")]) == 2


def test_capture_overhead_benchmark_quick_prints_its_json_line():
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "capture_overhead.py"), "--quick"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "capture_overhead"
    assert line["figures"]["rows"] == {"layer3": 8 * 16, "layer4": 8 * 4}
    assert line["ratios"]["capture_vs_plain_time"] > 0


def test_a_slow_machine_writes_the_same_store_and_trains_the_same_sae(tmp_path, tiny, shapes, monkeypatch):
    """Segment boundaries come from the rows, not the clock: a capture on a machine whose clock runs
    100 s per writer call (a very slow machine) writes the same bytes, so the same seed trains the
    same SAE. (With the old 10 s time trigger the slow run committed after every batch.)"""
    import activation_store.writer as writer_module
    from mechlens.sae import TopKConfig, TrainConfig, train_sae

    kwargs = dict(layers="stage2", spatial="all", dtype="float32", num_workers=0, progress=False, batch_size=4,
                  chunk_bytes=4096, commit_every=writer_module.CommitPolicy(bytes=40_000))
    capture_to_store(tiny, shapes, tmp_path / "fast", **kwargs)
    clock = iter(range(0, 10**9, 100))
    monkeypatch.setattr(writer_module.time, "monotonic", lambda: float(next(clock)))
    capture_to_store(tiny, shapes, tmp_path / "slow", **kwargs)
    monkeypatch.undo()

    def contents(root: Path) -> dict[str, object]:
        files = {}
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            relative = str(path.relative_to(root))
            if path.name in ("store.json", "manifest.json"):  # equal but for their timestamps
                data = json.loads(path.read_text())
                data.pop("created", None), data.pop("updated", None)
                files[relative] = data
            else:
                files[relative] = path.read_bytes()
        return files

    fast, slow = contents(tmp_path / "fast"), contents(tmp_path / "slow")
    assert fast.keys() == slow.keys() and fast == slow
    assert len(ActivationStore(tmp_path / "fast").info().shards[0].rows) and \
        ActivationStore(tmp_path / "fast").info().shards[0].segments > 1  # several commits, at the same rows
    train = TrainConfig(steps=20, batch_size=64, lr=3e-3, device="cpu", seed=3)
    a, b = (train_sae(tmp_path / name, "stage2", TopKConfig(width=32, k=4), train, progress=False).sae
            for name in ("fast", "slow"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
