"""Datasets from other sources, all yielding ``(image [C,H,W] float in [0,1], label)``.

* :class:`DigitsDataset`: scikit-learn's bundled 8x8 digits, upsampled, 1 or 3 channels.
* :class:`SkimagePhotos`: scikit-image's bundled sample images by name (astronaut, coffee...).
* :class:`ImageFolderDataset`: ``root/<class>/<image>`` folders, with counted skips of unreadable
  files and a policy for images of the wrong size.
* :func:`build_dataset`: one string spec for all of the above and :class:`SyntheticShapes`.

Every dataset here has ``class_names`` and ``labels`` (int64 numpy array) like
:class:`~mechlens.data.synthetic.SyntheticShapes`; an empty dataset is an error, never a silent
size-0 result.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence
from urllib.parse import parse_qsl

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig

__all__ = [
    "DigitsDataset",
    "SkimagePhotos",
    "SKIMAGE_IMAGES",
    "ImageFolderDataset",
    "SkippedFile",
    "UnreadableImageError",
    "IMAGE_EXTENSIONS",
    "build_dataset",
    "check_nonempty",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def check_nonempty(dataset: Dataset, what: str = "dataset") -> int:
    """``len(dataset)``, or a ``ValueError`` if it is 0 (or has no length)."""
    try:
        n = len(dataset)  # type: ignore[arg-type]
    except TypeError as error:
        raise TypeError(f"{what} must have a length (a map-style torch Dataset)") from error
    if n == 0:
        raise ValueError(f"{what} is empty (size 0); there is nothing to train on or capture")
    return n


def _resize_batch(images: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize ``[B,C,H,W]`` floats (antialiased when shrinking) and clamp to [0, 1]."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    antialias = mode in ("bilinear", "bicubic") and (images.shape[-2] > size[0] or images.shape[-1] > size[1])
    align = False if mode in ("bilinear", "bicubic") else None
    out = F.interpolate(images, size=size, mode=mode, align_corners=align, antialias=antialias)
    return out.clamp_(0.0, 1.0)


def _to_chw_float(array: np.ndarray, channels: int) -> torch.Tensor:
    """HxW / HxWxC uint8/bool/float array -> float tensor [channels, H, W] in [0, 1]."""
    if array.dtype == bool:
        x = array.astype(np.float32)
    elif np.issubdtype(array.dtype, np.integer):
        x = array.astype(np.float32) / float(np.iinfo(array.dtype).max)
    else:
        x = array.astype(np.float32)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0.0 or hi > 1.0:  # e.g. float phantoms: rescale to [0, 1]
            x = (x - lo) / max(hi - lo, 1e-12)
    if x.ndim == 2:
        x = x[:, :, None]
    if x.shape[2] == 4:  # RGBA: drop alpha
        x = x[:, :, :3]
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(2, 0, 1)
    if t.shape[0] == channels:
        return t
    if t.shape[0] == 1:
        return t.expand(channels, -1, -1).clone()
    if channels == 1:  # RGB -> luminance (ITU-R 601)
        weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
        return (t * weights).sum(0, keepdim=True)
    raise ValueError(f"cannot convert an image with {t.shape[0]} channels to {channels}")


def _resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Resize the shorter side to ``size`` then centre-crop to ``size x size``."""
    _, h, w = image.shape
    scale = size / min(h, w)
    new = (max(size, round(h * scale)), max(size, round(w * scale)))
    resized = _resize_batch(image[None], new)[0]
    top = (new[0] - size) // 2
    left = (new[1] - size) // 2
    return resized[:, top:top + size, left:left + size].contiguous()


