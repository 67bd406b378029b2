"""Move SAEs between mechlens and its peers: SAELens's directory format, and in-memory SAEs of
SAELens, dictionary_learning and overcomplete, converted to the mechlens SAE computing the same
latents (so :func:`~mechlens.sae.evaluate`, the feature statistics and the atlas score them).

>>> export_saelens(SAE.load("runs/sae/topk-w4096-k32"), "out/saelens")   # sae_lens.SAE.load_from_disk reads it
>>> sae = import_saelens("out/saelens")                                   # and back
>>> sae = from_peer(dictionary_learning_autoencoder)                      # any supported peer object

A conversion is either exact or refused (:class:`SAEInteropError`, one line saying what is
possible): no SAE is written or returned that computes other latents than its source. Exact means
the same formula; where a bias or a scale is folded into the weights (SAELens's
``apply_b_dec_to_input=False`` and ``rescale_acts_by_decoder_norm``, dictionary_learning's
``JumpReluAutoEncoder``, overcomplete's BatchNorm encoder) the result agrees up to float rounding.

What each peer computes, and how it maps (``pre = x @ W_enc + b_enc``; mechlens always encodes
``x - b_dec``; ``k`` and thresholds are as the peer applies them at inference):

* SAELens ``standard``: ``relu(pre)`` -> ``relu``. ``topk``: top-k of ``pre``, then ReLU: the very
  ops of mechlens's ``topk``; ``rescale_acts_by_decoder_norm`` (selects on ``pre * |W_dec_i|``,
  decodes ``z / |W_dec_i|``) is folded into ``W_enc``, ``b_enc``, ``W_dec``. ``jumprelu``:
  ``relu(pre) * (pre > t)``, ``t`` stored as is -> mechlens ``jumprelu`` (``pre * (pre >
  exp(log_threshold))``; a ``t <= 0`` becomes ``log_threshold = -inf``, a threshold of 0, which is
  what ``relu(pre) * (pre > t)`` computes there). SAELens saves its (Matryoshka) BatchTopK SAEs as
  ``jumprelu`` with one threshold for every latent and the training architecture in the metadata:
  those come back as mechlens ``batchtopk`` / ``matryoshka`` (eval mode: ``relu(pre) * (pre > t)``
  too). A BatchTopK *training* checkpoint (``architecture: batchtopk``, a ``topk_threshold``) ->
  ``batchtopk``. ``gated``: ``1[pre_gate > 0] * relu(x W_enc exp(r_mag) + b_mag)`` -> mechlens
  ``gated``. ``apply_b_dec_to_input=False`` is folded (``b_enc + b_dec @ W_enc``; for ``gated``
  ``b_mag`` gains ``exp(r_mag)`` times that). ``normalize_activations`` other than ``none`` is
  refused (``expected_average_only_in`` keeps its factor outside the directory; ``layer_norm`` and
  ``constant_norm_rescale`` are per-row, not affine), as are the other architectures.
* dictionary_learning ``AutoEncoder``: ``relu(enc(x - bias))``, ``dec(f) + bias`` -> ``relu``.
  ``AutoEncoderNew``: nothing subtracted before encoding, a decoder bias: folded. ``AutoEncoderTopK``:
  ReLU *then* top-k (the same latents as top-k then ReLU; its ``threshold`` is not used by
  ``encode``). ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` (every group active): ``relu(pre) *
  (relu(pre) > t)`` at inference -> ``batchtopk`` / ``matryoshka`` (a ``t < 0``, the untrained
  default -1, keeps every positive latent: stored as 0). ``JumpReluAutoEncoder``: ``relu(pre *
  (pre > t))``, and by default (``apply_b_dec_to_input=False``) ``b_dec`` is *not* subtracted:
  folded into ``b_enc``. ``GatedAutoEncoder``: the gated formula above -> ``gated``.
* overcomplete ``SAE`` / ``TopKSAE`` / ``BatchTopKSAE`` / ``JumpSAE`` / ``RATopKSAE`` with a linear
  encoder (``MLPEncoder`` without hidden blocks, its norm ``Identity`` or an eval-mode
  ``BatchNorm1d``, folded; or a ``TieableEncoder``) and no decoder bias. Its BatchTopK and JumpReLU
  keep ``codes >= t`` (not ``>``): the threshold becomes the next float below ``t``, for which ``>``
  is ``>=``. Its BatchTopK ``top_k`` counts latents per *batch* (mechlens's ``k`` per row): it is
  copied as ``k`` (capped at the width) and only matters if the SAE is trained further.
  ``RATopKSAE`` -> ``archetypal`` (archetypes, weights, relaxation and multiplier copied).

A JumpReLU threshold ``t`` from a peer becomes ``log_threshold`` with ``exp(log_threshold)`` the
float nearest ``t`` that ``exp`` reaches (float32 ``exp`` cannot hit every float: at most an ulp
or two off). Converted SAEs are returned in eval mode, on ``device`` (default CPU), in the dtype of
the peer's weights.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from activation_store.jsonutil import dumps as json_dumps
from mechlens.sae.config import SAEConfig, config_class
from mechlens.sae.modules import (SAE, BatchTopKSAE, JumpReLUSAE, ReLUSAE, TopKSAE, build_sae, list_architectures,
                                  sae_class)

__all__ = [
    "SAELENS_CONFIG_FILE",
    "SAELENS_WEIGHTS_FILE",
    "SAEInteropError",
    "export_saelens",
    "from_peer",
    "import_saelens",
    "peer_types",
]

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"
SAELENS_FORMAT_VERSION = "6.0.0"
"""Written as ``metadata.sae_lens_version``: SAELens reads a config without one (or older than 6)
as a pre-6 config and renames its keys."""

_COMMON_FIELDS = ("layer", "pooling", "layout", "input_scale", "input_centered")
_BATCHTOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")  # SAELens training architectures saved as jumprelu


class SAEInteropError(ValueError):
    """An SAE that cannot be converted exactly, or a directory that is not a readable peer SAE."""


# ---------------------------------------------------------------------------- helpers
def _registered(arch: str) -> type[SAE] | None:
    """The mechlens SAE class of ``arch`` if that architecture is registered now."""
    return sae_class(arch) if arch in list_architectures() else None


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_of(name: Any, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise SAEInteropError(f"{where}: dtype {name!r} is not a torch floating-point dtype")
    return dtype


def _same_computation(sae: SAE, reference: type[SAE] | None, names: tuple[str, ...] = ()) -> bool:
    """Whether ``sae``'s class runs exactly ``reference``'s inference code (a subclass that only
    adds training losses, like the Matryoshka one, does)."""
    if reference is None or not isinstance(sae, reference):
        return False
    methods = ("pre_activations", "activate", "encode", "decode", "forward", *names)
    return all(getattr(type(sae), name) is getattr(reference, name) for name in methods)


def _log_threshold(target: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``log_threshold`` (float64 holding a ``dtype`` value) whose ``exp`` in ``dtype`` is the
    float nearest ``target`` that exp reaches; ``target <= 0`` gives ``-inf`` (a threshold of 0:
    ``pre * (pre > 0)`` is the ReLU)."""
    target = target.detach().to("cpu", dtype)
    positive = target > 0
    safe = torch.where(positive, target, torch.ones_like(target))
    log = torch.log(safe.double()).to(dtype)
    if dtype in (torch.float32, torch.float64):
        candidates, up, down = [log], log, log
        for _ in range(4):
            up = torch.nextafter(up, torch.full_like(up, float("inf")))
            down = torch.nextafter(down, torch.full_like(down, float("-inf")))
            candidates += [up, down]
        stack = torch.stack(candidates)
        log = stack.gather(0, (torch.exp(stack) - safe).abs().argmin(0, keepdim=True)).squeeze(0)
    return torch.where(positive, log, torch.full_like(log, float("-inf"))).double()


