"""``mechlens attribute``: explain a feature on images with several methods; PNGs + JSON.

    mechlens attribute --model mechlens:small_cnn --weights w.safetensors --image a.png b.png \\
        --method gradcam ig smoothgrad --target class:3 --layer stage3 --out runs/attr

writes, per image, ``<image>_<method>.png`` (overlay with a colour bar) and
``<image>_methods.png`` (all methods side by side), plus ``summary.json``: the model, the feature
(``--target``: ``class:3``, ``channel:LAYER:17``, ``sae:PATH:123``...; default the predicted
class), and per method and image the raw map's shape, min / max / mean, and the method's
scalars (IG's completeness error, KernelSHAP's efficiency error, seconds). ``--save-maps`` also
writes the raw maps to ``maps.safetensors``.

``--layer`` names the layer of the CAMs (default: the last spatial stage); ``multilayer_cam`` fuses
the CAMs of several, ``--layers stage2 stage3`` (``--cam layercam``: the CAM fused, default
gradcam). A layer no method takes, or several for a one-layer CAM, is an error.

A NaN / infinite model output (or map) is an error; ``--allow-nonfinite`` writes the results
anyway, counts the affected images per method (``nonfinite_samples``) and writes ``null`` for
their non-finite numbers (``summary.json`` is always strict JSON).
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from mechlens.cli import options

__all__ = ["register", "run"]

DEFAULT_METHODS = ("saliency", "integrated_gradients", "gradcam")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``attribute`` sub-command."""
    parser = subparsers.add_parser(
        "attribute",
        help="attribution maps of a feature (class, channel, SAE latent...) on images",
        description=(
            "Explain a feature of MODEL on each image with one or more attribution methods and write "
            "overlays (PNG) and a JSON summary of the raw maps to the directory --out: per image "
            "<image>_<method>.png and <image>_methods.png, and summary.json (--save-maps: maps.safetensors)."
        ),
    )
    options.add_model_options(parser)
    parser.add_argument("--image", nargs="+", required=True, metavar="IMG", help="image files")
    parser.add_argument("--method", nargs="+", default=list(DEFAULT_METHODS), metavar="M",
                        help=f"methods (see mechlens.attribution.list_methods(); default: {' '.join(DEFAULT_METHODS)})")
    parser.add_argument("--target", default=None, metavar="FEATURE",
                        help="feature spec: class:3, channel:LAYER:17, neuron:LAYER:C:Y,X, sae:PATH:123, cav:PATH "
                             "(default: each image's predicted class)")
    add_layer_options(parser)
    parser.add_argument("--steps", type=int, default=50, help="integration steps (IG)")
    parser.add_argument("--samples", type=int, default=None, help="noise / perturbation samples (SmoothGrad, GradientSHAP, LIME, KernelSHAP)")
    parser.add_argument("--baseline", default=None, help="baseline for IG / occlusion / LIME / KernelSHAP: zeros, blur, uniform, or a number")
    parser.add_argument("--internal-batch-size", type=int, default=None, help="rows per forward pass for methods that multiply the batch")
    options.SEED.add(parser)
    parser.add_argument("--save-maps", action="store_true", help="also write the raw maps to maps.safetensors")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="keep results for NaN/Inf model outputs or maps (counted in summary.json, their "
                             "numbers written as null) instead of stopping with an error")
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def add_layer_options(parser: argparse.ArgumentParser) -> None:
    """``--layer/--layers`` (the shared one-or-more form) and ``--cam``, for commands that run CAMs."""
    options.LAYERS.add(parser, required=False)
    parser.add_argument("--cam", default=None, metavar="NAME",
                        help="the CAM that multilayer_cam fuses at each of --layers (default gradcam)")


