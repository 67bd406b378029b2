"""Load a model by name, with its preprocessing, from timm, torchvision, mechlens or user code.

Specs understood by :func:`load_model`:

``"timm:resnet50"``
    ``timm.create_model``; preprocessing from timm's resolved data config.
``"torchvision:resnet18"``
    ``torchvision.models.get_model``; preprocessing from the default weights' meta
    (available without downloading anything).
``"mechlens:small_cnn"`` (or just ``"small_cnn"``)
    the project's own registry (:func:`register_model`, :func:`list_models`).
``"package.module:factory"``
    any importable callable returning an ``nn.Module``; preprocessing from a
    ``mechlens_preprocessing`` attribute of the model or the factory (a dict or
    :class:`Preprocessing`), else ImageNet's 224-pixel defaults (``source`` says so).
``"path/to/checkpoint_dir"``
    a directory written by :func:`mechlens.models.training.save_checkpoint`.

``pretrained=True`` uses the library's own weight download (it fails plainly, and fast, on a
machine without network access); ``weights=PATH`` loads a local ``.safetensors`` file or a
state-dict file through ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import importlib
import inspect
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence
from urllib.parse import urlparse

import torch
from torch import nn

__all__ = [
    "Preprocessing",
    "LoadedModel",
    "ModelEntry",
    "PretrainedWeightsUnavailableError",
    "load_model",
    "register_model",
    "to_input",
    "list_models",
    "get_model_entry",
    "load_state_dict_file",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming", "nearest-exact")


# The on-disk layout of a mechlens model checkpoint (written by models.training.save_checkpoint)
CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_CONFIG = "config.json"
CHECKPOINT_FORMAT = "mechlens-checkpoint"

class PretrainedWeightsUnavailableError(RuntimeError):
    """Pretrained weights could not be downloaded (offline?) nor found in the local cache."""


# ---------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How a model expects its input: ``input_size`` ``(C, H, W)``, per-channel ``mean``/``std``
    applied to images in ``[0, 1]``, the resize ``interpolation`` and the centre-crop fraction
    ``crop_pct`` (resize to ``size / crop_pct`` then crop ``size``). ``source`` records where the
    values came from."""

    input_size: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    source: str = "default"

    def __post_init__(self) -> None:
        size = tuple(int(v) for v in self.input_size)
        if len(size) != 3 or min(size) < 1:
            raise ValueError(f"input_size must be (C, H, W) with positive entries, got {self.input_size!r}")
        mean = tuple(float(v) for v in self.mean)
        std = tuple(float(v) for v in self.std)
        channels = size[0]
        if len(mean) == 1:
            mean = mean * channels
        if len(std) == 1:
            std = std * channels
        if len(mean) != channels or len(std) != channels:
            raise ValueError(
                f"mean and std need one value per channel ({channels}), got mean={mean}, std={std}"
            )
        if min(std) <= 0:
            raise ValueError(f"std must be positive, got {std}")
        interpolation = str(self.interpolation).lower()
        if interpolation not in _INTERPOLATIONS:
            raise ValueError(f"unknown interpolation {self.interpolation!r}; one of {', '.join(_INTERPOLATIONS)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        object.__setattr__(self, "input_size", size)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "std", std)
        object.__setattr__(self, "interpolation", interpolation)
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return self.input_size[1], self.input_size[2]

    def _stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        channels = self.input_size[0]
        if x.ndim < 3 or x.shape[-3] != channels:
            raise ValueError(
                f"expected images [..., {channels}, H, W] (channel axis third from the end), "
                f"got shape {tuple(x.shape)}"
            )
        dtype = x.dtype if x.is_floating_point() else torch.float32
        mean = torch.tensor(self.mean, device=x.device, dtype=dtype).view(channels, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=dtype).view(channels, 1, 1)
        return mean, std

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - mean) / std`` for images in ``[0, 1]``, shape ``[..., C, H, W]`` (any device)."""
        mean, std = self._stats(x)
        return (x - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        mean, std = self._stats(x)
        return x * std + mean

    def transform(self, *, normalize: bool = True) -> Callable[[Any], torch.Tensor]:
        """A torchvision (v2) transform: PIL image / ndarray / uint8 or float tensor ->
        resized, centre-cropped float tensor ``[C, H, W]`` (normalised unless ``normalize=False``)."""
        from torchvision.transforms import InterpolationMode, v2

        height, width = self.image_size
        resize = (round(height / self.crop_pct), round(width / self.crop_pct))
        steps: list[Any] = [
            v2.ToImage(),
            v2.Resize(resize, interpolation=InterpolationMode(self.interpolation), antialias=True),
            v2.CenterCrop((height, width)),
            v2.ToDtype(torch.float32, scale=True),
        ]
        if self.input_size[0] == 1:
            steps.insert(1, v2.Grayscale(1))
        if normalize:
            steps.append(v2.Normalize(list(self.mean), list(self.std)))
        return v2.Compose(steps)

    def replace(self, **changes: Any) -> "Preprocessing":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["input_size"] = list(self.input_size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def _imagenet_default(source: str) -> Preprocessing:
    return Preprocessing((3, 224, 224), IMAGENET_MEAN, IMAGENET_STD, "bilinear", 0.875, source)


def _with_overrides(
    base: Preprocessing,
    input_size: int | Sequence[int] | None,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    interpolation: str | None,
) -> Preprocessing:
    changes: dict[str, Any] = {}
    if input_size is not None:
        if isinstance(input_size, int):
            changes["input_size"] = (base.input_size[0], input_size, input_size)
        elif len(input_size) == 2:
            changes["input_size"] = (base.input_size[0], *input_size)
        elif len(input_size) == 3:
            changes["input_size"] = tuple(input_size)
        else:
            raise ValueError(f"input_size must be S, (H, W) or (C, H, W), got {input_size!r}")
    if mean is not None:
        changes["mean"] = tuple(mean)
    if std is not None:
        changes["std"] = tuple(std)
    if interpolation is not None:
        changes["interpolation"] = interpolation
    if not changes:
        return base
    channels = changes.get("input_size", base.input_size)[0]
    if channels != base.input_size[0]:
        # Per-channel statistics no longer fit; a single repeated value carries over.
        for key in ("mean", "std"):
            values = getattr(base, key)
            if key not in changes:
                if len(set(values)) != 1:
                    raise ValueError(
                        f"input_size changes the channels from {base.input_size[0]} to {channels}; "
                        f"pass {key}= with {channels} value(s) as well"
                    )
                changes[key] = values[:1]
    return dataclasses.replace(base, source=f"{base.source} + overrides ({', '.join(sorted(changes))})", **changes)


# ---------------------------------------------------------------------------- results
@dataclass
class LoadedModel:
    """A model (in eval mode, on the requested device) with what is needed to feed it."""

    model: nn.Module
    spec: str
    preprocessing: Preprocessing
    source: str
    pretrained: bool = False
    weights: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        first = next(self.model.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def __repr__(self) -> str:
        parameters = sum(p.numel() for p in self.model.parameters())
        weights = "pretrained" if self.pretrained else (f"weights={self.weights!r}" if self.weights else "random weights")
        return (f"LoadedModel({self.spec!r}: {type(self.model).__name__}, {parameters:,} parameters, {weights}, "
                f"input {list(self.preprocessing.input_size)}, on {self.device})")

    def to(self, device: str | torch.device) -> "LoadedModel":
        self.model.to(device)
        return self


# ---------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class ModelEntry:
    """A model of the mechlens registry: a factory and its default preprocessing."""

    name: str
    factory: Callable[..., nn.Module]
    preprocessing: Preprocessing
    description: str = ""
    default_kwargs: Mapping[str, Any] = field(default_factory=dict)

    def build(self, **kwargs: Any) -> nn.Module:
        return self.factory(**{**self.default_kwargs, **kwargs})


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str,
    factory: Callable[..., nn.Module] | None = None,
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bilinear",
    crop_pct: float = 1.0,
    description: str = "",
    overwrite: bool = False,
    **default_kwargs: Any,
) -> Any:
    """Add ``factory`` to the registry under ``name`` (then ``load_model("mechlens:NAME")``).
    Usable as a decorator when ``factory`` is omitted."""

    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if not overwrite and name in _REGISTRY:
            raise ValueError(f"a model named {name!r} is already registered (pass overwrite=True)")
        _REGISTRY[name] = ModelEntry(
            name=name, factory=fn,
            preprocessing=Preprocessing(input_size, mean, std, interpolation, crop_pct, f"mechlens registry ({name})"),
            description=description, default_kwargs=dict(default_kwargs),
        )
        return fn

    return add(factory) if factory is not None else add


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry ``name`` (error listing close names if unknown)."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
        hint = f" Closest: {', '.join(close)}." if close else ""
        raise ValueError(
            f"no mechlens model named {name!r}.{hint} Registered: {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_models(pattern: str = "*", *, source: str = "mechlens") -> list[str]:
    """Model names matching a wildcard ``pattern``, timm-style.

    ``source="mechlens"`` lists the registry (bare names); ``"timm"``, ``"torchvision"`` or
    ``"all"`` list specs with their prefix (``"timm:resnet18"``), ready for :func:`load_model`.
    """
    sources = ("mechlens", "timm", "torchvision", "all")
    if source not in sources:
        raise ValueError(f"source must be one of {sources}, got {source!r}")
    names: list[str] = []
    if source == "mechlens":
        return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))
    if source == "all":
        names += [f"mechlens:{n}" for n in sorted(_REGISTRY) if fnmatch.fnmatchcase(n, pattern)]
    if source in ("timm", "all"):
        import timm

        names += [f"timm:{n}" for n in timm.list_models(pattern)]
    if source in ("torchvision", "all"):
        from torchvision import models as tvm

        names += [f"torchvision:{n}" for n in sorted(tvm.list_models()) if fnmatch.fnmatchcase(n, pattern)]
    return names


# ---------------------------------------------------------------------------- weights files
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "weights")
_PREFIXES = ("module.", "_orig_mod.", "model.")


def _unreadable_weights_message(path: Path, error: BaseException) -> str:
    """One line for a weights file ``torch.load(weights_only=True)`` refuses: a pickle holding
    objects other than tensors is never unpickled here (that can run arbitrary code); the way
    out is a one-time conversion to safetensors of a file the user trusts."""
    import pickle
    import re

    target = str(path.with_suffix(".safetensors"))
    convert = (
        f"python -c \"import torch, safetensors.torch as st; o = torch.load({str(path)!r}, weights_only=False); "
        "o = o.state_dict() if hasattr(o, 'state_dict') else o.get('state_dict', o); "
        f"st.save_file({{k: v.detach().clone() for k, v in o.items()}}, {target!r})\""
    )
    text = " ".join(str(error).split())
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if isinstance(error, pickle.UnpicklingError) and found:
        return (f"weights file {path} is a pickle holding Python objects ({found.group(1)}), which mechlens refuses "
                f"to unpickle (that can run arbitrary code); if you trust the file, convert it once to safetensors "
                f"with {convert} and pass --weights {target}")
    # torch's own text suggests weights_only=False: keep only what it says is wrong with the file
    reason = re.search(r"WeightsUnpickler error: (.*?)(?: Check the documentation|$)", text)
    detail = reason.group(1).strip() if reason else re.split(r"(?<=\.) ", text, maxsplit=1)[0]
    return (f"could not read weights file {path} as a state dict ({type(error).__name__}: {detail[:200]}); pass "
            f"a .safetensors file, or a plain state dict saved with torch.save(model.state_dict(), path)")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - re-raised with the file name and what to do
        raise ValueError(_unreadable_weights_message(path, error)) from None  # torch's text suggests unpickling
    for _ in range(2):  # unwrap {"state_dict": {...}} style checkpoints
        if isinstance(obj, Mapping) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
            inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, Mapping):
        raise ValueError(f"weights file {path} holds a {type(obj).__name__}, not a state dict")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"weights file {path} holds no tensors (keys: {sorted(obj)[:10]})")
    return tensors


def load_state_dict_file(model: nn.Module, path: str | Path, *, strict: bool = True) -> None:
    """Load weights from ``path`` (``.safetensors``, else ``torch.load(weights_only=True)``) into
    ``model``. Strips a common ``module.``/``_orig_mod.`` prefix, accepts tensors deduplicated by
    safetensors (tied weights), and raises a ``ValueError`` listing missing, unexpected and
    mis-shaped keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state = _read_state_dict(path)
    expected = model.state_dict()
    for prefix in _PREFIXES:
        if not set(state) & set(expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    # Tensors that share storage in the model (tied weights) are stored once by safetensors.
    by_storage: dict[tuple[int, int], list[str]] = {}
    for key, tensor in expected.items():
        if tensor.numel():
            by_storage.setdefault((tensor.untyped_storage().data_ptr(), tensor.storage_offset()), []).append(key)
    aliases = {k: group for group in by_storage.values() if len(group) > 1 for k in group}
    missing = [k for k in expected if k not in state and not any(a in state for a in aliases.get(k, ()))]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in state if k in expected and state[k].shape != expected[k].shape
    ]
    problems = []
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:8])}"
                        + (" — a different num_classes?" if mismatched else ""))
    if strict and missing:
        problems.append(f"missing from the file ({len(missing)}): {', '.join(missing[:10])}"
                        + (" ..." if len(missing) > 10 else ""))
    if strict and unexpected:
        hint = ""
        if missing:
            close = difflib.get_close_matches(unexpected[0], missing, n=1, cutoff=0.6)
            hint = f" (e.g. {unexpected[0]!r} looks like {close[0]!r})" if close else ""
        problems.append(f"not in the model ({len(unexpected)}): {', '.join(unexpected[:10])}"
                        + (" ..." if len(unexpected) > 10 else "") + hint)
    if problems:
        raise ValueError(
            f"weights in {path} do not fit {type(model).__name__}: " + " | ".join(problems)
        )
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


