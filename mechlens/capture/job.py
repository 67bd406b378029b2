"""Capture jobs: run a model over a dataset and stream chosen layers' activations into the store.

>>> result = capture_to_store(load_model("mechlens:small_cnn"), "synthetic:shapes?n=256",
...                           "runs/acts", layers=["stage2", "stage3"], spatial="all")

One row per (image, position) for ``spatial="all"``, ``k`` seeded random positions per image
for ``spatial="random"``, one pooled row per image for ``"mean"`` / ``"max"``, the first
token for ``"cls"``. The row index holds the dataset index as ``sample_id``, the flat position
(``y * W + x`` or the token index; -1 for pooled rows) and the label.

The pipeline, GPU-first: DataLoader workers decode and pin batches; the batch is copied
non-blocking to the device, normalised there and run under ``inference_mode`` (autocast and
channels_last on CUDA); the selected rows are cast to the stored dtype *on the device* and
copied into pinned host buffers asynchronously; batch ``i`` is handed to the store's
background writer only after batch ``i + 1``'s forward has been queued, so device→host copies
and disk writes overlap compute. When every hooked layer runs once per forward, the forward
is cut off after the last of them (the head of the network is never computed).

Resume: every write carries a cursor (images of this rank done so far); rerunning the same job
on the same store continues after the last committed image. Distributed: under ``torchrun``
each rank takes a contiguous block of the dataset and writes its own shard.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from activation_store import LayerSpec, Rows, StoreWriter
from activation_store.errors import IncompatibleStoreError
from mechlens._distributed import DistContext, distributed_context
from mechlens.capture.config import SPATIAL_MODES, CaptureConfig, check_keys
from mechlens.engine import HookSet, LayerNotFiredError, StopAfter, eval_mode
from mechlens.data.adapters import UnreadableImageError, build_dataset, check_nonempty
from mechlens.features.layout import as_position_rows, check_cls_token, infer_layouts
from mechlens.models.layers import resolve_layers
from mechlens.models.loading import LoadedModel, Preprocessing

__all__ = [
    "SPATIAL_MODES",
    "CaptureConfig",
    "CaptureResult",
    "SkippedSample",
    "capture_to_store",
    "distributed_context",
    "model_fingerprint",
    "random_positions",
]

_STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_AUTOCAST = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass(frozen=True)
class SkippedSample:
    """An image left out of the capture (unreadable at decode time)."""

    sample_id: int
    reason: str


@dataclass
class CaptureResult:
    """What a capture job did. Counts are for this process (rank)."""

    store: str
    layers: list[str]
    rank: int
    world_size: int
    images_assigned: int  # this rank's share of the dataset
    images_before: int  # already done by an earlier (interrupted) run
    images_captured: int  # newly processed in this run (including skipped ones)
    rows: dict[str, int]  # rows written in this run, per layer
    skipped: list[SkippedSample] = field(default_factory=list)
    # files an image folder left out when it was built (unreadable, or of another size with
    # on_size_mismatch='skip'): they never got a sample id, but they are data the user gave us
    files_skipped: list[Any] = field(default_factory=list)
    files_resized: int = 0
    seconds: float = 0.0
    bytes_written: int = 0
    early_stop: bool = False
    # rows holding NaN or Inf (in the stored dtype) written in this run, per layer; only with
    # nonfinite='count' (the default 'error' stops at the first such batch)
    nonfinite_rows: dict[str, int] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.images_captured / self.seconds if self.seconds > 0 else 0.0

    @property
    def complete(self) -> bool:
        return self.images_before + self.images_captured >= self.images_assigned


# ----------------------------------------------------------------------------- helpers
def model_fingerprint(model: nn.Module) -> str:
    """XXH3-64 of every parameter and buffer (names, shapes, dtypes, bytes): a resume with other
    weights (another random init, another checkpoint) is then refused by the store."""
    import xxhash

    digest = xxhash.xxh3_64()
    for name, tensor in sorted({**dict(model.named_parameters()), **dict(model.named_buffers())}.items()):
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.detach().to("cpu").contiguous()
        if data.dtype == torch.bfloat16:
            data = data.view(torch.int16)
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()


def random_positions(sample_ids: np.ndarray, num_positions: int, k: int, seed: int) -> np.ndarray:
    """``k`` distinct positions in ``[0, num_positions)`` for each sample, ``[B, k]``, sorted.

    A function of ``(seed, sample_id)`` only (a splitmix64 hash ranks the positions), so a resumed
    or distributed run picks exactly the positions a single uninterrupted run picks.
    """
    if k > num_positions:
        raise ValueError(f"k={k} random positions per image, but the layer has only {num_positions} positions")
    with np.errstate(over="ignore"):
        ids = sample_ids.astype(np.uint64)[:, None]
        pos = np.arange(num_positions, dtype=np.uint64)[None, :]
        z = (ids * np.uint64(0x9E3779B97F4A7C15)) ^ (pos + np.uint64(seed) * np.uint64(0xD1B54A32D192ED03))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    chosen = np.argpartition(z, k - 1, axis=1)[:, :k] if k < num_positions else np.broadcast_to(
        np.arange(num_positions), z.shape)
    return np.sort(chosen, axis=1).astype(np.int64)


def _rank_block(n: int, rank: int, world: int) -> range:
    """Contiguous block of dataset indices for ``rank`` (sizes differ by at most one)."""
    start = n * rank // world
    return range(start, n * (rank + 1) // world)


class _IndexedSamples(Dataset):
    """``dataset[indices[i]]`` as ``(sample_id, image, label)``; an unreadable image becomes
    ``(sample_id, None, reason)`` when skipping, so one bad file does not kill a worker."""

    def __init__(self, dataset: Dataset, indices: Sequence[int], skip_unreadable: bool) -> None:
        self.dataset = dataset
        self.indices = indices
        self.skip_unreadable = skip_unreadable

    def __len__(self) -> int:
        return len(self.indices)

    def _unpack(self, sample_id: int, item: Any) -> tuple[int, Any, Any]:
        if isinstance(item, (tuple, list)):
            image, label = item[0], (item[1] if len(item) > 1 else -1)
        elif isinstance(item, dict):
            image, label = item.get("image", item.get("pixel_values")), item.get("label", -1)
        else:
            image, label = item, -1
        if not isinstance(image, torch.Tensor):
            image = torch.as_tensor(np.asarray(image))
        return sample_id, image, int(label) if label is not None else -1

    def __getitem__(self, i: int) -> tuple[int, Any, Any]:
        sample_id = int(self.indices[i])
        try:
            return self._unpack(sample_id, self.dataset[sample_id])
        except (UnreadableImageError, OSError) as error:
            if not self.skip_unreadable:
                raise
            return sample_id, None, f"{type(error).__name__}: {error}"

    def __getitems__(self, positions: Sequence[int]) -> list[tuple[int, Any, Any]]:
        batched = getattr(self.dataset, "__getitems__", None)
        if batched is None:
            return [self[i] for i in positions]
        ids = [int(self.indices[i]) for i in positions]
        try:
            items = batched(ids)
        except (UnreadableImageError, OSError):
            return [self[i] for i in positions]  # find and skip the bad ones one by one
        return [self._unpack(sid, item) for sid, item in zip(ids, items)]


@dataclass
class _Batch:
    sample_ids: torch.Tensor
    images: torch.Tensor
    labels: torch.Tensor
    skipped: list[SkippedSample]
    size: int  # samples consumed, including skipped ones

    def pin_memory(self) -> "_Batch":  # DataLoader(pin_memory=True) calls this in its pin thread
        self.images = self.images.pin_memory()
        return self


def _collate(items: list[tuple[int, Any, Any]]) -> _Batch:
    good = [it for it in items if it[1] is not None]
    skipped = [SkippedSample(sid, str(reason)) for sid, image, reason in items if image is None]
    if good:
        shapes = {tuple(it[1].shape) for it in good}
        if len(shapes) > 1:
            raise ValueError(
                f"images of different sizes in one batch: {sorted(shapes)} (sample ids "
                f"{[it[0] for it in good][:8]}); resize them in the dataset (e.g. image_size=) or pass "
                "on_size_mismatch='resize'"
            )
        images = torch.stack([it[1] for it in good])
    else:
        images = torch.empty(0)
    return _Batch(
        sample_ids=torch.tensor([it[0] for it in good], dtype=torch.int64),
        images=images,
        labels=torch.tensor([it[2] for it in good], dtype=torch.int64),
        skipped=skipped,
        size=len(items),
    )


class _LayerTaps:
    """Forward hooks that keep each layer's latest output (no copy: we only read it before the
    next forward) and optionally stop the forward once all layers have run."""

    def __init__(self, model: nn.Module, layers: list[str]) -> None:
        self.model = model
        self.layers = layers
        self.outputs: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = dict.fromkeys(layers, 0)
        self.select: Callable[[str, torch.Tensor], Any] | None = None
        self._hooks = HookSet()
        self._stopper: StopAfter | None = None

    @property
    def stop_early(self) -> bool:
        return self._stopper is not None and self._stopper.armed

    @stop_early.setter
    def stop_early(self, value: bool) -> None:
        if self._stopper is not None:
            self._stopper.armed = bool(value)

    def __enter__(self) -> "_LayerTaps":
        try:
            for name in self.layers:
                self._hooks.layer(self.model, name, self._hook(name))
            self._stopper = StopAfter(self.model, self.layers, self._hooks, armed=False)  # after the taps
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._hooks.remove()
        self._stopper = None

    def _hook(self, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if not isinstance(output, torch.Tensor):
                raise TypeError(
                    f"layer {name!r} returns a {type(output).__name__}, not a tensor; capture the "
                    "submodule that produces the tensor you want"
                )
            # Rows are selected and cast inside the hook: the result is a fresh tensor, so an
            # in-place op downstream (ReLU(inplace=True)) cannot change what we keep.
            self.outputs[name] = self.select(name, output) if self.select is not None else output.clone()
            self.calls[name] += 1
        return hook

    def run(self, inputs: torch.Tensor, select: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
        """Forward ``inputs``; ``select(name, output)`` turns each output into what is kept."""
        self.outputs = {}
        self.calls = dict.fromkeys(self.layers, 0)
        self.select = select
        try:
            assert self._stopper is not None, "use the taps inside their with block"
            self._stopper.run(self.model, inputs)
        finally:
            self.select = None
        silent = [n for n in self.layers if n not in self.outputs]
        if silent:
            raise LayerNotFiredError(
                f"layer(s) {', '.join(silent)} did not run during the forward pass of "
                f"{type(self.model).__name__}, so there is nothing to capture (an unused module or a "
                "branch the forward skips). Nothing was written."
            )
        return self.outputs


def _select_rows(
    activation: torch.Tensor, layout: str, spatial: str, k: int, sample_ids: np.ndarray, seed: int
) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """Rows ``[N, C]`` (on the activation's device), their positions and their batch indices."""
    rows, spatial_shape = as_position_rows(activation, layout)
    b, p, c = rows.shape
    if spatial == "all":
        return rows.reshape(b * p, c), np.tile(np.arange(p), b), np.repeat(np.arange(b), p)
    if spatial in ("mean", "max"):
        pooled = rows.float().mean(dim=1) if spatial == "mean" else rows.amax(dim=1)
        return pooled, np.full(b, -1), np.arange(b)
    if spatial == "cls":
        return rows[:, 0], np.zeros(b, dtype=np.int64), np.arange(b)
    chosen = random_positions(sample_ids, p, k, seed)  # [B, k]
    index = torch.from_numpy(chosen).to(rows.device, non_blocking=True)
    picked = rows.gather(1, index[:, :, None].expand(b, k, c))
    return picked.reshape(b * k, c), chosen.reshape(-1), np.repeat(np.arange(b), k)


class _HostBuffers:
    """Double-buffered pinned host memory per layer for asynchronous device→host copies."""

    def __init__(self, pinned: bool) -> None:
        self.pinned = pinned
        self._slots: dict[tuple[str, int], torch.Tensor] = {}
        self._turn = 0

    def next_turn(self) -> None:
        self._turn ^= 1

    def copy(self, name: str, rows: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return rows.to("cpu")
        key = (name, self._turn)
        slot = self._slots.get(key)
        if slot is None or slot.numel() < rows.numel() or slot.dtype != rows.dtype:
            slot = torch.empty(rows.numel(), dtype=rows.dtype, pin_memory=True)
            self._slots[key] = slot
        view = slot[: rows.numel()].view(rows.shape)
        view.copy_(rows, non_blocking=True)
        return view


def _to_numpy_stored(rows: torch.Tensor, stored: str) -> np.ndarray:
    if stored == "bfloat16":
        return rows.view(torch.int16).numpy().view(np.uint16)  # bit patterns, as the store keeps them
    return rows.numpy()


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 1) - 1))


