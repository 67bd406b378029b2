"""Model-parameter randomization test (Adebayo et al., "Sanity Checks for Saliency Maps", 2018).

A map that explains what the model computed must change when the model's weights are
destroyed. The check re-initialises layers of a *deep copy* of the model (the model passed in is
never modified) and compares each method's map before and after:

* ``mode="cascading"``: randomize layers from the top (the output) down, cumulatively; the
  last step has every listed layer randomized.
* ``mode="independent"``: randomize one layer at a time, the others keep their trained weights.

Similarity per layer and sample: Spearman rank correlation and SSIM of the heatmaps
(:meth:`Attribution.heatmap`: the maps as the method returns them, channels folded; pass
``absolute=True`` to compare magnitudes only, the paper reports both). Low similarity is what a
faithful method shows; Guided Backprop and Guided Grad-CAM famously stay similar (they fail the
check). Measured on the project's trained shapes model (8 test images, cascading from the head):
signed gradient and IG maps drop to |rho| < 0.25 once the head is randomized, Grad-CAM to
rho < 0.3, while Guided Backprop keeps rho > 0.85 through the top three layers (see
``tests/mechlens/test_evaluation.py`` and ``docs/attribution.md``). With ``absolute=True`` the
gradient's magnitude maps stay more similar (rho ~0.8 after the head) because ``|grad|`` follows
the image's edges whatever the weights; a check on magnitudes alone is a weaker test.

Re-initialisation: every submodule's own ``reset_parameters()`` (its default initialisation; a
BatchNorm also resets its running statistics), run under a forked RNG seeded from ``seed`` so the
global random state is untouched; parameters of modules without ``reset_parameters`` get
``N(0, 0.02^2)`` from the same seed. The target is resolved once on the trained model, so the
randomized models explain the same feature (the trained model's predicted class when
``target=None``).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from mechlens.engine import unwrap
from mechlens.attribution.base import Attribution, default_layer, get_method, resolve_target, takes_pixels
from mechlens.evaluation.similarity import spearman, ssim
from mechlens.models.layers import get_module, resolve_layers

__all__ = ["RandomizationResult", "randomization_check", "randomization_layers", "randomize_module_"]


def randomization_layers(model: nn.Module) -> list[str]:
    """Default layer order for the check, top (output) first: the model's top-level children
    that own parameters, with sequential containers (stages, ``blocks``) split into their
    children. Parameters owned directly by the root (a ViT's ``cls_token``, ``pos_embed``) are
    not randomized."""
    model = unwrap(model)
    names: list[str] = []
    for name, child in model.named_children():
        if not any(True for _ in child.parameters()):
            continue
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and len(child) > 1:
            names += [f"{name}.{sub}" for sub, grand in child.named_children() if any(True for _ in grand.parameters())]
        else:
            names.append(name)
    if not names:
        raise ValueError(f"{type(model).__name__} has no submodules with parameters to randomize")
    return names[::-1]


@torch.no_grad()
def randomize_module_(module: nn.Module, seed: int) -> int:
    """Re-initialise ``module`` in place (see the module docstring); returns the number of
    parameter tensors changed."""
    params = list(module.parameters())
    if not params:
        raise ValueError(f"{type(module).__name__} has no parameters to randomize")
    devices = sorted({p.device.index for p in params if p.device.type == "cuda" and p.device.index is not None})
    covered: set[int] = set()
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for sub in module.modules():
            reset = getattr(sub, "reset_parameters", None)
            own = list(sub.parameters(recurse=False))
            if callable(reset) and own:
                reset()
                covered.update(id(p) for p in own)
    generator = torch.Generator().manual_seed(seed + 1)
    for p in params:
        if id(p) not in covered:
            p.copy_(torch.randn(p.shape, generator=generator).mul_(0.02).to(p))
    return len(params)


@dataclass
class RandomizationResult:
    """Similarity of the maps before and after randomizing ``layers`` (in order): ``spearman``
    and ``ssim`` are ``[L, B]`` (row ``i``: after step ``i``); ``original`` is the trained
    model's heatmap ``[B, H, W]``; ``maps`` ``[L, B, H, W]`` when kept."""

    method: str
    mode: str
    layers: list[str]
    spearman: torch.Tensor
    ssim: torch.Tensor
    original: torch.Tensor
    maps: torch.Tensor | None = None
    absolute: bool = True
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def constant_maps(self) -> torch.Tensor:
        """``[L]``: how many samples' maps were constant (before or after randomizing) at each step.
        Their similarity is undefined, so the means leave them out; this says how many."""
        return self.spearman.isnan().sum(dim=1)

    def mean_spearman(self) -> torch.Tensor:
        """``[L]`` mean over the samples whose maps are not constant (see :attr:`constant_maps`;
        NaN where all were)."""
        return self.spearman.nanmean(dim=1)

    def mean_ssim(self) -> torch.Tensor:
        return self.ssim.nanmean(dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method, "mode": self.mode, "absolute": self.absolute, "layers": list(self.layers),
            "spearman": [float(v) for v in self.mean_spearman()],
            "ssim": [float(v) for v in self.mean_ssim()],
            "constant_maps": [int(v) for v in self.constant_maps], "samples": int(self.spearman.shape[1]),
        }


@takes_pixels
def randomization_check(
    model: Any,
    inputs: torch.Tensor,
    target: Any = None,
    method: str = "saliency",
    *,
    mode: str = "cascading",
    layers: str | Sequence[str] | None = None,
    absolute: bool = False,
    seed: int = 0,
    keep_maps: bool = True,
    method_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> RandomizationResult:
    """Run the model-parameter randomization test for ``method`` (see the module docstring).
    ``layers``: names / glob patterns, in the order to randomize (default
    :func:`randomization_layers`, top first). ``seed`` seeds the re-initialisation. Keyword
    arguments of the method (``layer=`` for CAMs, looked up by name in each randomized copy) go in
    ``method_kwargs`` or as extra keywords; a method's own ``seed`` (SmoothGrad's noise) only in
    ``method_kwargs``. Samples whose maps are constant are counted in
    :attr:`RandomizationResult.constant_maps`, not silently averaged away."""
    if mode not in ("cascading", "independent"):
        raise ValueError(f"mode must be 'cascading' or 'independent', got {mode!r}")
    clash = set(kwargs) & set(method_kwargs or {})
    if clash:
        raise ValueError(f"{sorted(clash)} given both as keywords and in method_kwargs; give each once")
    method_kwargs = {**kwargs, **(method_kwargs or {})}
    model = unwrap(model)
    info = get_method(method)
    default_layer(info, model, inputs, method_kwargs)  # chosen on the trained model, kept for every step
    order = randomization_layers(model) if layers is None else resolve_layers(model, layers)
    resolved = resolve_target(model, inputs, target)

    def heat(net: nn.Module) -> torch.Tensor:
        result: Attribution = info.fn(net, inputs, resolved, **method_kwargs)
        return result.heatmap(absolute=absolute).detach().cpu()

    original = heat(model)
    rho, sim, maps = [], [], []
    work = copy.deepcopy(model) if mode == "cascading" else None
    for step, name in enumerate(order):
        if mode == "independent":
            work = copy.deepcopy(model)
        assert work is not None
        randomize_module_(get_module(work, name), seed + 1000 * step)
        after = heat(work)
        rho.append(spearman(original, after))
        sim.append(ssim(original, after))
        if keep_maps:
            maps.append(after)
    return RandomizationResult(
        method=info.name, mode=mode, layers=list(order), spearman=torch.stack(rho), ssim=torch.stack(sim),
        original=original, maps=torch.stack(maps) if keep_maps else None, absolute=absolute,
    )
