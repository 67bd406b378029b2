"""``mechlens evaluate``: which attribution methods to trust on this model.

    mechlens evaluate --model runs/shapes --data 'synthetic:shapes?n=64&split=test' \\
        --methods saliency,gradcam,occlusion --images 16 --out runs/evaluate

runs the randomization check, deletion / insertion against a random map, the pointing game and
IoU (when the data knows where the objects are: synthetic shapes do), the stability under small
shifts and the agreement between methods, for every method on the first ``--images`` images of
``--data``; prints the table and a verdict per method (trust / use with care / do not trust) with
the advice, and writes ``report.csv``, ``report.json`` and ``report.png`` to ``--out``
(:func:`mechlens.evaluation.report.evaluate_methods`).

Two expensive checks are opt-in, named in ``--checks``: ``manipulation`` fine-tunes a copy of the
model so that the maps of ``--attack`` (default gradcam when it is among the methods) move to the
image border while the predictions stay (``--manipulation-steps``), and measures how far every
method's maps moved on held-out images (``--manipulation-held-out``: the next images of
``--data``, as many as ``--images`` by default); ``roar`` removes each method's top pixels from the train and test splits of
``--data`` (synthetic shapes and digits have them), retrains a re-initialised copy of the model
(``--roar-epochs``) at ``--roar-fractions`` and compares the accuracy drop with a random ranking;
its maps and runs are cached under ``--cache-dir`` (default ``OUT/roar_cache``), so a rerun resumes.

``--layer`` names the CAMs' layer; ``multilayer_cam`` takes ``--layers L1 L2 ...`` (and ``--cam``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, TextIO

from mechlens.cli import options
from mechlens.cli.attribute import add_layer_options, cam_layers

__all__ = ["register", "run"]

DEFAULT_METHODS = "saliency,integrated_gradients,gradcam,occlusion"


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``evaluate`` sub-command."""
    parser = subparsers.add_parser(
        "evaluate",
        help="which attribution methods to trust on this model: sanity checks and faithfulness, a verdict per method",
        description=(
            "Run the model-parameter randomization check, deletion / insertion against a random map, the pointing "
            "game and IoU (when the data has object masks), stability under 2-pixel shifts and the agreement between "
            "methods for every --methods on the first --images images of --data; print the table and a verdict per "
            "method, and write report.csv, report.json and report.png to --out."
        ),
    )
    options.add_model_options(parser)
    options.add_data_options(parser, required=True)
    parser.add_argument("--methods", "--method", dest="methods", nargs="+", default=[DEFAULT_METHODS], metavar="M",
                        help=f"methods, comma- or space-separated (see mechlens.attribution.list_methods(); "
                             f"default: {DEFAULT_METHODS})")
    parser.add_argument("--images", type=int, default=16, metavar="N", help="images of --data to evaluate on (default 16)")
    parser.add_argument("--target", default=None, metavar="FEATURE",
                        help="feature spec: class:3, channel:LAYER:17, ... (default: each image's predicted class)")
    add_layer_options(parser)
    parser.add_argument("--checks", default=None, metavar="C,C",
                        help="checks to run, comma-separated (default: all but the expensive manipulation and roar, "
                             "which run only when named here)")
    parser.add_argument("--attack", default=None, metavar="M,M",
                        help="methods the manipulation check attacks (default: gradcam when among --methods, else "
                             "the first attackable one)")
    parser.add_argument("--manipulation-steps", type=int, default=None, metavar="N",
                        help="fine-tuning steps of the manipulation check (default 300)")
    parser.add_argument("--manipulation-held-out", type=int, default=None, metavar="N",
                        help="images of --data after the evaluated ones on which the manipulation check measures "
                             "(default: as many as --images; 0: measure on the images it fine-tunes on)")
    parser.add_argument("--roar-epochs", type=int, default=None, metavar="N",
                        help="epochs of each ROAR retrain (default 8)")
    parser.add_argument("--roar-fractions", default=None, metavar="F,F",
                        help="fractions of pixels ROAR removes (default 0.1,0.3,0.5,0.7,0.9)")
    parser.add_argument("--cache-dir", default=None, metavar="DIR",
                        help="where ROAR caches its maps and retrains, to resume (default: OUT/roar_cache)")
    parser.add_argument("--masks", default="auto", metavar="auto|object|none|FILE.npy",
                        help="ground truth for the pointing game: the dataset's object masks (auto: when it has them), "
                             "none, or an [N, H, W] boolean .npy file (default auto)")
    parser.add_argument("--steps", type=int, default=None, help="integration steps (IG)")
    parser.add_argument("--samples", type=int, default=None, help="noise / perturbation samples (SmoothGrad, LIME, ...)")
    parser.add_argument("--internal-batch-size", type=int, default=None,
                        help="rows per forward pass for methods that multiply the batch")
    parser.add_argument("--deletion-steps", type=int, default=16, help="points of the deletion / insertion curves")
    options.SEED.add(parser)
    options.add_run_options(parser, device="cpu", out={"required": True})
    parser.set_defaults(handler=run)


