"""Typed configurations of SAEs and of their training, round-tripping through JSON.

An :class:`SAEConfig` describes one SAE (its architecture and the knobs that differ between the
members of a sweep: width, ``k``, sparsity coefficient); a :class:`TrainConfig` describes one
training run, shared by every SAE trained in the same pass over the data.

Each field may carry ``metadata={"help": ...}``: ``mechlens sae train`` offers every field of
every registered architecture as an option (``--aux-coeff``) with that help text; fields with
``metadata={"cli": False}`` are filled in by the trainer or the store and are not options;
``"cli_default"`` gives a command-line default to a field without one (``width``).

``config.to_json()`` gives a plain dict (``"arch"`` included); ``SAEConfig.from_json(d)`` picks
the right subclass from ``d["arch"]`` and refuses unknown keys, so a typo in a JSON file is an
error rather than a silently ignored setting.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Mapping

from activation_store.jsonutil import check_fields

__all__ = [
    "B_DEC_INITS",
    "LR_MODES",
    "LR_RULE_BASE",
    "LR_RULE_WIDTH",
    "lr_rule",
    "BatchTopKConfig",
    "JumpReLUConfig",
    "ReLUConfig",
    "SAEConfig",
    "TopKConfig",
    "TrainConfig",
    "config_class",
    "option",
]

B_DEC_INITS: tuple[str, ...] = ("mean", "geometric_median", "zeros")
LR_MODES: tuple[str, ...] = ("rule", "auto")
_POOLINGS = ("all", "mean", "max", "cls")
_LAYOUTS = ("auto", "nchw", "nhwc", "nlc", "ncl", "nc")

# Gao et al. 2024 (fig. 3 and appendix) fit the best rate of TopK SAEs on GPT-2 activations as
# ~ width^-1/2; dictionary_learning's TopK trainer uses 2e-4 / sqrt(width / 2^14). With our
# normalisation (E||x||^2 = d) the optimum sits higher: at width 512 (2000 steps of 1024 rows) the
# best rate was 1.6e-2 on conv activations and 4e-3 to 8e-3 on a planted dictionary, and 8e-3
# was within 8% of the best FVU on both for TopK and BatchTopK (README, "Learning rate").
# LR_RULE_BASE is the rate at 2^14 latents that gives 8e-3 at 512.
LR_RULE_BASE = 1.4e-3
LR_RULE_WIDTH = 2 ** 14


def lr_rule(width: int) -> float:
    """The learning rate for an SAE of ``width`` latents: ``LR_RULE_BASE * sqrt(2^14 / width)``
    (Gao et al.'s width^-1/2 scaling)."""
    if int(width) != width or width < 1:
        raise ValueError(f"width must be a positive integer, got {width!r}")
    return LR_RULE_BASE * (LR_RULE_WIDTH / int(width)) ** 0.5


# arch name -> config class, filled by the subclasses below (and by register_sae for new ones)
_CONFIG_CLASSES: dict[str, type["SAEConfig"]] = {}


def option(default: Any, help: str = "", *, cli: bool = True) -> Any:
    """A config field with its command-line help (``cli=False``: not a command-line option)."""
    return field(default=default, metadata={"help": help, "cli": cli})


_INTERNAL = {"cli": False}


def config_class(arch: str) -> type["SAEConfig"]:
    """The config class of architecture ``arch`` (error listing the known ones)."""
    try:
        return _CONFIG_CLASSES[arch]
    except KeyError:
        close = difflib.get_close_matches(arch, list(_CONFIG_CLASSES), n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown SAE architecture {arch!r}.{hint} Known: {', '.join(sorted(_CONFIG_CLASSES))}") from None


@dataclass(frozen=True)
class SAEConfig:
    """What every SAE has.

    ``width``: number of latents; ``d_in``: the width of the rows it reads (``None`` until known:
    the trainer fills it in from the data). ``layer`` / ``pooling`` / ``layout`` record where the
    rows came from, so a saved SAE can be turned into :class:`~mechlens.features.SAELatent`
    features and spliced back into its model. ``normalize_decoder`` keeps decoder rows at unit
    norm during training (the gradient component parallel to each row is removed before the
    step). ``lr`` overrides ``TrainConfig.lr`` for this SAE, so the learning rate is a sweep axis
    like the width (several rates trained in one pass over the data). ``input_scale`` / ``input_centered`` record the activation normalisation that was
    folded into the weights on export (informational: a saved SAE reads raw activations).
    """

    arch: ClassVar[str] = ""
    width: int = field(metadata={"help": "number of latents", "cli_default": 4096})
    d_in: int | None = field(default=None, metadata=_INTERNAL)
    layer: str = field(default="", metadata=_INTERNAL)
    pooling: str = field(default="all", metadata=_INTERNAL)
    layout: str = field(default="auto", metadata=_INTERNAL)
    normalize_decoder: bool = option(True, "keep decoder rows at unit norm")
    lr: float | None = field(default=None, metadata={"cli": False, "help": "learning rate (None: TrainConfig.lr)"})
    decoder_lr_scale: float = option(1.0, "the decoder's learning rate / the SAE's (see the README's recipe)")
    input_scale: float = field(default=1.0, metadata=_INTERNAL)
    input_centered: bool = field(default=False, metadata=_INTERNAL)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("arch"):
            _CONFIG_CLASSES[cls.arch] = cls

    def __post_init__(self) -> None:
        if not self.arch:
            raise TypeError("SAEConfig is abstract: use ReLUConfig, TopKConfig, BatchTopKConfig or JumpReLUConfig")
        if int(self.width) != self.width or self.width < 1:
            raise ValueError(f"width must be a positive integer, got {self.width!r}")
        if self.d_in is not None and (int(self.d_in) != self.d_in or self.d_in < 1):
            raise ValueError(f"d_in must be a positive integer, got {self.d_in!r}")
        if self.pooling not in _POOLINGS:
            raise ValueError(f"pooling must be one of {_POOLINGS}, got {self.pooling!r}")
        if self.layout not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS}, got {self.layout!r}")
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {self.input_scale}")
        if self.lr is not None and not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number or None (TrainConfig.lr), got {self.lr!r}")
        if not (isinstance(self.decoder_lr_scale, (int, float)) and self.decoder_lr_scale > 0):
            raise ValueError(f"decoder_lr_scale must be a positive number, got {self.decoder_lr_scale!r}")

    # ------------------------------------------------------------------ JSON
    def to_json(self) -> dict[str, Any]:
        return {"arch": self.arch, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SAEConfig":
        data = dict(data)
        arch = data.pop("arch", cls.arch or None)
        if arch is None:
            raise ValueError("an SAE config needs an 'arch' key")
        target = config_class(arch)
        if cls.arch and target is not cls:
            raise ValueError(f"config of architecture {arch!r} cannot be read as {cls.__name__}")
        check_fields(target, data, f"{arch} SAE config key")
        data.setdefault("decoder_lr_scale", 1.0)  # written before the option: the decoder trained at the SAE's rate
        return target(**data)

    def replace(self, **changes: Any) -> "SAEConfig":
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        """Short name for sweeps and directories, e.g. ``topk-w4096-k32`` (``-lr0.002`` when the
        config sets its own learning rate)."""
        return self.base_name + (f"-lr{self.lr:g}" if self.lr is not None else "")

    @property
    def base_name(self) -> str:
        """The name without the learning rate (architectures override this)."""
        return f"{self.arch}-w{self.width}"


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    """ReLU latents with an L1 penalty weighted by each latent's decoder norm,
    ``l1_coeff * sum_i |z_i| * ||W_dec[i]||`` (Anthropic, "Towards Monosemanticity" and the April
    2024 update; their default coefficient 5 assumes the normalisation E||x||^2 = d used here).
    The decoder is left free by default (the norm weighting replaces the unit-norm constraint)."""

    arch: ClassVar[str] = "relu"
    l1_coeff: float = option(5.0, "L1 coefficient (weighted by decoder norms)")
    normalize_decoder: bool = option(False, "keep decoder rows at unit norm")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")

    @property
    def sparsity_coeff(self) -> float:
        return self.l1_coeff

    @property
    def base_name(self) -> str:
        return f"relu-w{self.width}-l1{self.l1_coeff:g}"


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    """Keep the ``k`` largest pre-activations of each row (ReLU applied), Gao et al. 2024.

    ``aux_k`` latents (default ``d_in // 2``, capped by the width) of those that have not fired
    for ``TrainConfig.dead_window`` rows reconstruct the residual in the AuxK loss, weighted by
    ``aux_coeff`` (1/32 in the paper) and divided by the residual's variance as in the paper
    (``aux_normalize``; off: the raw squared error, the earlier form). The dead latents enter
    AuxK with their pre-activations as they are (``aux_activation="linear"``): with the paper's
    ReLU (``"relu"``) a latent whose pre-activations are negative on every row gets no gradient
    and stays dead (measured on conv activations at the best rate: 77% dead latents with ReLU,
    28% linear, FVU within 4%). ``multi_k`` (off by
    default) adds the paper's Multi-TopK
    term: the reconstruction error with the ``multi_k`` largest latents, weighted by
    ``multi_k_coeff`` (the paper: ``multi_k = 4 k``, coefficient 1/8).

    ``rescale_acts_by_decoder_norm`` (SAELens's default for its TopK family) is another way to
    keep the decoder's directions at unit norm: the rows of ``W_dec`` are free parameters, the
    SAE decodes with ``W_dec_i / ||W_dec_i||`` and multiplies pre-activation ``i`` by
    ``||W_dec_i||``. The function class is the unit-norm SAE's (the norms fold into the encoder:
    :meth:`~mechlens.sae.TopKSAE.fold_decoder_norm`, done on export), but the gradient steps
    differ, like weight normalisation. It needs ``normalize_decoder=False``."""

    arch: ClassVar[str] = "topk"
    k: int = option(32, "active latents per row")
    aux_k: int | None = option(None, "dead latents in the AuxK loss (None: d_in // 2)")
    aux_coeff: float = option(1 / 32, "AuxK coefficient")
    aux_normalize: bool = option(True, "divide the AuxK loss by the residual's variance (Gao et al.)")
    aux_activation: str = option("linear", "the dead latents' values in AuxK: 'relu' (Gao et al.) or 'linear' "
                                           "(their pre-activations: revives latents that are negative everywhere)")
    multi_k: int | None = option(None, "latents of the Multi-TopK term (None: off)")
    multi_k_coeff: float = option(1 / 8, "Multi-TopK coefficient")
    rescale_acts_by_decoder_norm: bool = option(
        False, "select on pre * ||W_dec_i|| and decode with unit rows (SAELens's parameterisation; "
               "needs --no-normalize-decoder)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.k) != self.k or self.k < 1:
            raise ValueError(f"k must be a positive integer, got {self.k!r}")
        if self.k > self.width:
            raise ValueError(f"k={self.k} is larger than the width {self.width}: an SAE cannot keep more "
                             f"latents per row than it has; use k <= width")
        if self.aux_k is not None and (int(self.aux_k) != self.aux_k or self.aux_k < 1):
            raise ValueError(f"aux_k must be a positive integer or None, got {self.aux_k!r}")
        if self.aux_coeff < 0:
            raise ValueError(f"aux_coeff must be >= 0, got {self.aux_coeff}")
        if self.aux_activation not in ("relu", "linear"):
            raise ValueError(f"aux_activation must be 'relu' or 'linear', got {self.aux_activation!r}")
        if self.multi_k is not None and not self.k < self.multi_k <= self.width:
            raise ValueError(f"multi_k must be in ({self.k}, {self.width}], got {self.multi_k}")
        if self.rescale_acts_by_decoder_norm and self.normalize_decoder:
            raise ValueError("rescale_acts_by_decoder_norm leaves the decoder norms free (the SAE decodes with unit "
                             "rows and scales each latent by its row's norm): set normalize_decoder=False with it")

    @property
    def sparsity_coeff(self) -> float:
        return 0.0

    def resolved_aux_k(self) -> int:
        base = self.aux_k if self.aux_k is not None else max(1, (self.d_in or 2) // 2)
        return int(min(base, self.width))

    @property
    def base_name(self) -> str:
        return f"{self.arch}-w{self.width}-k{self.k}"


@dataclass(frozen=True)
class BatchTopKConfig(TopKConfig):
    """Keep the ``k * batch`` largest activations of the whole batch (Bussmann et al. 2024), so
    the number of latents per row varies. For inference the SAE uses a threshold, the running
    average (``threshold_momentum``) of the smallest activation kept in each training batch."""

    arch: ClassVar[str] = "batchtopk"
    threshold_momentum: float = option(0.99, "momentum of the inference threshold's running average")
    # measured on the conv rows (benchmarks/sae_vs_peers.py, 3 seeds): lower FVU with fewer dead latents
    decoder_lr_scale: float = option(4.0, "the decoder's learning rate / the SAE's (see the README's recipe)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.threshold_momentum < 1.0:
            raise ValueError(f"threshold_momentum must be in [0, 1), got {self.threshold_momentum}")


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    """JumpReLU latents ``z = pre * H(pre - theta)`` with a learnt threshold per latent and an L0
    penalty ``l0_coeff * ||z||_0`` trained with straight-through estimators whose pseudo-gradient
    uses a rectangle kernel of width ``bandwidth`` (Rajamanoharan et al. 2024). The threshold is
    learnt as ``log(theta)``; the defaults suit the trainer's normalisation (E||x||^2 = d, so
    pre-activations are of order 1): on small-CNN activations, 800 steps with ``l0_coeff`` 0.05 /
    0.5 gave L0 about 12 / 4 of 256 latents."""

    arch: ClassVar[str] = "jumprelu"
    l0_coeff: float = option(0.1, "L0 coefficient")
    bandwidth: float = option(0.1, "width of the straight-through kernel")
    init_threshold: float = option(0.5, "initial threshold")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_coeff < 0:
            raise ValueError(f"l0_coeff must be >= 0, got {self.l0_coeff}")
        if not self.bandwidth > 0 or not self.init_threshold > 0:
            raise ValueError("bandwidth and init_threshold must be positive")

    @property
    def sparsity_coeff(self) -> float:
        return self.l0_coeff

    @property
    def base_name(self) -> str:
        return f"jumprelu-w{self.width}-l0{self.l0_coeff:g}"


AUTOCASTS = (None, "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """One training run (shared by every SAE of a sweep trained in the same pass).

    Learning rate ``lr``: a number; ``"rule"``, the rate :func:`mechlens.sae.lr_rule` gives for
    each SAE's width; or ``"auto"``, a short range test on a validation split before the run
    (:func:`mechlens.sae.find_learning_rate`; only through :func:`~mechlens.sae.train_sae`, which
    can hold rows out). A config's own ``lr`` overrides it.

    Schedule: the learning rate warms up linearly over the first ``lr_warmup_fraction`` of the
    steps, stays at ``lr`` and decays linearly to zero over the last ``lr_decay_fraction``; the sparsity
    coefficient (ReLU / JumpReLU) ramps up linearly over the first ``sparsity_warmup_fraction``.
    Gradients are clipped to norm ``grad_clip`` (0 disables). ``autocast="bf16"`` runs the forward
    and the loss terms under ``torch.autocast`` in bfloat16 (the reconstruction error is summed in
    float32); the weights, gradients and Adam moments stay float32 (the GPU box's mixed precision).

    Data: ``normalize`` scales activations by one scalar so that E||x||^2 = d (after removing
    the mean when ``center``), estimated from the store's statistics (or from the first
    ``init_rows`` rows of a plain iterator); the scale is folded into the weights on export.
    ``b_dec_init`` sets the decoder bias from the data mean or the geometric median of the first
    ``init_rows`` rows. A latent is dead once it has not fired for ``dead_window`` rows.
    """

    steps: int = 10_000
    batch_size: int = 4096
    lr: float | str = "rule"
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    lr_warmup_fraction: float = 0.01
    lr_decay_fraction: float = 0.4  # measured: BatchTopK on the conv rows (README), no loss elsewhere
    sparsity_warmup_fraction: float = 0.05
    grad_clip: float = 1.0
    normalize: bool = True
    center: bool = False
    b_dec_init: str = "geometric_median"
    init_rows: int = 8192
    dead_window: int = 100_000
    seed: int = 0
    device: str | None = None
    log_every: int = 50
    checkpoint_every: int = 1000  # with a checkpoint_dir; 0: only at the end (a kill then loses the run)
    shuffle_buffer_chunks: int = 8
    prefetch: int = 2
    autocast: str | None = None  # "bf16": forward and loss terms in bfloat16 (torch.autocast); weights, Adam in float32

    def __post_init__(self) -> None:
        object.__setattr__(self, "adam_betas", tuple(float(b) for b in self.adam_betas))
        if self.autocast not in AUTOCASTS:
            raise ValueError(f"autocast must be one of {AUTOCASTS}, got {self.autocast!r}")
        for name in ("steps", "batch_size", "init_rows", "dead_window", "log_every", "shuffle_buffer_chunks"):
            value = getattr(self, name)
            if int(value) != value or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive integer, got {value!r}")
        for name in ("checkpoint_every", "seed", "prefetch"):
            value = getattr(self, name)
            if int(value) != value or value < 0:
                raise ValueError(f"TrainConfig.{name} must be a non-negative integer, got {value!r}")
        if isinstance(self.lr, str):
            if self.lr not in LR_MODES:
                raise ValueError(f"lr must be a positive number or one of {LR_MODES}, got {self.lr!r}")
        elif not self.lr > 0:
            raise ValueError(f"lr must be positive (or one of {LR_MODES}), got {self.lr}")
        for name in ("lr_warmup_fraction", "lr_decay_fraction", "sparsity_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"TrainConfig.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables clipping), got {self.grad_clip}")
        if self.b_dec_init not in B_DEC_INITS:
            raise ValueError(f"b_dec_init must be one of {B_DEC_INITS}, got {self.b_dec_init!r}")

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["adam_betas"] = list(self.adam_betas)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "TrainConfig":
        data = dict(data)
        if "lr_warmup_steps" in data and "lr_warmup_fraction" not in data:  # written before the fraction
            data["lr_warmup_fraction"] = min(1.0, data.pop("lr_warmup_steps") / max(int(data.get("steps", 10_000)), 1))
        check_fields(cls, data, "TrainConfig key")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
