"""Attribution: mechlens vs Captum and pytorch-grad-cam on the same model, inputs and settings.

One run: torchvision ``resnet18`` (random weights, ``torch.manual_seed(0)``, eval mode), one batch
of ``--images`` SyntheticShapes images at ``--size`` (ImageNet-normalised, seed 0), target class
3 for every image. Compared, each with the same algorithmic settings on both sides:

* saliency (abs gradient), Integrated Gradients (zero baseline, Gauss-Legendre, ``--steps``),
  SmoothGrad over saliency (``--samples`` noisy copies, the same absolute noise std on both
  sides), occlusion (window ``3 x W x W``, stride ``S``, zero baseline) and Grad-CAM at
  ``layer4`` (``LayerGradCam``): mechlens vs **Captum**;
* Grad-CAM, Score-CAM, HiResCAM, XGradCAM, EigenCAM and AblationCAM at ``layer4``, and FullGrad
  (every bias layer): mechlens vs **pytorch-grad-cam** (AblationCAM batched: ``--perturb-rows``
  ablated copies per pass against its ``batch_size``);
* RISE (``--rise-masks`` masks, no peer: Captum #1150 is open): seconds per image;
* DeepLIFT (zero baseline) and DeepLiftShap (4 reference images) vs **Captum**, on the house
  SmallCNN (width 32, 4 stages; Captum's DeepLift refuses resnet18, whose ReLU module is used
  twice per block); LRP (``epsilon_plus`` with BatchNorm merged) on resnet18 vs **Zennit**
  (``EpsilonPlus`` with its ``ResNetCanonizer``), both seeded with the logit.

Every implementation runs at its *default* batching and, where it has a batching knob, at tuned
ones named ``rows<N>`` (N rows per forward pass): each of ``--rows`` for the gradient methods
(Captum IG ``internal_batch_size``, NoiseTunnel ``nt_samples_batch_size = N / images``, mechlens
``internal_batch_size``) and each of ``--perturb-rows`` for the perturbation methods (Captum
Occlusion ``perturbations_per_eval = N / images``, pytorch-grad-cam ScoreCAM ``batch_size``,
mechlens ``internal_batch_size``; its occlusion recomputes locally one image at a time, so there N
rows are N windows of one image). A setting that amounts to the same rows per pass as one already
planned (e.g. Captum Occlusion's default of one window = 8 rows) runs once. The defaults, 8 and 64
rows for the gradient methods, 8, 16 and 64 for the perturbation methods, bracket the sweet spot:
with one thread on a 2-core CPU resnet18 at 224 is fastest at 4-16 rows per pass (64 rows costs
20-30% more per image); with more threads or on a GPU larger batches win. The "best" of each side
is its fastest setting.

Each measured call runs in its own child process (forked before the parent touches torch): the
child builds the model and inputs, does one warm-up forward/backward, hands freed memory back to
the OS (``malloc_trim``), then resets the kernel's peak-RSS counter (``/proc/self/clear_refs``)
and times the call. Peak memory is the peak RSS over the call minus the RSS just before it, so it
counts everything the call allocates (expanded batches, activations kept for backward, masks,
the result) and nothing else; expect +-5% between identical runs (glibc's heap). Wall time is
what the targets use; CPU time (``time.process_time``, all threads of the child) is reported too,
since on a machine shared with other jobs it is far less sensitive to their load (with
``--threads 1`` it is the work done). Repeats are interleaved over all runs (``--repeats``): a run
whose first (cold) measurement took longer than ``--repeat-budget`` seconds is measured once, the
others are measured again warm (the call run once untimed first) and the medians of the warm
measurements count.

The maps are checked to be apples to apples: same shapes, and the same values (up to float
rounding) where the settings fix the result (saliency, IG, occlusion, Grad-CAM, Score-CAM);
SmoothGrad draws its noise from different generators, so there the check is the correlation of
the two maps and the ratio of their mean magnitudes. The ratios are mechlens best / peer best:
wall time, CPU time and peak memory. Targets (issue 5): time <= 1.0x the peer's best on every
method with peak memory <= the peer's best; Score-CAM and occlusion <= 0.5x (issue 22:
AblationCAM <= 0.5x too).

``--device cuda`` (a GPU machine) runs the same comparison on the GPU: children are spawned
instead of forked, wall time waits for the device (``torch.cuda.synchronize``), and peak memory
is the GPU's (``torch.cuda.max_memory_allocated`` over the call, from the memory allocated
before it), with the host's peak RSS reported beside it as ``host_peak_mib``.

On a shared machine use ``--threads 1``: with two OpenMP threads on two busy cores every op waits
for the slower thread (a 2-image forward at 64x64 took 0.8 s instead of 0.03 s).

    python benchmarks/attribution_vs_peers.py             # 8 images at 224 (tens of minutes on 2 cores)
    python benchmarks/attribution_vs_peers.py --quick     # tiny, for the test suite
    python benchmarks/attribution_vs_peers.py --methods scorecam occlusion --repeats 1
    python benchmarks/attribution_vs_peers.py --one scorecam:mechlens:default   # one measurement
    python benchmarks/attribution_vs_peers.py --device cuda --methods scorecam occlusion
"""
from __future__ import annotations