def _below(t: torch.Tensor) -> torch.Tensor:
    """The next float below ``t``: for floats of ``t``'s dtype, ``x > below(t)`` iff ``x >= t``."""
    return torch.nextafter(t, torch.full_like(t, float("-inf")))


def _integral(value: Any) -> int | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number.is_integer() and number >= 1 else None


def _config(arch: str, width: int, d_in: int, *, recorded: SAEConfig | None = None, layer: Any = "",
            **fields: Any) -> SAEConfig:
    """The mechlens config of ``arch``: the ``recorded`` one (written by :func:`export_saelens`)
    when it is of that architecture and agrees on ``fields``; otherwise a new one, taking the
    layer / pooling / layout of ``recorded`` if any."""
    if recorded is not None and recorded.arch == arch and all(getattr(recorded, k) == v for k, v in fields.items()):
        return recorded
    common = ({k: getattr(recorded, k) for k in _COMMON_FIELDS} if recorded is not None
              else {"layer": layer if isinstance(layer, str) else ""})
    try:
        return config_class(arch)(width=int(width), d_in=int(d_in), **common, **fields)
    except (TypeError, ValueError) as error:
        raise SAEInteropError(f"cannot build a mechlens {arch} SAE of this peer: {error}") from None


def _build(config: SAEConfig, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, device: Any) -> SAE:
    """The mechlens SAE of ``config`` (eval mode, ``dtype``, ``device``) holding ``tensors``."""
    sae = build_sae(config, device="cpu", seed=None).to(dtype=dtype)
    state = sae.state_dict()
    missing = sorted(set(state) - set(tensors))
    if missing:
        raise SAEInteropError(f"internal: no value for {missing} of the mechlens {config.arch} SAE")
    with torch.no_grad():
        for name, value in tensors.items():
            target = state[name]
            if tuple(value.shape) != tuple(target.shape):
                raise SAEInteropError(f"{name} has shape {tuple(value.shape)}, expected {tuple(target.shape)} for a "
                                      f"{config.arch} SAE of width {config.width} on {config.d_in}-dim rows")
            target.copy_(value.detach().to("cpu", target.dtype))
    return sae.to(device=device or "cpu").eval()


