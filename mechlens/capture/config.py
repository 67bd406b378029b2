"""The typed configuration of a capture job, round-tripping through JSON.

A :class:`CaptureConfig` holds every option of :func:`~mechlens.capture.capture_to_store` that
says what is captured and how (layers, row selection, stored dtype, batching, device, store
backend, commit policy, ...). The job's other inputs stay arguments: the model, the data, the
output store, an explicit ``preprocessing`` (it describes the model's input) and ``rank`` /
``world_size`` (where this process sits in a ``torchrun`` launch; one config serves every rank,
and the launcher's environment supplies them).

>>> config = CaptureConfig(layers=["stage2", "stage3"], spatial="random", k=8)
>>> CaptureConfig.from_json(config.to_json()) == config
True

``to_dict`` gives plain JSON values (``commit_every`` as its string form, ``"64MiB"``);
``from_dict`` refuses unknown keys with one line that lists the valid ones, so a typo in a JSON
file is an error rather than a silently ignored setting. Every value is checked when the config
is built, before any model or data is touched. The store's provenance records
``config.to_dict()`` under ``provenance["capture"]["config"]``, so a capture can be rerun from it.
"""
from __future__ import annotations

import dataclasses
import json
import numbers
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from activation_store import CommitPolicy
from activation_store.jsonutil import check_fields, dumps
from mechlens.features.layout import POOLINGS

__all__ = ["AUTOCAST_MODES", "CaptureConfig", "SPATIAL_MODES", "STORE_DTYPES"]

SPATIAL_MODES: tuple[str, ...] = (*POOLINGS, "random")
STORE_DTYPES: tuple[str, ...] = ("float16", "bfloat16", "float32")
AUTOCAST_MODES: tuple[str, ...] = ("bf16", "bfloat16", "fp16", "float16")

_INTS = ("k", "batch_size", "num_workers", "max_images", "seed", "chunk_bytes", "num_prefix_tokens")
_BOOLS = ("channels_last", "normalize", "progress")


@dataclass(frozen=True)
class CaptureConfig:
    """Options of a capture job (see :func:`~mechlens.capture.capture_to_store` for each one's
    meaning). ``layers`` is required: layer names or globs (one string or several)."""

    layers: str | tuple[str, ...]
    spatial: str = "all"
    k: int = 16
    dtype: str = "float16"
    batch_size: int = 64
    num_workers: int | None = None
    device: str | None = None
    autocast: str | None = "auto"
    channels_last: bool | None = None
    normalize: bool = True
    on_size_mismatch: str | None = None
    on_unreadable: str | None = None
    max_images: int | None = None
    seed: int = 0
    backend: str = "zarr"
    compression: str | None = None
    chunk_bytes: int | None = None
    nonfinite: str = "error"
    model_name: str | None = None
    commit_every: CommitPolicy = field(default_factory=CommitPolicy)
    layout: str | dict[str, str] | None = None
    num_prefix_tokens: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        put = object.__setattr__
        if isinstance(self.layers, str):
            pass
        elif isinstance(self.layers, Sequence) and all(isinstance(name, str) for name in self.layers):
            put(self, "layers", tuple(self.layers))
        else:
            raise TypeError(f"layers must be a layer name or a sequence of names, got {self.layers!r}")
        if self.device is not None:
            put(self, "device", str(self.device))  # a torch.device too
        if isinstance(self.layout, Mapping):
            put(self, "layout", {str(name): str(value) for name, value in self.layout.items()})
        for name in _INTS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
                raise TypeError(f"{name} must be an integer, got {value!r}")
            if value is not None:
                put(self, name, int(value))  # a numpy integer too
        for name in _BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "channels_last" and value is None):
                raise TypeError(f"{name} must be true or false, got {value!r}")
        if self.spatial not in SPATIAL_MODES:
            raise ValueError(f"spatial must be one of {', '.join(SPATIAL_MODES)}, got {self.spatial!r}")
        if self.spatial == "random" and self.k < 1:
            raise ValueError(f"spatial='random' needs k >= 1 positions per image, got {self.k}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(STORE_DTYPES)}, got {self.dtype!r}")
        if self.on_size_mismatch not in (None, "error", "resize"):
            raise ValueError(f"on_size_mismatch must be 'error' or 'resize', got {self.on_size_mismatch!r}")
        if self.on_unreadable not in (None, "skip", "error"):
            raise ValueError(f"on_unreadable must be 'skip' or 'error', got {self.on_unreadable!r}")
        put(self, "commit_every", CommitPolicy.parse(self.commit_every))
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.nonfinite not in ("error", "count"):
            raise ValueError(f"nonfinite must be 'error' or 'count', got {self.nonfinite!r}")
        if self.autocast not in (None, "auto", *AUTOCAST_MODES):
            raise ValueError(f"autocast must be 'auto', 'bf16', 'fp16' or None, got {self.autocast!r}")
        if self.max_images is not None and self.max_images < 1:
            raise ValueError(f"max_images must be >= 1, got {self.max_images}")

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values: ``layers`` as a list (or its one string), ``commit_every`` as its
        string form."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if isinstance(self.layers, tuple):
            data["layers"] = list(self.layers)
        if isinstance(self.layout, dict):
            data["layout"] = dict(self.layout)
        data["commit_every"] = str(self.commit_every)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "CaptureConfig":
        """The config of ``to_dict``'s output (missing keys take their defaults; unknown keys are
        refused)."""
        if not isinstance(data, Mapping):
            raise TypeError(f"a capture config is a JSON object (a mapping), got {type(data).__name__}")
        check_keys(data, "capture config key", ValueError)
        return cls(**dict(data))

    def to_json(self, indent: int | None = None) -> str:
        return dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_json(cls, text: str) -> "CaptureConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes: Any) -> "CaptureConfig":
        """A copy with ``changes`` (a key that is not a field is a ``TypeError`` naming the
        valid ones)."""
        check_keys(changes, "capture option", TypeError)
        return dataclasses.replace(self, **changes)


def check_keys(data: Mapping[str, Any], what: str, error: type[Exception]) -> None:
    """Refuse keys of ``data`` that are not :class:`CaptureConfig` fields, in one line."""
    check_fields(CaptureConfig, data, what, error)