# ---------------------------------------------------------------------------- sklearn digits
class DigitsDataset(Dataset):
    """scikit-learn's 1797 bundled 8x8 digit images (no download), upsampled to ``image_size``.

    ``split``: ``"all"``, or ``"train"``/``"test"`` from a random (not stratified) permutation
    seeded by ``seed`` with ``test_fraction`` of the images in the test split.
    """

    def __init__(
        self,
        *,
        image_size: int = 32,
        channels: int = 3,
        split: str = "all",
        test_fraction: float = 0.25,
        seed: int = 0,
    ) -> None:
        from sklearn.datasets import load_digits

        if split not in ("all", "train", "test"):
            raise ValueError(f"split must be 'all', 'train' or 'test', got {split!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 8:
            raise ValueError(f"image_size must be at least 8 (the native size), got {image_size}")
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        digits = load_digits()
        images = digits.images.astype(np.float32) / 16.0
        labels = digits.target.astype(np.int64)
        if split != "all":
            order = np.random.default_rng(seed).permutation(len(labels))
            n_test = int(round(test_fraction * len(labels)))
            keep = order[:n_test] if split == "test" else order[n_test:]
            keep.sort()
            images, labels = images[keep], labels[keep]
        x = torch.from_numpy(images)[:, None]
        x = _resize_batch(x, (image_size, image_size), "bilinear")
        self.images = x.expand(-1, channels, -1, -1).contiguous()
        self.labels = labels
        self.class_names = [str(k) for k in range(10)]
        self.split = split

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"DigitsDataset(n={len(self)}, image_shape={tuple(self.images.shape[1:])}, split={self.split!r})"


# ---------------------------------------------------------------------------- skimage photos
#: scikit-image sample images that ship inside the package (no download needed).
SKIMAGE_IMAGES: tuple[str, ...] = (
    "astronaut", "brick", "camera", "cat", "cell", "checkerboard", "chelsea", "clock", "coffee",
    "coins", "colorwheel", "grass", "gravel", "horse", "hubble_deep_field",
    "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina", "rocket",
    "shepp_logan_phantom", "text",
)


class SkimagePhotos(Dataset):
    """scikit-image's bundled sample images by name; label ``k`` is the k-th name.

    ``image_size``: resize the shorter side and centre-crop to a square (``None`` keeps native
    sizes, which then cannot be batched together). Grey images are repeated to 3 channels.
    """

    def __init__(self, names: Sequence[str] = ("astronaut", "coffee", "chelsea"), *,
                 image_size: int | None = 224, channels: int = 3) -> None:
        import skimage.data

        if isinstance(names, str):
            names = [n for n in names.split(",") if n]
        names = list(names)
        if not names:
            raise ValueError(f"no image names given; bundled images: {', '.join(SKIMAGE_IMAGES)}")
        images = []
        for name in names:
            if name not in SKIMAGE_IMAGES:
                close = difflib.get_close_matches(name, SKIMAGE_IMAGES, n=3, cutoff=0.5)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                needs_download = hasattr(skimage.data, name)
                why = (" It is not bundled with scikit-image (it needs a download, which does not "
                       "work offline)." if needs_download else "")
                raise ValueError(
                    f"unknown scikit-image sample {name!r}.{why}{hint} Bundled: {', '.join(SKIMAGE_IMAGES)}"
                )
            image = _to_chw_float(getattr(skimage.data, name)(), channels)
            if image_size is not None:
                image = _resize_center_crop(image, image_size)
            images.append(image)
        self.names = names
        self.class_names = list(names)
        self.images = images
        self.labels = np.arange(len(names), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"SkimagePhotos({self.names}, shapes={[tuple(i.shape) for i in self.images[:3]]})"


# ---------------------------------------------------------------------------- image folders
class UnreadableImageError(OSError):
    """An image file could not be decoded."""


@dataclass(frozen=True)
class SkippedFile:
    """A file left out of an :class:`ImageFolderDataset`, and why."""

    path: str
    reason: str


class ImageFolderDataset(Dataset):
    """Images in ``root/<class_name>/...`` (class subfolders, sorted; files at any depth below
    them; hidden files ignored; only ``extensions`` considered).

    Every candidate file is opened and verified when the dataset is built (header decode plus
    PIL's ``verify``). ``on_unreadable="skip"`` leaves unreadable files out and records them in
    :attr:`skipped`; ``"error"`` raises :class:`UnreadableImageError` naming them all.

    Size policy (``image_size`` an int or ``(H, W)``; ``None``: the most common size in the
    folder): ``"error"`` (default) raises at build time listing them, ``on_size_mismatch="resize"``
    resizes other sizes (recorded in :attr:`resized`), ``"skip"`` leaves them out (recorded in
    :attr:`skipped`). ``transform`` (a callable on a PIL image returning a tensor, e.g.
    ``Preprocessing.transform()``) replaces the size handling altogether.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        image_size: int | tuple[int, int] | None = None,
        channels: int = 3,
        on_unreadable: str = "skip",
        on_size_mismatch: str = "error",
        transform: Callable[[Any], torch.Tensor] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        from PIL import Image

        if on_unreadable not in ("skip", "error"):
            raise ValueError(f"on_unreadable must be 'skip' or 'error', got {on_unreadable!r}")
        if on_size_mismatch not in ("resize", "skip", "error"):
            raise ValueError(f"on_size_mismatch must be 'resize', 'skip' or 'error', got {on_size_mismatch!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        root = Path(root)
        if not root.is_dir():
            shown = str(root) if str(root).isprintable() else ascii(str(root))  # one-line message
            raise FileNotFoundError(f"image folder {shown} does not exist or is not a directory")
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ValueError(
                f"{root} has no class subfolders; expected {root}/<class_name>/<image files>"
            )
        exts = tuple(e.lower() for e in extensions)
        self.root = root
        self.class_names = [p.name for p in class_dirs]
        self.channels = channels
        self.transform = transform
        self.on_size_mismatch = on_size_mismatch
        self.on_unreadable = on_unreadable
        self.skipped: list[SkippedFile] = []
        self.resized: list[str] = []
        candidates: list[tuple[Path, int, tuple[int, int]]] = []
        for label, class_dir in enumerate(class_dirs):
            for path in sorted(class_dir.rglob("*")):
                if not path.is_file() or any(part.startswith(".") for part in path.relative_to(root).parts):
                    continue
                if path.suffix.lower() not in exts:
                    continue
                try:
                    with Image.open(path) as im:
                        width, height = im.size
                        im.verify()
                except Exception as error:  # noqa: BLE001 - PIL raises many types for bad files
                    self.skipped.append(SkippedFile(str(path), f"unreadable: {type(error).__name__}: {error}"))
                    continue
                candidates.append((path, label, (height, width)))
        if self.skipped and on_unreadable == "error":
            listing = "; ".join(f"{s.path} ({s.reason})" for s in self.skipped[:10])
            raise UnreadableImageError(
                f"{len(self.skipped)} unreadable image file(s) under {root}: {listing}"
                f"{' ...' if len(self.skipped) > 10 else ''}. Pass on_unreadable='skip' to leave them out."
            )
        if not candidates:
            extra = f" ({len(self.skipped)} unreadable file(s) skipped)" if self.skipped else ""
            raise ValueError(
                f"no readable images with extensions {', '.join(exts)} under {root}/<class>/{extra}: "
                "the dataset would have size 0"
            )
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is None and transform is None:
            sizes, counts = np.unique(np.array([c[2] for c in candidates]), axis=0, return_counts=True)
            image_size = tuple(int(v) for v in sizes[np.argmax(counts)])
        self.image_size: tuple[int, int] | None = tuple(image_size) if image_size is not None else None
        if self.image_size is not None and transform is None:
            wrong = [c for c in candidates if c[2] != self.image_size]
            if wrong and on_size_mismatch == "error":
                listing = "; ".join(f"{p} is {h}x{w}" for p, _, (h, w) in wrong[:10])
                raise ValueError(
                    f"{len(wrong)} image(s) under {root} are not {self.image_size[0]}x{self.image_size[1]} "
                    f"(HxW): {listing}{' ...' if len(wrong) > 10 else ''}. Pass on_size_mismatch='resize' "
                    "or 'skip', or image_size=..."
                )
            if wrong and on_size_mismatch == "skip":
                for p, _, (h, w) in wrong:
                    self.skipped.append(SkippedFile(str(p), f"size {h}x{w} != {self.image_size[0]}x{self.image_size[1]}"))
                candidates = [c for c in candidates if c[2] == self.image_size]
                if not candidates:
                    raise ValueError(f"every image under {root} has the wrong size; the dataset would be empty")
            if wrong and on_size_mismatch == "resize":
                self.resized = [str(p) for p, _, _ in wrong]
        self.samples: list[tuple[str, int]] = [(str(p), label) for p, label, _ in candidates]
        self.labels = np.array([label for _, label in self.samples], dtype=np.int64)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        path, label = self.samples[index]
        try:
            with Image.open(path) as im:
                im = im.convert("RGB" if self.channels == 3 else "L")
                if self.transform is not None:
                    return self.transform(im), label
                array = np.asarray(im)
        except (OSError, ValueError) as error:
            raise UnreadableImageError(
                f"could not decode {path} ({error}); it passed the header check when the dataset "
                "was built, so it is probably truncated"
            ) from error
        image = _to_chw_float(array, self.channels)
        if self.image_size is not None and tuple(image.shape[-2:]) != self.image_size:
            image = _resize_batch(image[None], self.image_size)[0]
        return image, label

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset({str(self.root)!r}, n={len(self)}, classes={len(self.class_names)}, "
            f"image_size={self.image_size}, skipped={len(self.skipped)}, resized={len(self.resized)})"
        )


# ---------------------------------------------------------------------------- specs
_SYNTHETIC_KEYS = {
    "n": ("num_samples", int), "size": ("image_size", int), "seed": ("seed", int),
    "split": ("split", str), "artefact_class": ("artefact_class", str), "artefact_p": ("artefact_probability", float),
    "artefact_other_p": ("artefact_other_probability", float), "artefact_corner": ("artefact_corner", str),
    "classes": ("classes", str),
}


def _parse_query(spec: str, query: str, allowed: dict[str, Any]) -> dict[str, str]:
    params = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query)))
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} in dataset spec {spec!r}; allowed: {', '.join(sorted(allowed))}")
    return params


def build_dataset(spec: str, *, image_size: int | tuple[int, int] | None = None, seed: int | None = None,
                  split: str | None = None, on_unreadable: str | None = None,
                  on_size_mismatch: str | None = None) -> Dataset:
    """Build a dataset from a string spec. The keyword arguments fill in options that the spec
    leaves out (the spec wins for ``image_size`` / ``seed`` / ``split``; a spec whose
    ``on_unreadable`` / ``on_size_mismatch`` contradicts the keyword is refused). ``image_size``
    may be ``(H, W)``; only image folders take a non-square size.

    * ``synthetic:shapes?n=512&size=64&seed=0&split=train&artefact_class=1&artefact_p=0.9``
      (also ``artefact_other_p``, ``artefact_corner``, ``classes=circle,square,triangle``;
      ``artefact_class`` is an index or a class name) -> :class:`SyntheticShapes`
    * ``digits`` or ``digits?size=32&split=train&seed=0&channels=3`` -> :class:`DigitsDataset`
    * ``skimage:astronaut,coffee`` (``?size=224``) -> :class:`SkimagePhotos`
    * ``folder:PATH`` or an existing directory ``PATH`` (``?size=64&on_unreadable=skip&on_size_mismatch=resize``)
      -> :class:`ImageFolderDataset`
    """
    head, _, query = spec.partition("?")
    kind, sep, arg = head.partition(":")
    folder_size = image_size
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        folder_size = (int(image_size[0]), int(image_size[1]))
        image_size = folder_size[0] if folder_size[0] == folder_size[1] else None
        is_folder = (kind == "folder" and sep) or Path(head).is_dir()
        if image_size is None and not is_folder:
            raise ValueError(f"the model expects non-square {folder_size[0]}x{folder_size[1]} (HxW) images, but "
                             f"{spec!r} makes square images; pass a Dataset that yields {folder_size[0]}x{folder_size[1]} images")
    if head == "digits":
        params = _parse_query(spec, query, {"size": 1, "split": 1, "seed": 1, "channels": 1, "test_fraction": 1})
        return DigitsDataset(
            image_size=int(params.get("size", image_size or 32)),
            split=params.get("split", split or "all"),
            seed=int(params.get("seed", seed if seed is not None else 0)),
            channels=int(params.get("channels", 3)),
            test_fraction=float(params.get("test_fraction", 0.25)),
        )
    if kind == "synthetic" and sep:
        if arg != "shapes":
            raise ValueError(f"unknown synthetic dataset {arg!r} in {spec!r}; available: shapes")
        params = _parse_query(spec, query, _SYNTHETIC_KEYS)
        fields: dict[str, Any] = {}
        if image_size is not None:
            fields["image_size"] = image_size
        if seed is not None:
            fields["seed"] = seed
        if split is not None:
            fields["split"] = split
        for key, raw in params.items():
            name, cast = _SYNTHETIC_KEYS[key]
            if name == "classes":
                fields[name] = tuple(c for c in raw.split(",") if c)
            elif name == "artefact_class":
                fields[name] = int(raw) if raw.lstrip("-").isdigit() else raw
            else:
                try:
                    fields[name] = cast(raw)
                except ValueError as error:
                    raise ValueError(f"option {key}={raw!r} in {spec!r} is not a valid {cast.__name__}") from error
        return SyntheticShapes(SyntheticShapesConfig(**fields))
    if kind == "skimage" and sep:
        params = _parse_query(spec, query, {"size": 1})
        size = params.get("size", image_size if image_size is not None else 224)
        return SkimagePhotos([n for n in arg.split(",") if n], image_size=int(size) if size != "native" else None)
    folder = arg if kind == "folder" and sep else head
    if (kind == "folder" and sep) or Path(head).is_dir():
        params = _parse_query(spec, query, {"size": 1, "on_unreadable": 1, "on_size_mismatch": 1, "channels": 1})
        policies = {}
        for option, given, default in (("on_unreadable", on_unreadable, "skip"),
                                       ("on_size_mismatch", on_size_mismatch, "error")):
            said = params.get(option)
            if said is not None and given is not None and said != given:
                raise ValueError(f"dataset spec {spec!r} says {option}={said} but {option}={given!r} was also "
                                 f"asked for (e.g. by a command-line flag); say it once")
            policies[option] = said or given or default
        size = int(params["size"]) if "size" in params else folder_size
        return ImageFolderDataset(folder, image_size=size, channels=int(params.get("channels", 3)), **policies)
    raise ValueError(
        f"cannot understand dataset spec {spec!r} (and it is not an existing directory). Expected "
        "'synthetic:shapes?n=512&size=64', 'digits', 'skimage:astronaut,coffee', 'folder:PATH' or a directory."
    )