def _batchtopk_threshold(threshold: Any, updates: int = 1) -> dict[str, torch.Tensor]:
    return {"threshold": torch.as_tensor(threshold, dtype=torch.float32).detach().reshape(()).clone(),
            "threshold_updates": torch.tensor(updates, dtype=torch.long)}


def _matryoshka_or_batchtopk(width: int, d_in: int, k: int, widths: Any, *, recorded: SAEConfig | None = None,
                             layer: Any = "") -> SAEConfig:
    """A ``matryoshka`` config when that architecture is registered and ``widths`` (the cumulative
    widths of the groups) are valid, else ``batchtopk``: their inference is the same."""
    if _registered("matryoshka") is not None and widths is not None:
        ends = [int(w) for w in widths]
        if ends and ends[-1] == width and all(a < b for a, b in zip([0, *ends], ends)):
            sizes = tuple(b - a for a, b in zip([0, *ends[:-1]], ends))
            if recorded is not None and recorded.arch == "matryoshka" and getattr(recorded, "k", None) == k \
                    and recorded.resolved_group_sizes() == sizes:
                return recorded
            return _config("matryoshka", width, d_in, recorded=recorded, layer=layer, k=k, group_sizes=sizes)
    return _config("batchtopk", width, d_in, recorded=recorded, layer=layer, k=k)


# ---------------------------------------------------------------------------- SAELens export
def _exportable() -> list[str]:
    names = ["relu", "topk", "batchtopk", "jumprelu", "gated", "matryoshka", "archetypal (eval mode)"]
    return [n for n in names if n.split()[0] in list_architectures()]


def _saelens_form(sae: SAE) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], dict[str, Any]]:
    """(architecture, extra cfg keys, weights, extra metadata) of ``sae`` in SAELens's terms."""
    weights = {name: getattr(sae, name).detach() for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    gated = _registered("gated")
    if _same_computation(sae, gated, ("magnitudes",)):
        # 1[pre > 0] * relu((pre - b_enc) exp(r_mag) + b_mag): SAELens's gated with b_gate = b_enc
        weights["b_gate"] = weights.pop("b_enc")
        weights["r_mag"], weights["b_mag"] = sae.r_mag.detach(), sae.b_mag.detach()
        return "gated", {}, weights, {}
    if _same_computation(sae, BatchTopKSAE):
        # eval mode: relu(pre) * (pre > t), SAELens's jumprelu with t for every latent (how SAELens
        # saves its own BatchTopK SAEs, with their training architecture in the metadata)
        weights["threshold"] = sae.threshold.detach().to(weights["b_enc"].dtype).expand_as(weights["b_enc"])
        details: dict[str, Any] = {"k": int(sae.config.k)}
        training = "batchtopk"
        if hasattr(sae, "prefix_widths"):
            training, details["matryoshka_widths"] = "matryoshka_batchtopk", list(sae.prefix_widths())
        return "jumprelu", {}, weights, {"training_architecture": training, "training_architecture_details": details}
    archetypal = _registered("archetypal")
    if archetypal is not None and type(sae) is archetypal:
        if sae.training:
            raise SAEInteropError("an archetypal SAE exports its fused dictionary, which eval mode computes: call "
                                  "sae.eval() first")
        return "topk", {"k": int(sae.config.k), "rescale_acts_by_decoder_norm": False}, weights, {}
    if _same_computation(sae, TopKSAE):
        return "topk", {"k": int(sae.config.k), "rescale_acts_by_decoder_norm": False}, weights, {}
    if _same_computation(sae, JumpReLUSAE, ("threshold",)):
        # pre * (pre > theta), theta = exp(log_threshold) >= 0, is relu(pre) * (pre > theta)
        weights["threshold"] = sae.threshold.detach()
        return "jumprelu", {}, weights, {}
    if _same_computation(sae, ReLUSAE):
        return "standard", {}, weights, {}
    raise SAEInteropError(f"a mechlens {sae.config.arch!r} SAE ({type(sae).__name__}) has no exact SAELens "
                          f"equivalent; SAELens export supports {', '.join(_exportable())}")


def export_saelens(sae: SAE, path: str | os.PathLike) -> Path:
    """Write ``sae`` as SAELens 6 writes an SAE (``sae_weights.safetensors`` + ``cfg.json``), so
    ``sae_lens.SAE.load_from_disk(path)`` computes the same latents and reconstruction.

    mechlens ``relu`` -> ``standard``, ``topk`` -> ``topk``, ``jumprelu`` -> ``jumprelu`` (threshold
    ``exp(log_threshold)``), ``gated`` -> ``gated``, ``batchtopk`` / ``matryoshka`` -> ``jumprelu``
    with the inference threshold for every latent (as SAELens saves its own), ``archetypal`` (eval
    mode) -> ``topk`` with its fused dictionary. The SAE reads raw activations, so
    ``normalize_activations`` is ``none``; its layer is written as ``metadata.hook_name`` and its
    mechlens config as ``metadata.mechlens`` (so :func:`import_saelens` restores pooling, layout,
    ``k``...). Anything else raises :class:`SAEInteropError` and writes nothing."""
    from safetensors.torch import save_file

    if not isinstance(sae, SAE):
        raise TypeError(f"export_saelens needs a mechlens SAE, got {type(sae).__name__} (convert peers with from_peer)")
    sae = sae.fold_decoder_norm()  # SAELens's rescaled form is foldable: write the plain one
    architecture, extra, weights, extra_metadata = _saelens_form(sae)
    dtype = sae.W_enc.dtype
    metadata: dict[str, Any] = {"sae_lens_version": SAELENS_FORMAT_VERSION,
                                "sae_lens_training_version": SAELENS_FORMAT_VERSION}
    if sae.config.layer:
        metadata["hook_name"] = sae.config.layer
    metadata.update(extra_metadata)
    metadata["mechlens"] = {"config": sae.config.to_json()}
    cfg = {"d_in": sae.d_in, "d_sae": sae.width, "dtype": _dtype_name(dtype), "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": metadata, **extra, "architecture": architecture}
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.to("cpu", dtype).contiguous().clone() for name, t in weights.items()}
    tmp = path / (SAELENS_WEIGHTS_FILE + ".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path / SAELENS_WEIGHTS_FILE)
    tmp = path / (SAELENS_CONFIG_FILE + ".tmp")
    tmp.write_text(json_dumps(cfg, indent=2))
    tmp.replace(path / SAELENS_CONFIG_FILE)
    return path


# ---------------------------------------------------------------------------- SAELens import
_SAELENS_WEIGHTS = {
    "standard": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "topk": ("W_enc", "b_enc", "W_dec", "b_dec"),
    "jumprelu": ("W_enc", "b_enc", "W_dec", "b_dec", "threshold"),
    "batchtopk": ("W_enc", "b_enc", "W_dec", "b_dec", "topk_threshold"),
    "gated": ("W_enc", "b_gate", "r_mag", "b_mag", "W_dec", "b_dec"),
}


def _importable() -> str:
    names = ["standard", "topk", "jumprelu", "batchtopk (training checkpoints)"]
    if _registered("gated") is not None:
        names.append("gated")
    return ", ".join(names)


def _version_tuple(text: Any) -> tuple[int, ...] | None:
    parts = []
    for piece in str(text).split("."):
        digits = ""
        for ch in piece:
            if not ch.isdigit():
                break
            digits += ch
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts) or None