def parse_methods(values: list[str]) -> list[str]:
    """``["saliency,gradcam", "occlusion"]`` -> the registered names, in order; an unknown name is
    a one-line error listing the closest ones."""
    from mechlens.attribution import get_method

    names = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if not names:
        raise ValueError("--methods names no method; e.g. --methods saliency,gradcam,occlusion")
    resolved = [get_method(name).name for name in names]
    return list(dict.fromkeys(resolved))


def _method_kwargs(methods: list[str], args: argparse.Namespace,
                   multilayer: dict[str, Any] | None = None) -> dict[str, dict[str, Any]]:
    import inspect

    from mechlens.attribution import get_method

    out = {}
    for name in methods:
        info = get_method(name)
        if info.name == "multilayer_cam":  # its other keywords go to the CAM at every layer
            out[name] = dict(multilayer or {})
            continue
        params = inspect.signature(info.fn).parameters
        wanted = {"n_steps": args.steps, "n_samples": args.samples, "internal_batch_size": args.internal_batch_size}
        chosen = {k: v for k, v in wanted.items() if v is not None and (k in params or info.family == "smoothing")}
        if info.family == "smoothing":
            chosen.pop("n_steps", None)
        if chosen:
            out[name] = chosen
    return out


def _masks(args: argparse.Namespace, dataset: Any, count: int, size: tuple[int, int]) -> Any:
    import numpy as np
    import torch

    choice = args.masks
    if choice == "none":
        return None
    if choice in ("auto", "object"):
        if callable(getattr(dataset, "object_masks", None)):
            masks = dataset.object_masks(list(range(count)))
            return masks if tuple(masks.shape[-2:]) == tuple(size) else None
        if choice == "object":
            raise ValueError(f"--masks object: the dataset {type(dataset).__name__} has no object masks; "
                             "give an [N, H, W] .npy file or --masks none")
        return None
    path = Path(choice)
    if not path.is_file():
        raise ValueError(f"--masks {choice!r} is neither auto, object, none nor an existing .npy file")
    masks = torch.from_numpy(np.load(path)).bool()
    if masks.dim() != 3 or masks.shape[0] < count or tuple(masks.shape[-2:]) != tuple(size):
        raise ValueError(f"--masks {choice} holds {tuple(masks.shape)}; expected at least [{count}, {size[0]}, {size[1]}]")
    return masks[:count]


def _opt_in(args: argparse.Namespace, checks: list[str] | None, methods: list[str]) -> dict[str, Any]:
    """The keyword arguments of the opt-in checks; their flags without the check are errors."""
    from mechlens.evaluation.report import default_attack

    chosen = set(checks or ())
    kwargs: dict[str, Any] = {}
    manipulation_flags = {"--attack": args.attack, "--manipulation-steps": args.manipulation_steps,
                          "--manipulation-held-out": args.manipulation_held_out}
    roar_flags = {"--roar-epochs": args.roar_epochs, "--roar-fractions": args.roar_fractions,
                  "--cache-dir": args.cache_dir}
    for check, flags in (("manipulation", manipulation_flags), ("roar", roar_flags)):
        given = [flag for flag, value in flags.items() if value is not None]
        if given and check not in chosen:
            raise ValueError(f"{', '.join(given)} configure(s) the {check} check, which is not run: add it to --checks")
    if "manipulation" in chosen:
        if args.attack is not None:
            kwargs["manipulation_attack"] = [a.strip() for a in args.attack.split(",") if a.strip()]
        else:
            default_attack(methods)  # none attackable: the one-line error, before any work
        if args.manipulation_steps is not None:
            if args.manipulation_steps < 1:
                raise ValueError("--manipulation-steps must be at least 1")
            kwargs["manipulation_options"] = {"steps": args.manipulation_steps}
        if args.manipulation_held_out is not None and args.manipulation_held_out < 0:
            raise ValueError("--manipulation-held-out must be 0 (measure on the fine-tuning images) or more")
    if "roar" in chosen:
        kwargs["cache_dir"] = Path(args.cache_dir) if args.cache_dir is not None else Path(args.out) / "roar_cache"
        if args.roar_fractions is not None:
            try:
                kwargs["roar_fractions"] = [float(f) for f in args.roar_fractions.split(",") if f.strip()]
            except ValueError:
                raise ValueError(f"--roar-fractions {args.roar_fractions!r}: give numbers in (0, 1), e.g. 0.1,0.5") from None
        if args.roar_epochs is not None and args.roar_epochs < 1:
            raise ValueError("--roar-epochs must be at least 1")
    return kwargs