# ----------------------------------------------------------------------------- the job
def capture_to_store(
    model: LoadedModel | nn.Module,
    data: Dataset | str,
    out: str | os.PathLike,
    config: CaptureConfig | None = None,
    *,
    preprocessing: Preprocessing | None = None,
    rank: int | None = None,
    world_size: int | None = None,
    **overrides: Any,
) -> CaptureResult:
    """Capture ``config.layers`` of ``model`` over ``data`` into the store at ``out`` (created or resumed).

    ``config``: a :class:`~mechlens.capture.CaptureConfig`; keyword ``overrides`` build it (no
    ``config``) or replace its fields, so ``capture_to_store(m, d, out, layers=["stage2"], k=8)``
    and ``capture_to_store(m, d, out, CaptureConfig(layers=["stage2"], k=8))`` are the same job;
    a keyword that is not a config field is a ``TypeError`` naming the valid ones. The store's
    provenance records the config (``provenance["capture"]["config"]``, its ``to_dict()``).
    ``preprocessing`` replaces the model's own; ``rank`` / ``world_size`` default to torchrun's
    environment (one config serves every rank).

    ``data`` is a torch ``Dataset`` yielding ``(image, label)`` / images in ``[0, 1]`` (normalised
    on the device with the model's preprocessing when ``normalize``), or a dataset spec string
    for :func:`mechlens.data.build_dataset` (built at the model's input size).

    The config's fields: ``spatial``: one of :data:`SPATIAL_MODES` (``random`` keeps ``k``
    seeded positions per image). ``dtype``: the stored dtype. ``autocast``: ``"auto"`` (bf16 on
    CUDA, off on CPU), ``"bf16"``, ``"fp16"`` or ``None``. ``on_size_mismatch``: ``"error"``
    (default) or ``"resize"`` when images differ from the model's input size; ``on_unreadable``:
    ``"skip"`` (default; counted in the result, including files an image folder left out when it
    was built) or ``"error"``. For a spec string both reach
    the dataset itself (a spec that says otherwise is refused, never silently overridden).
    ``commit_every``: a :class:`~activation_store.CommitPolicy` or its string (``"5s,256MB"``,
    ``"2000rows"``): a kill loses at most the rows since the last commit. ``nonfinite``:
    ``"error"`` (default) stops at a batch whose rows hold NaN or Inf in the stored dtype
    (earlier batches stay committed); ``"count"`` stores them and counts them in
    ``result.nonfinite_rows`` (and the store's ``info()``). ``layout``: each layer's layout is
    taken from the model (see :func:`mechlens.features.layout.infer_layouts`); pass ``"nchw"``,
    ``"nhwc"``, ``"nlc"``, ... (or a per-layer mapping) where it cannot be, and
    ``num_prefix_tokens`` for a token model that does not declare its CLS/register tokens. The
    store records each layer's layout, prefix-token count and where the layout came from.
    """
    started = time.perf_counter()
    if config is None:
        check_keys(overrides, "capture_to_store() keyword", TypeError)
        if "layers" not in overrides:
            raise TypeError("capture_to_store() needs the layers to capture: layers=... or a CaptureConfig")
        config = CaptureConfig(**overrides)
    elif not isinstance(config, CaptureConfig):
        raise TypeError(f"config must be a CaptureConfig, got {type(config).__name__} "
                        "(CaptureConfig.from_dict / from_json read a dict or JSON text)")
    elif overrides:
        config = config.replace(**overrides)
    c = config
    layers, spatial, k, dtype, seed, layout = c.layers, c.spatial, c.k, c.dtype, c.seed, c.layout
    batch_size, num_workers, device, normalize = c.batch_size, c.num_workers, c.device, c.normalize
    autocast, channels_last, max_images, progress = c.autocast, c.channels_last, c.max_images, c.progress
    on_size_mismatch, on_unreadable, nonfinite = c.on_size_mismatch, c.on_unreadable, c.nonfinite
    backend, compression, chunk_bytes, commit_every = c.backend, c.compression, c.chunk_bytes, c.commit_every
    model_name, num_prefix_tokens = c.model_name, c.num_prefix_tokens

    loaded = model if isinstance(model, LoadedModel) else None
    net = loaded.model if loaded is not None else model
    if not isinstance(net, nn.Module):
        raise TypeError(f"model must be an nn.Module or a LoadedModel, got {type(model).__name__}")
    if preprocessing is None and loaded is not None:
        preprocessing = loaded.preprocessing
    dataset_spec = data if isinstance(data, str) else None
    if isinstance(data, str):
        size = preprocessing.image_size if preprocessing is not None else None
        data = build_dataset(data, image_size=size, on_unreadable=on_unreadable, on_size_mismatch=on_size_mismatch)
    for option, given in (("on_unreadable", on_unreadable), ("on_size_mismatch", on_size_mismatch)):
        held = getattr(data, option, None)  # a dataset that applies the policy itself (image folders)
        if given is not None and held is not None and held != given:
            raise ValueError(f"the dataset was built with {option}={held!r} but the capture was asked for "
                             f"{option}={given!r}; build the dataset with {option}={given!r} (or pass the spec string)")
    on_unreadable = on_unreadable or getattr(data, "on_unreadable", None) or "skip"
    resize_mismatched = (on_size_mismatch or getattr(data, "on_size_mismatch", None)) == "resize"
    total = check_nonempty(data, "capture dataset")
    if max_images is not None:
        total = min(total, max_images)
    layer_names = resolve_layers(net, layers)

    dist = distributed_context(rank, world_size)
    target = torch.device(device) if device is not None else (
        torch.device("cuda", dist.local_rank % torch.cuda.device_count()) if torch.cuda.is_available() else torch.device("cpu"))
    on_cuda = target.type == "cuda"
    if autocast == "auto":
        autocast = "bf16" if on_cuda and torch.cuda.is_bf16_supported() else None
    if channels_last is None:
        channels_last = on_cuda and any(isinstance(m, nn.Conv2d) for m in net.modules())

    modes = eval_mode(net)  # the engine's policy: every module gets its own flag back
    modes.__enter__()
    net.to(target)
    if channels_last:
        net.to(memory_format=torch.channels_last)
    identity = f"{model_name or (loaded.spec if loaded else type(net).__module__ + '.' + type(net).__qualname__)}" \
               f"@{model_fingerprint(net)}"
    block = _rank_block(total, dist.rank, dist.world_size)
    taps = _LayerTaps(net, layer_names)
    buffers = _HostBuffers(pinned=on_cuda)
    amp = torch.autocast(target.type, dtype=_AUTOCAST[autocast]) if autocast else None

    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.to(target, non_blocking=True)
        if not x.is_floating_point():
            x = x.float() / 255.0
        if x.dim() == 3:
            x = x[None]
        if preprocessing is not None:
            expected = preprocessing.image_size
            if tuple(x.shape[-2:]) != expected:
                if not resize_mismatched:
                    raise ValueError(
                        f"images are {x.shape[-2]}x{x.shape[-1]} but the model expects {expected[0]}x{expected[1]} "
                        "(HxW); build the dataset at the model's input size or pass on_size_mismatch='resize' "
                        "(--resize). Nothing was written for this batch."
                    )
                x = torch.nn.functional.interpolate(x, size=expected, mode="bilinear", antialias=True, align_corners=False)
            if normalize:
                x = preprocessing.normalize(x)
        return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x

    def forward(images: torch.Tensor, select: Callable[[str, torch.Tensor], Any] | None = None) -> dict[str, Any]:
        x = prepare(images)
        with torch.inference_mode():
            if amp is None:
                return taps.run(x, select)
            with amp:
                return taps.run(x, select)

    result = CaptureResult(store=str(out), layers=layer_names, rank=dist.rank, world_size=dist.world_size,
                           images_assigned=len(block), images_before=0, images_captured=0,
                           rows=dict.fromkeys(layer_names, 0), files_skipped=list(getattr(data, "skipped", []) or []),
                           files_resized=len(getattr(data, "resized", []) or []))
    writer: StoreWriter | None = None
    try:
        probe = _collate([_IndexedSamples(data, [block.start if len(block) else 0], False)[0]])
        known = infer_layouts(net, layer_names, prepare(probe.images), layout=layout, num_prefix_tokens=num_prefix_tokens)
        with taps:
            # A dry forward on one real sample: output shapes (the store's row widths), layers that
            # never fire, wrong input sizes, and whether the forward can be cut short.
            outputs = forward(probe.images)
            layouts = {name: known[name].layout for name in outputs}
            taps.stop_early = all(count == 1 for count in taps.calls.values())
            result.early_stop = taps.stop_early
            specs = {}
            for name, activation in outputs.items():
                rows, shape = as_position_rows(activation, layouts[name])
                if spatial == "random" and k > rows.shape[1]:
                    raise ValueError(f"k={k} random positions per image, but layer {name!r} has only {rows.shape[1]} positions")
                if spatial == "cls":
                    check_cls_token(name, known[name])
                meta = {"spatial": spatial, "layout": layouts[name], "spatial_shape": list(shape),
                        "num_prefix_tokens": known[name].num_prefix_tokens, "layout_source": known[name].source}
                if spatial == "random":
                    meta.update(k=int(k), seed=int(seed))
                specs[name] = LayerSpec(dim=int(rows.shape[-1]), dtype=dtype, meta=meta)
            provenance = {
                "capture": {
                    "dataset": repr(data)[:500], "dataset_spec": dataset_spec, "num_images": total,
                    # what rebuilding the dataset from its spec needs to give the same sample ids
                    "dataset_options": {"on_unreadable": on_unreadable, "on_size_mismatch": (
                        on_size_mismatch or getattr(data, "on_size_mismatch", None) or "error")},
                    "world_size": dist.world_size,
                    "preprocessing": preprocessing.to_dict() if preprocessing is not None else None,
                    "normalize": normalize, "autocast": autocast, "batch_size": batch_size,
                    "config": config.to_dict(),  # CaptureConfig.from_dict(...) reruns this capture
                },
                "model": {"spec": loaded.spec if loaded else None, "weights": loaded.weights if loaded else None,
                          "pretrained": loaded.pretrained if loaded else None},
            }
            writer_kwargs: dict[str, Any] = dict(model=identity, layers=specs, shard=dist.rank, backend=backend,
                                                 compression=compression, nonfinite="count",
                                                 commit_every=commit_every, provenance=provenance)
            if chunk_bytes is not None:
                writer_kwargs["chunk_bytes"] = chunk_bytes
            writer = StoreWriter(out, **writer_kwargs)
            done = _check_cursor(writer.cursor, total, dist, out)
            result.images_before = done
            todo = block[done:]
            workers = _default_workers() if num_workers is None else int(num_workers)
            loader = DataLoader(
                _IndexedSamples(data, todo, skip_unreadable=on_unreadable == "skip"),
                batch_size=batch_size, shuffle=False,
                num_workers=workers, collate_fn=_collate, pin_memory=on_cuda,
                prefetch_factor=4 if workers else None,
            )
            result.nonfinite_rows = dict.fromkeys(layer_names, 0)
            _run_batches(loader, forward, writer, result, layouts, spatial, k, seed, dtype, buffers,
                         on_cuda, done, total, dist, progress, nonfinite)
            writer.close()
    except BaseException:
        if writer is not None:
            # Rows written so far are whole batches with a matching cursor: commit them so a rerun
            # resumes after them (also on Ctrl-C). A failed writer keeps its last commit.
            try:
                writer.close()
            except Exception:  # noqa: BLE001 - report the original error, not the follow-up
                pass
        raise
    finally:
        modes.__exit__(None, None, None)
        if dist.initialized_here:
            import torch.distributed as tdist

            tdist.destroy_process_group()
    result.seconds = time.perf_counter() - started
    return result