# ---------------------------------------------------------------------------- network probe
def _unreachable(url: str, timeout: float = 3.0) -> str | None:
    """None if ``url``'s host accepts a TCP connection, else why not (fast offline detection:
    the download libraries themselves retry for up to a minute before giving up)."""
    parsed = urlparse(url)
    host = parsed.hostname
    if not host:
        return None
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as error:
        return f"cannot reach {host}:{port} ({error})"


def _offline_error(spec: str, reason: str, error: BaseException | None = None) -> PretrainedWeightsUnavailableError:
    detail = f": {error}" if error is not None else ""
    return PretrainedWeightsUnavailableError(
        f"pretrained weights for {spec!r} are not available: they are not in the local cache and "
        f"could not be downloaded ({reason}{detail}). This machine appears to be offline. "
        "Use pretrained=False for random weights, or weights=PATH to load a local .safetensors "
        "or state-dict file (for timm, a populated Hugging Face cache also works)."
    )


# ---------------------------------------------------------------------------- builders
def _close(name: str, names: Sequence[str], n: int = 5) -> list[str]:
    return difflib.get_close_matches(name, list(names), n=n, cutoff=0.6)


def _build_timm(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, Preprocessing]:
    import timm
    import timm.data

    if not timm.is_model(name):
        close = _close(name, timm.list_models())
        hint = f" Closest: {', '.join('timm:' + c for c in close)}." if close else ""
        raise ValueError(f"timm has no model named {name!r}.{hint} See list_models(pattern, source='timm').")
    if pretrained:
        model = _build_timm_pretrained(name, kwargs)
    else:
        model = timm.create_model(name, pretrained=False, **kwargs)
    cfg = timm.data.resolve_data_config({}, model=model)
    preprocessing = Preprocessing(
        input_size=tuple(cfg["input_size"]), mean=tuple(cfg["mean"]), std=tuple(cfg["std"]),
        interpolation=cfg.get("interpolation", "bicubic"), crop_pct=float(cfg.get("crop_pct", 1.0)),
        source="timm data config",
    )
    return model, preprocessing


