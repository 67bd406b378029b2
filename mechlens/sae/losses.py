"""SAE losses and the JumpReLU straight-through estimators, as pure functions.

Conventions: ``x`` and ``x_hat`` are ``[N, d]`` rows, latents ``z`` are ``[N, width]``, the decoder
``W_dec`` is ``[width, d]`` (one row per latent). Reconstruction losses are the squared error
summed over ``d`` and averaged over rows; with the trainer's normalisation (E||x||^2 = d) this
is the scale the literature's sparsity coefficients assume.
"""
from __future__ import annotations

import torch

from mechlens._distributed import batch_mean_variance

__all__ = [
    "auxk_loss",
    "fvu",
    "jumprelu",
    "l1_penalty",
    "squared_error",
    "step_l0",
]


def squared_error(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """``mean_n ||x_n - x_hat_n||^2`` (a scalar)."""
    return (x_hat - x).pow(2).sum(dim=-1).mean()


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained over a batch: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    residual = (x_hat - x).pow(2).sum()
    total = (x - x.mean(dim=0, keepdim=True)).pow(2).sum()
    return residual / total.clamp_min(torch.finfo(total.dtype).tiny)


def l1_penalty(z: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
    """``mean_n sum_i |z_ni| * ||W_dec[i]||`` (the L1 penalty weighted by decoder norm)."""
    return (z.abs() @ W_dec.norm(dim=1)).mean()


def auxk_loss(residual: torch.Tensor, pre_dead: torch.Tensor, W_dead: torch.Tensor, aux_k: int, *,
              normalize: bool = True, relu: bool = True) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the ``aux_k`` largest pre-activations among the *dead* latents
    reconstruct the (detached) residual ``x - x_hat`` through their decoder rows, without bias.

    ``pre_dead`` ``[N, n_dead]`` and ``W_dead`` ``[n_dead, d]`` are the dead latents' columns of the
    pre-activations and rows of the decoder, so the cost scales with the number of dead latents.
    ``normalize``: divide the squared error by the residual's variance (summed over ``d``), as
    Gao et al. do, so the term's weight does not shrink as the reconstruction improves.
    ``relu``: pass the chosen pre-activations through the ReLU (the paper); without it a latent
    whose pre-activations are negative on every row still gets a gradient, and can come back.
    """
    if pre_dead.shape[-1] == 0:
        return residual.new_zeros(())
    residual = residual.detach()
    values, indices = pre_dead.topk(min(aux_k, pre_dead.shape[-1]), dim=-1, sorted=False)
    recon = torch.zeros_like(pre_dead).scatter_(-1, indices, torch.relu(values) if relu else values) @ W_dead
    loss = (recon - residual).pow(2).sum(dim=-1).mean()
    if normalize:
        variance = batch_mean_variance(residual)  # over the global batch under data-parallel training
        loss = loss / variance.clamp_min(torch.finfo(variance.dtype).tiny)
    return loss


# ---------------------------------------------------------------------------- JumpReLU
def _rectangle(u: torch.Tensor) -> torch.Tensor:
    """Rectangle kernel K(u) = 1 on (-1/2, 1/2)."""
    return (u.abs() < 0.5).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """``pre * H(pre - theta)``; d/dpre = H(pre - theta); d/dtheta = -(theta / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_pre = grad * (pre > threshold).to(grad.dtype)
        grad_threshold = -(threshold / eps) * _rectangle((pre - threshold) / eps) * grad
        return grad_pre, grad_threshold.sum(dim=0), None


class _StepL0(torch.autograd.Function):
    """``H(pre - theta)``; no gradient to ``pre``; d/dtheta = -(1 / eps) K((pre - theta) / eps)."""

    @staticmethod
    def forward(ctx, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        grad_threshold = -(1.0 / eps) * _rectangle((pre - threshold) / eps) * grad
        return torch.zeros_like(pre), grad_threshold.sum(dim=0), None


def jumprelu(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """JumpReLU with the straight-through pseudo-gradient for the threshold (``[width]``)."""
    return _JumpReLU.apply(pre, threshold, float(bandwidth))


def step_l0(pre: torch.Tensor, threshold: torch.Tensor, bandwidth: float) -> torch.Tensor:
    """``mean_n ||H(pre_n - threshold)||_0`` with the straight-through gradient to the threshold."""
    return _StepL0.apply(pre, threshold, float(bandwidth)).sum(dim=-1).mean()