def _check_cursor(cursor: Any, total: int, dist: DistContext, out: Any) -> int:
    if cursor is None:
        return 0
    if not isinstance(cursor, dict) or "images_done" not in cursor:
        raise IncompatibleStoreError(f"shard of rank {dist.rank} in {out} was not written by a capture job (cursor {cursor!r})")
    if cursor.get("world_size") != dist.world_size or cursor.get("num_images") != total:
        raise IncompatibleStoreError(
            f"{out} was captured with world_size={cursor.get('world_size')} over {cursor.get('num_images')} images; "
            f"this run has world_size={dist.world_size} over {total} images, so the ranks' blocks differ. Resume "
            "with the same number of ranks and dataset, or write a new store."
        )
    return int(cursor["images_done"])


def _refuse_nonfinite(bad: dict[str, int], rows: dict[str, Rows], dtype: str) -> None:
    """The one-line error of a batch with NaN / Inf rows under ``nonfinite='error'``."""
    from activation_store.errors import InvalidRowsError
    from activation_store.writer import nonfinite_row_mask

    name = next(n for n, count in bad.items() if count)
    ids = np.unique(np.asarray(rows[name].sample_ids)[nonfinite_row_mask(rows[name].data, dtype)])
    shown = ", ".join(str(i) for i in ids[:10]) + (", ..." if len(ids) > 10 else "")
    overflow = {"float16": " or beyond float16's range (+-65504; --dtype bfloat16 or float32 keeps it)",
                "bfloat16": ""}.get(dtype, "")
    raise InvalidRowsError(
        f"layer {name!r}: {bad[name]} rows of this batch are NaN or Inf (sample ids {shown}; layers: "
        f"{', '.join(f'{n} {c}' for n, c in bad.items() if c)}): the model's activations there are not finite"
        f"{overflow}; nothing of this batch was written (earlier batches are committed, a rerun resumes here). "
        "Fix the model or inputs, or pass nonfinite='count' (CLI: --allow-nonfinite) to store such rows and count them"
    )


