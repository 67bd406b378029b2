"""A deterministic synthetic image dataset of shapes and textures, with an optional planted artefact.

Every image is a pure function of ``(seed, split, index)``: the per-image random numbers come
from ``numpy.random.default_rng([seed, crc32(split), index])``, so any index can be produced on
its own, in any order, in any batch, by any worker, and always gives the same pixels. Rendering
is vectorised over a batch with numpy; only the handful of per-image scalars (and one noise
field) are drawn per index.

Classes (default five): ``circle``, ``square``, ``triangle`` (filled shapes) and ``stripes``,
``checker`` (a disc or square region filled with a two-colour texture). Colours are drawn
independently of the class (a light object on a dark background or the reverse, random hue and
saturation), as are size, position, rotation, the background gradient and the pixel noise, so no
class can be told apart by colour alone.

The planted artefact (``artefact_kind="ruler"``) is a small cream bar with black tick marks, like
the rulers in dermoscopy photographs, drawn in a corner of the image. It is added to images of
``artefact_class`` with probability ``artefact_probability`` (and to the other classes with
``artefact_other_probability``). Whether it is drawn is decided by a uniform number that is drawn
for every image whatever the configuration, so :meth:`SyntheticShapes.with_artefact` renders
exact counterfactual twins: the same image with the artefact forced on or off and every other
pixel unchanged. Pixels are quantised to multiples of 1/255, so images survive a round trip
through 8-bit files exactly.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import zlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "SHAPE_CLASSES",
    "ARTEFACT_KINDS",
    "ARTEFACT_CORNERS",
    "SyntheticShapesConfig",
    "SyntheticShapes",
    "SyntheticSampleInfo",
]

#: Every class the renderer knows; a config picks any subset of at least two, in any order.
SHAPE_CLASSES: tuple[str, ...] = ("circle", "square", "triangle", "stripes", "checker")
ARTEFACT_KINDS: tuple[str, ...] = ("ruler",)
#: ``auto`` puts the artefact in the corner farthest from the object's centre (so the two rarely
#: overlap); ``random`` picks one of the four corners per image; the others fix the corner.
ARTEFACT_CORNERS: tuple[str, ...] = (
    "auto", "random", "top_left", "top_right", "bottom_left", "bottom_right",
)
_TEXTURE_CLASSES = ("stripes", "checker")

# Layout of the per-image uniform numbers (one ``rng.random(_N_UNIFORMS)`` call per image).
# Append new draws at the end only: reordering changes every image of every seed.
_U_BG_DARK, _U_BG_HUE, _U_BG_HUE2, _U_BG_SAT, _U_BG_VAL, _U_BG_VAL2, _U_BG_ANGLE = range(7)
_U_FG_HUE, _U_FG_SAT, _U_FG_VAL, _U_FG2_HUE, _U_FG2_SAT, _U_FG2_VAL = range(7, 13)
_U_SIZE, _U_CX, _U_CY, _U_ROT, _U_PERIOD, _U_REGION, _U_NOISE = range(13, 20)
_U_ART_DRAW, _U_ART_CORNER, _U_ART_DX, _U_ART_DY = range(20, 24)
_N_UNIFORMS = 24

_RULER_BAR = np.array([0.93, 0.87, 0.62], dtype=np.float32)
_RULER_TICK = np.array([0.08, 0.07, 0.06], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticShapesConfig:
    """Everything that determines the pixels of a :class:`SyntheticShapes` dataset.

    ``artefact_class`` may be given as an index or a class name (stored as the index).
    ``split`` is mixed into the seed, so ``split="train"`` and ``split="test"`` with the same
    seed are disjoint draws from the same distribution.
    """

    num_samples: int = 1000
    image_size: int = 64
    classes: tuple[str, ...] = SHAPE_CLASSES
    seed: int = 0
    split: str = "train"
    artefact_class: int | None = None
    artefact_probability: float = 0.0
    artefact_other_probability: float = 0.0
    artefact_kind: str = "ruler"
    artefact_corner: str = "auto"
    noise_std: tuple[float, float] = (0.02, 0.06)

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "noise_std", tuple(float(v) for v in self.noise_std))
        if int(self.num_samples) != self.num_samples or self.num_samples < 1:
            raise ValueError(
                f"num_samples must be a positive integer, got {self.num_samples!r} "
                "(a dataset of size 0 cannot be trained on or captured)"
            )
        if int(self.seed) != self.seed or self.seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if len(self.classes) < 2:
            raise ValueError(f"need at least two classes, got {self.classes!r}")
        for name in self.classes:
            if name not in SHAPE_CLASSES:
                close = difflib.get_close_matches(name, SHAPE_CLASSES, n=3, cutoff=0.4)
                hint = f" Did you mean {', '.join(close)}?" if close else ""
                raise ValueError(
                    f"unknown class {name!r}; known classes: {', '.join(SHAPE_CLASSES)}.{hint}"
                )
        if len(set(self.classes)) != len(self.classes):
            raise ValueError(f"classes must be distinct, got {self.classes!r}")
        if isinstance(self.artefact_class, str):
            if self.artefact_class not in self.classes:
                raise ValueError(
                    f"artefact_class {self.artefact_class!r} is not one of the classes "
                    f"{self.classes!r}"
                )
            object.__setattr__(self, "artefact_class", self.classes.index(self.artefact_class))
        if self.artefact_class is not None and not 0 <= self.artefact_class < len(self.classes):
            raise ValueError(
                f"artefact_class must be in [0, {len(self.classes) - 1}], got {self.artefact_class}"
            )
        for name in ("artefact_probability", "artefact_other_probability"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if self.artefact_class is None and self.artefact_probability > 0:
            raise ValueError("artefact_probability > 0 needs an artefact_class")
        if self.artefact_kind not in ARTEFACT_KINDS:
            raise ValueError(
                f"unknown artefact_kind {self.artefact_kind!r}; supported: {', '.join(ARTEFACT_KINDS)}"
            )
        if self.artefact_corner not in ARTEFACT_CORNERS:
            raise ValueError(
                f"unknown artefact_corner {self.artefact_corner!r}; "
                f"supported: {', '.join(ARTEFACT_CORNERS)}"
            )
        lo, hi = self.noise_std
        if not 0 <= lo <= hi:
            raise ValueError(f"noise_std must be (low, high) with 0 <= low <= high, got {self.noise_std}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def replace(self, **changes: Any) -> "SyntheticShapesConfig":
        """A copy with some fields changed (e.g. another split or seed)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; :meth:`from_dict` inverts it."""
        data = dataclasses.asdict(self)
        data["classes"] = list(self.classes)
        data["noise_std"] = list(self.noise_std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SyntheticShapesConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SyntheticShapesConfig keys {unknown}; known: {sorted(known)}")
        data = dict(data)
        if "classes" in data:
            data["classes"] = tuple(data["classes"])
        if "noise_std" in data:
            data["noise_std"] = tuple(data["noise_std"])
        return cls(**data)


@dataclass(frozen=True)
class SyntheticSampleInfo:
    """Metadata of one image (boxes are ``(x0, y0, x1, y1)`` in pixels, x1/y1 exclusive)."""

    index: int
    label: int
    class_name: str
    has_artefact: bool
    artefact_box: tuple[int, int, int, int]
    object_box: tuple[float, float, float, float]


@dataclass
class _Params:
    """Per-image parameters of a batch of indices (arrays of length B)."""

    labels: np.ndarray
    u: np.ndarray  # [B, _N_UNIFORMS] uniforms in [0, 1)
    noise: np.ndarray | None = field(default=None)  # [B, 3, S, S] uniforms, when rendering


def _split_key(split: str) -> int:
    return zlib.crc32(split.encode("utf-8"))


def _hsv_to_rgb(h: np.ndarray, s: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB for arrays of shape [B]; returns [B, 3] float32."""
    h6 = (h % 1.0) * 6.0
    i = np.floor(h6).astype(np.int64) % 6
    f = h6 - np.floor(h6)
    p = v * (1 - s)
    q = v * (1 - s * f)
    t = v * (1 - s * (1 - f))
    table = np.stack(
        [
            np.stack([v, t, p], -1), np.stack([q, v, p], -1), np.stack([p, v, t], -1),
            np.stack([p, q, v], -1), np.stack([t, p, v], -1), np.stack([v, p, q], -1),
        ],
        axis=1,
    )  # [B, 6, 3]
    return table[np.arange(len(h)), i].astype(np.float32)


