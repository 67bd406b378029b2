"""The model-family matrix (issue 17, item 3): the whole mechlens pipeline on random-weight models.

For each family (torchvision, timm, a plain module with a dict / tuple output, a Hugging
Face-style module whose output has ``.logits``) one representative internal layer goes through

    layers       ``mechlens layers`` (the CLI where the spec alone builds the model, else
                 :func:`mechlens.models.layer_shapes`)
    capture      :func:`mechlens.capture.capture_to_store` with ``spatial`` all / random / mean /
                 cls (cls: token layers; elsewhere the refusal is checked)
    sae          a TopK SAE trained for a few steps on the ``all`` rows (:func:`mechlens.sae.train_sae`)
    attribution  Grad-CAM, Integrated Gradients and occlusion for a class logit and for an SAE
                 latent (``sae:PATH:INDEX``, the saved SAE's recorded layer / pooling / layout)
    featvis      :func:`mechlens.featvis.render` of one channel (2 steps, the model's input size)
    tcav         :func:`mechlens.probes.run_tcav` with tiny concept / random / example sets

and every stage is checked against a direct forward of the model with a plain forward hook on the
layer, read with the layer's *true* layout (written down per family below, not inferred): store
row width == the layer's channel count, rows == images x positions for ``all``, the stored rows
equal the hooked activation, the SAE reads rows of that width, CAM maps have the layer's grid,
input maps the input's shape, maps finite and non-constant, the rendered channel's value equals
the direct forward's, CAVs have the channel count's dimension.

Expectations are per family: ``expect[check]`` is the text of the error a check must fail with
(an unsupported combination must say what is missing); every other check must pass. Layouts are
left to mechlens unless the family says ``explicit_layout=True``: then the harness passes
``layout=<the family's layout>`` to every entry point that takes a ``layout=`` parameter (an entry
point without one is called without it, and the check's notes say so; the check then shows
whether mechlens got the layout right on its own). The checks themselves never trust mechlens'
layout: the reference is read with the layout written down here.

Zero-initialised weights (torchvision ViT's head, timm ResNets' last BN scale per block) get
random values first (:func:`undo_zero_init`), so that class maps are not zero by construction.

``run_family`` returns the outcome of every check; ``tests/mechlens/test_model_matrix.py``
asserts them and ``benchmarks/model_matrix.py`` prints them as a table with timings.
"""
from __future__ import annotations

import contextlib
import inspect
import io
import math
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn

STAGES: tuple[str, ...] = ("layers", "capture", "sae", "attribution", "featvis", "tcav")
CHECKS: dict[str, tuple[str, ...]] = {
    "layers": ("layers",),
    "capture": ("capture:all", "capture:random", "capture:mean", "capture:cls"),
    "sae": ("sae",),
    "attribution": ("gradcam:class", "gradcam:sae", "gradcam:no-hints", "ig:class", "ig:sae", "occlusion:class",
                    "occlusion:sae"),
    "featvis": ("featvis",),
    "tcav": ("tcav",),
}
STAGE_OF = {check: stage for stage, checks in CHECKS.items() for check in checks}

NUM_CLASSES = 5
BATCH = 4  # images captured / explained per family
RANDOM_K = 2  # spatial="random": positions per image (the smallest layers here have 4)
CLASS_TARGET = "class:1"

# The errors mechlens gives today for combinations it does not support (first line, a substring).
CLS_NEEDS_TOKENS = "needs token maps [B, T, D]"  # spatial='cls' on a conv map
NOT_LOGITS = "not a logits tensor; a feature on the output needs model(x) to return [B, classes]: say which output that is with mechlens.engine.select_output"


# ---------------------------------------------------------------------------- the families
@dataclass(frozen=True)
class Family:
    """One model family of the matrix.

    ``layout``: the representative layer's true layout (``nchw``, ``nhwc`` or ``nlc``), the
    ground truth of the checks. ``explicit_layout``: pass ``layout=<layout>`` wherever an entry
    point takes it (the layout cannot be inferred from the activation). ``prefix_tokens``: tokens
    before the patch grid of a token layer (CLS, distillation, register tokens).
    ``cam_kwargs``: extra keyword arguments of Grad-CAM that the model cannot supply itself
    (check ``gradcam:no-hints`` runs Grad-CAM of the class without them: it must be refused).
    ``expect``: check -> the text its error must contain (see :data:`CHECKS`).
    """

    id: str
    spec: str
    layer: str
    layout: str
    size: int = 64
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    explicit_layout: bool = False
    prefix_tokens: int = 0
    cam_kwargs: Mapping[str, Any] = field(default_factory=dict)
    expect: Mapping[str, str] = field(default_factory=dict)
    slow: bool = False
    note: str = ""
    output: str | int | None = None  # select_output(model, output): which output is the logits
    featvis_kwargs: Mapping[str, Any] = field(default_factory=dict)  # what a user must tell render()

    @property
    def cli(self) -> bool:
        """Whether ``mechlens layers SPEC`` builds this model as the matrix uses it (the CLI takes
        no factory keyword arguments such as ``img_size``)."""
        return not self.kwargs


