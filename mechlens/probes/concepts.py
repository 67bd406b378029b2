"""Concept sets and their activations.

A concept set is a named collection of example images (a folder, a list of files, any dataset,
or rows already in an activation store). Activations are read at one layer, either pooled over
positions (``"mean"`` / ``"max"``, the default for CAVs: one vector per image, independent of
the image size) or flattened (``"flatten"``, ``C*H*W`` as in tensorflow/tcav).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from mechlens.engine import capture, eval_mode, unwrap_with_preprocessing
from mechlens.data.adapters import IMAGE_EXTENSIONS, ImageFolderDataset, _resize_batch, _to_chw_float
from mechlens.features.layout import as_position_rows, infer_layouts, layout_scope
from mechlens.models.loading import LoadedModel, Preprocessing

__all__ = ["CAV_POOLINGS", "ConceptSet", "concept_activations", "pool_activation", "random_concept_sets"]

CAV_POOLINGS = ("mean", "max", "flatten")


class _ImageFiles(Dataset):
    """Image files as ``[C, H, W]`` tensors in ``[0, 1]`` at one size."""

    def __init__(self, files: Sequence[str | os.PathLike], image_size: tuple[int, int] | None) -> None:
        self.files = [str(f) for f in files]
        self.image_size = image_size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        with Image.open(self.files[index]) as im:
            image = _to_chw_float(np.asarray(im.convert("RGB")), 3)
        if self.image_size is not None and tuple(image.shape[-2:]) != tuple(self.image_size):
            image = _resize_batch(image[None], tuple(self.image_size))[0]
        return image, -1


@dataclass
class ConceptSet:
    """Named example images of a concept (or a random counterpart set).

    Build with :meth:`from_folder`, :meth:`from_files`, :meth:`from_dataset` or
    :meth:`from_activations` (rows already captured, e.g. read from a store).
    """

    name: str
    dataset: Dataset | None = None
    activations: np.ndarray | None = None  # precomputed [N, d] rows (pooled as `pooling`)
    pooling: str | None = None  # pooling of `activations`
    layer: str | None = None  # layer of `activations`
    source: str = ""
    _ids: tuple[Any, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if (self.dataset is None) == (self.activations is None):
            raise ValueError("a ConceptSet needs either a dataset or precomputed activations (exactly one)")
        n = len(self)
        if n < 2:
            raise ValueError(f"concept set {self.name!r} has {n} example(s); a CAV needs at least 2 per set")

    def __len__(self) -> int:
        return len(self.activations) if self.activations is not None else len(self.dataset)  # type: ignore[arg-type]

    @property
    def identity(self) -> tuple[Any, ...]:
        """What makes two sets the same examples (used to refuse a concept equal to a random set)."""
        return self._ids

    @classmethod
    def from_folder(cls, name: str, folder: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                    extensions: Sequence[str] = IMAGE_EXTENSIONS) -> "ConceptSet":
        """Every image file directly in ``folder`` or below it (class subfolders not needed)."""
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"concept folder {root} does not exist or is not a directory")
        exts = tuple(e.lower() for e in extensions)
        files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts
                       and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            raise ValueError(f"concept folder {root} holds no images ({', '.join(exts)})")
        return cls.from_files(name, files, image_size=image_size, source=str(root))

    @classmethod
    def from_files(cls, name: str, files: Sequence[str | os.PathLike], *,
                   image_size: int | tuple[int, int] | None = None, source: str = "") -> "ConceptSet":
        size = (image_size, image_size) if isinstance(image_size, int) else image_size
        resolved = tuple(str(Path(f).resolve()) for f in files)
        return cls(name, dataset=_ImageFiles(files, size), source=source or f"{len(files)} files",
                   _ids=("files", resolved))

    @classmethod
    def from_dataset(cls, name: str, dataset: Dataset, indices: Sequence[int] | None = None) -> "ConceptSet":
        """Examples ``dataset[i]`` for ``i`` in ``indices`` (all when None); items are images or
        ``(image, label)`` pairs in ``[0, 1]``."""
        chosen = range(len(dataset)) if indices is None else [int(i) for i in indices]  # type: ignore[arg-type]
        subset = Subset(dataset, list(chosen))
        return cls(name, dataset=subset, source=type(dataset).__name__,
                   _ids=("dataset", id(dataset), tuple(subset.indices)))

    @classmethod
    def from_store(cls, name: str, view: Any, sample_ids: Sequence[int]) -> "ConceptSet":
        """Examples already captured in a store: the rows of ``view`` (``store[layer]``) whose sample
        id is in ``sample_ids``, one vector per image (per-position rows are mean-pooled per image)."""
        ids = np.asarray(sample_ids, dtype=np.int64)
        meta = dict(getattr(view.spec, "meta", {}) or {})
        spatial = meta.get("spatial", "all")
        index = view.read_index()
        keep = np.isin(index.sample_id, ids)
        if not keep.any():
            raise ValueError(f"none of the {len(ids)} sample ids are in layer {view.name!r} of the store")
        rows = view.read_rows(np.flatnonzero(keep)).astype(np.float32)
        owners = index.sample_id[keep]
        unique, inverse = np.unique(owners, return_inverse=True)
        if spatial in ("mean", "max", "cls"):
            pooled, pooling = rows, spatial
        else:  # per-position rows: average the rows of each image (a mean-pooled activation)
            sums = np.zeros((len(unique), rows.shape[1]), np.float64)
            np.add.at(sums, inverse, rows)
            pooled = (sums / np.bincount(inverse)[:, None]).astype(np.float32)
            pooling = "mean"  # for spatial="random" the mean of k sampled positions estimates it
        return cls.from_activations(name, pooled, layer=view.name, pooling=pooling, source=f"store rows of {len(unique)} images")

    @classmethod
    def from_activations(cls, name: str, activations: np.ndarray, *, layer: str, pooling: str = "mean",
                         source: str = "activations") -> "ConceptSet":
        """Rows already captured at ``layer`` (``[N, d]``, pooled as ``pooling``), e.g. read from
        a store: ``ConceptSet.from_activations("ruler", store["stage3"].read_rows(ids), layer="stage3")``."""
        rows = np.asarray(activations, dtype=np.float32)
        if rows.ndim != 2:
            raise ValueError(f"activations of {name!r} must be [N, d], got shape {rows.shape}")
        digest = hash(rows.tobytes()) if rows.size < 1 << 24 else id(activations)
        return cls(name, activations=rows, pooling=pooling, layer=layer, source=source, _ids=("acts", digest))


def pool_activation(activation: torch.Tensor, pooling: str, *, layer: str | None = None, layout: str = "auto") -> torch.Tensor:
    """``[B, ...]`` layer output -> ``[B, d]`` vectors as a CAV sees them (the layout: as given,
    else the one known for ``layer``; see :mod:`mechlens.features.layout`)."""
    if pooling == "flatten":
        return activation.reshape(activation.shape[0], -1)
    rows, _ = as_position_rows(activation, layout, layer=layer)
    if pooling == "mean":
        return rows.mean(dim=1)
    if pooling == "max":
        return rows.amax(dim=1)
    raise ValueError(f"unknown CAV pooling {pooling!r}; expected one of {', '.join(CAV_POOLINGS)}")


def _batches(dataset: Dataset, batch_size: int) -> DataLoader:
    def collate(items: list[Any]) -> torch.Tensor:
        images = [it[0] if isinstance(it, (tuple, list)) else it for it in items]
        shapes = {tuple(im.shape) for im in images}
        if len(shapes) > 1:
            raise ValueError(f"concept images have different sizes {sorted(shapes)}; pass image_size=")
        return torch.stack(images)

    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0, collate_fn=collate)


def prepare_images(images: torch.Tensor, preprocessing: Preprocessing | None, device: torch.device) -> torch.Tensor:
    """Images in ``[0, 1]`` -> the model's input (resized to its input size, normalised)."""
    x = images.to(device)
    if preprocessing is not None:
        if tuple(x.shape[-2:]) != preprocessing.image_size:
            x = torch.nn.functional.interpolate(x, size=preprocessing.image_size, mode="bilinear",
                                                antialias=True, align_corners=False)
        x = preprocessing.normalize(x)
    return x