def _recorded_config(metadata: Mapping[str, Any], width: int, d_in: int) -> SAEConfig | None:
    """The mechlens config :func:`export_saelens` recorded, if it is readable and of this shape."""
    record = metadata.get("mechlens")
    if not isinstance(record, Mapping) or not isinstance(record.get("config"), Mapping):
        return None
    try:
        config = SAEConfig.from_json(record["config"])
    except (TypeError, ValueError):
        return None
    return config if (config.width, config.d_in) == (width, d_in) else None


def _from_saelens(cfg: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: str, device: Any) -> SAE:
    """The mechlens SAE computing what SAELens's inference SAE of ``cfg`` + ``state`` computes."""
    arch = cfg.get("architecture", "standard")
    metadata = cfg.get("metadata") or {}
    if not isinstance(metadata, Mapping):
        metadata = dict(getattr(metadata, "__dict__", {}))
    norm = cfg.get("normalize_activations", "none")
    if norm not in ("none", None):
        raise SAEInteropError(
            f"{where}: normalize_activations={norm!r} cannot be represented exactly (mechlens SAEs read raw "
            "activations); fold it first (sae.fold_activation_norm_scaling_factor(factor) for "
            "expected_average_only_in) and save with normalize_activations='none'")
    if arch not in _SAELENS_WEIGHTS:
        raise SAEInteropError(f"{where}: SAELens architecture {arch!r} has no exact mechlens equivalent; importable: "
                              f"{_importable()}")
    if arch == "gated" and _registered("gated") is None:
        raise SAEInteropError(f"{where}: a SAELens gated SAE needs mechlens's 'gated' architecture, which is not "
                              f"registered; importable: {_importable()}")
    if cfg.get("finetuning_scaling_factor") or "finetuning_scaling_factor" in state:
        raise SAEInteropError(f"{where}: a finetuning scaling factor is not supported (mechlens has no such weight)")
    state = {k: v for k, v in state.items() if not (k == "scaling_factor" and bool((v == 1).all()))}
    expected = set(_SAELENS_WEIGHTS[arch])
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise SAEInteropError(f"{where}: a SAELens {arch!r} SAE has the weights {sorted(expected)}; missing {missing}, "
                              f"unexpected {unexpected}")
    d_in, width = (int(n) for n in state["W_enc"].shape)
    if (cfg.get("d_in", d_in), cfg.get("d_sae", width)) != (d_in, width):
        raise SAEInteropError(f"{where}: W_enc has shape {(d_in, width)} but the config says d_in={cfg.get('d_in')}, "
                              f"d_sae={cfg.get('d_sae')}")
    dtype = state["W_enc"].dtype
    t = {k: v.detach().to("cpu", torch.float64) for k, v in state.items()}
    if arch == "gated":
        t["b_enc"] = t.pop("b_gate")
    if not cfg.get("apply_b_dec_to_input", True):
        shift = t["b_dec"] @ t["W_enc"]
        t["b_enc"] = t["b_enc"] + shift
        if arch == "gated":  # the magnitude path reads x @ (W_enc * exp(r_mag))
            t["b_mag"] = t["b_mag"] + shift * t["r_mag"].exp()
    if arch in ("topk", "batchtopk") and cfg.get("rescale_acts_by_decoder_norm", False):
        norms = t["W_dec"].norm(dim=1)
        if not bool((norms > 0).all()):
            raise SAEInteropError(f"{where}: rescale_acts_by_decoder_norm with a zero decoder row divides by zero in "
                                  "SAELens; there is nothing finite to convert")
        t["W_enc"], t["b_enc"], t["W_dec"] = t["W_enc"] * norms, t["b_enc"] * norms, t["W_dec"] / norms[:, None]
    weights = {k: t[k] for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
    recorded, layer = _recorded_config(metadata, width, d_in), metadata.get("hook_name") or ""
    details = metadata.get("training_architecture_details")
    details = details if isinstance(details, Mapping) else {}

    def build(config: SAEConfig, extra: Mapping[str, torch.Tensor] = {}) -> SAE:
        return _build(config, {**weights, **extra}, dtype, device)

    if arch == "standard":
        return build(_config("relu", width, d_in, recorded=recorded, layer=layer))
    if arch == "gated":
        return build(_config("gated", width, d_in, recorded=recorded, layer=layer),
                     {"r_mag": t["r_mag"], "b_mag": t["b_mag"]})
    if arch == "topk":
        k = _integral(cfg.get("k"))
        if k is None:
            raise SAEInteropError(f"{where}: a topk SAE with k={cfg.get('k')!r}; mechlens needs a positive integer k")
        return build(_config("topk", width, d_in, recorded=recorded, layer=layer, k=k))
    if arch == "batchtopk":
        k = _integral(cfg.get("k"))
        if k is None:
            raise SAEInteropError(f"{where}: a BatchTopK SAE with k={cfg.get('k')!r}; mechlens needs a positive "
                                  "integer k")
        widths = cfg.get("matryoshka_widths") if metadata.get("training_architecture") == "matryoshka_batchtopk" \
            else None
        config = _matryoshka_or_batchtopk(width, d_in, k, widths, recorded=recorded, layer=layer)
        return build(config, _batchtopk_threshold(state["topk_threshold"].to(torch.float32)))
    threshold = state["threshold"].detach().to(dtype)
    uniform = bool((threshold == threshold.reshape(-1)[0]).all())
    k = _integral(details.get("k"))
    if uniform and recorded is not None and issubclass(sae_class(recorded.arch), BatchTopKSAE):
        return build(recorded, _batchtopk_threshold(threshold.reshape(-1)[0].to(torch.float32)))
    if uniform and metadata.get("training_architecture") in _BATCHTOPK_FAMILY and k is not None:
        widths = details.get("matryoshka_widths") if metadata.get("training_architecture") == "matryoshka_batchtopk" \
            else None
        config = _matryoshka_or_batchtopk(width, d_in, k, widths, recorded=recorded, layer=layer)
        return build(config, _batchtopk_threshold(threshold.reshape(-1)[0].to(torch.float32)))
    return build(_config("jumprelu", width, d_in, recorded=recorded, layer=layer),
                 {"log_threshold": _log_threshold(threshold, dtype)})


def import_saelens(path: str | os.PathLike, *, device: str | torch.device | None = None) -> SAE:
    """The mechlens SAE (eval mode) computing the latents and reconstruction of the SAE that
    SAELens 6 saved at ``path`` (``save_model`` / ``save_inference_model``, or
    :func:`export_saelens`). What cannot be represented exactly raises :class:`SAEInteropError`;
    the module docstring lists the mapping."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file, weights_file = path / SAELENS_CONFIG_FILE, path / SAELENS_WEIGHTS_FILE
    if not cfg_file.is_file() or not weights_file.is_file():
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise SAEInteropError(f"{path} is not a SAELens SAE directory: expected {SAELENS_CONFIG_FILE} and "
                              f"{SAELENS_WEIGHTS_FILE}" + (f", found {', '.join(found)}" if found else ""))
    try:
        cfg = json.loads(cfg_file.read_text())
    except ValueError as error:
        raise SAEInteropError(f"{cfg_file} is not valid JSON: {error}") from None
    if not isinstance(cfg, dict):
        raise SAEInteropError(f"{cfg_file} is not a SAELens config (a JSON object)")
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    written = metadata.get("sae_lens_version") or cfg.get("sae_lens_version")
    version = _version_tuple(written or "")
    if version is None or version < (6,):
        raise SAEInteropError(f"{path} was not written by SAELens 6 (sae_lens_version {written!r}); load it with "
                              "sae_lens.SAE.load_from_disk, which converts older configs, and convert that SAE with "
                              "mechlens.sae.from_peer")
    state = load_file(str(weights_file), device="cpu")
    if "dtype" in cfg:  # as SAELens does: every weight in the config's dtype (BatchTopK's threshold stays double)
        dtype = _dtype_of(cfg["dtype"], str(cfg_file))
        state = {k: (v.to(dtype) if v.is_floating_point() and k != "topk_threshold" else v) for k, v in state.items()}
    return _from_saelens(cfg, state, str(path), device)


# ---------------------------------------------------------------------------- in-memory peers
def _peer(module: str, name: str) -> type | None:
    """Class ``name`` of ``module`` if that peer is already imported (from_peer imports nothing)."""
    loaded = sys.modules.get(module)
    return getattr(loaded, name, None) if loaded is not None else None


def _from_saelens_object(obj: Any, device: Any) -> SAE:
    import sae_lens  # already imported: obj is one of its SAEs
    from sae_lens.registry import get_sae_class, get_sae_training_class

    where = f"SAELens {type(obj).__name__}"
    training = isinstance(obj, sae_lens.TrainingSAE)
    arch = obj.cfg.architecture()
    try:
        registered = (get_sae_training_class if training else get_sae_class)(arch)[0]
    except KeyError:
        registered = None
    if type(obj) is not registered:
        raise SAEInteropError(f"{where}: not the class SAELens registers for {arch!r} "
                              f"({getattr(registered, '__name__', None)}); a subclass may compute other latents")
    with torch.no_grad():
        state = {k: v.detach().clone() for k, v in obj.state_dict().items()}
        if training:  # the inference SAE SAELens itself writes (save_inference_model) and evaluates
            obj.process_state_dict_for_saving_inference(state)
            cfg = obj.cfg.get_inference_sae_cfg_dict()
        else:
            obj.process_state_dict_for_saving(state)
            cfg = obj.cfg.to_dict()
    if training and arch in _BATCHTOPK_FAMILY and cfg.get("architecture") == "jumprelu":
        # stay a BatchTopK SAE (its training-mode batch top-k too), with the threshold it spreads per latent
        cfg = {**cfg, "architecture": "batchtopk", "k": obj.cfg.k,
               "matryoshka_widths": getattr(obj.cfg, "matryoshka_widths", None)}
        state = {k: v for k, v in state.items() if k != "threshold"}
        state["topk_threshold"] = obj.topk_threshold.detach().clone()
    return _from_saelens(cfg, state, where, device)


def _f64(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu", torch.float64)


def _from_dictionary_learning(obj: Any, device: Any) -> SAE:
    name = type(obj).__name__
    where = f"dictionary_learning {name}"
    width, d_in = int(obj.dict_size), int(obj.activation_dim)
    with torch.no_grad():
        if name in ("AutoEncoder", "AutoEncoderNew", "AutoEncoderTopK", "BatchTopKSAE", "GatedAutoEncoder"):
            dtype = obj.encoder.weight.dtype
            weights = {"W_enc": _f64(obj.encoder.weight).T, "W_dec": _f64(obj.decoder.weight).T}
        else:
            dtype = obj.W_enc.dtype
            weights = {k: _f64(getattr(obj, k)) for k in ("W_enc", "b_enc", "W_dec", "b_dec")}
        if name == "AutoEncoder":  # relu(enc(x - bias)), dec(f) + bias
            weights.update(b_enc=_f64(obj.encoder.bias), b_dec=_f64(obj.bias))
            return _build(_config("relu", width, d_in), weights, dtype, device)
        if name == "AutoEncoderNew":  # relu(enc(x)), dec(f) with the decoder's bias
            b_dec = _f64(obj.decoder.bias)
            weights.update(b_enc=_f64(obj.encoder.bias) + b_dec @ weights["W_enc"], b_dec=b_dec)
            return _build(_config("relu", width, d_in), weights, dtype, device)
        if name == "AutoEncoderTopK":  # top-k of relu(pre): the latents of mechlens's relu of the top-k
            weights.update(b_enc=_f64(obj.encoder.bias), b_dec=_f64(obj.b_dec))
            return _build(_config("topk", width, d_in, k=int(obj.k)), weights, dtype, device)
        if name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
            if name == "BatchTopKSAE":
                weights.update(b_enc=_f64(obj.encoder.bias), b_dec=_f64(obj.b_dec))
                config = _config("batchtopk", width, d_in, k=int(obj.k))
            else:
                if obj.active_groups != len(obj.group_sizes):
                    raise SAEInteropError(f"{where}: only {obj.active_groups} of {len(obj.group_sizes)} groups are "
                                          "active (the later latents are zeroed); convert it with every group active")
                ends = torch.cumsum(obj.group_sizes.detach().cpu(), 0).tolist()
                config = _matryoshka_or_batchtopk(width, d_in, int(obj.k), ends)
            # relu(pre) * (relu(pre) > t) is relu(pre) * (pre > t) for t >= 0, a plain ReLU for t < 0
            t = float(obj.threshold)
            return _build(config, {**weights, **_batchtopk_threshold(max(t, 0.0), int(t >= 0))}, dtype, device)
        if name == "JumpReluAutoEncoder":
            # relu(pre * (pre > t)) = pre * (pre > max(t, 0)); b_dec subtracted only with apply_b_dec_to_input
            if not getattr(obj, "apply_b_dec_to_input", False):
                weights["b_enc"] = weights["b_enc"] + weights["b_dec"] @ weights["W_enc"]
            weights["log_threshold"] = _log_threshold(obj.threshold.detach().to(dtype), dtype)
            return _build(_config("jumprelu", width, d_in), weights, dtype, device)
        if name == "GatedAutoEncoder":  # 1[x_enc + gate_bias > 0] * relu(exp(r_mag) x_enc + mag_bias)
            if _registered("gated") is None:
                raise SAEInteropError(f"{where}: gated SAEs need mechlens's 'gated' architecture, which is not "
                                      f"registered (registered: {', '.join(list_architectures())})")
            weights.update(b_enc=_f64(obj.gate_bias), r_mag=_f64(obj.r_mag), b_mag=_f64(obj.mag_bias),
                           b_dec=_f64(obj.decoder_bias))
            return _build(_config("gated", width, d_in), weights, dtype, device)
    raise SAEInteropError(f"{where} has no exact mechlens equivalent")  # pragma: no cover - dispatch lists the names


def _overcomplete_encoder(obj: Any, where: str, *, need_relu: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(W_enc [d, width], b_enc) of an affine overcomplete encoder whose codes are relu(pre)."""
    encoder = obj.encoder
    kind = type(encoder).__name__
    if kind == "MLPEncoder":
        if len(encoder.mlp_blocks) != 0:
            raise SAEInteropError(f"{where}: an MLP encoder with {len(encoder.mlp_blocks)} hidden block(s) is not "
                                  "linear; only the 'linear' encoder (Linear + Identity or BatchNorm1d) converts")
        linear, norm = encoder.final_block[0], encoder.final_block[1]
        W = _f64(linear.weight).T
        b = _f64(linear.bias) if linear.bias is not None else torch.zeros(W.shape[1], dtype=torch.float64)
        if isinstance(norm, nn.BatchNorm1d):
            if norm.running_mean is None or norm.running_var is None:
                raise SAEInteropError(f"{where}: a BatchNorm1d without running statistics normalises each batch by "
                                      "itself; only an eval-mode BatchNorm (running statistics) is affine")
            scale = torch.rsqrt(_f64(norm.running_var) + norm.eps)
            if norm.weight is not None:
                scale = scale * _f64(norm.weight)
            shift = -_f64(norm.running_mean) * scale
            if norm.bias is not None:
                shift = shift + _f64(norm.bias)
            W, b = W * scale, b * scale + shift
        elif type(norm) is not nn.Identity:
            raise SAEInteropError(f"{where}: encoder normalisation {type(norm).__name__} is not a per-latent affine "
                                  "map; only Identity and eval-mode BatchNorm1d convert")
        activation = encoder.final_activation
    elif kind == "TieableEncoder":
        weight = encoder.tied_to.get_dictionary() if encoder.tied_to is not None else encoder.weight
        W = _f64(weight).T
        b = _f64(encoder.bias) if encoder.bias is not None else torch.zeros(W.shape[1], dtype=torch.float64)
        activation = nn.ReLU()
    else:
        raise SAEInteropError(f"{where}: encoder {kind} is not linear; only MLPEncoder without hidden blocks "
                              "('linear') and TieableEncoder convert")
    if need_relu and type(activation) is not nn.ReLU:
        raise SAEInteropError(f"{where}: encoder output activation {type(activation).__name__}; mechlens latents are "
                              "ReLU-based")
    return W, b


def _overcomplete_dictionary(layer: Any) -> torch.Tensor:
    """The dictionary the layer decodes with, without get_dictionary()'s in-place projection."""
    if not layer.training and layer._fused_dictionary is not None:
        return _f64(layer._fused_dictionary)
    return _f64(layer.normalization(layer._weights.detach()) * torch.exp(layer.multiplier.detach()))


def _from_overcomplete(obj: Any, device: Any) -> SAE:
    name = type(obj).__name__
    where = f"overcomplete {name}"
    layer = obj.dictionary
    archetypal = name == "RATopKSAE"
    expected = "RelaxedArchetypalDictionary" if archetypal else "DictionaryLayer"
    if type(layer).__name__ != expected:
        raise SAEInteropError(f"{where}: dictionary {type(layer).__name__} is not a plain {expected}")
    with torch.no_grad():
        W_enc, b_enc = _overcomplete_encoder(obj, where, need_relu=name != "JumpSAE")
        width, d_in = int(layer.nb_concepts), int(layer.in_dimensions)
        if tuple(W_enc.shape) != (d_in, width):
            raise SAEInteropError(f"{where}: encoder {tuple(W_enc.shape)} does not match the dictionary "
                                  f"{(width, d_in)}")
        weights = {"W_enc": W_enc, "b_enc": b_enc, "b_dec": torch.zeros(d_in, dtype=torch.float64)}
        if archetypal:
            if _registered("archetypal") is None:
                raise SAEInteropError(f"{where}: needs mechlens's 'archetypal' architecture, which is not registered")
            # the mechlens SAE recomputes (and projects) the dictionary from W, C, Lambda, m when put in eval mode
            dtype = layer.W.dtype
            config = _config("archetypal", width, d_in, k=min(int(obj.top_k), width),
                             n_candidates=int(layer.C.shape[0]),
                             delta=float(layer.delta), use_multiplier=isinstance(layer.multiplier, nn.Parameter))
            weights.update(W_dec=(_f64(layer.W) @ _f64(layer.C) + _f64(layer.Relax)) * _f64(layer.multiplier).exp(),
                           archetypes=_f64(layer.C), archetypes_set=torch.tensor(1), archetype_weights=_f64(layer.W),
                           relaxation=_f64(layer.Relax), log_multiplier=_f64(layer.multiplier).reshape(()))
            return _build(config, weights, dtype, device)
        weights["W_dec"] = _overcomplete_dictionary(layer)
        dtype = layer._weights.dtype
        if name == "SAE":  # relu(pre)
            return _build(_config("relu", width, d_in), weights, dtype, device)
        if name == "TopKSAE":  # top-k of relu(pre)
            return _build(_config("topk", width, d_in, k=int(obj.top_k)), weights, dtype, device)
        if name == "BatchTopKSAE":  # eval: relu(pre) * (relu(pre) >= running_threshold)
            if obj.running_threshold is None:
                raise SAEInteropError(f"{where}: no running threshold yet (never trained), so it has no inference "
                                      "behaviour to convert")
            t = obj.running_threshold.detach().to("cpu", torch.float32).reshape(())
            threshold = _below(t) if float(t) > 0 else torch.zeros((), dtype=torch.float32)
            config = _config("batchtopk", width, d_in, k=min(max(int(obj.top_k), 1), width))
            return _build(config, {**weights, **_batchtopk_threshold(threshold)}, dtype, device)
        if name == "JumpSAE":  # relu(pre) kept where >= exp(thresholds)
            theta = torch.exp(obj.thresholds.detach().to("cpu", dtype))
            weights["log_threshold"] = _log_threshold(_below(theta), dtype)
            return _build(_config("jumprelu", width, d_in), weights, dtype, device)
    raise SAEInteropError(f"{where} has no exact mechlens equivalent")  # pragma: no cover - dispatch lists the names


_DICTIONARY_LEARNING = {
    "dictionary_learning.dictionary": ("AutoEncoder", "AutoEncoderNew", "JumpReluAutoEncoder", "GatedAutoEncoder"),
    "dictionary_learning.trainers.top_k": ("AutoEncoderTopK",),
    "dictionary_learning.trainers.batch_top_k": ("BatchTopKSAE",),
    "dictionary_learning.trainers.matryoshka_batch_top_k": ("MatryoshkaBatchTopKSAE",),
}
_OVERCOMPLETE = {
    "overcomplete.sae.base": ("SAE",),
    "overcomplete.sae.topk_sae": ("TopKSAE",),
    "overcomplete.sae.batchtopk_sae": ("BatchTopKSAE",),
    "overcomplete.sae.jump_sae": ("JumpSAE",),
    "overcomplete.sae.rasae": ("RATopKSAE",),
}


def peer_types() -> list[str]:
    """The peer SAE classes :func:`from_peer` converts."""
    names = ["sae_lens SAE / TrainingSAE (standard, topk, jumprelu, batchtopk, matryoshka_batchtopk"
             + (", gated" if _registered("gated") is not None else "") + ")"]
    for table in (_DICTIONARY_LEARNING, _OVERCOMPLETE):
        names += [f"{module}.{cls}" for module, classes in table.items() for cls in classes]
    return names


def from_peer(obj: Any, *, device: str | torch.device | None = None) -> SAE:
    """The mechlens SAE (eval mode) computing the same latents and reconstruction as the peer SAE
    ``obj``: a SAELens ``SAE`` (a training SAE as the inference SAE it saves, a BatchTopK one kept
    BatchTopK), a dictionary_learning ``AutoEncoder`` / ``AutoEncoderNew`` / ``AutoEncoderTopK`` /
    ``BatchTopKSAE`` / ``MatryoshkaBatchTopKSAE`` / ``JumpReluAutoEncoder`` / ``GatedAutoEncoder``,
    or an overcomplete ``SAE`` / ``TopKSAE`` / ``BatchTopKSAE`` / ``JumpSAE`` / ``RATopKSAE`` with a
    linear encoder (the module docstring gives each one's conventions). A mechlens SAE is returned
    as it is. Other types raise ``TypeError``; inexact configurations :class:`SAEInteropError`."""
    if isinstance(obj, SAE):
        return obj
    sae_lens_base = _peer("sae_lens", "SAE")
    if sae_lens_base is not None and isinstance(obj, sae_lens_base):
        return _from_saelens_object(obj, device)
    for module, classes in _DICTIONARY_LEARNING.items():
        if any(type(obj) is _peer(module, cls) for cls in classes):
            return _from_dictionary_learning(obj, device)
    for module, classes in _OVERCOMPLETE.items():
        if any(type(obj) is _peer(module, cls) for cls in classes):
            return _from_overcomplete(obj, device)
    raise TypeError(f"from_peer does not know {type(obj).__module__}.{type(obj).__qualname__}; supported: "
                    f"{'; '.join(peer_types())}")
