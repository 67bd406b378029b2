"""Three more SAE architectures, each matched against a peer implementation:

* ``gated`` (Rajamanoharan et al. 2024): latents ``1[pi_gate > 0] * relu(pi_mag)``, the magnitude
  path sharing the encoder (``W_mag = W_enc * exp(r_mag)``); loss terms: the L1 of
  ``relu(pi_gate)`` weighted by decoder norms, and the gate's auxiliary reconstruction through a
  frozen decoder.
* ``matryoshka`` (Bussmann et al. 2025; Nabeshima 2024): BatchTopK latents split into nested
  prefixes (``group_sizes``); loss terms: every inner prefix's reconstruction error, plus
  BatchTopK's AuxK / Multi-TopK.
* ``archetypal`` (Fel et al. 2025, RA-SAE): TopK latents on decoder rows ``(W C + Lambda) exp(m)``,
  convex combinations of archetype points ``C`` (rows of the data) relaxed by ``||Lambda|| <=
  delta``; loss terms: TopK's AuxK / Multi-TopK.

Conventions follow the peers (``tests/mechlens/test_sae_architectures.py`` checks them weight for
weight):

* gated: the forward pass, the L1 term and the auxiliary term are those of dictionary_learning's
  ``GatedAutoEncoder`` + ``GatedSAETrainer`` (``trainers/gdm.py``: auxiliary reconstruction through
  ``decoder.weight.detach()`` and ``decoder_bias.detach()``, as the paper's frozen decoder; unit-norm
  decoder by constrained Adam) and SAELens's ``GatedTrainingSAE`` (L1 weighted by the decoder-row
  norms, so it stays right with a free decoder; SAELens does not detach the decoder in the
  auxiliary term: same value, different gradient).
* matryoshka: the loss is the *sum* over prefixes of their reconstruction errors, the full width
  counted once, as in the paper and SAELens's ``MatryoshkaBatchTopKTrainingSAE`` (the trainer adds
  the full reconstruction; the ``matryoshka`` term adds the inner prefixes). dictionary_learning's
  ``MatryoshkaBatchTopKTrainer`` takes the *mean* of ``group_weights[i] * error_i`` (default weights
  ``1/G``), i.e. ``sum_i error_i / G^2``: the same terms, scaled by a constant.
* archetypal: overcomplete's ``RelaxedArchetypalDictionary`` (``W`` projected onto row-stochastic
  matrices and ``Lambda`` onto the ``delta``-ball before the dictionary is computed, in training
  mode; ``W = I`` and ``Lambda = 0`` at initialisation) with its ``RATopKSAE``'s TopK codes. The
  archetype points ``C`` are rows of the training data minus ``b_dec`` (overcomplete has no decoder
  bias): :meth:`ArchetypalSAE.set_archetypes`, or, by default, the first training batch the SAE sees
  (the trainer passes the SAE no data before that).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from mechlens.sae.config import BatchTopKConfig, SAEConfig, TopKConfig, option
from mechlens.sae.losses import l1_penalty, squared_error
from mechlens.sae.modules import SAE, BatchTopKSAE, SAEOutput, TopKSAE, register_sae
from mechlens.sae.terms import LossContext, LossTerm, sparsity_term

__all__ = [
    "ArchetypalConfig",
    "ArchetypalSAE",
    "GatedConfig",
    "GatedSAE",
    "MatryoshkaConfig",
    "MatryoshkaSAE",
    "gate_aux_term",
    "matryoshka_term",
    "prefix_errors",
]


# ---------------------------------------------------------------------------- gated
@dataclass(frozen=True)
class GatedConfig(SAEConfig):
    """Gated SAE (Rajamanoharan et al. 2024, "Improving dictionary learning with gated sparse
    autoencoders"): ``pi_gate = (x - b_dec) W_enc + b_gate`` decides which latents fire,
    ``pi_mag = (x - b_dec) (W_enc * exp(r_mag)) + b_mag`` how strongly, ``z = 1[pi_gate > 0] *
    relu(pi_mag)``. The loss adds ``l1_coeff * sum_i relu(pi_gate)_i ||W_dec[i]||`` (ramped up over
    ``TrainConfig.sparsity_warmup_fraction``) and the auxiliary reconstruction of ``x`` from
    ``relu(pi_gate)`` through a frozen copy of the decoder, which trains the gate. The decoder is
    kept at unit norm (the paper and dictionary_learning); with ``normalize_decoder=False`` the
    norm weighting of the L1 term (SAELens) keeps the penalty meaningful."""

    arch: ClassVar[str] = "gated"
    l1_coeff: float = option(1.0, "L1 coefficient of the gate (weighted by decoder norms)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.l1_coeff >= 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")

    @property
    def sparsity_coeff(self) -> float:
        return self.l1_coeff

    @property
    def base_name(self) -> str:
        return f"gated-w{self.width}-l1{self.l1_coeff:g}"


def _gate_aux(sae: "GatedSAE", ctx: LossContext) -> torch.Tensor:
    # relu(pi_gate) reconstructs x through a frozen decoder: gradients reach only the gate
    # (W_enc, b_gate; and b_dec through the encoder's input), never the decoder
    gate = torch.relu(ctx.out.pre)
    return squared_error(ctx.x, torch.addmm(sae.b_dec.detach(), gate, sae.W_dec.detach()))


gate_aux_term = LossTerm("gate_aux", 1.0, _gate_aux)
"""The Gated SAE's auxiliary loss ``||x - (relu(pi_gate) W_dec' + b_dec')||^2`` (``'``: detached),
with coefficient 1 as in the paper and both peers."""


@register_sae
class GatedSAE(SAE):
    """Gated SAE. ``b_enc`` is the gate bias ``b_gate`` (so ``pre`` is ``pi_gate``); ``r_mag`` and
    ``b_mag`` ``[width]`` are the magnitude path's rescaling and bias (both start at 0, so the two
    paths start equal). The latents are those of training at inference too: no threshold."""

    config_class = GatedConfig
    loss_terms = (sparsity_term("l1_coeff"), gate_aux_term)
    config: GatedConfig

    def __init__(self, config: GatedConfig, *, device: str | torch.device | None = None, seed: int | None = 0):
        super().__init__(config, device=device, seed=seed)
        self.r_mag = nn.Parameter(torch.zeros(config.width, device=device))
        self.b_mag = nn.Parameter(torch.zeros(config.width, device=device))

    @property
    def b_gate(self) -> torch.Tensor:
        return self.b_enc

    def magnitudes(self, pre: torch.Tensor) -> torch.Tensor:
        """``pi_mag`` from ``pi_gate``: ``(pi_gate - b_gate) * exp(r_mag) + b_mag``."""
        return torch.addcmul(self.b_mag, pre - self.b_enc, self.r_mag.exp())

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return (pre > 0).to(pre.dtype) * torch.relu(self.magnitudes(pre))

    def sparsity_loss(self, out: SAEOutput) -> torch.Tensor:
        return l1_penalty(torch.relu(out.pre), self.W_dec)


# ---------------------------------------------------------------------------- matryoshka
def _parse_sizes(value: Any) -> Any:
    """``"64+192+768"`` / ``"64,192,768"`` / a list (from JSON) -> a tuple of ints (else as given)."""
    if isinstance(value, str):
        parts = [p for p in re.split(r"[+,\s]+", value.strip()) if p]
        try:
            return tuple(int(p) for p in parts)
        except ValueError:
            raise ValueError(f"group_sizes must be integers separated by '+', got {value!r}") from None
    if isinstance(value, (list, tuple)):
        return tuple(value)
    return value


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025, "Learning multi-level features with
    Matryoshka sparse autoencoders"; Nabeshima 2024): the latents are split into consecutive
    groups, ``group_sizes`` (summing to the width), and every prefix of groups must reconstruct the
    input on its own: the loss is the sum over prefixes of their reconstruction errors (the full
    width once). Early latents then learn the general features, later ones refine them, and
    parents are not absorbed into their children. Activations, AuxK and the inference threshold
    are BatchTopK's. ``group_sizes`` ``None``: prefixes of ``width/8, width/4, width/2, width``.
    On the command line the sizes of one SAE are joined by ``+`` (``--group-sizes 64+192+768``;
    commas separate the SAEs of a sweep)."""

    arch: ClassVar[str] = "matryoshka"
    # BatchTopK's decoder rate was measured on plain BatchTopK only: Matryoshka keeps the SAE's rate
    decoder_lr_scale: float = option(1.0, "the decoder's learning rate / the SAE's (see the README's recipe)")
    group_sizes: Optional[tuple[int, ...]] = option(
        None, "sizes of the nested latent groups, joined by '+' (e.g. 64+192+768; None: width/8, /8, /4, /2)")

    def __post_init__(self) -> None:
        object.__setattr__(self, "group_sizes", _parse_sizes(self.group_sizes))
        super().__post_init__()
        sizes = self.group_sizes
        if sizes is None:
            return
        if not isinstance(sizes, tuple) or not sizes:
            raise ValueError(f"group_sizes must be a non-empty sequence of positive integers, got {sizes!r}")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sizes):
            raise ValueError(f"group_sizes must be positive integers, got {sizes}")
        if sum(sizes) != self.width:
            raise ValueError(f"group_sizes {'+'.join(map(str, sizes))} sum to {sum(sizes)}, not the width {self.width}")

    def resolved_group_sizes(self) -> tuple[int, ...]:
        """The group sizes (the default when ``group_sizes`` is None: prefixes of width/8, /4, /2, 1)."""
        if self.group_sizes is not None:
            return tuple(self.group_sizes)
        ends = sorted({max(1, self.width // 8), max(1, self.width // 4), max(1, self.width // 2), self.width})
        return tuple(b - a for a, b in zip([0, *ends[:-1]], ends))

    @property
    def base_name(self) -> str:
        groups = "_".join(map(str, self.group_sizes)) if self.group_sizes is not None else "default"
        return f"matryoshka-w{self.width}-k{self.k}-g{groups}"


def prefix_errors(sae: "MatryoshkaSAE", x: torch.Tensor, z: torch.Tensor) -> list[torch.Tensor]:
    """The reconstruction error ``mean_n ||x_n - x_hat_n^(m)||^2`` of every prefix ``m`` of groups,
    the full width last."""
    errors = []
    recon = sae.b_dec.expand_as(x)
    directions = sae.decoder_directions()
    start = 0
    for size in sae.config.resolved_group_sizes():
        recon = torch.addmm(recon, z[:, start:start + size], directions[start:start + size])
        start += size
        errors.append(squared_error(x, recon))
    return errors


def _matryoshka(sae: "MatryoshkaSAE", ctx: LossContext) -> Optional[torch.Tensor]:
    errors = prefix_errors(sae, ctx.x, ctx.out.z)[:-1]  # the trainer adds the full width's error itself
    return torch.stack(errors).sum() if errors else None


matryoshka_term = LossTerm("matryoshka", 1.0, _matryoshka)
"""The inner prefixes' reconstruction errors, summed (the full width's is the trainer's own term)."""


@register_sae
class MatryoshkaSAE(BatchTopKSAE):
    """BatchTopK latents whose nested prefixes (``config.resolved_group_sizes()``) each reconstruct
    the input. A saved SAE uses the BatchTopK inference threshold; the first
    ``prefix_widths()[m]`` latents alone are a coarser SAE."""

    config_class = MatryoshkaConfig
    loss_terms = (matryoshka_term, *BatchTopKSAE.loss_terms)
    config: MatryoshkaConfig

    def prefix_widths(self) -> list[int]:
        """The width of every prefix of groups (the last is the full width)."""
        widths, total = [], 0
        for size in self.config.resolved_group_sizes():
            total += size
            widths.append(total)
        return widths


# ---------------------------------------------------------------------------- archetypal
@dataclass(frozen=True)
class ArchetypalConfig(TopKConfig):
    """Relaxed Archetypal TopK SAE (Fel et al. 2025, "Archetypal SAE: adaptive and stable
    dictionary learning for concept extraction in large vision models"; overcomplete's
    ``RATopKSAE``). Each decoder row is a convex combination of ``n_candidates`` archetype points
    ``C`` (rows of the training data) plus a relaxation of norm at most ``delta``, times a learnt
    scale ``exp(m)`` (``use_multiplier``): ``D = (W C + Lambda) exp(m)``, ``W`` row-stochastic. The
    dictionary then stays in (near) the data's conical hull, which makes it stable across seeds.
    The decoder norm is set by the archetypes, so ``normalize_decoder`` must stay off.
    ``delta`` is in the trainer's normalised units (E||x||^2 = d)."""

    arch: ClassVar[str] = "archetypal"
    normalize_decoder: bool = option(False, "keep decoder rows at unit norm (not with archetypes: must be off)")
    n_candidates: Optional[int] = option(None, "archetype points C, rows of the data (None: the width)")
    delta: float = option(1.0, "largest norm of the relaxation Lambda of each atom")
    use_multiplier: bool = option(True, "learn a scale exp(m) of the dictionary")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalize_decoder:
            raise ValueError("archetypal SAE: normalize_decoder must be False (the archetypes set the decoder norms)")
        if self.rescale_acts_by_decoder_norm:
            raise ValueError("archetypal SAE: rescale_acts_by_decoder_norm must be False (the archetypes set the "
                             "decoder norms)")
        if self.n_candidates is not None and (int(self.n_candidates) != self.n_candidates or self.n_candidates < 1):
            raise ValueError(f"n_candidates must be a positive integer or None, got {self.n_candidates!r}")
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")

    def resolved_candidates(self) -> int:
        return int(self.n_candidates if self.n_candidates is not None else self.width)


@register_sae
class ArchetypalSAE(TopKSAE):
    """TopK codes on a relaxed archetypal dictionary.

    State: ``archetypes`` ``C`` ``[n_candidates, d_in]`` (a buffer: data rows minus ``b_dec``, in the
    trainer's normalised space), ``archetype_weights`` ``W`` ``[width, n_candidates]``, ``relaxation``
    ``Lambda`` ``[width, d_in]``, ``log_multiplier`` ``m``; ``W_dec`` is a buffer holding the fused
    dictionary ``(W C + Lambda) exp(m) / input_scale`` (``input_scale``: the normalisation folded in
    on export), which inference reads. In training mode the forward pass projects ``W`` and
    ``Lambda`` onto their constraints and computes the dictionary afresh (with gradients to ``W``,
    ``Lambda``, ``m``); ``W_dec`` then holds it for the step's loss terms (AuxK, Multi-TopK) and is
    fused again by :meth:`after_step` (the trainer calls it after each step) or, when a training
    forward pass came since, on switching to eval mode (:meth:`refresh_dictionary` fuses it
    explicitly, e.g. after editing the parameters by hand).

    Until archetypes are set (``set_archetypes`` or the first training forward pass, which takes
    them from its batch), the decoder is the usual random unit directions."""

    config_class = ArchetypalConfig
    config: ArchetypalConfig

    def __init__(self, config: ArchetypalConfig, *, device: str | torch.device | None = None, seed: int | None = 0):
        super().__init__(config, device=device, seed=seed)
        self._seed = 0 if seed is None else int(seed)
        w, d, n = config.width, int(config.d_in), config.resolved_candidates()
        dictionary = self.W_dec.detach().clone()
        del self.W_dec  # the decoder is derived from the archetypes: a buffer, not a parameter
        self.register_buffer("W_dec", dictionary)
        self.register_buffer("archetypes", torch.zeros(n, d, device=device))
        self.register_buffer("archetypes_set", torch.zeros((), dtype=torch.long, device=device))
        self.archetype_weights = nn.Parameter(torch.eye(w, n, device=device))
        self.relaxation = nn.Parameter(torch.zeros(w, d, device=device))
        self.log_multiplier = nn.Parameter(torch.zeros((), device=device), requires_grad=config.use_multiplier)
        self._stale = False  # W_dec may lag the parameters (a training forward pass since the last fusion)

    # ------------------------------------------------------------------ archetypes
    @torch.no_grad()
    def set_archetypes(self, rows: torch.Tensor, *, center: bool = True, reset: bool = True) -> "ArchetypalSAE":
        """Take the archetype points ``C`` from data ``rows`` ``[N, d_in]`` (in the space the SAE is
        trained in: the trainer's normalised rows): ``n_candidates`` of them, drawn without
        replacement (with replacement when ``N`` is smaller). ``center``: subtract ``b_dec`` (the
        dictionary reconstructs ``x - b_dec``, so its atoms belong to the hull of the rows seen from
        ``b_dec``; without it, data with a large common offset, which ``b_dec`` absorbs, gives atoms
        that all point along the offset: on a planted dictionary shifted by 1 in every dimension,
        MMCS 0.70 instead of 0.99). ``reset``: restart ``W = I``, ``Lambda = 0``, ``m = 0``
        (overcomplete's initialisation; the encoder keeps its random init: pointing it at the new
        atoms made recovery on planted dictionaries worse)."""
        rows = rows.detach().to(self.archetypes)
        if rows.dim() != 2 or rows.shape[1] != self.d_in or rows.shape[0] == 0:
            raise ValueError(f"archetypes are rows [N, {self.d_in}], got shape {tuple(rows.shape)}")
        if center:
            rows = rows - self.b_dec.detach()
        n = self.archetypes.shape[0]
        generator = torch.Generator().manual_seed(self._seed)
        if rows.shape[0] >= n:
            index = torch.randperm(rows.shape[0], generator=generator)[:n]
        else:
            index = torch.randint(rows.shape[0], (n,), generator=generator)
        self.archetypes.copy_(rows[index.to(rows.device)])
        self.archetypes_set.fill_(1)
        if reset:
            self.archetype_weights.copy_(torch.eye(*self.archetype_weights.shape))
            self.relaxation.zero_()
            self.log_multiplier.zero_()
        self.refresh_dictionary()
        return self

    @property
    def has_archetypes(self) -> bool:
        return bool(self.archetypes_set)

    @torch.no_grad()
    def project(self) -> None:
        """``W`` onto row-stochastic matrices (ReLU, rows divided by their sum + 1e-8) and each
        row of ``Lambda`` into the ball of radius ``delta`` (overcomplete's projection)."""
        weights = torch.relu(self.archetype_weights)
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-8
        self.archetype_weights.copy_(weights)
        norms = self.relaxation.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # (delta = 0: no NaN from 0/0)
        self.relaxation.mul_(torch.clamp(self.config.delta / norms, max=1))

    def dictionary(self) -> torch.Tensor:
        """``(W C + Lambda) exp(m) / input_scale`` from the current parameters (no projection)."""
        D = torch.addmm(self.relaxation, self.archetype_weights, self.archetypes)
        return D * (self.log_multiplier.exp() / self.config.input_scale)

    @torch.no_grad()
    def refresh_dictionary(self) -> None:
        """Fuse the dictionary into ``W_dec`` (projecting ``W`` and ``Lambda`` first)."""
        if self.has_archetypes:
            self.project()
            self._buffers["W_dec"] = self.dictionary().detach().clone()
        else:
            self._buffers["W_dec"] = self.W_dec.detach()
        self._stale = False

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> SAEOutput:
        if self.training:
            if not self.has_archetypes:
                self._check_rows(x)
                self.set_archetypes(x)
            self.project()
            self._buffers["W_dec"] = self.dictionary()  # live: the step's loss terms differentiate through it
            self._stale = True
        return super().forward(x)

    def after_step(self, out: SAEOutput) -> None:
        self.refresh_dictionary()

    def train(self, mode: bool = True) -> "ArchetypalSAE":
        # fuse what training changed (a loaded or folded SAE keeps its W_dec as it is)
        if not mode and self._stale:
            self.refresh_dictionary()
        return super().train(mode)

    # the trainer leaves the decoder alone (normalize_decoder is always off for this class)
    def remove_parallel_decoder_grad(self) -> None:  # pragma: no cover - never called
        return None

    def normalize_decoder_rows(self) -> None:  # pragma: no cover - never called
        return None

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._buffers["W_dec"] = self.W_dec.detach()
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self._stale = False
        return result
