"""ROAR, RemOve And Retrain (Hooker et al., "A benchmark for interpretability methods in deep
neural networks", NeurIPS 2019).

Deleting the pixels a map ranks highest and watching the *same* model's score (deletion curves)
confounds two things: the pixels carried information, and the edited images are out of the
distribution the model was trained on. ROAR removes the confound by retraining: for each method
and each removal fraction ``f``, the top ``f`` of every image's pixels by that method's ranking
are replaced by the per-channel mean of the training images, in the training *and* the test
images, a fresh model is trained from scratch on the degraded training set (same recipe, same
seed) and its test accuracy is reported. A method whose top pixels carry the class information
makes that accuracy fall faster than a random ranking (the control) does.

* The maps come from the trained model being explained (``model``), once per image of both
  splits, for the predicted class (``target="predicted"``, default) or the label
  (``target="label"``); magnitudes rank the pixels (``absolute=True``: ROAR asks where the
  information is, whatever its sign). Ties (CAM plateaus, constant maps) are broken by a seeded
  random order, as in :func:`~mechlens.evaluation.deletion_curve`.
* Caveat (Rong et al. 2022, "ROAD"): the *shape* of the removed region can itself leak the class
  (a silhouette of mean-coloured pixels), so ROAR can under-rate a method; read the curves beside
  the random control, not alone.
* **Cache and resume.** With ``cache_dir`` every method's maps (``maps/``) and every retrained
  accuracy (``runs/``, one JSON file each, written atomically) are stored under keys that hash the
  method and its arguments, the fraction, the explained model's weights, the data and the retrain
  recipe (the fresh model's initial weights and the hyper-parameters). A rerun reads them back;
  a killed run resumes where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from activation_store.jsonutil import dumps as json_dumps
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from mechlens.attribution.base import attribute, get_method
from mechlens.attribution.baselines import dataset_mean
from mechlens.capture import model_fingerprint
from mechlens.models.training import evaluate_accuracy, train_classifier

__all__ = ["RetrainRecipe", "RoarResult", "roar", "remove_top_pixels", "pixel_ranks"]

RANDOM = "random"
TARGETS = ("predicted", "label")


# ---------------------------------------------------------------------------- the retraining recipe
@dataclass(frozen=True)
class RetrainRecipe:
    """How ROAR retrains from scratch: ``make_model()`` must return a *fresh*, seeded model (an
    ``nn.Module`` or a :class:`~mechlens.models.LoadedModel`, whose preprocessing then normalizes
    the batches) with the same initial weights on every call; the rest are
    :func:`~mechlens.models.training.train_classifier`'s arguments."""

    make_model: Callable[[], Any]
    epochs: int = 8
    batch_size: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    seed: int = 0
    channels_last: bool = True
    device: str = "cpu"

    @classmethod
    def from_shapes(cls, recipe: Any, **changes: Any) -> "RetrainRecipe":
        """The recipe of a :class:`~mechlens.models.ShapesRecipe` (its architecture, model seed and
        optimisation); ``changes`` override fields (e.g. ``epochs=``)."""
        from mechlens.models.loading import load_model

        def make() -> Any:
            return load_model(recipe.model_spec, num_classes=recipe.train_data.num_classes, seed=recipe.model_seed)

        base = cls(make_model=make, epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr,
                   weight_decay=recipe.weight_decay, seed=recipe.seed, channels_last=recipe.channels_last)
        return dataclasses.replace(base, **changes)

    @classmethod
    def from_model(cls, model: Any, *, model_seed: int = 0, **changes: Any) -> "RetrainRecipe":
        """Retrain the architecture of ``model`` (an ``nn.Module`` or a ``LoadedModel``, which then
        normalizes the batches) from a fresh copy: its weights re-initialised by every submodule's
        ``reset_parameters()`` under a seeded RNG (as the randomization check does), the same on every
        call; ``changes`` set the other fields (``epochs=``, ``device=``...). For models with no recipe
        of their own (a checkpoint, a timm or torchvision architecture)."""
        from mechlens.evaluation.randomization import randomize_module_

        net = model if isinstance(model, nn.Module) else getattr(model, "model", None)
        wrapped = net is not model and dataclasses.is_dataclass(model)
        if not isinstance(net, nn.Module) or (net is not model and not wrapped):
            raise TypeError(f"RetrainRecipe.from_model takes an nn.Module or a LoadedModel, got {type(model).__name__}")
        if not any(True for _ in net.parameters()):
            raise ValueError(f"{type(net).__name__} has no parameters: there is nothing to retrain")

        def make() -> Any:
            import copy

            fresh = copy.deepcopy(net).cpu()
            randomize_module_(fresh, model_seed)
            return fresh if net is model else dataclasses.replace(model, model=fresh)

        return dataclasses.replace(cls(make_model=make), **changes)

    def build(self) -> tuple[nn.Module, Callable[[torch.Tensor], torch.Tensor] | None]:
        """A fresh model and the batch transform it trains with (its normalization, if any)."""
        made = self.make_model()
        if isinstance(made, nn.Module):
            return made, None
        module, preprocessing = getattr(made, "model", None), getattr(made, "preprocessing", None)
        if not isinstance(module, nn.Module):
            raise TypeError(f"RetrainRecipe.make_model must return an nn.Module or a LoadedModel, got {type(made).__name__}")
        return module, (preprocessing.normalize if preprocessing is not None else None)

    def fingerprint(self) -> str:
        """Hash of the fresh model's initial weights and the hyper-parameters; refuses a
        ``make_model`` that builds different weights on each call (it could not be retrained
        "from scratch with the same seed", and nothing could be cached)."""
        first, second = model_fingerprint(self.build()[0]), model_fingerprint(self.build()[0])
        if first != second:
            raise ValueError(
                "RetrainRecipe.make_model builds different initial weights on each call; seed it "
                "(e.g. small_cnn(..., seed=0) or load_model(spec, seed=0)) so every retrain starts from the same model"
            )
        hyper = {k: v for k, v in dataclasses.asdict(self).items() if k != "make_model"}
        return _hash(first, json_dumps(hyper, sort_keys=True))