def _build_timm_pretrained(name: str, kwargs: dict[str, Any]) -> nn.Module:
    import timm
    from timm.models import get_pretrained_cfg

    spec = f"timm:{name}"
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        raise PretrainedWeightsUnavailableError(f"timm has no pretrained weights for {spec!r}")
    cached = False
    url = None
    if getattr(cfg, "hf_hub_id", None):
        import huggingface_hub

        for filename in ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin"):
            hit = huggingface_hub.try_to_load_from_cache(cfg.hf_hub_id, filename)
            cached = cached or isinstance(hit, str)
        url = huggingface_hub.constants.ENDPOINT
    elif getattr(cfg, "url", None):
        url = cfg.url
        cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)).is_file()
    if not cached and url is not None:
        reason = _unreachable(url)
        if reason is not None:
            raise _offline_error(spec, reason)
    try:
        return timm.create_model(name, pretrained=True, **kwargs)
    except Exception as error:  # noqa: BLE001 - tell weight problems from argument problems
        timm.create_model(name, pretrained=False, **kwargs)  # re-raises argument errors as they are
        raise _offline_error(spec, "the download failed", error) from error


def _torchvision_preprocessing(name: str) -> Preprocessing:
    from torchvision import models as tvm

    try:
        weights = tvm.get_model_weights(name).DEFAULT
        preset = weights.transforms()
        crop = preset.crop_size[0]
        resize = preset.resize_size[0]
        return Preprocessing(
            input_size=(3, crop, crop), mean=tuple(preset.mean), std=tuple(preset.std),
            interpolation=preset.interpolation.value, crop_pct=min(1.0, crop / resize),
            source=f"torchvision weights meta ({weights})",
        )
    except Exception:  # noqa: BLE001 - no classification preset for this model: say so in `source`
        return _imagenet_default(f"default (ImageNet 224; torchvision has no classification preset for {name})")