_CNN = {"capture:cls": CLS_NEEDS_TOKENS}  # conv maps have no CLS token
_OUTPUT_NOT_LOGITS = {check: NOT_LOGITS for check in ("gradcam:class", "ig:class", "occlusion:class", "tcav")}

FAMILIES: tuple[Family, ...] = (
    # torchvision
    Family("tv_resnet18", "torchvision:resnet18", "layer4", "nchw", expect=_CNN),
    Family("tv_vgg11_bn", "torchvision:vgg11_bn", "features.28", "nchw", expect=_CNN, slow=True),
    Family("tv_densenet121", "torchvision:densenet121", "features.denseblock4", "nchw", expect=_CNN),
    Family("tv_mobilenet_v3_small", "torchvision:mobilenet_v3_small", "features.12", "nchw", expect=_CNN),
    Family("tv_efficientnet_b0", "torchvision:efficientnet_b0", "features.7", "nchw", expect=_CNN),
    Family("tv_convnext_tiny", "torchvision:convnext_tiny", "features.7.2.block.5", "nhwc", expect=_CNN,
           note="the last block's second Linear, on [B, H, W, C]"),
    Family("tv_vit_b_16", "torchvision:vit_b_16", "encoder.layers.encoder_layer_10", "nlc", kwargs={"image_size": 64},
           prefix_tokens=1, cam_kwargs={"num_prefix_tokens": 1}, slow=True,
           note="torchvision's ViT has no num_prefix_tokens attribute: its class token is known from the model class"),
    Family("tv_swin_t", "torchvision:swin_t", "features.7", "nhwc", expect=_CNN),
    # timm
    Family("timm_resnet10t", "timm:resnet10t", "layer4", "nchw", expect=_CNN),
    Family("timm_regnetx_002", "timm:regnetx_002", "s4", "nchw", expect=_CNN),
    Family("timm_convnext_atto", "timm:convnext_atto", "stages.3.blocks.1.mlp", "nhwc", kwargs={"conv_mlp": False},
           expect=_CNN,
           note="conv_mlp=False (atto's default is the NCHW conv MLP; convnext_tiny and up are channels-last)"),
    Family("timm_efficientnet_b0", "timm:efficientnet_b0", "blocks.6", "nchw", expect=_CNN),
    Family("timm_mobilenetv3_small_050", "timm:mobilenetv3_small_050", "blocks.5", "nchw", expect=_CNN),
    Family("timm_vit_tiny", "timm:vit_tiny_patch16_224", "blocks.10", "nlc", kwargs={"img_size": 64}, prefix_tokens=1),
    Family("timm_deit_tiny_distilled", "timm:deit_tiny_distilled_patch16_224", "blocks.10", "nlc",
           kwargs={"img_size": 64}, prefix_tokens=2),
    Family("timm_vit_reg4", "timm.models.vision_transformer:VisionTransformer", "blocks.2", "nlc",
           kwargs={"img_size": 64, "patch_size": 16, "embed_dim": 64, "depth": 4, "num_heads": 2, "reg_tokens": 4},
           prefix_tokens=5, note="a small timm VisionTransformer with 4 register tokens (no tiny reg4 model is registered)"),
    Family("timm_swin_tiny", "timm:swin_tiny_patch4_window7_224", "layers.3", "nhwc", kwargs={"img_size": 64},
           expect=_CNN),
    Family("timm_swin_tiny_explicit", "timm:swin_tiny_patch4_window7_224", "layers.3", "nhwc", kwargs={"img_size": 64},
           explicit_layout=True, expect=_CNN, note="the same layer with layout='nhwc' passed to every entry point"),
    Family("timm_maxvit_pico", "timm:maxvit_pico_rw_256", "stages.3", "nchw", kwargs={"img_size": 64}, expect=_CNN,
           featvis_kwargs={"input_size": (64, 64)},
           note="maxvit does not declare its one input size: render() is told input_size"),
    Family("timm_eva02_tiny", "timm:eva02_tiny_patch14_224", "blocks.10", "nlc", size=56, kwargs={"img_size": 56},
           prefix_tokens=1),
    # plain modules whose output is not a logits tensor: features on the model output are refused
    # (with the fix in the message) until the user says which output is the logits
    Family("dict_output_unselected", "tests.mechlens._matrix:dict_output_net", "stage2", "nchw",
           expect={**_CNN, **_OUTPUT_NOT_LOGITS}, note="forward returns {'logits': ..., 'embedding': ...}"),
    Family("dict_output", "tests.mechlens._matrix:dict_output_net", "stage2", "nchw", output="logits",
           expect=_CNN, note="select_output(model, 'logits')"),
    Family("tuple_output", "tests.mechlens._matrix:tuple_output_net", "stage2", "nchw", output=0,
           expect=_CNN, note="forward returns (logits, embedding); select_output(model, 0)"),
    Family("hf_style_output", "tests.mechlens._matrix:hf_style_net", "stage2", "nchw", output="logits",
           expect=_CNN,
           note="forward returns an object with .logits (stand-in: transformers is not installed); select_output"),
)
FAMILY = {f.id: f for f in FAMILIES}