class SyntheticShapes(Dataset):
    """Deterministic shapes/textures dataset; items are ``(image [3,H,W] float in [0,1], label)``.

    Per-index metadata (numpy arrays over the whole dataset, computed on first access without
    rendering): :attr:`labels`, :attr:`has_artefact`, :attr:`artefact_box`, :attr:`object_box`;
    per-pixel masks on demand: :meth:`object_masks`, :meth:`artefact_masks`.

    ``cache``: keep rendered images (as uint8, ``3*H*W`` bytes each) in memory after their first
    render. ``"auto"`` caches when the whole dataset fits in 512 MiB.
    ``force_artefact``: ``None`` follows the config; ``True``/``False`` draws/omits the artefact on
    every image (see :meth:`with_artefact`).
    """

    def __init__(
        self,
        config: SyntheticShapesConfig | None = None,
        *,
        cache: bool | str = "auto",
        force_artefact: bool | None = None,
        **overrides: Any,
    ) -> None:
        if config is None:
            config = SyntheticShapesConfig(**overrides)
        elif overrides:
            config = config.replace(**overrides)
        self.config = config
        self.force_artefact = force_artefact
        size = config.image_size
        if cache == "auto":
            cache = config.num_samples * 3 * size * size <= 512 * 2**20
        elif not isinstance(cache, bool):
            raise ValueError(f"cache must be True, False or 'auto', got {cache!r}")
        self._cache: np.ndarray | None = (
            np.zeros((config.num_samples, 3, size, size), dtype=np.uint8) if cache else None
        )
        self._cached = np.zeros(config.num_samples, dtype=bool) if cache else None

    # ------------------------------------------------------------------ dataset protocol
    def __len__(self) -> int:
        return self.config.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = self._check_index(index)
        image = self.render([index])[0]
        return image, int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, int]]:
        """Batched fetch used by ``DataLoader`` (one vectorised render per batch)."""
        images = self.render(indices)
        labels = self.labels[np.asarray(indices, dtype=np.int64)]
        return [(images[k], int(labels[k])) for k in range(len(images))]

    def __repr__(self) -> str:
        c = self.config
        art = (
            f", artefact={c.artefact_kind!r} on {c.classes[c.artefact_class]!r} "
            f"p={c.artefact_probability}" if c.artefact_class is not None else ""
        )
        forced = f", force_artefact={self.force_artefact}" if self.force_artefact is not None else ""
        return (
            f"SyntheticShapes(n={c.num_samples}, size={c.image_size}, classes={list(c.classes)}, "
            f"seed={c.seed}, split={c.split!r}{art}{forced})"
        )

    # ------------------------------------------------------------------ metadata
    @property
    def class_names(self) -> list[str]:
        return list(self.config.classes)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (3, self.config.image_size, self.config.image_size)

    @cached_property
    def labels(self) -> np.ndarray:
        """Class index of every image, int64 ``[N]``; classes are balanced (``index % K``)."""
        return np.arange(self.config.num_samples, dtype=np.int64) % self.config.num_classes

    @property
    def targets(self) -> np.ndarray:
        """Alias of :attr:`labels` (the torchvision name)."""
        return self.labels

    @cached_property
    def _all_uniforms(self) -> np.ndarray:
        return self._uniforms(np.arange(self.config.num_samples))

    @cached_property
    def has_artefact(self) -> np.ndarray:
        """Whether image i carries the artefact, bool ``[N]``."""
        return self._artefact_flags(self.labels, self._all_uniforms)

    @cached_property
    def artefact_box(self) -> np.ndarray:
        """Where the artefact of image i is (or would be) drawn: int64 ``[N, 4]`` ``(x0,y0,x1,y1)``.

        Rows are filled for every image so counterfactuals can be located; read them together
        with :attr:`has_artefact`.
        """
        geo = self._geometry(self.labels, self._all_uniforms)
        return self._artefact_boxes(geo, self._all_uniforms)

    @cached_property
    def object_box(self) -> np.ndarray:
        """Tight box of the object (shape or texture region), float32 ``[N, 4]`` ``(x0,y0,x1,y1)``."""
        geo = self._geometry(self.labels, self._all_uniforms)
        return geo["box"]

    def info(self, index: int) -> SyntheticSampleInfo:
        """Metadata of image ``index`` as a dataclass."""
        index = self._check_index(index)
        label = int(self.labels[index])
        return SyntheticSampleInfo(
            index=index,
            label=label,
            class_name=self.config.classes[label],
            has_artefact=bool(self.has_artefact[index]),
            artefact_box=tuple(int(v) for v in self.artefact_box[index]),
            object_box=tuple(float(v) for v in self.object_box[index]),
        )

    def with_artefact(self, force: bool | None) -> "SyntheticShapes":
        """The same images with the artefact drawn on all (``True``), none (``False``) or as
        configured (``None``); every other pixel is identical (the artefact's look and corner
        do not depend on the class)."""
        return SyntheticShapes(
            self.config, cache=self._cache is not None, force_artefact=force
        )

    # ------------------------------------------------------------------ rendering
    def render(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Images of ``indices`` as a float32 tensor ``[B, 3, H, W]`` in ``[0, 1]``."""
        idx = self._check_indices(indices)
        if self._cache is None:
            return torch.from_numpy(self._render_uint8(idx)).float().div_(255.0)
        missing = idx[~self._cached[idx]]
        if len(missing):
            missing = np.unique(missing)
            self._cache[missing] = self._render_uint8(missing)
            self._cached[missing] = True
        return torch.from_numpy(self._cache[idx]).float().div_(255.0)

    def to_tensors(self, batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole dataset as ``(images [N,3,H,W] float32, labels [N] int64)``."""
        n = len(self)
        chunks = [self.render(np.arange(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        return torch.cat(chunks), torch.from_numpy(self.labels.copy())

    def object_masks(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Bool ``[B, H, W]``: pixels covered (at least half) by the object."""
        idx = self._check_indices(indices)
        params = _Params(labels=self.labels[idx], u=self._uniforms(idx))
        alpha, _ = self._object_layer(params)
        return torch.from_numpy(alpha >= 0.5)

    def artefact_masks(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Bool ``[B, H, W]``: the artefact's box on images that carry it (all False otherwise)."""
        idx = self._check_indices(indices)
        s = self.config.image_size
        boxes = self.artefact_box[idx]
        present = self.has_artefact[idx]
        ys = np.arange(s)[None, :, None]
        xs = np.arange(s)[None, None, :]
        inside = (
            (xs >= boxes[:, 0, None, None]) & (xs < boxes[:, 2, None, None])
            & (ys >= boxes[:, 1, None, None]) & (ys < boxes[:, 3, None, None])
        )
        return torch.from_numpy(inside & present[:, None, None])

    # ------------------------------------------------------------------ internals
    def _check_index(self, index: int) -> int:
        n = self.config.num_samples
        index = int(index)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"index {index} out of range for SyntheticShapes of length {n}")
        return index

    def _check_indices(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> np.ndarray:
        if isinstance(indices, torch.Tensor):
            indices = indices.detach().cpu().numpy()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = self.config.num_samples
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            bad = idx[(idx < 0) | (idx >= n)][:5].tolist()
            raise IndexError(f"indices {bad} out of range for SyntheticShapes of length {n}")
        return idx

    def _rng(self, index: int) -> np.random.Generator:
        c = self.config
        return np.random.default_rng([c.seed & 0xFFFFFFFF, c.seed >> 32, _split_key(c.split), int(index)])

    def _uniforms(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), _N_UNIFORMS), dtype=np.float64)
        for k, i in enumerate(idx):
            out[k] = self._rng(i).random(_N_UNIFORMS)
        return out

    def _draw(self, idx: np.ndarray) -> _Params:
        s = self.config.image_size
        u = np.empty((len(idx), _N_UNIFORMS), dtype=np.float64)
        noise = np.empty((len(idx), 3, s, s), dtype=np.float32)
        for k, i in enumerate(idx):
            rng = self._rng(i)
            u[k] = rng.random(_N_UNIFORMS)  # scalars first, the noise field last
            noise[k] = rng.random((3, s, s), dtype=np.float32)
        return _Params(labels=self.labels[idx], u=u, noise=noise)

    def _artefact_flags(self, labels: np.ndarray, u: np.ndarray) -> np.ndarray:
        if self.force_artefact is not None:
            return np.full(len(labels), bool(self.force_artefact))
        c = self.config
        if c.artefact_class is None:
            p = np.full(len(labels), c.artefact_other_probability)
        else:
            p = np.where(labels == c.artefact_class, c.artefact_probability, c.artefact_other_probability)
        return u[:, _U_ART_DRAW] < p

    def _geometry(self, labels: np.ndarray, u: np.ndarray) -> dict[str, np.ndarray]:
        """Object centre, size, rotation, kind and tight box (pixel units)."""
        s = float(self.config.image_size)
        names = np.asarray(self.config.classes)[labels]
        r = (0.16 + 0.12 * u[:, _U_SIZE]) * s  # "radius" of the object
        reach = 1.3 * r + 1.0
        cx = reach + u[:, _U_CX] * (s - 2 * reach)
        cy = reach + u[:, _U_CY] * (s - 2 * reach)
        rot = u[:, _U_ROT] * 2 * np.pi
        # Outline: 0 circle, 1 square, 2 triangle. Texture classes fill a circle or a square.
        outline = np.where(names == "square", 1, np.where(names == "triangle", 2, 0))
        is_texture = np.isin(names, _TEXTURE_CLASSES)
        outline = np.where(is_texture, (u[:, _U_REGION] < 0.5).astype(np.int64), outline)
        half_side = 0.88 * r
        circum = 1.2 * r  # circumradius of the triangle
        # Tight boxes.
        ext_sq = half_side * (np.abs(np.cos(rot)) + np.abs(np.sin(rot)))
        vert_angles = rot[:, None] + np.array([0.0, 2 * np.pi / 3, 4 * np.pi / 3])[None, :] - np.pi / 2
        vx = circum[:, None] * np.cos(vert_angles)
        vy = circum[:, None] * np.sin(vert_angles)
        x0 = np.select([outline == 0, outline == 1], [cx - r, cx - ext_sq], cx + vx.min(1))
        x1 = np.select([outline == 0, outline == 1], [cx + r, cx + ext_sq], cx + vx.max(1))
        y0 = np.select([outline == 0, outline == 1], [cy - r, cy - ext_sq], cy + vy.min(1))
        y1 = np.select([outline == 0, outline == 1], [cy + r, cy + ext_sq], cy + vy.max(1))
        box = np.clip(np.stack([x0, y0, x1, y1], axis=1), 0, s).astype(np.float32)
        return {
            "r": r, "cx": cx, "cy": cy, "rot": rot, "outline": outline, "is_texture": is_texture,
            "is_checker": names == "checker", "half_side": half_side, "circum": circum, "box": box,
        }

    def _artefact_boxes(self, geo: dict[str, np.ndarray], u: np.ndarray) -> np.ndarray:
        s = self.config.image_size
        w, h = self._ruler_size()
        margin = max(1, round(0.03 * s))
        jitter = max(1, round(0.02 * s))
        corner = self.config.artefact_corner
        n = len(u)
        if corner == "auto":
            right = geo["cx"] < s / 2
            bottom = geo["cy"] < s / 2
        elif corner == "random":
            k = np.minimum((u[:, _U_ART_CORNER] * 4).astype(np.int64), 3)
            right, bottom = (k % 2 == 1), (k >= 2)
        else:
            right = np.full(n, corner.endswith("right"))
            bottom = np.full(n, corner.startswith("bottom"))
        dx = np.minimum((u[:, _U_ART_DX] * (jitter + 1)).astype(np.int64), jitter)
        dy = np.minimum((u[:, _U_ART_DY] * (jitter + 1)).astype(np.int64), jitter)
        x0 = np.where(right, s - margin - w - dx, margin + dx)
        y0 = np.where(bottom, s - margin - h - dy, margin + dy)
        return np.stack([x0, y0, x0 + w, y0 + h], axis=1).astype(np.int64)

    def _ruler_size(self) -> tuple[int, int]:
        s = self.config.image_size
        return max(8, round(0.34 * s)), max(4, round(0.11 * s))

    def _object_layer(self, params: _Params) -> tuple[np.ndarray, np.ndarray]:
        """Coverage ``alpha [B,H,W]`` and texture mix ``t [B,H,W]`` (1 = first colour)."""
        s = self.config.image_size
        u = params.u
        geo = self._geometry(params.labels, u)
        coords = np.arange(s, dtype=np.float32) + 0.5
        dx = coords[None, None, :] - geo["cx"].astype(np.float32)[:, None, None]
        dy = coords[None, :, None] - geo["cy"].astype(np.float32)[:, None, None]
        cos = np.cos(geo["rot"]).astype(np.float32)[:, None, None]
        sin = np.sin(geo["rot"]).astype(np.float32)[:, None, None]
        lu = cos * dx + sin * dy  # coordinates in the object's rotated frame
        lv = -sin * dx + cos * dy
        r = geo["r"].astype(np.float32)[:, None, None]
        a = geo["half_side"].astype(np.float32)[:, None, None]
        d_circle = np.sqrt(dx * dx + dy * dy) - r
        d_square = np.maximum(np.abs(lu), np.abs(lv)) - a
        inradius = (geo["circum"] / 2).astype(np.float32)[:, None, None]
        d_tri = np.full_like(lu, -np.inf)
        for k in range(3):  # three edge half-planes; vertex 0 points "up" in the local frame
            ang = np.pi / 2 + 2 * np.pi * k / 3
            d_tri = np.maximum(d_tri, np.float32(np.cos(ang)) * lu + np.float32(np.sin(ang)) * lv)
        d_tri = d_tri - inradius
        outline = geo["outline"][:, None, None]
        dist = np.where(outline == 0, d_circle, np.where(outline == 1, d_square, d_tri))
        alpha = np.clip(0.5 - dist, 0.0, 1.0)  # one-pixel anti-aliased edge
        # Textures: a square wave along the local u axis (stripes) or the XOR of two (checker),
        # anti-aliased by turning the distance to the nearest stripe edge into a 1-px ramp.
        s_f = np.float32(s)
        period = np.maximum(3.0, (0.075 + 0.05 * u[:, _U_PERIOD]) * s_f).astype(np.float32)[:, None, None]

        def square_wave(x: np.ndarray) -> np.ndarray:
            phase = x / period
            edge_dist = (np.abs(phase - np.floor(phase) - 0.5) - 0.25) * period
            return np.clip(edge_dist + 0.5, 0.0, 1.0)

        tu = square_wave(lu)
        tv = square_wave(lv)
        checker = tu * (1 - tv) + tv * (1 - tu)
        t = np.where(geo["is_checker"][:, None, None], checker, tu)
        t = np.where(geo["is_texture"][:, None, None], t, 1.0)
        return alpha.astype(np.float32), t.astype(np.float32)

    def _colours(self, u: np.ndarray) -> dict[str, np.ndarray]:
        dark_bg = u[:, _U_BG_DARK] < 0.5
        # Values live in two bands: dark [0.08, 0.40] and light [0.60, 0.95]; the background
        # takes one, the object the other, so objects always contrast with their background.
        def band(dark: np.ndarray, x: np.ndarray) -> np.ndarray:
            return np.where(dark, 0.08 + 0.32 * x, 0.60 + 0.35 * x)

        bg_sat = 0.6 * u[:, _U_BG_SAT]
        bg0 = _hsv_to_rgb(u[:, _U_BG_HUE], bg_sat, band(dark_bg, u[:, _U_BG_VAL]))
        bg1 = _hsv_to_rgb(
            u[:, _U_BG_HUE] + 0.3 * (u[:, _U_BG_HUE2] - 0.5), bg_sat, band(dark_bg, u[:, _U_BG_VAL2])
        )
        fg = _hsv_to_rgb(u[:, _U_FG_HUE], 0.25 + 0.75 * u[:, _U_FG_SAT], band(~dark_bg, u[:, _U_FG_VAL]))
        # Second texture colour: from the background's band with its own hue, so the texture
        # keeps full contrast inside the region.
        fg2 = _hsv_to_rgb(u[:, _U_FG2_HUE], 0.25 + 0.75 * u[:, _U_FG2_SAT], band(dark_bg, u[:, _U_FG2_VAL]))
        return {"bg0": bg0, "bg1": bg1, "fg": fg, "fg2": fg2}

    def _render_uint8(self, idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), 3, self.config.image_size, self.config.image_size), dtype=np.uint8)
        step = 256  # bound the float temporaries
        for start in range(0, len(idx), step):
            part = idx[start:start + step]
            out[start:start + len(part)] = self._render_chunk(part)
        return out

    def _render_chunk(self, idx: np.ndarray) -> np.ndarray:
        s = self.config.image_size
        params = self._draw(idx)
        u = params.u
        col = self._colours(u)
        # Background: a linear gradient between two colours along a random direction.
        angle = u[:, _U_BG_ANGLE] * 2 * np.pi
        coords = (np.arange(s, dtype=np.float32) + 0.5) / np.float32(s) - 0.5
        ramp = (
            np.cos(angle).astype(np.float32)[:, None, None] * coords[None, None, :]
            + np.sin(angle).astype(np.float32)[:, None, None] * coords[None, :, None]
        )
        g = np.clip(ramp + 0.5, 0.0, 1.0)[:, None]  # [B,1,H,W]
        image = col["bg0"][:, :, None, None] * (1 - g) + col["bg1"][:, :, None, None] * g
        # Object.
        alpha, t = self._object_layer(params)
        obj = col["fg"][:, :, None, None] * t[:, None] + col["fg2"][:, :, None, None] * (1 - t[:, None])
        image = image * (1 - alpha[:, None]) + obj * alpha[:, None]
        # Artefact (before the noise, so it is not a suspiciously clean patch).
        present = self._artefact_flags(params.labels, u)
        if present.any():
            geo = self._geometry(params.labels, u)
            boxes = self._artefact_boxes(geo, u)
            self._draw_rulers(image, boxes, present)
        # Noise: uniform, zero-mean, per-image standard deviation.
        lo, hi = self.config.noise_std
        std = (lo + (hi - lo) * u[:, _U_NOISE]).astype(np.float32)[:, None, None, None]
        image = image + (params.noise - 0.5) * (std * np.float32(math.sqrt(12.0)))
        return np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)

    def _draw_rulers(self, image: np.ndarray, boxes: np.ndarray, present: np.ndarray) -> None:
        s = self.config.image_size
        w, h = self._ruler_size()
        spacing = max(2, round(0.05 * s))
        # Ruler template [3, h, w]: cream bar, ticks from the top edge, every 4th tick long.
        cols = np.arange(w)
        rows = np.arange(h)[:, None]
        tick_index = (cols - 1) // spacing
        is_tick = ((cols - 1) % spacing == 0) & (cols >= 1) & (cols < w - 1)
        tick_len = np.where(tick_index % 4 == 0, h - 1, max(2, (h + 1) // 2))
        tick_mask = is_tick[None, :] & (rows < tick_len[None, :])
        template = np.where(tick_mask[None], _RULER_TICK[:, None, None], _RULER_BAR[:, None, None])
        for k in np.flatnonzero(present):  # at most B small slices; the box sizes are equal
            x0, y0, x1, y1 = boxes[k]
            image[k, :, y0:y1, x0:x1] = template