import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's ScoreCAM progress bars (read at tqdm import)

import argparse  # noqa: E402
import ctypes  # noqa: E402
import math  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import multiprocessing as mp  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable  # noqa: E402

import torch  # noqa: E402

PGC_CAMS = ("hirescam", "xgradcam", "eigencam", "ablationcam", "fullgrad")  # compared with pytorch-grad-cam
PROPAGATION = ("deeplift", "deeplift_shap")  # on the house SmallCNN: Captum refuses resnet18's shared ReLU
METHODS = ("saliency", "integrated_gradients", "smoothgrad", "occlusion", "gradcam", "scorecam", *PGC_CAMS, "rise",
           *PROPAGATION, "lrp")
SHAP_BASELINES = 4  # DeepLiftShap reference images
# (method, peer) pairs compared; mechlens' gradcam runs are shared by both Grad-CAM comparisons.
COMPARISONS = (
    ("saliency", "captum"),
    ("integrated_gradients", "captum"),
    ("smoothgrad", "captum"),
    ("occlusion", "captum"),
    ("gradcam", "captum"),
    ("gradcam", "pytorch_grad_cam"),
    ("scorecam", "pytorch_grad_cam"),
    *((cam, "pytorch_grad_cam") for cam in PGC_CAMS),
    ("deeplift", "captum"),
    ("deeplift_shap", "captum"),
    ("lrp", "zennit"),
)
TIME_TARGETS = {"occlusion": 0.5, "scorecam": 0.5, "ablationcam": 0.5}  # else 1.0
TARGET_CLASS = 3
LAYER = "layer4"
MIB = 1024 * 1024


@dataclass(frozen=True)
class Config:
    images: int = 8
    size: int = 224
    steps: int = 50
    samples: int = 50
    window: int = 32
    stride: int = 16
    rows: tuple[int, ...] = (8, 64)
    perturb_rows: tuple[int, ...] = (8, 16, 64)
    noise_spread: float = 0.15
    rise_masks: int = 1000
    threads: int = 0  # torch intra-op threads in each child; 0 = torch's default
    device: str = "cpu"  # where the model and inputs live ("cuda" on a GPU machine)


@dataclass(frozen=True)
class Run:
    method: str
    impl: str  # mechlens | captum | pytorch_grad_cam
    setting: str  # default | rows<N>
    kwargs: dict = field(default_factory=dict, hash=False, compare=False)  # the batching arguments

    @property
    def key(self) -> str:
        return f"{self.method}:{self.impl}:{self.setting}"


