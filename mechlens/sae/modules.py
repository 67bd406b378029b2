"""The SAE module family and its registry (timm-style ``create_sae`` / ``list_architectures``).

Every SAE computes ``pre = (x - b_dec) @ W_enc + b_enc``, latents ``z = act(pre)`` and the
reconstruction ``x_hat = z @ W_dec + b_dec``, with ``W_enc`` ``[d_in, width]`` and ``W_dec``
``[width, d_in]`` (row ``i`` is latent ``i``'s direction). Architectures differ in ``act`` and in
the loss terms they add to the reconstruction error (``SAE.loss_terms``, see
:mod:`mechlens.sae.terms`; the trainer sums what the class declares):

=============  ===========================================  ==================================
``relu``       ReLU                                         L1 weighted by decoder row norms
``topk``       keep the k largest per row (ReLU)            AuxK against dead latents, Multi-TopK
``batchtopk``  keep the k*B largest in the batch; a         AuxK, Multi-TopK
               learnt threshold at inference
``jumprelu``   ``pre * H(pre - theta)``, theta per latent   L0 with straight-through gradients
=============  ===========================================  ==================================

Initialisation follows the literature: decoder rows are random unit directions (norm 0.1 for
``relu``, whose decoder norm is free), ``W_enc = W_dec^T``, ``b_enc = 0``; the trainer sets
``b_dec`` from the data. ``SAE.save(dir)`` writes ``sae.safetensors`` + ``config.json``;
``SAE.load(dir)`` rebuilds the right class. No pickle anywhere.

A new architecture is one config class (an :class:`SAEConfig` subclass with its ``arch``: it
registers itself; its fields become ``mechlens sae train`` options) and one SAE class decorated
with :func:`register_sae`, which implements ``activate`` and declares its ``loss_terms``.
"""
from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from mechlens._distributed import batch_group
from activation_store.jsonutil import dumps as json_dumps
from mechlens.sae.config import (
    BatchTopKConfig,
    JumpReLUConfig,
    ReLUConfig,
    SAEConfig,
    TopKConfig,
    config_class,
)
from mechlens.sae.losses import jumprelu, l1_penalty, step_l0
from mechlens.sae.terms import LossTerm, auxk_term, multi_k_term, sparsity_term

__all__ = [
    "BatchTopKSAE",
    "JumpReLUSAE",
    "ReLUSAE",
    "SAE",
    "SAECheckpointError",
    "SAEOutput",
    "TopKSAE",
    "build_sae",
    "create_sae",
    "fold_normalization",
    "list_architectures",
    "register_sae",
    "sae_class",
]

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "mechlens-sae"


class SAECheckpointError(ValueError):
    """A saved SAE is missing, malformed, or does not fit the SAE it is loaded into."""


class SAEOutput:
    """``x_hat`` the reconstruction, ``z`` the latents, ``pre`` the pre-activations (all batch-first).

    ``active`` / ``active_values``: optionally, flat latent indices and values (without gradient)
    that hold every non-zero entry of ``z`` (and maybe some zeros): what a sparse forward already
    knows, so the trainer counts firings without scanning ``z`` (and without a host sync). A sparse
    forward may give ``z`` as ``make_z``, a function that builds it when first read (training
    steps that never read it skip writing the dense ``[N, width]`` tensor)."""

    __slots__ = ("x_hat", "pre", "active", "active_values", "_z", "_make_z")

    def __init__(self, x_hat: torch.Tensor, z: torch.Tensor | None, pre: torch.Tensor,
                 active: torch.Tensor | None = None, active_values: torch.Tensor | None = None, *,
                 make_z: Any = None):
        if z is None and make_z is None:
            raise ValueError("SAEOutput needs z or make_z")
        self.x_hat, self.pre, self.active, self.active_values = x_hat, pre, active, active_values
        self._z, self._make_z = z, make_z

    @property
    def z(self) -> torch.Tensor:
        if self._z is None:
            self._z, self._make_z = self._make_z(), None
        return self._z

    def __iter__(self):  # x_hat, z, pre = sae(x)
        return iter((self.x_hat, self.z, self.pre))

    def __repr__(self) -> str:
        return f"SAEOutput(x_hat={tuple(self.x_hat.shape)}, z={tuple(self.pre.shape)}, pre={tuple(self.pre.shape)})"