# ---------------------------------------------------------------------------- pixel removal
def pixel_ranks(heat: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Rank ``[N, H*W]`` (0 = most important) of each pixel of maps ``[N, H, W]``; ties are broken
    by one seeded random order of the pixels."""
    batch, pixels = heat.shape[0], heat.shape[-2] * heat.shape[-1]
    flat = heat.reshape(batch, pixels).float()
    perm = torch.randperm(pixels, generator=torch.Generator().manual_seed(seed)).to(flat.device)
    order = perm[torch.argsort(-flat[:, perm], dim=1, stable=True)]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(pixels, device=flat.device).expand(batch, pixels))
    return ranks


def remove_top_pixels(images: torch.Tensor, ranks: torch.Tensor, fraction: float, fill: torch.Tensor) -> torch.Tensor:
    """``images`` ``[N, C, H, W]`` with the top ``fraction`` of each image's pixels (by ``ranks``
    from :func:`pixel_ranks`) replaced by ``fill`` (``[C]``, e.g. the per-channel dataset mean),
    in every channel."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"a removal fraction must be in [0, 1], got {fraction}")
    batch, channels, height, width = images.shape
    count = int(round(fraction * height * width))
    removed = (ranks < count).view(batch, 1, height, width)
    return torch.where(removed, fill.to(images).view(1, channels, 1, 1), images)