class _StopAtBatchBoundary:
    """SIGINT / SIGTERM during a capture: finish the batch in hand, then stop before the next one.

    An exception raised at an arbitrary point (Python's default Ctrl-C) could fall between a
    batch's rows and its cursor inside the writer, and a resume would then redo or skip images.
    A second signal interrupts at once unless a batch is being handed to the writer.
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.critical = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopAtBatchBoundary":
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None and not self.critical:
            raise KeyboardInterrupt(f"signal {signum} (second)")
        self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"signal {self.signum}")


def _run_batches(loader: DataLoader, forward: Callable, writer: StoreWriter, result: CaptureResult,
                 layouts: dict[str, str], spatial: str, k: int, seed: int, dtype: str, buffers: _HostBuffers,
                 on_cuda: bool, done: int, total: int, dist: DistContext, progress: bool, nonfinite: str = "error") -> None:
    from tqdm.auto import tqdm

    stored = _STORE_DTYPES[dtype]
    bar = tqdm(total=result.images_assigned, initial=done, unit="img", desc=f"capture rank {dist.rank}",
               disable=not progress or dist.rank != 0, dynamic_ncols=True)
    t0 = time.perf_counter()
    images_done = done

    def finish(item: tuple[Any, ...]) -> None:
        stop.critical = True
        try:
            _finish(item)
        finally:
            stop.critical = False

    def _finish(item: tuple[Any, ...]) -> None:
        nonlocal images_done
        event, selected, batch = item
        if event is not None:
            event.synchronize()  # the asynchronous device->host copies of this batch are complete
        images_done += batch.size
        cursor = {"images_done": images_done, "world_size": dist.world_size, "num_images": total}
        sample_ids, labels = batch.sample_ids.numpy(), batch.labels.numpy()
        rows = {
            name: Rows(_to_numpy_stored(host, dtype), sample_ids=sample_ids[owners], positions=positions,
                       labels=labels[owners])
            for name, (host, positions, owners, _) in selected.items()
        }
        bad = {name: int(count[0]) for name, (_, _, _, count) in selected.items()}
        if nonfinite == "error" and any(bad.values()):
            _refuse_nonfinite(bad, rows, dtype)
        # All layers and the cursor in one all-or-nothing call: a resume never sees half a batch.
        writer.write(rows, cursor=cursor)
        for name, count in bad.items():
            result.nonfinite_rows[name] = result.nonfinite_rows.get(name, 0) + count
        result.skipped.extend(batch.skipped)
        for name, r in rows.items():
            result.rows[name] += r.data.shape[0]
            result.bytes_written += r.data.nbytes
        result.images_captured = images_done - done
        elapsed = max(time.perf_counter() - t0, 1e-9)
        bar.update(batch.size)
        bar.set_postfix_str(
            f"{sum(result.rows.values()) / elapsed:,.0f} rows/s, {result.bytes_written / elapsed / 1e6:,.1f} MB/s"
            + (f", skipped {len(result.skipped)}" if result.skipped else ""),
            refresh=False,
        )

    pending: tuple[Any, ...] | None = None
    stop = _StopAtBatchBoundary()
    try:
        stop.__enter__()
        stop.check()
        for batch in loader:
            selected: dict[str, Any] = {}
            event = None
            if batch.images.numel():  # else every image of the batch was unreadable
                sample_ids = batch.sample_ids.numpy()

                def select(name: str, output: torch.Tensor) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
                    rows, positions, owners = _select_rows(output, layouts[name], spatial, k, sample_ids, seed)
                    cast = rows.to(stored)
                    if cast is rows:  # no conversion happened: copy, the output may be modified in place
                        cast = rows.clone()
                    # rows with NaN / Inf in the stored dtype, counted on the device and copied back
                    # with the rows (no extra sync); checked in finish()
                    bad = (~torch.isfinite(cast)).any(dim=-1).sum().reshape(1)
                    return buffers.copy(name, cast), positions, owners, buffers.copy(f"{name}\0nonfinite", bad)

                selected = forward(batch.images, select)
                if on_cuda:
                    event = torch.cuda.Event()
                    event.record()
                buffers.next_turn()
            if pending is not None:
                finishing, pending = pending, None
                finish(finishing)  # the previous batch's copies ran while this forward was queued
            pending = (event, selected, batch)
            stop.check()  # a signal stops here, between batches (the one in hand is finished below)
        if pending is not None:
            finishing, pending = pending, None
            finish(finishing)
    except BaseException:
        # Interrupted (Ctrl-C, kill, a bad batch): the previous batch is complete, keep it.
        if pending is not None:
            finish(pending)
        raise
    finally:
        stop.__exit__()
        bar.close()


def captured_dataset(store: Any, *, image_size: Any = None) -> Any:
    """The dataset ``store`` was captured from, rebuilt from the spec its capture recorded, with the
    capture's own policies (so sample ``i`` of the store is item ``i`` of the dataset). Raises when
    the capture was given a dataset object rather than a spec (pass that dataset yourself)."""
    from activation_store import ActivationStore

    store = store if isinstance(store, ActivationStore) else ActivationStore(store)
    recorded = store.manifest.provenance.get("capture", {})
    spec = recorded.get("dataset_spec")
    if not spec:
        raise ValueError("the store does not record the dataset it was captured from (it was given a dataset object, "
                         "not a spec); pass the dataset yourself")
    return build_dataset(spec, image_size=image_size, **recorded.get("dataset_options", {}))