_ARCHITECTURES: dict[str, type["SAE"]] = {}


def register_sae(cls: type["SAE"]) -> type["SAE"]:
    """Class decorator: add an SAE subclass to the registry under its config's ``arch``."""
    arch = cls.config_class.arch
    if not arch:
        raise ValueError(f"{cls.__name__}.config_class must be an SAEConfig subclass with an 'arch'")
    _ARCHITECTURES[arch] = cls
    return cls


def list_architectures(pattern: str = "*") -> list[str]:
    """Registered architecture names matching a wildcard ``pattern`` (``"*topk"``)."""
    return sorted(name for name in _ARCHITECTURES if fnmatch.fnmatchcase(name, pattern))


def sae_class(arch: str) -> type["SAE"]:
    """The SAE class registered for architecture ``arch`` (error listing the known ones)."""
    try:
        return _ARCHITECTURES[arch]
    except KeyError:
        config_class(arch)  # raises with close names
        raise ValueError(f"SAE architecture {arch!r} has a config class but no SAE class: decorate one with "
                         "@register_sae") from None


def build_sae(config: SAEConfig, *, device: str | torch.device | None = None, seed: int | None = 0) -> "SAE":
    """Instantiate the SAE class registered for ``config.arch``."""
    return sae_class(config.arch)(config, device=device, seed=seed)


def create_sae(arch: str, *, width: int, d_in: int, device: str | torch.device | None = None, seed: int | None = 0,
               **kwargs: Any) -> "SAE":
    """``create_sae("topk", width=4096, d_in=512, k=32)``: build the config of ``arch`` from the
    keywords (unknown ones are an error) and the SAE."""
    cls = config_class(arch)
    try:
        config = cls(width=width, d_in=d_in, **kwargs)
    except TypeError as error:
        raise TypeError(f"{arch} SAE: {error}") from None
    return build_sae(config, device=device, seed=seed)