def _batching(method: str, impl: str, rows: int | None, cfg: Config) -> tuple[dict, int]:
    """The batching keyword arguments of ``impl`` that run about ``rows`` rows per forward pass
    (``None``: the implementation's default), and the rows per pass they really mean."""
    b = cfg.images
    if method in ("saliency", "gradcam", "hirescam", "xgradcam", "eigencam", "fullgrad", "deeplift", "lrp"):
        return {}, b
    if method == "deeplift_shap":  # both run every (input, baseline) pair in one pass
        return {}, b * SHAP_BASELINES
    if method == "integrated_gradients":  # interpolation rows; default: all steps x batch at once
        total = cfg.steps * b
        return ({}, total) if rows is None else ({"internal_batch_size": rows}, min(rows, total))
    if method == "smoothgrad":  # whole noise draws per call; default: all draws at once (both)
        draws = cfg.samples if rows is None else max(1, min(cfg.samples, rows // b))
        key = "internal_batch_size" if impl == "mechlens" else "nt_samples_batch_size"
        return ({} if rows is None else {key: draws * b if impl == "mechlens" else draws}), draws * b
    if method == "occlusion":  # whole windows per pass; defaults: mechlens 64 rows, Captum 1 window
        n_windows = math.prod(math.ceil((s - w) / st) + 1 for s, w, st in
                              ((cfg.size, cfg.window, cfg.stride), (cfg.size, cfg.window, cfg.stride)))
        if rows is None:
            windows = 64 // b if impl == "mechlens" else 1
            return {}, min(max(1, windows), n_windows) * b
        windows = min(max(1, rows // b), n_windows)
        key = "internal_batch_size" if impl == "mechlens" else "perturbations_per_eval"
        return {key: windows * b if impl == "mechlens" else windows}, windows * b
    if method == "ablationcam":  # ablated copies per pass; defaults: mechlens 64, pytorch-grad-cam 32
        if rows is None:
            return {}, 64 if impl == "mechlens" else 32
        key = "internal_batch_size" if impl == "mechlens" else "batch_size"
        return {key: rows}, rows
    if method == "rise":  # masked inputs per pass; no peer (Captum #1150)
        return ({}, 64) if rows is None else ({"internal_batch_size": rows}, rows)
    if method == "scorecam":  # masked inputs per pass; defaults: mechlens 64, pytorch-grad-cam 16
        if rows is None:
            return {}, 64 if impl == "mechlens" else 16
        key = "internal_batch_size" if impl == "mechlens" else "batch_size"
        return {key: rows}, rows
    raise ValueError(method)


PEERS = {"saliency": ("captum",), "integrated_gradients": ("captum",), "smoothgrad": ("captum",),
         "occlusion": ("captum",), "gradcam": ("captum", "pytorch_grad_cam"), "scorecam": ("pytorch_grad_cam",),
         **{cam: ("pytorch_grad_cam",) for cam in PGC_CAMS}, "rise": (), "deeplift": ("captum",),
         "deeplift_shap": ("captum",), "lrp": ("zennit",)}
TUNABLE = ("integrated_gradients", "smoothgrad", "occlusion", "scorecam", "ablationcam")


def plan(cfg: Config, methods: list[str]) -> list[Run]:
    """Every measurement: per method, each implementation at its default batching and at each of
    the tuned row counts (``cfg.rows`` for the gradient methods, ``cfg.perturb_rows`` for occlusion
    and Score-CAM); a tuned setting that amounts to the same rows per pass as the default (or as
    an earlier tuned setting) is the same measurement and runs once. Mechlens and its peer(s)
    alternate, so slow drifts of the machine's load hit both."""
    out = []
    for method in methods:
        impls = ("mechlens", *PEERS[method])
        candidates: list[int | None] = [None]
        if method in TUNABLE:
            candidates += list(cfg.perturb_rows if method in ("occlusion", "scorecam", "ablationcam") else cfg.rows)
        seen: dict[str, set[int]] = {impl: set() for impl in impls}
        for rows in candidates:
            for impl in impls:
                kwargs, effective = _batching(method, impl, rows, cfg)
                if effective in seen[impl]:
                    continue
                seen[impl].add(effective)
                out.append(Run(method, impl, "default" if rows is None else f"rows{effective}", kwargs))
    return out


# ---------------------------------------------------------------------------- child side
def build(cfg: Config, method: str = "") -> tuple[torch.nn.Module, torch.Tensor]:
    """The model and the batch every run sees (DeepLIFT: the house SmallCNN, whose modules are
    used once each, as Captum's DeepLift requires)."""
    import torchvision

    from mechlens.data import SyntheticShapes
    from mechlens.models import small_cnn

    torch.manual_seed(0)
    if method in PROPAGATION:
        model = small_cnn(num_classes=10, width=32, depth=4, blocks_per_stage=1, seed=0).eval()
    else:
        model = torchvision.models.resnet18(weights=None).eval()
    images = SyntheticShapes(num_samples=cfg.images, image_size=cfg.size, seed=0).to_tensors()[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return model.to(cfg.device), ((images - mean) / std).contiguous().to(cfg.device)


def noise_std(cfg: Config, x: torch.Tensor) -> float:
    """One absolute SmoothGrad noise std for both sides (Smilkov et al.'s spread of the batch range)."""
    return float(cfg.noise_spread * (x.max() - x.min()))


def make_call(run: Run, cfg: Config, model: torch.nn.Module, x: torch.Tensor) -> Callable[[], tuple[torch.Tensor, dict]]:
    """A closure doing the measured call; returns the map (as a tensor) and run-specific extras."""
    window, stride = (3, cfg.window, cfg.window), (3, cfg.stride, cfg.stride)
    kw = dict(run.kwargs)
    if run.impl == "mechlens":
        from mechlens.attribution import attribute

        args: dict[str, Any] = {
            "saliency": {},
            "integrated_gradients": {"n_steps": cfg.steps, "baseline": "zeros", "integration": "gausslegendre"},
            "smoothgrad": {"n_samples": cfg.samples, "stdevs": noise_std(cfg, x)},
            "occlusion": {"window": window, "strides": stride, "baseline": 0.0},
            "gradcam": {"layer": LAYER},
            "scorecam": {"layer": LAYER},
            **{cam: {"layer": LAYER} for cam in PGC_CAMS if cam != "fullgrad"},
            "fullgrad": {},
            "rise": {"n_masks": cfg.rise_masks, "seed": 0},
            "deeplift": {"baseline": "zeros"},
            "deeplift_shap": {"baselines": shap_baselines(cfg, x)},
            "lrp": {"composite": "epsilon_plus"},
        }[run.method]

        def call() -> tuple[torch.Tensor, dict]:
            result = attribute(model, x, TARGET_CLASS, method=run.method, **args, **kw)
            extras = {}
            for key in ("masked_inputs_run", "local_recompute", "n_forwards"):  # work done / saved, for the record
                if key in result.extras:
                    extras[key] = result.extras[key]
            return result.map, extras

        return call
    if run.impl == "captum":
        from captum import attr as ca

        def call() -> tuple[torch.Tensor, dict]:
            if run.method == "saliency":
                out = ca.Saliency(model).attribute(x, target=TARGET_CLASS)
            elif run.method == "integrated_gradients":
                out = ca.IntegratedGradients(model).attribute(x, baselines=0.0, target=TARGET_CLASS, n_steps=cfg.steps,
                                                              method="gausslegendre", **kw)
            elif run.method == "smoothgrad":
                out = ca.NoiseTunnel(ca.Saliency(model)).attribute(
                    x, nt_type="smoothgrad", nt_samples=cfg.samples, stdevs=noise_std(cfg, x), target=TARGET_CLASS, **kw)
            elif run.method == "occlusion":
                out = ca.Occlusion(model).attribute(x, sliding_window_shapes=window, strides=stride, baselines=0.0,
                                                    target=TARGET_CLASS, **kw)
            elif run.method == "gradcam":
                out = ca.LayerGradCam(model, getattr(model, LAYER)).attribute(x, target=TARGET_CLASS)
            elif run.method == "deeplift":
                out = ca.DeepLift(model).attribute(x, baselines=0.0, target=TARGET_CLASS)
            elif run.method == "deeplift_shap":
                out = ca.DeepLiftShap(model).attribute(x, baselines=shap_baselines(cfg, x), target=TARGET_CLASS)
            else:
                raise ValueError(f"no Captum run for {run.method}")
            return out.detach(), {}

        return call
    if run.impl == "pytorch_grad_cam":
        import pytorch_grad_cam as pgc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

        cls = {"gradcam": pgc.GradCAM, "scorecam": pgc.ScoreCAM, "hirescam": pgc.HiResCAM, "xgradcam": pgc.XGradCAM,
               "eigencam": pgc.EigenCAM, "ablationcam": pgc.AblationCAM, "fullgrad": pgc.FullGrad}[run.method]
        layers = [] if run.method == "fullgrad" else [getattr(model, LAYER)]  # FullGrad takes every bias layer

        def call() -> tuple[torch.Tensor, dict]:
            with cls(model=model, target_layers=layers) as cam:
                if "batch_size" in kw:
                    cam.batch_size = kw["batch_size"]
                out = cam(input_tensor=x, targets=[ClassifierOutputTarget(TARGET_CLASS)] * x.shape[0])
            return torch.from_numpy(out), {}

        return call
    if run.impl == "zennit":
        from zennit.attribution import Gradient
        from zennit.composites import EpsilonPlus
        from zennit.torchvision import ResNetCanonizer

        def call() -> tuple[torch.Tensor, dict]:
            # relevance seeded with the logit, as mechlens starts it (Zennit's default seed is 1)
            onehot = torch.nn.functional.one_hot(torch.tensor(TARGET_CLASS), 1000).to(x)
            with Gradient(model, EpsilonPlus(canonizers=[ResNetCanonizer()])) as attributor:
                _, relevance = attributor(x.clone(), lambda out: out * onehot)
            return relevance.detach(), {}

        return call
    raise ValueError(f"unknown implementation {run.impl!r}")


def shap_baselines(cfg: Config, x: torch.Tensor) -> torch.Tensor:
    """DeepLiftShap's reference set, the same on both sides: other SyntheticShapes images."""
    from mechlens.data import SyntheticShapes

    images = SyntheticShapes(num_samples=SHAP_BASELINES, image_size=cfg.size, seed=1).to_tensors()[0]
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    return ((images - mean) / std).to(x)


def _status_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux >= 4.0); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(run: Run, cfg: Config, map_path: str | None, warm_call: bool = False) -> dict:
    """Build, warm up, and time one call in this (fresh) process; peak RSS increase over the call.
    ``warm_call``: run the measured call once untimed first (first-call costs out of the figures;
    used for the repeats of the fast runs)."""
    warnings.simplefilter("ignore")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    model, x = build(cfg, run.method)
    call = make_call(run, cfg, model, x)
    # warm-up: one forward/backward of the batch (thread pool, allocator, autograd, kernels)
    xx = x.detach().clone().requires_grad_(True)
    torch.autograd.grad(model(xx)[:, TARGET_CLASS].sum(), xx)
    del xx
    if warm_call:
        call()
    _trim()
    cuda = x.device.type == "cuda"
    if cuda:  # peak memory is the GPU's: the caching allocator's peak over what was allocated before
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base_bytes = torch.cuda.memory_allocated()
    hwm_ok = _reset_peak() and _status_kib("VmHWM") is not None
    base_kib = _status_kib("VmRSS") if hwm_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start, cpu_start = time.perf_counter(), time.process_time()
    amap, extras = call()
    if cuda:
        torch.cuda.synchronize()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak_kib = _status_kib("VmHWM") if hwm_ok else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if map_path is not None:
        torch.save(amap.detach().float().cpu().contiguous(), map_path)
    out = {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_mib": max(0, peak_kib - base_kib) / 1024, "map_shape": list(amap.shape),
           "peak_method": "VmHWM" if hwm_ok else "ru_maxrss", "threads": torch.get_num_threads(), **extras}
    if cuda:
        out["host_peak_mib"] = out["peak_mib"]
        out["peak_mib"] = max(0, torch.cuda.max_memory_allocated() - base_bytes) / MIB
        out["peak_method"] = "cuda.max_memory_allocated"
    return out


def _child(run: Run, cfg: Config, map_path: str | None, result_path: str, warm_call: bool) -> None:
    out = measure(run, cfg, map_path, warm_call)
    Path(result_path).write_text(json.dumps(out))


# ---------------------------------------------------------------------------- parent side
def _preimport() -> None:
    """Import what the children use (no torch computation happens in the parent before forking)."""
    import captum.attr  # noqa: F401
    import pytorch_grad_cam  # noqa: F401
    import zennit.attribution  # noqa: F401
    import zennit.torchvision  # noqa: F401
    import pytorch_grad_cam.utils.image  # noqa: F401
    import torchvision  # noqa: F401

    import mechlens.attribution  # noqa: F401
    import mechlens.data  # noqa: F401


def _context(cfg: Config) -> mp.context.BaseContext:
    # CUDA cannot be used in a child forked after the parent touched the driver (is_available does)
    fork = sys.platform.startswith("linux") and not cfg.device.startswith("cuda")
    return mp.get_context("fork" if fork else "spawn")


def run_isolated(run: Run, cfg: Config, scratch: Path, save_map: bool, warm_call: bool = False) -> dict:
    map_path = str(scratch / f"{run.key.replace(':', '__')}.pt") if save_map else None
    result_path = scratch / f"{run.key.replace(':', '__')}.json"
    result_path.unlink(missing_ok=True)
    proc = _context(cfg).Process(target=_child, args=(run, cfg, map_path, str(result_path), warm_call))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not result_path.exists():
        return {"error": f"child exited with code {proc.exitcode}"}
    out = json.loads(result_path.read_text())
    if map_path is not None:
        out["map_path"] = map_path
    return out


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    a, b = ours.double(), theirs.double()
    scale = b.abs().max().item()
    if scale == 0:
        raise AssertionError("the peer's map is all zeros: the comparison would be vacuous")
    return (a - b).abs().max().item() / scale


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-300))


def _pgc_scaled(cam: torch.Tensor, size: int) -> torch.Tensor:
    """Our raw CAM the way pytorch-grad-cam post-processes its own (min-max scale, resize, scale)."""
    from pytorch_grad_cam.utils.image import scale_cam_image

    return torch.from_numpy(scale_cam_image(scale_cam_image(cam.numpy(), (size, size))))


def check_agreement(method: str, peer: str, ours: torch.Tensor, theirs: torch.Tensor, cfg: Config) -> dict:
    """Shapes equal and values close where the settings fix the result; raises if not."""
    if method == "gradcam" and peer == "captum":
        theirs = theirs.clamp(min=0).squeeze(1)  # LayerGradCam: [B, 1, h, w] before the ReLU
    if method == "fullgrad" and peer == "pytorch_grad_cam":  # ours is already at input size
        from pytorch_grad_cam.utils.image import scale_cam_image

        ours = torch.from_numpy(scale_cam_image(ours.numpy()))
    elif peer == "pytorch_grad_cam":
        ours = _pgc_scaled(ours, cfg.size)  # pytorch-grad-cam returns scaled maps at input size
    if tuple(ours.shape) != tuple(theirs.shape):
        raise AssertionError(f"{method}: mechlens map {tuple(ours.shape)} vs {peer} {tuple(theirs.shape)}")
    if method == "smoothgrad":
        # Independent noise draws: the same expected map, different Monte-Carlo error (which shrinks
        # with the number of samples). Unrelated maps would not correlate, nor share their scale.
        corr = _corr(ours, theirs)
        scale = float(ours.double().abs().mean() / theirs.double().abs().mean())
        if corr < 0.3 or not 0.8 < scale < 1.25:
            raise AssertionError(f"smoothgrad: mechlens and {peer} maps correlate {corr:.3f}, mean |map| ratio {scale:.3f}")
        return {"shape": list(ours.shape), "correlation": round(corr, 4), "mean_abs_ratio": round(scale, 4)}
    if peer == "pytorch_grad_cam":  # both in [0, 1]
        diff = float((ours.double() - theirs.double()).abs().max())
        if diff > 1e-3:
            raise AssertionError(f"{method}: mechlens vs {peer} scaled maps differ by {diff:.2e}")
        return {"shape": list(ours.shape), "max_abs_diff": diff}
    rel = _rel(ours, theirs)
    if method == "lrp" and rel > 1e-3:
        # Zennit keeps each merged BatchNorm dividing by sqrt(1 + eps): 1e-4-level differences
        raise AssertionError(f"lrp: mechlens vs {peer} maps differ by {rel:.2e} of the peer's max")
    if method == "lrp":
        return {"shape": list(ours.shape), "max_rel_diff": rel}
    if method in ("saliency", "integrated_gradients"):
        # Our inference copy (folded BatchNorm, channels-last) rounds differently, and a ReLU
        # pre-activation within rounding of zero flips the gradient of single pixels: judge the
        # whole map (relative L2 error, correlation), report the largest pixel difference too.
        l2 = float((ours.double() - theirs.double()).norm() / theirs.double().norm().clamp_min(1e-30))
        corr = _corr(ours, theirs)
        if l2 > 1e-2 or corr < 0.9999:
            raise AssertionError(f"{method}: mechlens vs {peer} maps: relative L2 error {l2:.2e}, correlation {corr:.6f}")
        return {"shape": list(ours.shape), "rel_l2_error": l2, "correlation": round(corr, 7), "max_rel_diff": rel}
    if rel > 1e-3:
        raise AssertionError(f"{method}: mechlens vs {peer} maps differ by {rel:.2e} of the peer's max")
    return {"shape": list(ours.shape), "max_rel_diff": rel}


def summarise(runs: list[Run], records: dict[str, list[dict]], cfg: Config) -> dict[str, dict]:
    """Per run: the median over its measurements (over the warm ones when it has any)."""
    out = {}
    for run in runs:
        recs = [r for r in records[run.key] if "error" not in r]
        if not recs:
            out[run.key] = {"error": records[run.key][0].get("error", "no measurement"), "kwargs": run.kwargs}
            continue
        used = [r for r in recs if r.get("warm")] or recs
        item = {
            "seconds": round(statistics.median(r["seconds"] for r in used), 3),
            "cpu_seconds": round(statistics.median(r["cpu_seconds"] for r in used), 3),
            "peak_mib": round(statistics.median(r["peak_mib"] for r in used), 1),
            "runs": len(used),
            "rows_per_pass": _batching(run.method, run.impl, None if run.setting == "default" else
                                       int(run.setting[4:]), cfg)[1],
            "kwargs": run.kwargs,
        }
        for key in ("masked_inputs_run", "local_recompute"):
            if key in recs[0]:
                item[key] = recs[0][key]
        out[run.key] = item
    return out


def compare(runs: list[Run], summary: dict[str, dict], maps: dict[str, str], cfg: Config) -> tuple[dict, dict]:
    """Per (method, peer): the fastest setting of each side (wall time), the ratios of time, CPU
    time and peak memory, the targets, and the agreement of every pair of maps."""
    comparisons, ratios = {}, {}
    methods = {run.method for run in runs}
    floor = 1.0  # MiB: keeps the memory ratio meaningful when both peaks are near zero
    for method, peer in COMPARISONS:
        if method not in methods:
            continue
        ours = {r.key: summary[r.key] for r in runs if r.method == method and r.impl == "mechlens" and "seconds" in summary[r.key]}
        theirs = {r.key: summary[r.key] for r in runs if r.method == method and r.impl == peer and "seconds" in summary[r.key]}
        name = f"{method}/{peer}"
        if not ours or not theirs:
            comparisons[name] = {"error": "missing measurements"}
            continue
        our_best = min(ours, key=lambda k: ours[k]["seconds"])
        peer_best = min(theirs, key=lambda k: theirs[k]["seconds"])
        agreement = {}
        for our_key in ours:
            for peer_key in theirs:
                if our_key in maps and peer_key in maps:
                    pair = f"{our_key.split(':')[2]} vs {peer_key.split(':')[2]}"
                    try:
                        agreement[pair] = check_agreement(method, peer, torch.load(maps[our_key]), torch.load(maps[peer_key]), cfg)
                    except AssertionError as error:  # recorded and printed, not fatal: the timings still count
                        agreement[pair] = {"disagree": str(error)}
                        print(f"DISAGREEMENT {name} {pair}: {error}", flush=True)
        a, b = ours[our_best], theirs[peer_best]
        time_ratio = a["seconds"] / b["seconds"]
        cpu_ratio = a["cpu_seconds"] / max(b["cpu_seconds"], 1e-9)
        mem_ratio = max(a["peak_mib"], floor) / max(b["peak_mib"], floor)
        limit = TIME_TARGETS.get(method, 1.0)
        item = {
            "mechlens_best": our_best, "peer_best": peer_best,
            "time_ratio": round(time_ratio, 3), "cpu_time_ratio": round(cpu_ratio, 3), "memory_ratio": round(mem_ratio, 3),
            "time_target": limit, "time_target_met": time_ratio <= limit, "memory_target_met": mem_ratio <= 1.0,
            "cpu_time_target_met": cpu_ratio <= limit,
            "agreement": agreement,
            "maps_agree": bool(agreement) and not any("disagree" in v for v in agreement.values()),
        }
        default = ours.get(f"{method}:mechlens:default")
        if default is not None:
            item["default_time_ratio"] = round(default["seconds"] / b["seconds"], 3)
            item["default_memory_ratio"] = round(max(default["peak_mib"], floor) / max(b["peak_mib"], floor), 3)
        peer_default = theirs.get(f"{method}:{peer}:default")
        if default is not None and peer_default is not None:
            item["default_vs_default_time_ratio"] = round(default["seconds"] / peer_default["seconds"], 3)
            item["default_vs_default_memory_ratio"] = round(
                max(default["peak_mib"], floor) / max(peer_default["peak_mib"], floor), 3)
        # The targets ask for both at once: the fastest of our settings whose peak memory is within
        # the peer best's (None when every setting of ours needs more memory).
        lean = [k for k in ours if max(ours[k]["peak_mib"], floor) <= max(b["peak_mib"], floor)]
        if lean:
            lean_best = min(lean, key=lambda k: ours[k]["seconds"])
            item["lean_best"] = lean_best
            item["lean_time_ratio"] = round(ours[lean_best]["seconds"] / b["seconds"], 3)
            item["lean_memory_ratio"] = round(max(ours[lean_best]["peak_mib"], floor) / max(b["peak_mib"], floor), 3)
            item["lean_targets_met"] = item["lean_time_ratio"] <= limit
            ratios[f"{name}_lean_time"] = item["lean_time_ratio"]
        else:
            item["lean_best"] = None
            item["lean_targets_met"] = False
        comparisons[name] = item
        ratios[f"{name}_time"] = item["time_ratio"]
        ratios[f"{name}_cpu_time"] = item["cpu_time_ratio"]
        ratios[f"{name}_memory"] = item["memory_ratio"]
    return comparisons, ratios


def print_table(runs: list[Run], summary: dict[str, dict]) -> None:
    print(f"\n{'run':44s} {'rows':>5s} {'wall s':>8s} {'cpu s':>8s} {'peak MiB':>9s} {'n':>2s}  batching")
    for run in runs:
        s = summary[run.key]
        if "error" in s:
            print(f"{run.key:44s} {'':5s} {'ERROR':>8s}  {s['error']}")
            continue
        print(f"{run.key:44s} {s['rows_per_pass']:5d} {s['seconds']:8.2f} {s['cpu_seconds']:8.2f} {s['peak_mib']:9.0f} "
              f"{s['runs']:2d}  {s['kwargs'] or 'default'}")


def print_comparisons(comparisons: dict[str, dict]) -> None:
    print(f"\n{'comparison':27s} {'mechlens best':>31s} {'peer best':>40s} {'time x':>7s} {'cpu x':>6s} {'mem x':>6s}"
          "  targets (time, memory)")
    for name, item in comparisons.items():
        if "error" in item:
            print(f"{name:27s} ERROR {item['error']}")
            continue
        print(f"{name:27s} {item['mechlens_best']:>31s} {item['peer_best']:>40s} {item['time_ratio']:7.3f} "
              f"{item['cpu_time_ratio']:6.3f} {item['memory_ratio']:6.3f}  <={item['time_target']}: "
              f"{'met' if item['time_target_met'] else 'NOT met'}, <=1: {'met' if item['memory_target_met'] else 'NOT met'}")
    print("\nboth targets at once: our fastest setting with peak memory <= the peer best's")
    for name, item in comparisons.items():
        if "error" in item:
            continue
        if item.get("lean_best") is None:
            print(f"{name:27s} none of our settings fits in the peer best's memory")
            continue
        print(f"{name:27s} {item['lean_best']:>31s} time {item['lean_time_ratio']:.3f}x, memory {item['lean_memory_ratio']:.3f}x: "
              f"{'met' if item['lean_targets_met'] else 'NOT met'} (time <= {item['time_target']})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=50, help="Integrated Gradients steps")
    parser.add_argument("--samples", type=int, default=50, help="SmoothGrad noise samples")
    parser.add_argument("--window", type=int, default=32, help="occlusion window 3 x W x W")
    parser.add_argument("--stride", type=int, default=16, help="occlusion stride 3 x S x S")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 64],
                        help="tuned rows per forward/backward tried for the gradient methods (IG, SmoothGrad)")
    parser.add_argument("--perturb-rows", type=int, nargs="+", default=[8, 16, 64],
                        help="tuned rows per forward tried for occlusion and Score-CAM")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--repeat-budget", type=float, default=20.0,
                        help="runs whose first measurement took longer than this many seconds are not repeated")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads per measurement (0: torch's default). On a shared, busy machine 1 "
                             "avoids OpenMP threads waiting on each other at every op")
    parser.add_argument("--device", default="cpu",
                        help="where the model and inputs live: cpu, or cuda on a GPU machine (then peak memory is "
                             "the GPU's, from torch.cuda.max_memory_allocated, and the host's is reported beside it)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--one", metavar="METHOD:IMPL:SETTING", help="measure one run in this process and print it")
    parser.add_argument("--rise-masks", type=int, default=1000, help="RISE masks per image")
    parser.add_argument("--quick", action="store_true", help="tiny run for the test suite")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible to torch")
    if args.quick:
        args.images, args.size, args.steps, args.samples = 2, 64, 8, 4
        args.window, args.stride, args.rows, args.perturb_rows, args.repeats = 16, 8, [4], [8], 1
        args.threads = args.threads or 1
        args.rise_masks = 64
    cfg = Config(images=args.images, size=args.size, steps=args.steps, samples=args.samples, window=args.window,
                 stride=args.stride, rows=tuple(args.rows), perturb_rows=tuple(args.perturb_rows), threads=args.threads,
                 device=args.device, rise_masks=args.rise_masks)
    runs = plan(cfg, args.methods if not args.one else [args.one.split(":")[0]])
    if args.one:
        (run,) = [r for r in runs if r.key == args.one] or [None]
        if run is None:
            parser.error(f"--one: no run {args.one!r}; runs: {', '.join(r.key for r in plan(cfg, list(METHODS)))}")
        print(json.dumps({"run": run.key, **measure(run, cfg, None)}))
        return

    print(f"resnet18 (random weights, eval), {cfg.images} images of {cfg.size}x{cfg.size}, class {TARGET_CLASS}; "
          f"IG {cfg.steps} steps, SmoothGrad {cfg.samples} samples, occlusion 3x{cfg.window}x{cfg.window} stride "
          f"{cfg.stride}, CAMs at {LAYER}; {len(runs)} runs x up to {args.repeats} repeats, "
          f"{cfg.threads or torch.get_num_threads()} threads", flush=True)
    _preimport()  # forked children inherit the modules instead of importing them again
    scratch = Path(tempfile.mkdtemp(prefix="mechlens-attr-bench-"))
    records: dict[str, list[dict]] = {run.key: [] for run in runs}
    maps: dict[str, str] = {}
    total_start = time.perf_counter()
    try:
        for repeat in range(args.repeats):
            for run in runs:
                done = records[run.key]
                if done and ("error" in done[0] or done[0]["seconds"] > args.repeat_budget):
                    continue  # slow runs are measured once (cold); fast ones again, warm
                rec = run_isolated(run, cfg, scratch, save_map=repeat == 0, warm_call=repeat > 0)
                rec["warm"] = repeat > 0
                done.append(rec)
                if "map_path" in rec:
                    maps[run.key] = rec["map_path"]
                if "error" in rec:
                    print(f"[{repeat + 1}] {run.key:44s} ERROR {rec['error']}", flush=True)
                else:
                    print(f"[{repeat + 1}] {run.key:44s} {rec['seconds']:8.2f} s (cpu {rec['cpu_seconds']:8.2f} s)  "
                          f"peak +{rec['peak_mib']:7.0f} MiB", flush=True)
        summary = summarise(runs, records, cfg)
        comparisons, ratios = compare(runs, summary, maps, cfg)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_table(runs, summary)
    print_comparisons(comparisons)
    ok = [c for c in comparisons.values() if "error" not in c]
    complete = len(ok) == len(comparisons)
    figures = {
        "model": "torchvision:resnet18 (random weights, eval)", "images": cfg.images, "size": cfg.size,
        "target": f"class:{TARGET_CLASS}", "layer": LAYER, "ig_steps": cfg.steps, "smoothgrad_samples": cfg.samples,
        "occlusion_window": [3, cfg.window, cfg.window], "occlusion_stride": [3, cfg.stride, cfg.stride],
        "rows": list(cfg.rows), "perturb_rows": list(cfg.perturb_rows), "repeats": args.repeats,
        "device": cfg.device, "threads": cfg.threads or torch.get_num_threads(), "wall_seconds": round(time.perf_counter() - total_start, 1),
        "runs": summary, "comparisons": comparisons, "rise_masks": cfg.rise_masks,
        # RISE has no peer (Captum #1150): its cost per image at its fastest batching
        "rise_seconds_per_image": min((v["seconds"] / cfg.images for k, v in summary.items()
                                       if k.startswith("rise:") and "seconds" in v), default=None),
        "targets": {
            "time": complete and all(c["time_target_met"] for c in ok),
            "memory": complete and all(c["memory_target_met"] for c in ok),
            "cpu_time": complete and all(c["cpu_time_target_met"] for c in ok),
            "per_comparison": {name: {"time": c.get("time_target_met", False), "memory": c.get("memory_target_met", False),
                                      "cpu_time": c.get("cpu_time_target_met", False)}
                               for name, c in comparisons.items()},
        },
    }
    print(json.dumps({"benchmark": "attribution_vs_peers", "figures": figures, "ratios": ratios}))


if __name__ == "__main__":
    main()