def _build_torchvision(name: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, Preprocessing]:
    from torchvision import models as tvm

    names = tvm.list_models()
    if name not in names:
        close = _close(name, names)
        hint = f" Closest: {', '.join('torchvision:' + c for c in close)}." if close else ""
        raise ValueError(f"torchvision has no model named {name!r}.{hint}")
    preprocessing = _torchvision_preprocessing(name)
    if not pretrained:
        return tvm.get_model(name, weights=None, **kwargs), preprocessing
    weights = tvm.get_model_weights(name).DEFAULT
    spec = f"torchvision:{name}"
    if "num_classes" in kwargs and kwargs["num_classes"] != len(weights.meta.get("categories", [])):
        raise ValueError(
            f"{spec} pretrained weights have {len(weights.meta.get('categories', []))} classes; "
            f"num_classes={kwargs['num_classes']} needs pretrained=False (or replace the head yourself)"
        )
    cached = (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(weights.url).path)).is_file()
    if not cached:
        reason = _unreachable(weights.url)
        if reason is not None:
            raise _offline_error(spec, reason)
    try:
        return tvm.get_model(name, weights=weights, **kwargs), preprocessing
    except OSError as error:  # URLError and friends
        raise _offline_error(spec, "the download failed", error) from error


def _build_from_module(spec: str, pretrained: bool, kwargs: dict[str, Any]) -> tuple[nn.Module, Preprocessing]:
    module_name, _, attr_path = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise ValueError(
            f"cannot import {module_name!r} for model spec {spec!r} ({error}); expected "
            "'package.module:factory', 'timm:NAME', 'torchvision:NAME' or 'mechlens:NAME'"
        ) from error
    obj: Any = module
    for part in attr_path.split("."):
        if not hasattr(obj, part):
            public = [n for n in dir(obj) if not n.startswith("_")]
            close = _close(part, public)
            hint = f" Closest: {', '.join(close)}." if close else ""
            raise ValueError(f"{getattr(obj, '__name__', obj)!r} has no attribute {part!r} (spec {spec!r}).{hint}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec!r} is not callable; it must be a factory returning an nn.Module")
    if pretrained:
        params = inspect.signature(obj).parameters
        if "pretrained" not in params and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            raise ValueError(f"{spec!r} takes no 'pretrained' argument; pass weights=PATH instead")
        kwargs = {**kwargs, "pretrained": True}
    model = obj(**kwargs)
    if not isinstance(model, nn.Module):
        raise TypeError(f"{spec!r} returned a {type(model).__name__}, not an nn.Module")
    declared = getattr(model, "mechlens_preprocessing", None) or getattr(obj, "mechlens_preprocessing", None)
    if declared is None:
        return model, _imagenet_default(f"default (ImageNet 224; {spec} declares no mechlens_preprocessing)")
    if isinstance(declared, Preprocessing):
        return model, declared
    data = dict(declared)
    data.setdefault("source", f"{spec}.mechlens_preprocessing")
    return model, Preprocessing.from_dict(data)


