"""Datasets: synthetic shapes (determinism, artefact, metadata), digits, skimage, image folders."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Subset

from mechlens.data import (
    DigitsDataset,
    ImageFolderDataset,
    SkimagePhotos,
    SyntheticShapes,
    SyntheticShapesConfig,
    UnreadableImageError,
    build_dataset,
    check_nonempty,
)


def small(**kw) -> SyntheticShapes:
    base = dict(num_samples=200, image_size=32, seed=3)
    base.update(kw)
    return SyntheticShapes(**base)


# ---------------------------------------------------------------------------- determinism
def test_same_seed_and_index_give_identical_images_in_any_batch_or_order():
    a = small(cache=False)
    b = small(cache=True)
    single = torch.stack([a[i][0] for i in (7, 150, 0)])
    batched = a.render([150, 3, 7, 0])
    assert torch.equal(single[0], batched[2])
    assert torch.equal(single[1], batched[0])
    assert torch.equal(single[2], batched[3])
    # A second dataset object (cached this time) and a much larger dataset give the same pixels.
    assert torch.equal(b.render([7, 150, 0]), single)
    bigger = SyntheticShapes(num_samples=5000, image_size=32, seed=3)
    assert torch.equal(bigger.render([7, 150, 0]), single)


def test_seed_and_split_change_the_images():
    base = small().render(range(10))
    assert not torch.equal(base, small(seed=4).render(range(10)))
    assert not torch.equal(base, small(split="test").render(range(10)))


def test_images_are_valid_and_quantised_to_8_bits():
    images = small().render(range(50))
    assert images.shape == (50, 3, 32, 32) and images.dtype == torch.float32
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(torch.round(images * 255) / 255, images)
    assert images.std(dim=(1, 2, 3)).min() > 0.02  # never a blank image


def test_labels_are_balanced_and_items_are_pairs():
    ds = small(num_samples=100)
    counts = np.bincount(ds.labels, minlength=5)
    assert counts.tolist() == [20] * 5
    image, label = ds[13]
    assert image.shape == (3, 32, 32) and label == 13 % 5


def test_dataloader_uses_batched_getitems():
    ds = small(num_samples=64)
    batch = next(iter(DataLoader(ds, batch_size=16, shuffle=False)))
    assert batch[0].shape == (16, 3, 32, 32)
    assert torch.equal(batch[0], ds.render(range(16)))
    assert batch[1].tolist() == ds.labels[:16].tolist()


def test_classes_are_not_separable_by_mean_colour():
    """Colour is drawn independently of the class: a linear model on the mean RGB of each image
    must stay near chance (0.2), far below what the shapes allow (>0.95 with the CNN)."""
    from sklearn.linear_model import LogisticRegression

    ds = SyntheticShapes(num_samples=1500, image_size=32, seed=0)
    feats = ds.render(range(1500)).mean(dim=(2, 3)).numpy()
    clf = LogisticRegression(max_iter=2000).fit(feats[:1000], ds.labels[:1000])
    assert clf.score(feats[1000:], ds.labels[1000:]) < 0.35


# ---------------------------------------------------------------------------- artefact
def test_artefact_frequency_matches_the_requested_probability():
    p = 0.3
    ds = SyntheticShapes(num_samples=5000, image_size=32, artefact_class="triangle",
                         artefact_probability=p, artefact_other_probability=0.05)
    assert ds.config.artefact_class == 2
    target = ds.labels == 2
    n = int(target.sum())
    rate = ds.has_artefact[target].mean()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n)  # within 4 binomial standard errors
    other = ds.has_artefact[~target].mean()
    assert abs(other - 0.05) < 4 * math.sqrt(0.05 * 0.95 / (~target).sum())
    assert not SyntheticShapes(num_samples=500, image_size=32).has_artefact.any()


def test_counterfactual_twins_differ_only_inside_the_artefact_box():
    ds = SyntheticShapes(num_samples=40, image_size=64, artefact_class=1, artefact_probability=1.0)
    idx = list(range(40))
    with_art = ds.with_artefact(True).render(idx)
    without = ds.with_artefact(False).render(idx)
    assert torch.equal(ds.with_artefact(None).render(idx), ds.render(idx))
    boxes = torch.from_numpy(ds.with_artefact(True).artefact_masks(idx).numpy())
    diff = (with_art - without).abs().amax(dim=1) > 0
    assert not (diff & ~boxes).any(), "pixels outside the artefact box changed"
    assert (diff & boxes).float().sum(dim=(1, 2)).min() > 0.5 * boxes.float().sum(dim=(1, 2)).min()
    # As configured, exactly the squares carry it.
    assert ds.has_artefact.tolist() == (ds.labels == 1).tolist()


def test_ruler_has_a_light_bar_with_dark_ticks_in_a_corner():
    ds = SyntheticShapes(num_samples=10, image_size=64, force_artefact=True, noise_std=(0.0, 0.0))
    img = ds.render([0])[0]
    x0, y0, x1, y1 = ds.artefact_box[0]
    s = 64
    assert (x0 < s / 4 or x1 > 3 * s / 4) and (y0 < s / 4 or y1 > 3 * s / 4)  # in a corner
    patch = img[:, y0:y1, x0:x1]
    lum = patch.mean(0)
    assert (lum > 0.75).float().mean() > 0.4  # cream bar
    tick_columns = (lum[0] < 0.15).nonzero().flatten()  # ticks start at the top edge
    assert len(tick_columns) >= 5
    assert torch.diff(tick_columns).unique().numel() == 1  # evenly spaced


def test_auto_corner_keeps_the_artefact_off_the_object():
    ds = SyntheticShapes(num_samples=300, image_size=64, force_artefact=True)
    a = ds.artefact_box.astype(float)
    o = ds.object_box.astype(float)
    ix = np.clip(np.minimum(a[:, 2], o[:, 2]) - np.maximum(a[:, 0], o[:, 0]), 0, None)
    iy = np.clip(np.minimum(a[:, 3], o[:, 3]) - np.maximum(a[:, 1], o[:, 1]), 0, None)
    overlap = ix * iy / ((a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1]))
    assert np.mean(overlap > 0.25) < 0.02


def test_object_masks_lie_in_the_object_boxes_and_cover_them():
    ds = small(num_samples=50, image_size=64)
    masks = ds.object_masks(range(50))
    assert masks.shape == (50, 64, 64)
    for i in range(50):
        ys, xs = masks[i].nonzero(as_tuple=True)
        x0, y0, x1, y1 = ds.object_box[i]
        assert len(xs) > 50
        assert xs.min() >= math.floor(x0) - 1 and xs.max() <= math.ceil(x1)
        assert ys.min() >= math.floor(y0) - 1 and ys.max() <= math.ceil(y1)
        # the mask fills a good part of its box (shapes are not slivers)
        assert len(xs) / ((x1 - x0) * (y1 - y0)) > 0.35
    info = ds.info(3)
    assert info.label == 3 and info.class_name == "stripes" and not info.has_artefact


def test_config_validation_and_round_trip():
    with pytest.raises(ValueError, match="size 0"):
        SyntheticShapesConfig(num_samples=0)
    with pytest.raises(ValueError, match="circle"):
        SyntheticShapesConfig(classes=("circel", "square"))
    with pytest.raises(ValueError, match="artefact_class"):
        SyntheticShapesConfig(artefact_probability=0.5)
    cfg = SyntheticShapesConfig(num_samples=10, classes=("square", "stripes"), artefact_class="stripes",
                                artefact_probability=0.5)
    assert cfg.artefact_class == 1
    assert SyntheticShapesConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(IndexError):
        SyntheticShapes(cfg)[10]


# ---------------------------------------------------------------------------- adapters
def test_digits_are_upsampled_three_channel_images_with_disjoint_splits():
    train = DigitsDataset(image_size=16, split="train")
    test = DigitsDataset(image_size=16, split="test")
    assert len(train) + len(test) == 1797 and abs(len(test) - 449) <= 1
    image, label = test[0]
    assert image.shape == (3, 16, 16) and 0 <= image.min() and image.max() <= 1 and image.max() > 0.5
    assert set(np.unique(train.labels)) == set(range(10))
    assert len(DigitsDataset(image_size=8, channels=1)[0][0]) == 1


def test_skimage_photos_by_name():
    ds = SkimagePhotos(["astronaut", "camera"], image_size=48)
    assert len(ds) == 2 and ds.class_names == ["astronaut", "camera"]
    assert ds[1][0].shape == (3, 48, 48)  # grey image repeated to 3 channels
    assert torch.equal(ds[1][0][0], ds[1][0][2])
    with pytest.raises(ValueError, match="coffee"):
        SkimagePhotos(["cofee"])
    with pytest.raises(ValueError, match="download"):
        SkimagePhotos(["lily"])


def _write_png(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size[1], size[0]), colour).save(path)


@pytest.fixture()
def image_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    for k in range(3):
        _write_png(root / "cats" / f"c{k}.png", (20, 24), (200, 10, 10))
        _write_png(root / "dogs" / f"d{k}.png", (20, 24), (10, 10, 200))
    _write_png(root / "dogs" / "big.png", (40, 30), (10, 200, 10))  # wrong size
    (root / "cats" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    (root / "cats" / "notes.txt").write_text("not an image, ignored by extension")
    return root


def test_image_folder_skips_and_counts_unreadable_files(image_folder: Path):
    ds = ImageFolderDataset(image_folder, on_size_mismatch="resize")
    assert ds.class_names == ["cats", "dogs"]
    assert len(ds) == 7 and ds.num_skipped == 1
    assert ds.skipped[0].path.endswith("broken.png") and "unreadable" in ds.skipped[0].reason
    assert ds.image_size == (20, 24)  # the most common size
    assert ds.resized == [str(image_folder / "dogs" / "big.png")]
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.shape == (7, 3, 20, 24)
    assert ds[0][1] == 0 and abs(float(ds[0][0][0].mean()) - 200 / 255) < 1e-6
    with pytest.raises(UnreadableImageError, match="broken.png"):
        ImageFolderDataset(image_folder, on_unreadable="error")


def test_image_folder_size_policies(image_folder: Path):
    with pytest.raises(ValueError, match=r"big.png is 40x30"):
        ImageFolderDataset(image_folder)  # the default: another size is an error, never a silent resize
    skipping = ImageFolderDataset(image_folder, on_size_mismatch="skip")
    assert len(skipping) == 6 and skipping.num_skipped == 2
    resized = ImageFolderDataset(image_folder, image_size=16, on_size_mismatch="resize")
    assert resized[0][0].shape == (3, 16, 16)


def test_image_folder_empty_cases(tmp_path: Path):
    with pytest.raises(FileNotFoundError):
        ImageFolderDataset(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolderDataset(tmp_path)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(ValueError, match=r"size 0.*|1 unreadable"):
        ImageFolderDataset(tmp_path)


def test_build_dataset_specs(image_folder: Path):
    ds = build_dataset("synthetic:shapes?n=20&size=32&seed=5&artefact_class=square&artefact_p=1&split=val")
    assert isinstance(ds, SyntheticShapes)
    assert (ds.config.num_samples, ds.config.image_size, ds.config.seed, ds.config.split) == (20, 32, 5, "val")
    assert ds.has_artefact.tolist() == (ds.labels == 1).tolist()
    assert build_dataset("synthetic:shapes?classes=circle,square&n=4").class_names == ["circle", "square"]
    assert len(build_dataset("digits?split=test&size=12")) == len(DigitsDataset(split="test"))
    assert build_dataset("skimage:coffee,chelsea?size=32")[0][0].shape == (3, 32, 32)
    assert len(build_dataset(str(image_folder), on_size_mismatch="resize")) == 7
    assert len(build_dataset(f"folder:{image_folder}?on_size_mismatch=skip")) == 6
    with pytest.raises(ValueError, match="big.png is 40x30"):
        build_dataset(str(image_folder))
    with pytest.raises(ValueError, match="say it once"):
        build_dataset(f"folder:{image_folder}?on_size_mismatch=skip", on_size_mismatch="error")
    with pytest.raises(UnreadableImageError, match="broken.png"):
        build_dataset(str(image_folder), on_unreadable="error", on_size_mismatch="resize")
    assert build_dataset(str(image_folder), image_size=(20, 24), on_size_mismatch="skip").image_size == (20, 24)
    with pytest.raises(ValueError, match="non-square"):
        build_dataset("digits", image_size=(20, 24))
    with pytest.raises(ValueError, match="allowed: .*artefact_p"):
        build_dataset("synthetic:shapes?artefact_prob=0.5")
    with pytest.raises(ValueError, match="cannot understand"):
        build_dataset("imagenet")
    with pytest.raises(ValueError, match="size 0"):
        check_nonempty(Subset(small(), []))