def cam_layers(infos: list[Any], layers: list[str] | None, cam: str | None) -> tuple[str | None, dict[str, Any]]:
    """``(layer, multilayer)``: the one layer of the one-layer CAMs among ``infos`` (``None``: the
    default) and the keyword arguments of ``multilayer_cam`` (``layers=``, ``cam=``), from
    ``--layer/--layers`` and ``--cam``. A layer no method uses, several layers for a one-layer CAM,
    ``--cam`` without multilayer_cam and multilayer_cam without layers are one-line errors."""
    from mechlens.attribution import get_method

    names = [info.name for info in infos]
    multi = "multilayer_cam" in names
    single = [info.name for info in infos if info.needs_layer]
    if cam is not None:
        if not multi:
            raise ValueError("--cam names the CAM that multilayer_cam fuses; add --method multilayer_cam or drop --cam")
        info = get_method(cam)
        if not (info.needs_layer and info.kind == "layer"):
            raise ValueError(f"--cam {cam}: multilayer_cam fuses layer CAMs (gradcam, layercam, ...); {info.name!r} is not one")
        cam = info.name
    if multi and not layers:
        raise ValueError("multilayer_cam fuses the CAMs of several layers: pass --layers L1 L2 ... "
                         "(see `mechlens layers MODEL`)")
    layers = list(layers or [])
    if layers and not multi and not single:
        raise ValueError(f"--layers {' '.join(layers)}: none of the methods {', '.join(names)} takes a layer "
                         "(the CAMs and multilayer_cam do)")
    if len(layers) > 1 and single:
        hint = "" if multi else "; several layers are for multilayer_cam"
        raise ValueError(f"{', '.join(single)} {'takes' if len(single) == 1 else 'take'} one --layer but --layers names {len(layers)} "
                         f"({' '.join(layers)}){hint}: run them in a separate call with one --layer")
    multilayer = {"layers": layers, **({"cam": cam} if cam is not None else {})} if multi else {}
    return (layers[0] if len(layers) == 1 and single else None), multilayer


def load_images(paths: list[str], preprocessing: Any) -> Any:
    """Image files -> a batch ``[B, C, H, W]`` through the model's preprocessing."""
    import torch
    from PIL import Image

    transform = preprocessing.transform()
    mode = "L" if preprocessing.input_size[0] == 1 else "RGB"
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise FileNotFoundError(f"image {path!r} does not exist")
        with Image.open(path) as image:
            images.append(transform(image.convert(mode)))
    return torch.stack(images)


def _method_kwargs(info: Any, args: argparse.Namespace, layer: str | None,
                   multilayer: dict[str, Any] | None = None) -> dict[str, Any]:
    params = inspect.signature(info.fn).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if info.name == "multilayer_cam":  # its other keywords go to the CAM at every layer: pass only its own
        return dict(multilayer or {})
    wanted: dict[str, Any] = {}
    if info.needs_layer:
        wanted["layer"] = layer
    if args.steps is not None:
        wanted["n_steps"] = args.steps
    if args.samples is not None:
        wanted["n_samples"] = args.samples
    if args.baseline is not None:
        try:
            baseline: Any = float(args.baseline)
        except ValueError:
            baseline = args.baseline
        wanted["baselines" if "baselines" in params else "baseline"] = baseline
    if args.internal_batch_size is not None:
        wanted["internal_batch_size"] = args.internal_batch_size
    wanted["seed"] = args.seed
    if info.family == "smoothing":
        # n_steps / baseline belong to the base method only when it takes them
        wanted.pop("n_steps", None)
        wanted.pop("baseline", None)
        return wanted
    return {k: v for k, v in wanted.items() if k in params or (accepts_any and k in ("layer",))}