def _load_checkpoint_dir(
    path: Path, pretrained: bool, weights: str | Path | None, kwargs: dict[str, Any]
) -> LoadedModel:

    config_path = path / CHECKPOINT_CONFIG
    if not config_path.is_file():
        raise ValueError(
            f"{path} is a directory but has no {CHECKPOINT_CONFIG}; a mechlens checkpoint "
            "directory is written by mechlens.models.training.save_checkpoint"
        )
    config = json.loads(config_path.read_text())
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{config_path} is not a mechlens checkpoint (format={config.get('format')!r})")
    if pretrained:
        raise ValueError("pretrained=True makes no sense for a checkpoint directory")
    spec = config["spec"]
    model_kwargs = {**config.get("model_kwargs", {}), **kwargs}
    loaded = load_model(spec, weights=weights or path / CHECKPOINT_WEIGHTS, **model_kwargs)
    if config.get("preprocessing"):
        loaded.preprocessing = Preprocessing.from_dict(config["preprocessing"])
    loaded.spec = str(path)
    loaded.source = "checkpoint"
    return loaded


# ---------------------------------------------------------------------------- entry point
def load_model(
    spec: str,
    *,
    pretrained: bool = False,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    input_size: int | Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    interpolation: str | None = None,
    device: str | torch.device | None = None,
    **kwargs: Any,
) -> LoadedModel:
    """Build the model named by ``spec`` (see the module docstring) and return it in eval mode
    with its :class:`Preprocessing`. ``input_size``/``mean``/``std``/``interpolation`` override
    the preprocessing; other keyword arguments go to the model's factory."""
    if pretrained and weights is not None:
        raise ValueError("pass either pretrained=True or weights=PATH, not both")
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    path = Path(spec)
    if ":" not in spec or (len(spec) > 1 and spec[1] == ":" and path.exists()):  # allow C:\ paths
        is_checkpoint = (path / "config.json").is_file()
        if path.is_dir() and (is_checkpoint or spec not in _REGISTRY):
            loaded = _load_checkpoint_dir(path, pretrained, weights, kwargs)
            loaded.preprocessing = _with_overrides(loaded.preprocessing, input_size, mean, std, interpolation)
            if device is not None:
                loaded.model.to(device)
            return loaded
        if path.is_file():
            raise ValueError(
                f"{spec!r} is a file; give the architecture as the spec and the file as weights= "
                f"(e.g. load_model('timm:resnet18', weights={spec!r}))"
            )
    prefix, sep, name = spec.partition(":")
    if not sep:
        prefix, name = "mechlens", spec
        if spec not in _REGISTRY:
            suggestions = [f"mechlens:{c}" for c in _close(spec, list(_REGISTRY))]
            try:
                import timm

                if timm.is_model(spec):
                    suggestions.insert(0, f"timm:{spec}")
            except ImportError:  # pragma: no cover - timm is a dependency
                pass
            from torchvision import models as tvm

            if spec in tvm.list_models():
                suggestions.insert(0, f"torchvision:{spec}")
            hint = f" Did you mean {', '.join(suggestions[:5])}?" if suggestions else ""
            raise ValueError(
                f"unknown model spec {spec!r}: not a mechlens model nor an existing checkpoint directory.{hint} "
                "Specs look like 'timm:resnet50', 'torchvision:resnet18', 'mechlens:small_cnn' or "
                "'package.module:factory'."
            )
    if not name:
        raise ValueError(f"model spec {spec!r} has an empty name after {prefix!r}:")

    if prefix == "timm":
        model, preprocessing = _build_timm(name, pretrained, kwargs)
    elif prefix == "torchvision":
        model, preprocessing = _build_torchvision(name, pretrained, kwargs)
    elif prefix == "mechlens":
        entry = get_model_entry(name)
        if pretrained:
            raise PretrainedWeightsUnavailableError(
                f"mechlens:{name} has no downloadable pretrained weights; train one with "
                "mechlens.models.training.train_classifier and load it with weights=PATH or "
                "load_model(CHECKPOINT_DIRECTORY)"
            )
        model = entry.build(**kwargs)
        preprocessing = entry.preprocessing
    else:
        prefix = "module"
        model, preprocessing = _build_from_module(spec, pretrained, kwargs)

    if weights is not None:
        load_state_dict_file(model, weights)
    model.eval()
    if device is not None:
        model.to(device)
    canonical = spec if sep else f"mechlens:{name}"
    return LoadedModel(
        model=model,
        spec=canonical,
        preprocessing=_with_overrides(preprocessing, input_size, mean, std, interpolation),
        source=prefix,
        pretrained=pretrained,
        weights=str(weights) if weights is not None else None,
        model_kwargs=dict(kwargs),
    )