# ---------------------------------------------------------------------------- result
@dataclass
class RoarResult:
    """Test accuracy of the model retrained on images with the top ``fractions`` of pixels removed,
    per method (``accuracy[method][i]`` at ``fractions[i]``; ``fractions[0] == 0``: the unmodified
    data, shared by all methods). ``"random"`` is the control ranking. ``from_cache`` /
    ``trained``: how many retrains were read back / run."""

    fractions: list[float]
    accuracy: dict[str, list[float]]
    from_cache: int = 0
    trained: int = 0
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return [m for m in self.accuracy if m != RANDOM]

    @property
    def unmodified_accuracy(self) -> float:
        return next(iter(self.accuracy.values()))[0]

    def chance_p_value(self) -> float:
        """One-sided binomial p-value that the model retrained on the unmodified data beats always
        answering the test set's majority class. ROAR compares accuracy drops, which say nothing
        when that retrain learnt nothing (everything then sits at chance)."""
        from scipy.stats import binomtest

        if not {"test_images", "majority_share"} <= set(self.settings):
            raise ValueError("this RoarResult does not record its test set (settings test_images and majority_share, "
                             "which roar() writes); cannot test the unmodified retrain against chance")
        n = int(self.settings["test_images"])
        majority = float(self.settings["majority_share"])
        if majority >= 1.0:
            return 1.0  # one class only: nothing to beat
        correct = int(round(self.unmodified_accuracy * n))
        return float(binomtest(correct, n, majority, alternative="greater").pvalue)

    def drop(self, method: str) -> list[float]:
        """Accuracy lost at each fraction, relative to the unmodified data."""
        return [self.unmodified_accuracy - a for a in self._curve(method)]

    def mean_accuracy(self, method: str) -> float:
        """Mean accuracy over the removal fractions (0 excluded): lower means the method's top
        pixels carried more of the information."""
        values = self._curve(method)[1:]
        return float(sum(values) / len(values))

    def vs_random(self, method: str) -> list[float]:
        """``random - method`` accuracy at each fraction (positive: the method's pixels mattered
        more than random ones)."""
        if RANDOM not in self.accuracy:
            raise ValueError("this ROAR run has no random control (random_control=False)")
        return [r - a for r, a in zip(self.accuracy[RANDOM], self._curve(method))]

    def _curve(self, method: str) -> list[float]:
        if method not in self.accuracy:
            raise KeyError(f"no ROAR curve for {method!r}; have {', '.join(self.accuracy)}")
        return self.accuracy[method]

    def rows(self) -> list[dict[str, Any]]:
        """One row per method and fraction (``vs_random`` is None without the control)."""
        rows = []
        for method, curve in self.accuracy.items():
            control = self.accuracy.get(RANDOM)
            for i, (fraction, acc) in enumerate(zip(self.fractions, curve)):
                rows.append({"method": method, "fraction": fraction, "accuracy": acc,
                             "drop": self.unmodified_accuracy - acc,
                             "vs_random": None if control is None else control[i] - acc})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"fractions": list(self.fractions), "accuracy": {k: list(v) for k, v in self.accuracy.items()},
                "mean_accuracy": {m: self.mean_accuracy(m) for m in self.accuracy},
                "from_cache": self.from_cache, "trained": self.trained, "seconds": self.seconds,
                "settings": dict(self.settings)}

    def to_pandas(self) -> Any:
        """:meth:`rows` as a ``pandas.DataFrame`` (pandas is optional)."""
        from mechlens._display import to_pandas

        return to_pandas(self.rows(), ("method", "fraction", "accuracy", "drop", "vs_random"))

    def plot(self) -> Any:
        """Test accuracy against the fraction of pixels removed, one line per method; the random
        control dashed."""
        from mechlens.attribution.display import figure

        fig = figure(5.0, 3.6)
        ax = fig.add_subplot(1, 1, 1)
        for method, curve in self.accuracy.items():
            style = dict(color="0.4", linestyle="--") if method == RANDOM else {}
            ax.plot(self.fractions, curve, marker="o", label=method, **style)
        ax.set_xlabel("fraction of pixels removed (train and test)")
        ax.set_ylabel("test accuracy after retraining")
        ax.set_title("ROAR: lower is a more faithful ranking", fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        return fig

    def _repr_png_(self) -> bytes:
        from mechlens.attribution.display import png_bytes

        return png_bytes(self.plot())

    def _repr_html_(self) -> str:
        from mechlens._display import html_table

        rows = [{"method": m, **{f"{f:g}": a for f, a in zip(self.fractions, self.accuracy[m])},
                 "mean": self.mean_accuracy(m)} for m in self.accuracy]
        columns = ["method", *[f"{f:g}" for f in self.fractions], "mean"]
        return html_table(rows, columns, caption="ROAR: test accuracy after removing the top fraction of pixels and retraining")


# ---------------------------------------------------------------------------- the benchmark
def roar(
    model: Any,
    train: Dataset | tuple[torch.Tensor, torch.Tensor],
    test: Dataset | tuple[torch.Tensor, torch.Tensor],
    methods: Sequence[str] = ("saliency", "integrated_gradients", "gradcam"),
    *,
    recipe: RetrainRecipe,
    fractions: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
    target: str = "predicted",
    absolute: bool = True,
    method_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
    random_control: bool = True,
    batch_size: int = 128,
    cache_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = False,
) -> RoarResult:
    """Run ROAR (see the module docstring) for ``methods`` (registered names) on the trained
    ``model``. ``train`` / ``test``: datasets of ``(image, label)`` or ``(images, labels)`` tensors,
    pixels as ``model`` takes them. ``recipe``: how to retrain (:class:`RetrainRecipe`, e.g.
    ``RetrainRecipe.from_shapes(shapes_recipe)``). ``method_kwargs``: per-method arguments
    (``{"occlusion": {"window": 4}}``). ``batch_size``: images per attribution call. ``seed``:
    tie-breaking and the random control's ranking."""
    started = time.perf_counter()
    infos = [get_method(name) for name in methods]  # unknown names fail before any work
    names = [info.name for info in infos]
    if not names:
        raise ValueError("give at least one method to benchmark, e.g. methods=['integrated_gradients']")
    if len(set(names)) != len(names):
        raise ValueError(f"methods {list(methods)} name a method twice")
    if target not in TARGETS:
        raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    fractions = _check_fractions(fractions)
    kwargs_of = {get_method(k).name: dict(v) for k, v in (method_kwargs or {}).items()}
    unknown = sorted(set(kwargs_of) - set(names))
    if unknown:
        raise ValueError(f"method_kwargs names {unknown}, which are not among the methods {names}")
    train_x, train_y = _tensors(train, "train")
    test_x, test_y = _tensors(test, "test")
    if train_x.shape[1:] != test_x.shape[1:]:
        raise ValueError(f"train images are {tuple(train_x.shape[1:])} but test images {tuple(test_x.shape[1:])}")
    fill = dataset_mean([train_x])
    explained = _model_key(model)
    data_key = _hash(_tensor_hash(train_x), _tensor_hash(train_y), _tensor_hash(test_x), _tensor_hash(test_y))
    retrain_key = recipe.fingerprint()
    cache = Path(cache_dir) if cache_dir is not None else None
    curves: dict[str, list[float]] = {}
    counts = {"cached": 0, "trained": 0}
    total = len(names) + (len(names) + random_control) * len(fractions) + 1
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="roar", unit="step", disable=not progress, leave=False) as bar:
        def retrain(label: str, key: str, ranks: tuple[torch.Tensor, torch.Tensor] | None, fraction: float) -> float:
            bar.set_postfix_str(f"{label} {fraction:g}", refresh=False)
            path = cache / "runs" / f"{key}.json" if cache is not None else None
            if path is not None and path.is_file():
                counts["cached"] += 1
                bar.update()
                return float(json.loads(path.read_text())["accuracy"])
            tr, te = train_x, test_x
            if ranks is not None:
                tr = remove_top_pixels(train_x, ranks[0], fraction, fill)
                te = remove_top_pixels(test_x, ranks[1], fraction, fill)
            net, transform = recipe.build()
            t0 = time.perf_counter()
            fit = train_classifier(net, TensorDataset(tr, train_y), epochs=recipe.epochs, batch_size=recipe.batch_size,
                                   lr=recipe.lr, weight_decay=recipe.weight_decay, seed=recipe.seed,
                                   device=recipe.device, transform=transform, channels_last=recipe.channels_last,
                                   progress=False)
            accuracy = evaluate_accuracy(net, TensorDataset(te, test_y), transform=transform)
            counts["trained"] += 1
            if path is not None:
                _write_json(path, {"method": label, "fraction": fraction, "accuracy": accuracy,
                                   "train_accuracy": fit.train_accuracy, "seconds": time.perf_counter() - t0})
            bar.update()
            return accuracy

        unmodified = retrain("unmodified", _hash("unmodified", data_key, retrain_key), None, 0.0)
        for info in infos:
            extra = kwargs_of.get(info.name, {})
            maps_key = _hash(info.name, json_dumps(extra, sort_keys=True, default=repr), explained, data_key, target,
                             str(absolute))
            bar.set_postfix_str(f"{info.name} maps", refresh=False)
            heat = _cached_maps(cache, f"{info.name}-{maps_key}", lambda: _maps(
                model, info.name, extra, train_x, train_y, test_x, test_y, target, absolute, batch_size))
            bar.update()
            ranks = (pixel_ranks(heat[0], seed=seed), pixel_ranks(heat[1], seed=seed + 1))
            curves[info.name] = [unmodified] + [
                retrain(info.name, _hash(maps_key, repr(f), retrain_key, str(seed)), ranks, f) for f in fractions]
        if random_control:
            generator = torch.Generator().manual_seed(seed)
            random_heat = (torch.rand(train_x.shape[0], *train_x.shape[-2:], generator=generator),
                           torch.rand(test_x.shape[0], *test_x.shape[-2:], generator=generator))
            ranks = (pixel_ranks(random_heat[0], seed=seed), pixel_ranks(random_heat[1], seed=seed + 1))
            curves[RANDOM] = [unmodified] + [
                retrain(RANDOM, _hash(RANDOM, data_key, repr(f), retrain_key, str(seed)), ranks, f) for f in fractions]
    settings = {"methods": names, "target": target, "absolute": absolute, "seed": seed,
                "train_images": int(train_x.shape[0]), "test_images": int(test_x.shape[0]),
                "majority_share": float(torch.bincount(test_y).max()) / max(1, int(test_y.numel())),
                "image_shape": list(train_x.shape[1:]), "fill": [float(v) for v in fill],
                "recipe": {k: v for k, v in dataclasses.asdict(recipe).items() if k != "make_model"},
                "method_kwargs": {k: {a: repr(b) for a, b in v.items()} for k, v in kwargs_of.items()}}
    return RoarResult(fractions=[0.0, *fractions], accuracy=curves, from_cache=counts["cached"],
                      trained=counts["trained"], seconds=time.perf_counter() - started, settings=settings)