def _per_image(result: Any) -> list[dict[str, Any]]:
    rows = []
    maps = result.map.detach().float()
    for i in range(maps.shape[0]):
        m = maps[i]
        row: dict[str, Any] = {
            "feature": result.features[i], "feature_value": float(result.values[i]),
            "min": float(m.min()), "max": float(m.max()), "mean": float(m.mean()), "abs_mean": float(m.abs().mean()),
        }
        for key in ("completeness_error", "convergence_delta"):
            value = result.extras.get(key)
            if value is not None:
                row[key] = float(value[i])
        if i in result.extras.get("nonfinite_sample_index", ()):
            row["nonfinite"] = True
        rows.append(row)
    return rows


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens attribute``; returns the exit code."""
    import torch

    from activation_store.jsonutil import dumps
    from mechlens.attribution import attribute, get_method, resolve_target, suggest_cam_layer
    from mechlens.evaluation.plots import plot_methods, plot_overlay, save_figure

    stdout = out or sys.stdout
    infos = [get_method(name) for name in args.method]  # unknown names fail before any work
    layer, multilayer = cam_layers(infos, args.layer, args.cam)
    device = options.resolved_device(args)
    loaded = options.load_model_from_args(args, device=device)
    model, preprocessing = loaded.model, loaded.preprocessing
    inputs = load_images(args.image, preprocessing).to(device)
    target = resolve_target(model, inputs, args.target)
    if layer is None and any(info.needs_layer for info in infos):
        layer = suggest_cam_layer(model, preprocessing.input_size)
    directory = Path(args.out)
    directory.mkdir(parents=True, exist_ok=True)
    stems = [f"{i:02d}_{Path(p).stem}" if len(args.image) > 1 else Path(p).stem for i, p in enumerate(args.image)]
    with torch.no_grad():
        logits = model(inputs)
    summary: dict[str, Any] = {
        "model": loaded.spec, "weights": args.weights, "target": args.target or "predicted class",
        "layer": layer, **({"layers": multilayer["layers"]} if multilayer else {}), "input_shape": list(inputs.shape),
        "images": [
            {"path": str(p), "name": s, "feature": target.names[i],
             "predicted_class": int(logits[i].argmax()) if logits.dim() == 2 else None}
            for i, (p, s) in enumerate(zip(args.image, stems))
        ],
        "methods": {}, "files": [],
    }
    results = {}
    with options.progress_bar(args, total=len(infos), desc="attribute", unit="method") as bar:
        for info in infos:
            bar.set_postfix_str(info.name, refresh=False)
            started = time.perf_counter()
            result = attribute(model, inputs, target, method=info.name, allow_nonfinite=args.allow_nonfinite,
                               **_method_kwargs(info, args, layer, multilayer))
            seconds = time.perf_counter() - started
            results[info.name] = result
            entry = result.summary()
            entry["seconds"] = round(seconds, 4)
            entry["randomization_check"] = info.randomization
            entry["per_image"] = _per_image(result)
            summary["methods"][info.name] = entry
            for i, stem in enumerate(stems):
                fig = plot_overlay(inputs[i], result, index=i, preprocessing=preprocessing)
                summary["files"].append(str(save_figure(fig, directory / f"{stem}_{info.name}.png")))
            bar.update()
    for i, stem in enumerate(stems):
        fig = plot_methods(inputs[i], results, index=i, preprocessing=preprocessing, title=target.names[i])
        summary["files"].append(str(save_figure(fig, directory / f"{stem}_methods.png")))
    if args.save_maps:
        from safetensors.torch import save_file

        save_file({name: r.map.detach().float().cpu().contiguous() for name, r in results.items()}, str(directory / "maps.safetensors"))
        summary["files"].append(str(directory / "maps.safetensors"))
    nonfinite = {name: entry["nonfinite_samples"] for name, entry in summary["methods"].items()
                 if entry.get("nonfinite_samples")}
    summary["nonfinite_samples"] = nonfinite
    (directory / "summary.json").write_text(dumps(summary, indent=1))
    if args.json:
        options.print_json({"out": str(directory), "summary": str(directory / "summary.json"),
                            "methods": [i.name for i in infos], "images": len(stems), "files": summary["files"],
                            "nonfinite_samples": nonfinite}, stdout)
    else:
        print(f"{len(infos)} method(s) x {len(stems)} image(s): wrote {len(summary['files'])} files and summary.json "
              f"to {directory}", file=stdout)
    if nonfinite:
        counts = ", ".join(f"{name} {count}" for name, count in nonfinite.items())
        print(f"warning: non-finite model outputs or maps kept (--allow-nonfinite), images per method: {counts}",
              file=sys.stderr)
    return 0