def _register_builtins() -> None:
    from mechlens.models.small_cnn import small_cnn

    common = dict(input_size=(3, 64, 64), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear")
    register_model(
        "small_cnn", small_cnn, **common,
        description="SmallCNN for 64x64 SyntheticShapes: width 16, 3 stages of 2 blocks, stem stride 2 (~0.3M params)",
    )
    register_model(
        "small_cnn_tiny", small_cnn, **common, width=8, blocks_per_stage=1,
        description="SmallCNN, width 8, one block per stage (~25k params): fast unit tests",
    )
    register_model(
        "small_cnn_wide", small_cnn, **common, width=32,
        description="SmallCNN, width 32, 3 stages of 2 blocks (~1.2M params)",
    )
    register_model(
        "small_cnn_32", small_cnn, **{**common, "input_size": (3, 32, 32)}, stem_stride=1,
        description="SmallCNN for 32x32 inputs (stem stride 1)",
    )


_register_builtins()


def to_input(images: Any, model: "LoadedModel | Preprocessing") -> torch.Tensor:
    """Images as ``model`` takes them: ``[B, C, H, W]`` pixels in [0, 1] at its input size,
    resized and centre-cropped as its preprocessing says (not normalised: a ``LoadedModel``
    normalises inside, and every mechlens function that takes a ``LoadedModel`` takes pixels).
    ``images``: one image ``[C, H, W]``, a batch ``[B, C, H, W]``, or a list of images, paths,
    ``"skimage:NAME"`` photos or PIL images (anything :func:`mechlens.data.load_image` reads)."""
    from mechlens.data.images import load_image

    preprocessing = model.preprocessing if isinstance(model, LoadedModel) else model
    if not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"to_input needs a LoadedModel or a Preprocessing, got {type(model).__name__}")
    if isinstance(images, torch.Tensor) and images.dim() == 4:
        items = list(images)
    elif isinstance(images, torch.Tensor) and images.dim() == 3:
        items = [images]
    elif isinstance(images, (list, tuple)):
        items = list(images)
    else:
        items = [images]
    if not items:
        raise ValueError("to_input got no images")
    transform = preprocessing.transform(normalize=False)
    batch = []
    for item in items:
        image = item.detach().float().cpu() if isinstance(item, torch.Tensor) else load_image(item)
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ValueError(f"expected an image [C, H, W] with 1 or 3 channels, got {tuple(image.shape)}")
        if float(image.min()) < 0 or float(image.max()) > 1:
            raise ValueError("image tensors must hold pixels in [0, 1] (the model normalises them itself); "
                             f"got values in [{float(image.min()):.3g}, {float(image.max()):.3g}]")
        if image.shape[0] == 1 and preprocessing.input_size[0] == 3:
            image = image.expand(3, -1, -1)
        batch.append(transform(image))
    return torch.stack(batch)