# ---------------------------------------------------------------------------- plain test modules
_PLAIN_PREPROCESSING = {"input_size": (3, 64, 64), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


@dataclass
class ImageClassifierOutput:
    """Stand-in for ``transformers.modeling_outputs.ImageClassifierOutput``: the logits in an attribute."""

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class StructuredOutputNet(nn.Module):
    """A small CNN (stem, two stages, pooled embedding, linear head) whose forward returns a dict,
    a tuple or an object with ``.logits`` instead of the logits tensor."""

    mechlens_preprocessing = _PLAIN_PREPROCESSING

    def __init__(self, output: str = "dict", num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.output = output

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.stem = block(3, 16)
        self.stage1 = block(16, 32)
        self.stage2 = block(32, 48)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x: torch.Tensor) -> Any:
        f1 = self.stage1(self.stem(x))
        f2 = self.stage2(f1)
        embedding = self.pool(f2).flatten(1)
        logits = self.head(embedding)
        if self.output == "dict":
            return {"logits": logits, "embedding": embedding}
        if self.output == "tuple":
            return logits, embedding
        return ImageClassifierOutput(logits=logits, hidden_states=(f1, f2))


def dict_output_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    return StructuredOutputNet("dict", num_classes)


def tuple_output_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    return StructuredOutputNet("tuple", num_classes)


def hf_style_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    return StructuredOutputNet("hf", num_classes)


# ---------------------------------------------------------------------------- outcomes
@dataclass
class Outcome:
    """What one check did: ``ok``; ``error`` (mechlens raised; ``message`` is its first line);
    ``fail`` (mechlens returned, but a check against the direct forward failed); ``skipped``
    (a check it depends on did not produce its input)."""

    status: str
    message: str = ""
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def cell(self) -> str:
        if self.status == "ok":
            return "ok" + (f" ({'; '.join(self.notes)})" if self.notes else "")
        return f"{self.status.upper()}: {self.message}"


@dataclass
class FamilyResult:
    family: Family
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    stage_seconds: dict[str, float] = field(default_factory=dict)
    build_seconds: float = 0.0
    total_seconds: float = 0.0
    reinitialized: list[str] = field(default_factory=list)

    def problems(self, stage: str | None = None) -> list[str]:
        """Where the outcomes differ from the family's expectations (all stages, or one)."""
        out = []
        checks = CHECKS[stage] if stage else [c for s in STAGES for c in CHECKS[s]]
        for check in checks:
            outcome = self.outcomes.get(check, Outcome("skipped", "not run"))
            expected = self.family.expect.get(check)
            where = f"{self.family.id} {check}"
            if expected is None:
                if outcome.status != "ok":
                    notes = f" [{'; '.join(outcome.notes)}]" if outcome.notes else ""
                    out.append(f"{where}: expected to work, got {outcome.cell()}{notes}")
            elif outcome.status != "error":
                out.append(f"{where}: expected the error {expected!r}, got {outcome.cell()}")
            elif expected not in outcome.message:
                out.append(f"{where}: expected an error containing {expected!r}, got {outcome.message!r}")
        return out


class CheckFailed(AssertionError):
    """A result of mechlens disagrees with the direct forward."""


def check(condition: Any, message: str) -> None:
    if not condition:
        raise CheckFailed(message)


def first_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# ---------------------------------------------------------------------------- references
@dataclass
class Reference:
    """The representative layer's activation from a direct forward with a plain forward hook,
    read with the family's true layout: ``rows`` ``[B, P, C]``, ``grid`` the spatial shape
    (``(H, W)`` of a map, ``(h, w)`` of the patch grid of a token layer), ``shape`` as hooked."""

    rows: torch.Tensor
    grid: tuple[int, int]
    shape: tuple[int, ...]

    @property
    def channels(self) -> int:
        return int(self.rows.shape[-1])

    @property
    def positions(self) -> int:
        return int(self.rows.shape[1])


def direct_forward(loaded: Any, family: Family, images: torch.Tensor) -> Reference:
    net = loaded.model
    kept: list[torch.Tensor] = []
    handle = net.get_submodule(family.layer).register_forward_hook(lambda m, a, out: kept.append(out.detach().clone()))
    try:
        with torch.no_grad():
            net(loaded.preprocessing.normalize(images))
    finally:
        handle.remove()
    check(len(kept) == 1, f"layer {family.layer} ran {len(kept)} times in one forward (the matrix needs a layer that runs once)")
    act = kept[0].float()
    if family.layout == "nchw":
        b, c, h, w = act.shape
        return Reference(act.flatten(2).transpose(1, 2), (h, w), tuple(act.shape))
    if family.layout == "nhwc":
        b, h, w, c = act.shape
        return Reference(act.reshape(b, h * w, c), (h, w), tuple(act.shape))
    if family.layout == "nlc":
        patches = act.shape[1] - family.prefix_tokens
        side = math.isqrt(patches)
        check(side * side == patches, f"{patches} patch tokens are not a square grid")
        return Reference(act, (side, side), tuple(act.shape))
    raise ValueError(f"unknown layout {family.layout!r}")


def close(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray, rtol: float = 1e-3) -> bool:
    a = torch.as_tensor(np.asarray(a), dtype=torch.float32)
    b = torch.as_tensor(np.asarray(b), dtype=torch.float32)
    if a.shape != b.shape:
        return False
    scale = float(b.abs().max()) if b.numel() else 1.0
    return bool(torch.allclose(a, b, rtol=rtol, atol=rtol * max(scale, 1e-6)))


def finite_and_varying(amap: torch.Tensor, what: str) -> None:
    amap = amap.detach().float()
    check(bool(torch.isfinite(amap).all()), f"{what} is not finite")
    check(float(amap.max() - amap.min()) > 0, f"{what} is constant ({float(amap.flatten()[0]):.3g} everywhere)")


def undo_zero_init(model: nn.Module) -> list[str]:
    """Give zero-initialised weights random values (seeded): torchvision's ViT starts with a zero
    head and timm's ResNets with a zero last-BN scale in every block, so at random init every
    logit is constant or a whole stage is skipped, and maps of a class would be zero for reasons
    that have nothing to do with mechlens. Norm scales become 1, other weights N(0, 0.02).
    Returns the names of the parameters changed."""
    norms = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)
    generator = torch.Generator().manual_seed(0)
    changed = []
    with torch.no_grad():
        for module_name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if not isinstance(weight, nn.Parameter) or weight.numel() < 2 or bool(weight.any()):
                continue
            if isinstance(module, norms):
                weight.fill_(1.0)
            else:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
            changed.append(f"{module_name}.weight")
    return changed