class SAE(nn.Module):
    """Base class; subclasses set ``config_class``, implement :meth:`activate` and declare the
    ``loss_terms`` the trainer adds to the reconstruction error, in order."""

    config_class: ClassVar[type[SAEConfig]] = SAEConfig
    init_decoder_norm: ClassVar[float] = 1.0
    loss_terms: ClassVar[tuple[LossTerm, ...]] = ()

    def __init__(self, config: SAEConfig, *, device: str | torch.device | None = None, seed: int | None = 0):
        super().__init__()
        if not isinstance(config, self.config_class):
            raise TypeError(f"{type(self).__name__} needs a {self.config_class.__name__}, got {type(config).__name__}")
        if config.d_in is None:
            raise ValueError("the SAE config has no d_in (the width of the rows it reads); set d_in=")
        self.config = config
        d, w = int(config.d_in), int(config.width)
        self.W_enc = nn.Parameter(torch.empty(d, w, device=device))
        self.b_enc = nn.Parameter(torch.zeros(w, device=device))
        self.W_dec = nn.Parameter(torch.empty(w, d, device=device))
        self.b_dec = nn.Parameter(torch.zeros(d, device=device))
        self.reset_parameters(seed)

    # ------------------------------------------------------------------ properties
    @property
    def d_in(self) -> int:
        return int(self.config.d_in)  # type: ignore[arg-type]

    @property
    def width(self) -> int:
        return int(self.config.width)

    @property
    def device(self) -> torch.device:
        return self.W_enc.device

    def extra_repr(self) -> str:
        return f"arch={self.config.arch}, d_in={self.d_in}, width={self.width}, layer={self.config.layer!r}"

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self, seed: int | None = 0) -> None:
        """Random unit (or ``init_decoder_norm``) decoder rows, ``W_enc = W_dec^T``, zero biases."""
        generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
        directions = torch.randn(self.width, self.d_in, generator=generator)
        directions = directions / directions.norm(dim=1, keepdim=True) * self.init_decoder_norm
        self.W_dec.copy_(directions)
        self.W_enc.copy_(directions.T)
        self.b_enc.zero_()
        self.b_dec.zero_()

    # ------------------------------------------------------------------ forward
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.W_enc.dtype)
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc)

    def activate(self, pre: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def feature(self, index: int, *, source: str = "") -> Any:
        """Latent ``index`` as a :class:`mechlens.features.SAELatent` of the layer, pooling and
        layout it was trained on (``source``: the path it was loaded from, for its name)."""
        from mechlens.features.base import SAELatent

        if not 0 <= int(index) < self.width:
            raise IndexError(f"latent {index} is out of range: the SAE has {self.width} latents")
        if not self.config.layer:
            raise ValueError("this SAE does not record the layer it was trained on, so a latent cannot be a feature")
        return SAELatent(self.config.layer, self, int(index), pooling=self.config.pooling, layout=self.config.layout,
                         source=source)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latents ``[N, width]`` of rows ``x`` ``[N, d_in]`` (what :class:`SAELatent` calls)."""
        self._check_rows(x)
        return self.activate(self.pre_activations(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, z, self.decoder_directions())

    def decoder_directions(self, index: torch.Tensor | None = None) -> torch.Tensor:
        """The rows latent activations multiply in :meth:`decode` (``index``: only those rows):
        ``W_dec``, or its rows at unit norm when the SAE rescales by decoder norm."""
        return self.W_dec if index is None else self.W_dec.index_select(0, index)

    @property
    def rescales_by_decoder_norm(self) -> bool:
        """Whether pre-activations are scaled by ``||W_dec_i||`` and decoding uses unit rows
        (``TopKConfig.rescale_acts_by_decoder_norm``)."""
        return bool(getattr(self.config, "rescale_acts_by_decoder_norm", False))

    def fold_decoder_norm(self) -> "SAE":
        """This SAE in plain form (nothing to fold here; TopK overrides it)."""
        return self

    def forward(self, x: torch.Tensor) -> SAEOutput:
        self._check_rows(x)
        pre = self.pre_activations(x)
        z = self.activate(pre)
        return SAEOutput(self.decode(z), z, pre)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def sparsity_loss(self, out: SAEOutput) -> torch.Tensor:
        """The unscaled sparsity penalty of a batch (0 for the TopK family; what
        :func:`~mechlens.sae.terms.sparsity_term` weights)."""
        return out.x_hat.new_zeros(())

    def after_step(self, out: SAEOutput) -> None:
        """Called by the trainer after each optimizer step (BatchTopK updates its threshold)."""

    def _check_rows(self, x: torch.Tensor) -> None:
        if x.dim() != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"{self.config.arch} SAE reads rows [N, {self.d_in}], got shape {tuple(x.shape)}"
                             + (f" (trained on layer {self.config.layer!r})" if self.config.layer else ""))

    # ------------------------------------------------------------------ decoder constraint
    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out of ``W_dec.grad`` the component along each (unit) decoder row."""
        if self.W_dec.grad is None:
            return
        W = self.W_dec
        parallel = (self.W_dec.grad * W).sum(dim=1, keepdim=True)
        self.W_dec.grad.sub_(parallel * W)

    @torch.no_grad()
    def normalize_decoder_rows(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> Path:
        """Write ``path/sae.safetensors`` and ``path/config.json`` (``metadata``: any JSON-able dict)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in self.state_dict().items()}
        tmp = path / (WEIGHTS_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": FORMAT, "arch": self.config.arch})
        tmp.replace(path / WEIGHTS_FILE)
        record = {"format": FORMAT, "version": 1, "config": self.config.to_json(), "metadata": dict(metadata or {})}
        tmp = path / (CONFIG_FILE + ".tmp")
        tmp.write_text(json_dumps(record, indent=2, sort_keys=True))
        tmp.replace(path / CONFIG_FILE)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device | None = None) -> "SAE":
        """Rebuild a saved SAE (in eval mode). ``SAE.load`` returns whatever architecture was
        saved; ``TopKSAE.load`` also checks it is one."""
        config, _ = read_config(path)
        sae = build_sae(config, device=device, seed=None)
        if not isinstance(sae, cls):
            raise SAECheckpointError(f"{path} holds a {config.arch!r} SAE ({type(sae).__name__}), not a {cls.__name__}")
        sae.load_weights(path)
        return sae.eval()

    def load_weights(self, path: str | os.PathLike) -> "SAE":
        """Load the tensors saved at ``path`` into this SAE; a checkpoint of another width,
        input width or architecture is an error naming both shapes."""
        from safetensors.torch import load_file

        weights = Path(path) / WEIGHTS_FILE if Path(path).is_dir() else Path(path)
        if not weights.is_file():
            raise SAECheckpointError(f"no SAE weights at {weights} (expected a directory written by SAE.save)")
        state = load_file(str(weights), device="cpu")
        self.check_state(state, str(weights))
        self.load_state_dict(state)
        return self

    def check_state(self, state: Mapping[str, torch.Tensor], where: str) -> None:
        expected = self.state_dict()
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if "W_enc" in state and tuple(state["W_enc"].shape) != tuple(expected["W_enc"].shape):
            d, w = state["W_enc"].shape
            raise SAECheckpointError(
                f"{where} holds an SAE of width {w} on {d}-dim rows, but this SAE has width {self.width} on "
                f"{self.d_in}-dim rows; load it with SAE.load or build an SAE with the same width and d_in")
        bad = [f"{k}: file {tuple(state[k].shape)} vs SAE {tuple(expected[k].shape)}"
               for k in expected if k in state and state[k].shape != expected[k].shape]
        if missing or unexpected or bad:
            raise SAECheckpointError(
                f"{where} does not fit this {self.config.arch} SAE: missing {missing}, unexpected {unexpected}, "
                f"shape mismatches {bad} (was it saved from another architecture?)")


def read_config(path: str | os.PathLike) -> tuple[SAEConfig, dict[str, Any]]:
    """The :class:`SAEConfig` and metadata of the SAE saved at ``path``."""
    path = Path(path)
    file = path / CONFIG_FILE if path.is_dir() else path
    if not file.is_file():
        raise SAECheckpointError(f"{path} is not a saved SAE: {file} does not exist (save with SAE.save(dir))")
    try:
        record = json.loads(file.read_text())
    except ValueError as error:
        raise SAECheckpointError(f"{file} is not valid JSON: {error}") from error
    if record.get("format") != FORMAT:
        raise SAECheckpointError(f"{file} is not a mechlens SAE config (format {record.get('format')!r})")
    return SAEConfig.from_json(record["config"]), dict(record.get("metadata", {}))


def batch_topk(flat: torch.Tensor, k: int, rows: int, *, fast: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k * rows`` largest entries of ``flat`` (``rows`` rows' activations, flattened):
    ``(values, indices)``, the same set as ``flat.topk(k * rows, sorted=False)``.

    Under data-parallel training (a :func:`~mechlens._distributed.batch_group` is set) the
    selection is that of the *global* batch: the ``k * global_rows`` largest over every rank, so
    each rank keeps what one process would keep of the concatenated batch (entries at 0 may differ:
    they reconstruct nothing and have no gradient). ``fast``: on CPU, when the count is a small part
    of ``flat``, a strided sample gives a threshold a little below the count-th largest value and
    the exact top is taken among the entries above it (the full ``topk`` runs when the sample
    misled); on CUDA it is ``topk`` (the candidate count would cost a host sync)."""
    group = batch_group()
    if group is not None:
        return _global_batch_topk(flat, k * group.rows, group)
    count = min(k * rows, flat.numel())
    stride = 17  # coprime with the usual widths, so the sample visits every latent
    if not fast or flat.device.type != "cpu" or count * 16 > flat.numel():
        return flat.topk(count, sorted=False)
    sample = flat[::stride]
    take = min(sample.numel(), int(1.5 * count / stride) + 16)
    floor = sample.topk(take, sorted=False).values.min()
    candidates = (flat >= floor).nonzero().squeeze(1)
    if candidates.numel() < count:
        return flat.topk(count, sorted=False)
    values, position = flat[candidates].topk(count, sorted=False)
    return values, candidates[position]


def _global_batch_topk(flat: torch.Tensor, count: int, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    # Each rank's part of the global top-count is among its own top-count: gather those (padded
    # to one size), find the global count-th largest value, keep the local entries at or above it.
    with torch.no_grad():
        local = flat.detach().topk(min(count, flat.numel()), sorted=False).values
        padded = local.new_full((count,), float("-inf"))
        padded[:local.numel()] = local
        pool = torch.cat(group.dist.all_gather(padded))
        threshold = pool.topk(min(count, pool.numel()), sorted=False).values.min()
    indices = ((flat >= threshold) & (flat > 0)).nonzero().squeeze(1)
    return flat[indices], indices


def sparse_decode(sae: "SAE", indices: torch.Tensor, values: torch.Tensor, *,
                  offsets: torch.Tensor | None = None) -> torch.Tensor:
    """``sae.decode(z)`` for a ``z`` given by its non-zero entries: ``indices`` / ``values``
    ``[N, k]`` (``k`` per row), or flat with ``offsets`` (row ``n`` is ``[offsets[n], offsets[n+1])``).
    Differentiable in ``values`` and ``W_dec``; reads only the active decoder rows."""
    if sae.rescales_by_decoder_norm:  # decode with unit rows: divide each value by its row's norm
        values = values / sae.W_dec.norm(dim=1).clamp_min(1e-12)[indices]
    # embedding_bag is not autocast-aware: under bf16 autocast the values arrive in bfloat16
    decoded = nn.functional.embedding_bag(indices, sae.W_dec, offsets, mode="sum",
                                          per_sample_weights=values.to(sae.W_dec.dtype))
    return decoded + sae.b_dec


# ---------------------------------------------------------------------------- architectures
@register_sae
class ReLUSAE(SAE):
    """ReLU latents; L1 penalty weighted by decoder norm."""

    config_class = ReLUConfig
    init_decoder_norm = 0.1
    loss_terms = (sparsity_term("l1_coeff"),)
    config: ReLUConfig

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre)

    def sparsity_loss(self, out: SAEOutput) -> torch.Tensor:
        return l1_penalty(out.z, self.W_dec)


@register_sae
class TopKSAE(SAE):
    """The ``k`` largest pre-activations of each row, through a ReLU."""

    config_class = TopKConfig
    loss_terms = (multi_k_term, auxk_term)
    config: TopKConfig

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, indices, torch.relu(values))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        if not self.rescales_by_decoder_norm:
            return super().pre_activations(x)
        # pre * ||W_dec_i||, with the norms applied to the encoder's [d, width] weights rather
        # than to the [N, width] product (the same value; a quarter of the step's time saved at d=64)
        norms = self.W_dec.norm(dim=1)
        return torch.addmm(self.b_enc * norms, x.to(self.W_enc.dtype) - self.b_dec, self.W_enc * norms)

    def decoder_directions(self, index: torch.Tensor | None = None) -> torch.Tensor:
        rows = super().decoder_directions(index)
        return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12) if self.rescales_by_decoder_norm else rows

    @torch.no_grad()
    def fold_decoder_norm(self) -> "SAE":
        """The same SAE without ``rescale_acts_by_decoder_norm``: each row's norm moved into its
        encoder column and bias, the decoder rows at unit norm (the same latents, threshold and
        reconstruction). A new module; ``self`` when there is nothing to fold."""
        if not self.rescales_by_decoder_norm:
            return self
        norms = self.W_dec.norm(dim=1)
        if not bool((norms > 0).all()):
            raise ValueError("a decoder row has norm 0: rescale_acts_by_decoder_norm has no finite plain form")
        folded = build_sae(self.config.replace(rescale_acts_by_decoder_norm=False), device=self.device, seed=None)
        folded.load_state_dict(self.state_dict())
        folded.W_enc.mul_(norms)
        folded.b_enc.mul_(norms)
        folded.W_dec.div_(norms[:, None])
        return folded.train(self.training)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        # The same output as SAE.forward, but the decoder reads only the k active rows of W_dec
        # per row (embedding_bag), in the forward and in the backward pass: O(N k d) instead of
        # O(N width d), the largest saving of a training step when k << width.
        # ``z`` is returned without gradient: the built-in terms read ``pre`` and ``x_hat``; a
        # subclass that selects otherwise or adds terms takes the generic path.
        if not self._sparse_path(TopKSAE):
            return super().forward(x)
        self._check_rows(x)
        pre = self.pre_activations(x)
        values, indices = pre.topk(self.config.k, dim=-1, sorted=False)
        values = torch.relu(values)
        kept = values.detach()

        def make_z() -> torch.Tensor:
            return pre.new_zeros(pre.shape).scatter_(-1, indices, kept)

        return SAEOutput(sparse_decode(self, indices, values), None, pre, indices.flatten(), kept.flatten(),
                         make_z=make_z)

    def _sparse_path(self, owner: type) -> bool:
        cls = type(self)
        return cls.activate is owner.activate and cls.loss_terms == TopKSAE.loss_terms