def _held_out(args: argparse.Namespace, dataset: Any, count: int) -> range:
    """Indices of the images the manipulation check measures on: the ones after the evaluated
    ``count`` (the fine-tune sees only those), as many as asked; refused when --data has too few."""
    wanted = count if args.manipulation_held_out is None else args.manipulation_held_out
    if wanted == 0:
        return range(0)
    if len(dataset) < count + wanted:
        raise ValueError(f"the manipulation check measures on {wanted} held-out images after the {count} evaluated "
                         f"ones, but --data has {len(dataset)}: use a larger dataset, a smaller "
                         "--manipulation-held-out, or --manipulation-held-out 0 to measure on the fine-tuning images")
    return range(count, count + wanted)


def _roar_source(spec: str) -> tuple[str, str]:
    """``(head, query)`` of a ``--data`` spec with labelled train/test splits; others are refused."""
    head, _, query = spec.partition("?")
    if not (head.startswith("synthetic:") or head == "digits"):
        raise ValueError(f"--checks roar retrains on the train split of --data and tests on its test split, but "
                         f"{spec!r} has no labelled train/test splits: use synthetic:shapes or digits (or "
                         "evaluate_methods(..., roar_data=(train, test)) from Python)")
    return head, query


def _roar_data(args: argparse.Namespace, image_size: Any) -> tuple[Any, Any]:
    """The train and test splits of ``--data`` (its own ``split=`` dropped)."""
    from mechlens.data import build_dataset

    head, query = _roar_source(args.data)
    kept = [part for part in query.split("&") if part and not part.startswith("split=")]
    spec = head + ("?" + "&".join(kept) if kept else "")
    return tuple(build_dataset(spec, image_size=image_size, split=split, **options.dataset_options(args))
                 for split in ("train", "test"))


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens evaluate``; returns the exit code."""
    import torch

    from mechlens.attribution import get_method
    from mechlens.data import build_dataset
    from mechlens.evaluation.report import CHECKS, evaluate_methods

    stdout = out or sys.stdout
    methods = parse_methods(args.methods)  # unknown names fail before any work
    layer, multilayer = cam_layers([get_method(m) for m in methods], args.layer, args.cam)
    checks = None
    if args.checks is not None:
        checks = [c.strip() for c in args.checks.split(",") if c.strip()]
        unknown = [c for c in checks if c not in CHECKS]
        if unknown:
            import difflib

            close = [m for c in unknown for m in difflib.get_close_matches(c, list(CHECKS), n=2)]
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown check(s) {', '.join(unknown)}.{hint} Available: {', '.join(CHECKS)}")
    if args.images < 1:
        raise ValueError("--images must be at least 1")
    opt_in = _opt_in(args, checks, methods)
    wants_roar = "roar" in (checks or ())
    if wants_roar:  # a data source without labelled splits fails before the model loads
        _roar_source(args.data)
    device = options.resolved_device(args)
    loaded = options.load_model_from_args(args, device=device)
    dataset = build_dataset(args.data, image_size=loaded.preprocessing.image_size, **options.dataset_options(args))
    if wants_roar:
        from mechlens.evaluation.roar import RetrainRecipe

        opt_in["roar_data"] = _roar_data(args, loaded.preprocessing.image_size)
        recipe = {"device": device, **({"epochs": args.roar_epochs} if args.roar_epochs is not None else {})}
        opt_in["roar_recipe"] = RetrainRecipe.from_model(loaded, model_seed=args.seed, seed=args.seed, **recipe)
    count = min(args.images, len(dataset))
    images = torch.stack([torch.as_tensor(dataset[i][0]).float() for i in range(count)]).to(device)
    masks = _masks(args, dataset, count, tuple(images.shape[-2:]))
    if "manipulation" in (checks or ()):
        held_out = _held_out(args, dataset, count)
        if held_out:
            extra = torch.stack([torch.as_tensor(dataset[i][0]).float() for i in held_out]).to(device)
            opt_in.setdefault("manipulation_options", {})["eval_images"] = extra
    report = evaluate_methods(loaded, images, args.target, methods, masks=masks, layer=layer, checks=checks,
                              method_kwargs=_method_kwargs(methods, args, multilayer),
                              deletion_steps=args.deletion_steps, seed=args.seed,
                              progress=options.wants_progress(args), **opt_in)
    files = report.save(args.out)
    if args.json:
        options.print_json({"out": str(args.out), "summary": report.summary, "verdicts": report.verdicts,
                            "rows": report.table(), "files": [str(f) for f in files]}, stdout)
    else:
        print(report.text(), file=stdout)
        print(f"\nwrote {', '.join(f.name for f in files)} to {args.out}", file=stdout)
    return 0