# ---------------------------------------------------------------------------- the runner
class _Run:
    def __init__(self, family: Family, workdir: Path) -> None:
        self.family = family
        self.workdir = Path(workdir)
        self.result = FamilyResult(family)
        self.loaded: Any = None
        self.data: Any = None
        self.images: torch.Tensor | None = None
        self.ref: Reference | None = None
        self.store_all: Path | None = None
        self.sae_path: Path | None = None
        self.sae_latent: int | None = None

    # layout= only where the family asks for it and the entry point has the parameter
    def layout_kwargs(self, fn: Callable[..., Any], what: str, notes: list[str]) -> dict[str, Any]:
        if not self.family.explicit_layout:
            return {}
        try:
            params = inspect.signature(fn).parameters
        except (TypeError, ValueError):
            params = {}
        if "layout" in params:
            return {"layout": self.family.layout}
        notes.append(f"{what} takes no layout=")
        return {}

    def run_check(self, name: str, fn: Callable[[list[str]], None], needs: tuple[str, ...] = ()) -> None:
        missing = [n for n in needs if self.result.outcomes.get(n, Outcome("skipped")).status != "ok"]
        if missing:
            self.result.outcomes[name] = Outcome("skipped", f"needs {', '.join(missing)}")
            return
        notes: list[str] = []
        start = time.perf_counter()
        try:
            fn(notes)
            outcome = Outcome("ok", notes=notes)
        except CheckFailed as failure:
            outcome = Outcome("fail", str(failure), notes=notes)
        except Exception as error:  # noqa: BLE001 - every error is an outcome of the matrix
            outcome = Outcome("error", first_line(error), notes=notes)
            outcome.notes.append("at " + _innermost_frame(error))
        outcome.seconds = time.perf_counter() - start
        self.result.outcomes[name] = outcome
        stage = STAGE_OF[name]
        self.result.stage_seconds[stage] = self.result.stage_seconds.get(stage, 0.0) + outcome.seconds

    # ------------------------------------------------------------------ set-up
    def build(self) -> None:
        from mechlens.data import SyntheticShapes
        from mechlens.models import load_model

        f = self.family
        start = time.perf_counter()
        torch.manual_seed(0)
        self.loaded = load_model(f.spec, num_classes=NUM_CLASSES, input_size=f.size, **dict(f.kwargs))
        self.result.reinitialized = undo_zero_init(self.loaded.model)
        if f.output is not None:
            from mechlens.engine import select_output

            select_output(self.loaded, f.output)
        # 40 images: 4 captured / explained, 6 concept, 3 x 6 random, 4 TCAV examples
        self.data = SyntheticShapes(num_samples=40, image_size=f.size, seed=0)
        self.images = torch.stack([self.data[i][0] for i in range(BATCH)])
        self.ref = direct_forward(self.loaded, f, self.images)
        self.result.build_seconds = time.perf_counter() - start

    # ------------------------------------------------------------------ stages
    def layers(self, notes: list[str]) -> None:
        from mechlens.cli import main as cli_main
        from mechlens.cli.layers import format_shape
        from mechlens.features import layer_shapes

        f, ref = self.family, self.ref
        expected = format_shape(ref.shape)
        if f.cli:
            out = io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()) as err:
                code = cli_main(["layers", f.spec, "--input-size", "3", str(f.size), str(f.size),
                                 "--filter", f.layer, "--num-classes", str(NUM_CLASSES)])
            if code != 0:
                raise RuntimeError(err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else f"exit {code}")
            columns = _table_columns(out.getvalue(), f.layer)
            check(columns is not None, f"`mechlens layers` did not list {f.layer}: {out.getvalue()[-300:]}")
            shown, layout = columns.get("output shape", ""), columns.get("layout")
            check(shown == expected, f"`mechlens layers` shows {shown!r} for {f.layer}, the direct forward gives {expected}")
            notes.append("CLI")
        else:
            infos = layer_shapes(self.loaded.model, (3, f.size, f.size), [f.layer], batch_size=2)
            check(len(infos) == 1 and infos[0].calls == 1, f"layer_shapes: {infos}")
            shown = format_shape(infos[0].output_shape)
            check(shown == expected, f"layer_shapes gives {shown} for {f.layer}, the direct forward gives {expected}")
            layout = getattr(infos[0], "layout", None)
            if layout and f.layout == "nlc" and getattr(infos[0], "num_prefix_tokens", None):
                layout += f"+{infos[0].num_prefix_tokens}"
            notes.append("python layer_shapes (the CLI takes no model kwargs)")
        if layout is not None:  # mechlens reports layouts (with the layout rewrite): they must be right
            wanted = f.layout + (f"+{f.prefix_tokens}" if f.layout == "nlc" and f.prefix_tokens else "")
            check(layout in (wanted, "?", ""), f"mechlens reports layout {layout!r} for {f.layer}, the layer is {wanted}")
            if layout in ("?", ""):
                notes.append("layout not reported")

    def capture(self, spatial: str) -> Callable[[list[str]], None]:
        def run(notes: list[str]) -> None:
            from activation_store import ActivationStore
            from mechlens.capture import capture_to_store

            f, ref = self.family, self.ref
            out = self.workdir / f"store-{spatial}"
            kwargs = self.layout_kwargs(capture_to_store, "capture_to_store", notes)
            capture_to_store(self.loaded, self.data, out, layers=[f.layer], spatial=spatial, k=RANDOM_K,
                             dtype="float32", batch_size=BATCH // 2, num_workers=0, device="cpu",
                             max_images=BATCH, progress=False, **kwargs)
            view = ActivationStore(out)[f.layer]
            c, p = ref.channels, ref.positions
            rows_expected = {"all": BATCH * p, "random": BATCH * RANDOM_K, "mean": BATCH, "cls": BATCH}[spatial]
            check(view.dim == c, f"store row width {view.dim} != {c} channels of {f.layer} "
                                 f"(direct forward {list(ref.shape)}, layout {f.layout})")
            check(view.num_rows == rows_expected, f"{view.num_rows} rows, expected {rows_expected} "
                                                  f"({BATCH} images x {p if spatial == 'all' else RANDOM_K if spatial == 'random' else 1})")
            layout = dict(view.spec.meta or {}).get("layout")
            check(layout == f.layout, f"the store records layout {layout!r}, the layer is {f.layout}")
            data = view.read_rows(np.arange(view.num_rows))
            index = view.read_index()
            flat = ref.rows.numpy()
            if spatial == "all":
                check(np.array_equal(index.sample_id, np.repeat(np.arange(BATCH), p)), "row index sample ids")
                check(np.array_equal(index.position, np.tile(np.arange(p), BATCH)), "row index positions")
                expected = flat.reshape(BATCH * p, c)
            elif spatial == "random":
                check(np.all((index.position >= 0) & (index.position < p)), "random positions outside the layer")
                expected = flat[index.sample_id, index.position]
            elif spatial == "mean":
                expected = flat.mean(axis=1)[index.sample_id]
            else:
                expected = flat[:, 0][index.sample_id]
            check(close(data, expected), f"stored rows differ from the direct forward's (max abs diff "
                                         f"{float(np.abs(np.asarray(data) - expected).max()):.3g})")
            if spatial == "all":
                self.store_all = out
        return run

    def sae(self, notes: list[str]) -> None:
        from activation_store import ActivationStore
        from mechlens.sae import SAE, TopKConfig, TrainConfig, train_sae

        f, ref = self.family, self.ref
        view = ActivationStore(self.store_all)[f.layer]
        rows = view.num_rows
        out = self.workdir / "sae"
        config = TopKConfig(width=32, k=4)
        train = TrainConfig(steps=6, batch_size=min(64, rows), lr=1e-3, lr_warmup_fraction=0.17, init_rows=min(256, rows),
                            log_every=3, checkpoint_every=0, seed=0)
        result = train_sae(self.store_all, f.layer, config, train, out=out, progress=False)
        check(result.paths, "train_sae saved nothing")
        sae = SAE.load(result.paths[0])
        check(sae.config.d_in == ref.channels, f"the SAE reads rows of width {sae.config.d_in}, {f.layer} has {ref.channels} channels")
        check(sae.config.layer == f.layer and sae.config.pooling == "all",
              f"the SAE records layer {sae.config.layer!r} pooling {sae.config.pooling!r}")
        check(sae.config.layout == f.layout, f"the SAE records layout {sae.config.layout!r}, the layer is {f.layout}")
        x = ref.rows.reshape(-1, ref.channels)
        with torch.no_grad():
            z = sae.encode(x)
            recon = sae.decode(z)
        check(tuple(z.shape) == (x.shape[0], 32), f"latents {tuple(z.shape)}")
        check(tuple(recon.shape) == tuple(x.shape), f"reconstruction {tuple(recon.shape)} of rows {tuple(x.shape)}")
        check(bool(torch.isfinite(z).all() and torch.isfinite(recon).all()), "SAE outputs are not finite")
        check(int((z > 0).sum(dim=1).max()) <= 4, "more than k latents active")
        metrics = {k: v for k, v in result.metrics[0].items() if isinstance(v, float)}
        check(all(math.isfinite(v) for v in metrics.values()), f"training metrics not finite: {metrics}")
        # the latent explained below: the most active one on the stored rows
        with torch.no_grad():
            stored = torch.from_numpy(np.asarray(view.read_rows(np.arange(rows)), dtype=np.float32))
            self.sae_latent = int(sae.encode(stored).mean(dim=0).argmax())
        self.sae_path = result.paths[0]

    def attribution(self, method: str, target_kind: str, hints: bool = True) -> Callable[[list[str]], None]:
        def run(notes: list[str]) -> None:
            from mechlens.attribution import attribute, get_method
            from mechlens.features import parse_feature

            f, ref, images = self.family, self.ref, self.images
            if not hints and not f.cam_kwargs:
                notes.append("n/a: no Grad-CAM hints in this family")
                return
            target: Any = CLASS_TARGET if target_kind == "class" else parse_feature(f"sae:{self.sae_path}:{self.sae_latent}")
            kwargs: dict[str, Any] = {}
            if method == "gradcam":
                kwargs = {"layer": f.layer, **(dict(f.cam_kwargs) if hints else {}),
                          **self.layout_kwargs(get_method("gradcam").fn, "gradcam", notes)}
            elif method == "integrated_gradients":
                kwargs = {"n_steps": 4}
            elif method == "occlusion":
                kwargs = {"window": f.size // 4, "strides": f.size // 4}
            result = attribute(self.loaded, images, target, method=method, **kwargs)
            if method == "gradcam":
                expected = (BATCH, *ref.grid)
            else:
                expected = tuple(images.shape)
            check(tuple(result.map.shape) == expected, f"{method} map {tuple(result.map.shape)}, expected {expected}")
            check(tuple(result.heatmap().shape) == (BATCH, f.size, f.size), f"heatmap {tuple(result.heatmap().shape)}")
            check(bool(torch.isfinite(result.values).all()), "explained values not finite")
            finite_and_varying(result.map, f"the {method} map")
            if method == "integrated_gradients":
                err = result.completeness_error
                check(err is not None and bool(torch.isfinite(err).all()), f"completeness error {err}")
        return run

    def featvis(self, notes: list[str]) -> None:
        from mechlens.features import Channel
        from mechlens.featvis import render

        f, ref = self.family, self.ref
        channel = ref.channels - 1  # the last one: out of range when the channel axis is misread
        kwargs = {"layout": f.layout} if f.explicit_layout else {}
        feature = Channel(f.layer, channel, **kwargs)
        result = render(self.loaded, feature, size=f.size, steps=2, seed=0, **dict(f.featvis_kwargs))
        check(tuple(result.images.shape) == (1, 3, f.size, f.size), f"images {tuple(result.images.shape)}")
        check(bool(torch.isfinite(result.images).all() and torch.isfinite(result.losses).all()), "not finite")
        direct = direct_forward(self.loaded, f, result.images)
        value = float(direct.rows[0, :, channel].mean())
        got = float(result.objective.reshape(-1)[0])
        check(math.isclose(got, value, rel_tol=1e-3, abs_tol=1e-4 * max(1.0, abs(value))),
              f"render reports channel {channel} = {got:.6g}, the direct forward of its image gives {value:.6g}")

    def tcav(self, notes: list[str]) -> None:
        from mechlens.probes import ConceptSet, random_concept_sets, run_tcav

        f, ref, data = self.family, self.ref, self.data
        labels = np.asarray(data.labels)
        concept_ids = np.flatnonzero(labels == 0)[:6]
        example_ids = np.flatnonzero(labels == 1)[:4]
        concept = ConceptSet.from_dataset("concept", data, concept_ids)
        examples = ConceptSet.from_dataset("examples", data, example_ids)
        randoms = random_concept_sets(data, 3, 6, seed=1, exclude=np.concatenate([concept_ids, example_ids]))
        kwargs = self.layout_kwargs(run_tcav, "run_tcav", notes)
        report = run_tcav(self.loaded, layers=[f.layer], concepts=[concept], random_sets=randoms, examples=examples,
                          targets=[1], batch_size=16, **kwargs)
        rows = report.rows()
        check(len(rows) == 1, f"{len(rows)} TCAV rows")
        score = rows[0]["tcav_mean"]
        check(score is not None and 0.0 <= score <= 1.0, f"tcav_mean {score}")
        dims = {int(np.asarray(cav.vector).size) for cav in report.cavs}
        check(dims == {ref.channels}, f"CAVs of dimension {sorted(dims)}, {f.layer} has {ref.channels} channels")


def _table_columns(text: str, name: str) -> dict[str, str] | None:
    """The cells of row ``name`` of a ``mechlens layers`` table, keyed by the header's column names
    (cells hold single spaces only; columns are two or more spaces apart and left-aligned, so a
    cell starts where its header does; the right-aligned last column is left out)."""
    import re

    lines = text.splitlines()
    header = next((i for i, line in enumerate(lines) if line.startswith("name ") and "output shape" in line), None)
    if header is None:
        return None
    head = lines[header]
    names = [part.strip() for part in re.split(r"\s{2,}", head) if part.strip()][:-1]
    starts = [head.index(n) for n in names]
    for line in lines[header + 1:]:
        if line.split(" ", 1)[0] != name:
            continue
        cells = {column: re.split(r"\s{2,}", line[start:].strip())[0] if line[start:start + 1].strip() else ""
                 for column, start in zip(names, starts)}
        if "calls" in line:  # "x2 calls (last shown)": the layer ran more than once
            cells["output shape"] += " (ran more than once)"
        return cells
    return None


def _innermost_frame(error: BaseException) -> str:
    frames = traceback.extract_tb(error.__traceback__)
    own = [fr for fr in frames if "/mechlens/" in fr.filename or "/activation_store/" in fr.filename]
    frame = (own or frames or [None])[-1]
    if frame is None:
        return "?"
    path = frame.filename
    for root in ("/mechlens/", "/activation_store/"):
        if root in path:
            path = root.strip("/") + "/" + path.split(root, 1)[1]
            break
    return f"{path}:{frame.lineno}"


def run_family(family: Family, workdir: str | Path) -> FamilyResult:
    """Run every check of ``family`` (in ``workdir``) on one CPU thread; never raises for a
    failing check, only records it."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    run = _Run(family, Path(workdir))
    run.workdir.mkdir(parents=True, exist_ok=True)
    try:
        try:
            run.build()
        except Exception as error:  # noqa: BLE001 - a family that does not build fails every check
            message = f"building the model or its reference forward failed: {first_line(error)}"
            run.result.outcomes = {c: Outcome("error", message) for c in STAGE_OF}
            return run.result
        run.run_check("layers", run.layers)
        for spatial in ("all", "random", "mean", "cls"):
            run.run_check(f"capture:{spatial}", run.capture(spatial))
        run.run_check("sae", run.sae, needs=("capture:all",))
        for method, short in (("gradcam", "gradcam"), ("integrated_gradients", "ig"), ("occlusion", "occlusion")):
            run.run_check(f"{short}:class", run.attribution(method, "class"))
            run.run_check(f"{short}:sae", run.attribution(method, "sae"), needs=("sae",))
            if short == "gradcam":
                run.run_check("gradcam:no-hints", run.attribution(method, "class", hints=False))
        run.run_check("featvis", run.featvis)
        run.run_check("tcav", run.tcav)
    finally:
        torch.set_num_threads(previous)
        run.result.total_seconds = time.perf_counter() - start
    return run.result


# ---------------------------------------------------------------------------- reporting
def markdown_table(results: list[FamilyResult], *, per_check: bool = False) -> str:
    """family x stage (or x check) as a markdown table: ``ok`` or the first line of what failed."""
    columns = [c for s in STAGES for c in CHECKS[s]] if per_check else list(STAGES)
    lines = ["| family | " + " | ".join(columns) + " | seconds |", "|---" * (len(columns) + 2) + "|"]
    for r in results:
        cells = []
        for col in columns:
            checks = (col,) if per_check else CHECKS[col]
            parts = []
            for c in checks:
                o = r.outcomes.get(c, Outcome("skipped", "not run"))
                expected = r.family.expect.get(c)
                prefix = "" if per_check else f"{c}: "
                if o.status == "ok" and expected:
                    parts.append(f"{prefix}ok, but the table expects the error {expected!r}")
                elif o.status != "ok":
                    tag = "expected " if expected and o.status == "error" and expected in o.message else ""
                    parts.append(f"{prefix}{tag}{o.status.upper()} {o.message}")
            cells.append("<br>".join(p.replace("|", "\\|") for p in parts) if parts else "ok")
        lines.append(f"| {r.family.id} | " + " | ".join(cells) + f" | {r.total_seconds:.1f} |")
    return "\n".join(lines)