@register_sae
class BatchTopKSAE(TopKSAE):
    """Training: the ``k * N`` largest activations of the batch. Inference (eval mode): a fixed
    threshold, the running mean of the smallest kept activation during training."""

    config_class = BatchTopKConfig
    config: BatchTopKConfig

    def __init__(self, config: BatchTopKConfig, *, device: str | torch.device | None = None, seed: int | None = 0):
        super().__init__(config, device=device, seed=seed)
        self.register_buffer("threshold", torch.zeros((), device=device))
        self.register_buffer("threshold_updates", torch.zeros((), dtype=torch.long, device=device))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        acts = torch.relu(pre)
        if not self.training:
            return acts * (pre > self.threshold)
        flat = acts.flatten()
        values, indices = batch_topk(flat, self.config.k, pre.shape[0], fast=False)
        return torch.zeros_like(flat).scatter_(0, indices, values).view_as(pre)

    def forward(self, x: torch.Tensor) -> SAEOutput:
        if not self.training or not self._sparse_path(BatchTopKSAE):
            return SAE.forward(self, x)
        self._check_rows(x)
        pre = self.pre_activations(x)
        flat = torch.relu(pre).flatten()
        values, indices = batch_topk(flat, self.config.k, pre.shape[0])
        chosen, kept = indices, values.detach()

        def make_z() -> torch.Tensor:
            return flat.new_zeros(flat.shape).scatter_(0, chosen, kept).view(pre.shape)

        # rows keep different numbers of latents: bags of variable size, in row order
        order = indices.argsort()
        indices, values = indices[order], values[order]
        rows = torch.div(indices, self.width, rounding_mode="floor")
        offsets = torch.searchsorted(rows, torch.arange(pre.shape[0], device=rows.device))
        latents = indices % self.width
        return SAEOutput(sparse_decode(self, latents, values, offsets=offsets), None, pre, latents, values.detach(),
                         make_z=make_z)

    @torch.no_grad()
    def calibrate_threshold(self, batches: Any, l0: float | None = None) -> float:
        """Set the inference threshold so that the mean L0 over the rows of ``batches`` (raw rows,
        as the SAE reads them) is ``l0`` (default ``k``): the threshold is then what BatchTopK
        keeps from one batch made of all these rows. Returns the threshold."""
        from mechlens.sae.data import as_row_batch

        target = float(self.config.k if l0 is None else l0)
        if not 0 < target <= self.width:
            raise ValueError(f"l0 must be in (0, {self.width}], got {target}")
        device = self.W_enc.device
        batches = [as_row_batch(item).data for item in batches]  # two passes: count the rows, then select
        rows = sum(x.shape[0] for x in batches)
        if rows == 0:
            raise ValueError("calibrate_threshold needs rows: the batches were empty")
        keep = int(target * rows) + 1  # the values above the threshold, and the one it sits on
        chunks: list[torch.Tensor] = []
        for x in batches:
            chunks.append(torch.relu(self.pre_activations(x.to(device, self.W_enc.dtype))).flatten())
            pool = torch.cat(chunks)
            chunks = [pool.topk(min(keep, pool.numel()), sorted=False).values]
        values = chunks[0].sort(descending=True).values
        kept = int(target * rows)
        threshold = values[kept] if kept < values.numel() else values.new_zeros(())
        self.threshold.copy_(threshold.clamp_min(0))
        self.threshold_updates.add_(1)
        return float(self.threshold)

    @torch.no_grad()
    def after_step(self, out: SAEOutput) -> None:
        if out.active_values is not None:  # the kept activations, known to the sparse forward
            kept = out.active_values
            smallest = torch.where(kept > 0, kept, torch.full_like(kept, float("inf"))).min()
        else:
            z = out.z.detach()
            smallest = torch.where(z > 0, z, torch.full_like(z, float("inf"))).min()
        group = batch_group()
        if group is not None:  # data-parallel ranks: the smallest kept activation of the global batch
            smallest = group.dist.all_reduce_min(smallest.detach().clone())
        smallest = torch.where(torch.isfinite(smallest), smallest, self.threshold)
        m = self.config.threshold_momentum
        # the first update takes the value as it is (no bias towards the initial 0)
        first = self.threshold_updates == 0
        self.threshold.copy_(torch.where(first, smallest, m * self.threshold + (1 - m) * smallest))
        self.threshold_updates.add_(1)


