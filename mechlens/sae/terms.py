"""The loss terms an SAE architecture adds to the reconstruction error, and their schedules.

The trainer knows no architecture: per step it computes ``loss = reconstruction`` and adds, in
order, ``coefficient(step) * term(context)`` for every :class:`LossTerm` that the SAE's class
declares in ``SAE.loss_terms`` (a term that returns ``None`` is off for that step). A term
names its coefficient (a field of the architecture's config, so the command line offers it)
and its schedule (:func:`constant` or :func:`sparsity_warmup`, or any ``(step, train) ->
factor``). Each term is logged as ``<name>_loss`` (its unscaled value) and ``<name>_coeff``.

>>> class MySAE(SAE):
...     loss_terms = (LossTerm("sparsity", "l1_coeff", lambda sae, ctx: ctx.out.z.abs().sum(-1).mean(),
...                            schedule=sparsity_warmup),)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from mechlens.sae.losses import auxk_loss, squared_error

if TYPE_CHECKING:  # pragma: no cover
    from mechlens.sae.config import SAEConfig, TrainConfig
    from mechlens.sae.modules import SAE, SAEOutput

__all__ = [
    "LossContext",
    "LossTerm",
    "auxk_term",
    "constant",
    "multi_k_term",
    "sparsity_term",
    "sparsity_warmup",
]

Schedule = Callable[[int, "TrainConfig"], float]


def constant(step: int, train: "TrainConfig") -> float:
    """The coefficient as configured, at every step."""
    return 1.0


def sparsity_warmup(step: int, train: "TrainConfig") -> float:
    """Linear ramp of the coefficient over the first ``TrainConfig.sparsity_warmup_fraction``."""
    ramp = train.sparsity_warmup_fraction * train.steps
    return 1.0 if ramp <= 0 else min(1.0, (step + 1) / ramp)


@dataclass
class LossContext:
    """What a loss term may read: the normalised rows ``x``, the SAE's output ``out``, the step,
    the training configuration and ``dead`` (indices of the latents that have not fired for
    ``TrainConfig.dead_window`` rows; refreshed every few steps for SAEs whose terms ask for it
    with ``uses_dead_latents``; ``None`` when there are none)."""

    x: torch.Tensor
    out: "SAEOutput"
    step: int
    train: "TrainConfig"
    dead: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class LossTerm:
    """One term of an architecture's loss: ``coefficient * compute(sae, context)``.

    ``coeff``: the name of the config field that holds the coefficient (or a number);
    ``schedule``: ``(step, train) -> factor`` multiplying it; ``compute`` returns the unscaled
    term (a scalar tensor) or ``None`` when the term is off (then nothing is added and 0 is
    logged); ``uses_dead_latents``: the trainer tracks the dead latents for ``context.dead``."""

    name: str
    coeff: str | float
    compute: Callable[["SAE", LossContext], Optional[torch.Tensor]]
    schedule: Schedule = constant
    uses_dead_latents: bool = False

    def coefficient(self, config: "SAEConfig", step: int, train: "TrainConfig") -> float:
        base = getattr(config, self.coeff) if isinstance(self.coeff, str) else self.coeff
        return base * self.schedule(step, train)

    @property
    def columns(self) -> tuple[str, str]:
        """The log columns of the term: its unscaled value and its scheduled coefficient."""
        return f"{self.name}_loss", f"{self.name}_coeff"


# ---------------------------------------------------------------------------- the built-in terms
def _sparsity(sae: "SAE", ctx: LossContext) -> torch.Tensor:
    return sae.sparsity_loss(ctx.out)


def _multi_k(sae: Any, ctx: LossContext) -> Optional[torch.Tensor]:
    multi_k = sae.config.multi_k
    if multi_k is None:
        return None
    values, indices = ctx.out.pre.topk(multi_k, dim=-1, sorted=False)
    wide = torch.zeros_like(ctx.out.pre).scatter_(-1, indices, torch.relu(values))
    return squared_error(ctx.x, sae.decode(wide))


def _auxk(sae: Any, ctx: LossContext) -> Optional[torch.Tensor]:
    if not sae.config.aux_coeff > 0 or ctx.dead is None:
        return None
    out, dead = ctx.out, ctx.dead
    return auxk_loss(ctx.x - out.x_hat, out.pre.index_select(1, dead), sae.decoder_directions(dead),
                     sae.config.resolved_aux_k(), normalize=sae.config.aux_normalize,
                     relu=sae.config.aux_activation == "relu")


def sparsity_term(coeff: str) -> LossTerm:
    """``SAE.sparsity_loss`` weighted by config field ``coeff``, ramped up by :func:`sparsity_warmup`."""
    return LossTerm("sparsity", coeff, _sparsity, schedule=sparsity_warmup)


multi_k_term = LossTerm("multi_k", "multi_k_coeff", _multi_k)
"""Multi-TopK (Gao et al. 2024): the reconstruction error with the ``multi_k`` largest latents."""

auxk_term = LossTerm("aux", "aux_coeff", _auxk, uses_dead_latents=True)
"""AuxK (Gao et al. 2024): the dead latents reconstruct the residual (see :func:`auxk_loss`)."""