def concept_activations(model: LoadedModel | nn.Module, concept: ConceptSet, layer: str | Sequence[str], *,
                        pooling: str = "mean", batch_size: int = 64,
                        preprocessing: Preprocessing | None = None) -> np.ndarray | dict[str, np.ndarray]:
    """``[N, d]`` activations of ``concept``'s examples at ``layer`` (captured on the fly unless the
    set holds precomputed rows of that layer and pooling). With a list of layers: a dict, all
    layers read in the same forward passes."""
    layers = [layer] if isinstance(layer, str) else list(layer)
    if concept.activations is not None:
        if concept.layer not in layers or len(layers) > 1 or concept.pooling != pooling:
            raise ValueError(
                f"concept {concept.name!r} holds activations of layer {concept.layer!r} pooled by "
                f"{concept.pooling!r}, not of {layers} pooled by {pooling!r}"
            )
        return concept.activations if isinstance(layer, str) else {concept.layer: concept.activations}
    net, preprocessing = unwrap_with_preprocessing(model, preprocessing)
    device = next(net.parameters()).device
    out: dict[str, list[np.ndarray]] = {name: [] for name in layers}
    with eval_mode(net):
        with capture(net, layers) as cap, torch.no_grad():
            known: dict = {}
            for images in _batches(concept.dataset, batch_size):  # type: ignore[arg-type]
                x = prepare_images(images, preprocessing, device)
                known = known or (infer_layouts(net, layers, x) if pooling != "flatten" else {})
                net(x)
                with layout_scope(known):
                    for name in layers:
                        out[name].append(pool_activation(cap[name].float(), pooling, layer=name).cpu().numpy())
    merged = {name: np.concatenate(parts) for name, parts in out.items()}
    return merged[layer] if isinstance(layer, str) else merged


def random_concept_sets(dataset: Dataset, num_sets: int, size: int, *, seed: int = 0,
                        prefix: str = "random", exclude: Sequence[int] = ()) -> list[ConceptSet]:
    """``num_sets`` random counterpart sets of ``size`` examples drawn from ``dataset`` (seeded;
    disjoint when the dataset is large enough, otherwise each set is drawn independently)."""
    if num_sets < 1 or size < 2:
        raise ValueError(f"need num_sets >= 1 and size >= 2, got {num_sets} and {size}")
    pool = np.setdiff1d(np.arange(len(dataset)), np.asarray(exclude, dtype=np.int64))  # type: ignore[arg-type]
    if len(pool) < size:
        raise ValueError(f"cannot draw random sets of {size} from {len(pool)} examples")
    rng = np.random.default_rng(seed)
    if len(pool) >= num_sets * size:
        picks = rng.permutation(pool)[: num_sets * size].reshape(num_sets, size)
    else:
        picks = np.stack([rng.choice(pool, size, replace=False) for _ in range(num_sets)])
    return [ConceptSet.from_dataset(f"{prefix}{i}", dataset, np.sort(p).tolist()) for i, p in enumerate(picks)]