# ---------------------------------------------------------------------------- helpers
def _check_fractions(fractions: Sequence[float]) -> list[float]:
    values = [float(f) for f in fractions]
    if not values:
        raise ValueError("give at least one removal fraction, e.g. fractions=(0.1, 0.5, 0.9)")
    bad = [f for f in values if not 0.0 < f < 1.0]
    if bad:
        raise ValueError(f"removal fractions must be in (0, 1) (0 is always measured), got {bad}")
    if values != sorted(set(values)):
        raise ValueError(f"removal fractions must be increasing and distinct, got {values}")
    return values


def _tensors(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [N, C, H, W] float, labels [N] long)`` of a dataset or a pair of tensors."""
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        images, labels = data
    elif callable(getattr(data, "to_tensors", None)):
        images, labels = data.to_tensors()
    elif isinstance(data, Dataset):
        batches = list(DataLoader(data, batch_size=256, shuffle=False))
        if not batches:
            raise ValueError(f"the {what} dataset is empty")
        images = torch.cat([b[0] for b in batches])
        labels = torch.cat([torch.as_tensor(b[1]) for b in batches])
    else:
        raise TypeError(f"{what} must be a Dataset of (image, label) or an (images, labels) pair of tensors, "
                        f"got {type(data).__name__}")
    images, labels = torch.as_tensor(images), torch.as_tensor(labels)
    if images.dim() != 4 or not images.is_floating_point():
        raise ValueError(f"{what} images must be a float tensor [N, C, H, W], got {tuple(images.shape)} {images.dtype}")
    if labels.shape != (images.shape[0],):
        raise ValueError(f"{what} needs one label per image: {images.shape[0]} images, labels {tuple(labels.shape)}")
    if images.shape[0] == 0:
        raise ValueError(f"the {what} set is empty")
    return images.detach().float().cpu(), labels.long().cpu()


def _maps(model: Any, method: str, extra: Mapping[str, Any], train_x: torch.Tensor, train_y: torch.Tensor,
          test_x: torch.Tensor, test_y: torch.Tensor, target: str, absolute: bool,
          batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    device = _device(model)
    out = []
    for images, labels in ((train_x, train_y), (test_x, test_y)):
        heats = []
        for start in range(0, images.shape[0], batch_size):
            x = images[start:start + batch_size].to(device)
            y = labels[start:start + batch_size].to(device) if target == "label" else None
            result = attribute(model, x, y, method=method, **extra)
            heats.append(result.heatmap(absolute=absolute).detach().float().cpu())
        out.append(torch.cat(heats))
    return out[0], out[1]


def _cached_maps(cache: Path | None, key: str, compute: Callable[[], tuple[torch.Tensor, torch.Tensor]]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    from safetensors.torch import load_file, save_file

    path = cache / "maps" / f"{key}.safetensors" if cache is not None else None
    if path is not None and path.is_file():
        stored = load_file(str(path))
        return stored["train"], stored["test"]
    heat = compute()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file({"train": heat[0].contiguous(), "test": heat[1].contiguous()}, str(tmp))
        tmp.replace(path)
    return heat


def _write_json(path: Path, value: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json_dumps(value))
    tmp.replace(path)


def _device(model: Any) -> torch.device:
    net = getattr(model, "model", model)
    first = next(iter(net.parameters()), None) if isinstance(net, nn.Module) else None
    return first.device if first is not None else torch.device("cpu")


def _model_key(model: Any) -> str:
    """The explained function: weights, plus the normalization a LoadedModel applies inside."""
    net = getattr(model, "model", model)
    if not isinstance(net, nn.Module):
        raise TypeError(f"model must be an nn.Module or a LoadedModel, got {type(model).__name__}")
    preprocessing = getattr(model, "preprocessing", None)
    norm = json_dumps(preprocessing.to_dict(), sort_keys=True, default=repr) if preprocessing is not None and net is not model else ""
    return _hash(model_fingerprint(net), norm)


def _tensor_hash(tensor: torch.Tensor) -> str:
    import xxhash

    data = tensor.detach().cpu().contiguous()
    return xxhash.xxh3_64(f"{tuple(data.shape)}{data.dtype}".encode() + data.numpy().tobytes()).hexdigest()


def _hash(*parts: str) -> str:
    import xxhash

    return xxhash.xxh3_64("|".join(parts).encode()).hexdigest()