@register_sae
class JumpReLUSAE(SAE):
    """``z = pre * H(pre - theta)`` with ``theta = exp(log_threshold)`` learnt per latent."""

    config_class = JumpReLUConfig
    loss_terms = (sparsity_term("l0_coeff"),)
    config: JumpReLUConfig

    def __init__(self, config: JumpReLUConfig, *, device: str | torch.device | None = None, seed: int | None = 0):
        super().__init__(config, device=device, seed=seed)
        self.log_threshold = nn.Parameter(
            torch.full((config.width,), float(torch.tensor(config.init_threshold).log()), device=device))

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        if self.training and torch.is_grad_enabled():
            return jumprelu(pre, self.threshold, self.config.bandwidth)
        return pre * (pre > self.threshold)

    def sparsity_loss(self, out: SAEOutput) -> torch.Tensor:
        return step_l0(out.pre, self.threshold, self.config.bandwidth)


# ---------------------------------------------------------------------------- normalisation
@torch.no_grad()
def fold_normalization(sae: SAE, *, scale: float, shift: torch.Tensor | None = None) -> SAE:
    """An SAE that reads raw activations ``x``, from one trained on ``(x - shift) * scale``.

    ``W_enc <- scale * W_enc``, ``W_dec <- W_dec / scale``, ``b_dec <- b_dec / scale + shift``: the
    latents are unchanged (so are thresholds and ``k``) and the reconstruction is mapped back to
    the raw scale. The returned SAE is a new module; its config records ``input_scale``.
    """
    sae = sae.fold_decoder_norm()  # the rescaled form would not map the reconstruction back
    centered = shift is not None
    config = sae.config.replace(input_scale=float(scale) * sae.config.input_scale,
                                input_centered=centered or sae.config.input_centered)
    folded = build_sae(config, device=sae.device, seed=None)
    folded.load_state_dict(sae.state_dict())
    folded.W_enc.mul_(scale)
    folded.W_dec.div_(scale)
    folded.b_dec.div_(scale)
    if shift is not None:
        folded.b_dec.add_(shift.to(folded.b_dec))
    return folded.train(sae.training)

