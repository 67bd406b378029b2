"""``mechlens sae train|eval|stats``: sparse autoencoders on a store layer.

    mechlens sae train --store S --layer L --arch topk --k 32 --width 4096 --out runs/sae
    mechlens sae train ... --k 16,32,64            # a sweep, trained in one pass (out/<name> each)
    mechlens sae train ... --arch relu --l1-coeff 2,5 --normalize-decoder

The architecture options are built from the config dataclasses of the registered architectures
(``mechlens.sae.config``): one option per field (``--aux-coeff`` for ``TopKConfig.aux_coeff``),
its help from the field's metadata; numbers take comma-separated values, swept in one pass.
    mechlens sae eval runs/sae/* --store S_test --plot fvu_l0.png [--model M --data D]
    mechlens sae stats runs/sae --store S --top-k 16
    mechlens sae export runs/sae/topk-w4096-k32 out/saelens   # SAELens format (and `sae import` back)
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import types
import typing
from pathlib import Path
from typing import Any

from mechlens.cli import options
from mechlens.sae.config import TrainConfig as _TrainConfig

TRAIN_DEFAULTS = _TrainConfig()  # the command-line defaults are the library's


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _learning_rates(text: str) -> str | list[float]:
    from mechlens.sae.config import LR_MODES

    if text in LR_MODES:
        return text
    try:
        rates = [float(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, comma-separated numbers or one of {LR_MODES}, "
                                         f"got {text!r}") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"learning rates must be positive, got {text!r}")
    return rates


def register(subparsers: argparse._SubParsersAction) -> None:
    sae = subparsers.add_parser("sae", help="train, evaluate and describe sparse autoencoders on a store layer")
    actions = sae.add_subparsers(dest="sae_command", metavar="ACTION")
    actions.required = True

    train = actions.add_parser(
        "train", help="train one SAE or a sweep (width x k / coefficient) in one pass",
        description="Train one SAE, or a sweep (every --arch x every value of the comma-separated architecture "
                    "options: --width, --k, --l1-coeff, ...) in one pass, on --layer of --store; writes the SAE to "
                    "--out (a sweep: --out/<name> per SAE).")
    options.STORE.add(train, required=True)
    train.add_argument("--layer", required=True, metavar="LAYER", help="layer of the store to train on")
    train.add_argument("--steps", type=int, default=10_000)
    train.add_argument("--batch-size", type=int, default=4096)
    train.add_argument("--lr", type=_learning_rates, default=None, metavar="LR",
                       help="learning rate: a number, comma-separated numbers (a sweep axis, like --width), 'rule' "
                            "(from each SAE's width) or 'auto' (a short range test on held-out chunks first); "
                            f"default {TRAIN_DEFAULTS.lr}")
    train.add_argument("--lr-warmup-fraction", type=float, default=TRAIN_DEFAULTS.lr_warmup_fraction,
                       help="fraction of the steps over which the learning rate warms up")
    train.add_argument("--dead-window", type=int, default=100_000, help="rows without firing before a latent is dead")
    train.add_argument("--b-dec-init", default="geometric_median", choices=("geometric_median", "mean", "zeros"))
    train.add_argument("--center", action="store_true", help="subtract the data mean before scaling")
    train.add_argument("--no-normalize", action="store_true", help="train on raw activations (no scalar normalisation)")
    options.SEED.add(train)
    train.add_argument("--checkpoint-dir", default=None, help="write resumable checkpoints here")
    train.add_argument("--checkpoint-every", type=int, default=1000,
                       help="steps between checkpoints in --checkpoint-dir (default 1000; 0: only at the end)")
    train.add_argument("--resume", action="store_true",
                       help="continue from --checkpoint-dir if it holds a checkpoint (without it, an existing "
                            "checkpoint is an error, never silently overwritten)")
    train.add_argument("--log", default=None, help="metrics log: .csv, or JSON lines for any other suffix")
    train.add_argument("--log-every", type=int, default=50)
    train.add_argument("--autocast", choices=("bf16",), default=None,
                       help="forward and losses in bfloat16 under torch.autocast (GPU); weights and Adam stay float32")
    options.add_run_options(train, device="auto", out={"required": True})
    _add_arch_options(train)
    train.set_defaults(handler=_train)

    evaluate = actions.add_parser(
        "eval", help="MSE, FVU, L0, dead/dense fractions; accuracy and KL when spliced in",
        description="Evaluate each SAE on rows of --store (ideally held-out rows); with --model and --data, also "
                    "spliced into the model on held-out images (accuracy, KL).")
    evaluate.add_argument("saes", nargs="+", help="saved SAE directories")
    options.STORE.add(evaluate, required=True)
    evaluate.add_argument("--layer", default=None, metavar="LAYER",
                          help="layer of the store (default: the layer each SAE was trained on)")
    evaluate.add_argument("--rows", type=int, default=100_000, help="rows evaluated (the dead-latent window)")
    evaluate.add_argument("--batch-size", type=int, default=4096)
    evaluate.add_argument("--samples", type=int, default=1000, help="images for the spliced evaluation")
    evaluate.add_argument("--plot", default=None, help="write a FVU-vs-L0 plot (PNG) of the SAEs")
    options.add_model_options(evaluate, required=False)
    options.add_data_options(evaluate)
    options.add_run_options(evaluate, device="cpu")
    evaluate.set_defaults(handler=_eval)

    export = actions.add_parser(
        "export", help="write a saved SAE in a peer's format (SAELens: sae_weights.safetensors + cfg.json)",
        description="Write the SAE saved in SAE_DIR to OUT_DIR in --format (saelens: the directory "
                    "sae_lens.SAE.load_from_disk reads), computing the same latents; an architecture the format "
                    "cannot represent exactly is an error.")
    export.add_argument("sae", metavar="SAE_DIR", help="saved mechlens SAE directory")
    export.add_argument("out", metavar="OUT_DIR", help="directory to write")
    export.add_argument("--format", default="saelens", choices=("saelens",), help="peer format (default: saelens)")
    options.JSON.add(export)
    export.set_defaults(handler=_export)

    imported = actions.add_parser(
        "import", help="convert a SAELens SAE directory into a mechlens SAE (for eval, stats, atlas)",
        description="Read the SAE SAELens saved in PEER_DIR (cfg.json + sae_weights.safetensors) and save the "
                    "mechlens SAE computing the same latents to OUT_DIR; a configuration mechlens cannot represent "
                    "exactly is an error.")
    imported.add_argument("peer", metavar="PEER_DIR", help="SAELens SAE directory")
    imported.add_argument("out", metavar="OUT_DIR", help="directory to write the mechlens SAE to")
    options.JSON.add(imported)
    imported.set_defaults(handler=_import)

    stats = actions.add_parser(
        "stats", help="per-latent frequency, mean, max and top-k exemplars (the atlas's input)",
        description="Per-latent frequency, mean, max and top-k exemplars of SAE over --store, written to --out "
                    "(default: the SAE directory), where `mechlens atlas` finds them.")
    stats.add_argument("sae", help="saved SAE directory (the statistics are written next to it)")
    options.STORE.add(stats, required=True)
    stats.add_argument("--layer", default=None, metavar="LAYER",
                       help="layer of the store (default: the layer the SAE was trained on)")
    stats.add_argument("--top-k", type=int, default=16)
    stats.add_argument("--all-rows", action="store_true",
                       help="exemplars may repeat an image (default: k distinct images, each at its best position)")
    stats.add_argument("--rows", type=int, default=None, help="only the first N rows of the store")
    stats.add_argument("--batch-size", type=int, default=4096)
    options.add_run_options(stats, device="cpu", out={"default": None})
    stats.set_defaults(handler=_stats)

    compare = actions.add_parser(
        "compare", help="stability across seeds: pairwise mean matched decoder cosine (Hungarian)",
        description="Match the decoder directions of every pair of saved SAEs one to one (Hungarian algorithm, "
                    "signed cosine) and print the mean matched cosine and the fraction of pairs above --threshold.")
    compare.add_argument("saes", nargs="+", metavar="SAE", help="saved SAE directories (at least two)")
    compare.add_argument("--threshold", type=float, default=0.7, help="cosine a matched pair must exceed (default 0.7)")
    options.add_run_options(compare, device="cpu", progress=False)
    compare.set_defaults(handler=_compare)


# ----------------------------------------------------------------------------- architecture options
_DEST = "sae_"  # dest prefix of the options made from config fields


def _strings(text: str) -> list[str]:
    return [v for v in text.split(",") if v]


@dataclasses.dataclass
class _ArchOption:
    """One command-line option made from the config field ``name`` of one or more architectures."""

    name: str
    kind: type
    archs: list[str]
    helps: list[str]
    defaults: list[Any]

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def add(self, group: Any, cli_default: Any) -> None:
        defaults = {repr(d) for d in self.defaults}
        shown = (f"default: {self.defaults[0]!r}" if len(defaults) == 1 and self.defaults[0] is not dataclasses.MISSING
                 else "default: per architecture")
        if cli_default is not None:
            shown = f"default: {cli_default}"
        text = f"{self.helps[0] if self.helps else self.name} [{', '.join(self.archs)}] ({shown})".replace("%", "%%")
        if self.kind is bool:
            group.add_argument(self.flag, dest=_DEST + self.name, action=argparse.BooleanOptionalAction,
                               default=None, help=text)
            return
        parse = {int: _ints, float: _floats, str: _strings}[self.kind]
        group.add_argument(self.flag, dest=_DEST + self.name, type=parse, metavar=self.kind.__name__.upper(),
                           default=[cli_default] if cli_default is not None else None,
                           help=text + "; comma-separated values: a sweep")


def _field_kind(annotation: Any, default: Any) -> type | None:
    """``int`` / ``float`` / ``str`` / ``bool`` of a field annotated with it (or ``X | None``).
    A ``tuple[int, ...]`` field (Matryoshka's ``group_sizes``) is ``str``: one SAE's value is its
    integers joined by ``+`` (``64+192+768``; commas separate the values of a sweep, as for every
    option), which the config class parses."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if args and typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0] if len(args) == 1 else None
    if typing.get_origin(annotation) is tuple and typing.get_args(annotation) in ((int, ...),):
        return str
    if annotation in (int, float, str, bool):
        return annotation
    if annotation is None and default is not dataclasses.MISSING and type(default) in (int, float, str, bool):
        return type(default)
    return None


def _arch_options() -> tuple[dict[str, _ArchOption], dict[str, Any]]:
    """The options made from the fields of every registered config class, and their CLI defaults."""
    from mechlens.sae.config import _CONFIG_CLASSES

    found: dict[str, _ArchOption] = {}
    cli_defaults: dict[str, Any] = {}
    for arch, cls in sorted(_CONFIG_CLASSES.items()):
        try:
            hints = typing.get_type_hints(cls)
        except Exception:  # an annotation that does not resolve: fall back on the defaults' types
            hints = {}
        for f in dataclasses.fields(cls):
            if not f.init or f.metadata.get("cli", True) is False:
                continue
            kind = _field_kind(hints.get(f.name), f.default)
            if kind is None:
                continue
            entry = found.setdefault(f.name, _ArchOption(f.name, kind, [], [], []))
            entry.archs.append(arch)
            entry.defaults.append(f.default)
            if f.metadata.get("help") and f.metadata["help"] not in entry.helps:
                entry.helps.append(f.metadata["help"])
            if "cli_default" in f.metadata:
                cli_defaults.setdefault(f.name, f.metadata["cli_default"])
    return found, cli_defaults


def _add_arch_options(parser: argparse.ArgumentParser) -> None:
    from mechlens.sae.config import _CONFIG_CLASSES

    group = parser.add_argument_group(
        "architecture", "--arch and one option per field of the architectures' configs (mechlens.sae.config); "
        "[...] names the architectures that take it")
    group.add_argument("--arch", default="topk",
                       help=f"architecture(s), comma-separated: {', '.join(sorted(_CONFIG_CLASSES))} (default: topk)")
    taken = set(parser._option_string_actions)
    found, cli_defaults = _arch_options()
    for name, entry in found.items():
        if entry.flag not in taken:  # a field named like a training option is not offered
            entry.add(group, cli_defaults.get(name))


def _configs(args: argparse.Namespace) -> list[Any]:
    from mechlens.sae.config import config_class

    found, _ = _arch_options()
    given = {name: getattr(args, _DEST + name) for name in found if getattr(args, _DEST + name, None) is not None}
    archs = [a for a in args.arch.split(",") if a]
    classes = [config_class(arch) for arch in archs]
    used: set[str] = set()
    configs = []
    for cls in classes:
        names = [f.name for f in dataclasses.fields(cls) if f.name in given]
        used.update(names)
        sweeps = [given[n] if isinstance(given[n], list) else [given[n]] for n in names]
        for values in itertools.product(*sweeps):
            configs.append(cls(**dict(zip(names, values))))
    unused = sorted(set(given) - used - {"width"})
    if unused and archs:
        flags = ", ".join(f"{found[n].flag} ({'/'.join(found[n].archs)})" for n in unused)
        raise ValueError(f"{flags} does not apply to --arch {args.arch}")
    if not configs:
        raise ValueError("no SAE to train: --arch is empty")
    return configs


def _train(args: argparse.Namespace) -> int:
    from mechlens.sae import TrainConfig, train_sae

    configs = _configs(args)
    lr: Any = TRAIN_DEFAULTS.lr if args.lr is None else args.lr
    if isinstance(lr, list):
        if len(lr) > 1:  # a sweep axis: each config at each rate
            configs = [config.replace(lr=rate) for config in configs for rate in lr]
        lr = lr[0]
    train = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=lr, lr_warmup_fraction=args.lr_warmup_fraction,
                        dead_window=args.dead_window, b_dec_init=args.b_dec_init, center=args.center,
                        normalize=not args.no_normalize, seed=args.seed, device=options.requested_device(args),
                        log_every=args.log_every, autocast=args.autocast,
                        checkpoint_every=args.checkpoint_every)
    result = train_sae(args.store, args.layer, configs, train, out=args.out, checkpoint_dir=args.checkpoint_dir,
                       resume=args.resume, progress=options.wants_progress(args), log_path=args.log)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun every rank holds the same result: rank 0 reports it
        return 0
    if args.json:
        saes = [{"path": str(path), **metrics, "peak_lr": sae.config.lr}
                for path, sae, metrics in zip(result.paths, result.saes, result.metrics)]
        options.print_json({"saes": saes, "steps": result.steps, "rows": result.rows,
                            "rows_per_second": result.rows_per_second, "metrics_over_last_steps": train.log_every,
                            "lr_search": result.lr_search.to_json() if result.lr_search is not None else None})
        return 0
    if result.lr_search is not None:
        print(result.lr_search)
    print(f"trained {len(result.saes)} SAE(s) for {result.steps} steps on {result.rows:,} rows "
          f"({result.rows_per_second:,.0f} rows/s)")
    for path, metrics in zip(result.paths, result.metrics):
        print(f"  {path}  fvu {metrics.get('fvu', float('nan')):.4f}  l0 {metrics.get('l0', float('nan')):.2f}  "
              f"dead {100 * metrics.get('dead_fraction', float('nan')):.1f}% (last {train.log_every} training steps)")
    return 0


def _held_out(sae_path: str, store: str) -> bool | None:
    """False when the SAE's metadata names ``store`` as its training store, True when it names
    another, None when it names none."""
    from mechlens.sae.modules import read_config

    trained_on = read_config(sae_path)[1].get("store")
    if not trained_on:
        return None
    return Path(trained_on).resolve() != Path(store).resolve()


def _eval(args: argparse.Namespace) -> int:
    from mechlens.sae import SAE, evaluate_store, plot_fvu_vs_l0, spliced_metrics

    if (args.model is None) != (args.data is None):
        raise ValueError("the spliced evaluation needs both --model and --data")
    device = options.resolved_device(args)
    model = dataset = None
    if args.model is not None:
        from mechlens.data.adapters import build_dataset

        model = options.load_model_from_args(args, device=device)
        dataset = build_dataset(args.data, image_size=model.preprocessing.image_size, **options.dataset_options(args))
    elif args.resize or args.on_unreadable:
        raise ValueError("--resize / --on-unreadable apply to the spliced evaluation: give --model and --data")
    report = []
    points = []
    with options.progress_bar(args, total=len(args.saes), desc="sae eval", unit="sae") as bar:
        for path in args.saes:
            sae = SAE.load(path, device=device)
            metrics = evaluate_store(sae, args.store, args.layer, max_rows=args.rows, batch_size=args.batch_size)
            held_out = _held_out(path, args.store)
            if held_out is False:
                import warnings

                warnings.warn(f"{path} was trained on {args.store}: these are training-set figures, not held-out "
                              "ones (evaluate on a store captured from other images)", stacklevel=1)
            entry: dict[str, Any] = {"sae": str(path), "arch": sae.config.arch, "width": sae.width,
                                     "layer": args.layer or sae.config.layer, "held_out": held_out, **metrics.to_json()}
            if model is not None:
                spliced = spliced_metrics(model, sae, dataset, layer=args.layer, max_samples=args.samples)
                entry["spliced"] = spliced.to_json()
            report.append(entry)
            points.append((Path(path).name, metrics))
            bar.update()
    if not args.json:
        _print_eval_table(report, options.model_spec(args) if model is not None else None)
    if args.plot:
        plot_fvu_vs_l0(points, args.plot, groups=[entry["arch"] for entry in report])
        if not args.json:
            print(f"plot: {args.plot}")
    if args.json:
        options.print_json(report if len(report) > 1 else report[0])
    return 0


def _print_eval_table(report: list[dict[str, Any]], model: str | None) -> None:
    """One row per SAE: reconstruction and sparsity, then (spliced into ``model``) accuracy,
    KL and cross-entropy recovered."""
    columns = ["sae", "arch", "width", "rows", "L0", "FVU", "dead %", "dense %"]
    if model is not None:
        columns += ["acc clean", "acc spliced", "Δ pts", "KL", "CE rec."]
    lines = []
    for entry in report:
        line = [entry["sae"], entry["arch"], str(entry["width"]), f"{entry['rows']:,}", f"{entry['l0']:.2f}",
                f"{entry['fvu']:.4f}", f"{100 * entry['dead_fraction']:.1f}", f"{100 * entry['dense_fraction']:.1f}"]
        if model is not None:
            spliced = entry["spliced"]
            line += [f"{100 * spliced['clean_accuracy']:.1f}", f"{100 * spliced['spliced_accuracy']:.1f}",
                     f"{100 * spliced['accuracy_change']:+.1f}", f"{spliced['kl']:.4g}", f"{spliced['ce_recovered']:.3f}"]
        lines.append(line)
    widths = [max(len(c), *(len(line[i]) for line in lines)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    for line in lines:
        print("  ".join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths))))
    if model is not None:
        print(f"(spliced into {model}: accuracy in %, KL of the output distribution in nats, CE rec. = fraction of "
              "cross-entropy recovered relative to all latents off)")


def _stats(args: argparse.Namespace) -> int:
    from mechlens.sae import SAE, feature_statistics

    sae = SAE.load(args.sae, device=options.resolved_device(args))  # under torchrun: the rank's GPU
    stats = feature_statistics(sae, args.store, args.layer, top_k=args.top_k, distinct_samples=not args.all_rows,
                               batch_size=args.batch_size, max_rows=args.rows, progress=options.wants_progress(args))
    out = stats.save(args.out or args.sae)
    if stats.rank != 0:  # every rank holds the same statistics; rank 0 wrote and reports them
        return 0
    dead = float((stats.frequency == 0).mean())
    if args.json:
        options.print_json({"out": str(out), "latents": sae.width, "rows": stats.rows, "layer": stats.layer,
                            "dead_fraction": dead, "median_frequency": _median(stats.frequency),
                            "top_k": stats.top_k, "distinct_samples": stats.distinct_samples})
        return 0
    print(f"feature statistics of {sae.width} latents over {stats.rows:,} rows of {stats.layer!r} -> {out}")
    print(f"  never fire: {100 * dead:.1f}%  median frequency {float(_median(stats.frequency)):.4g}  "
          f"top-{stats.top_k} exemplars per latent ({'distinct images' if stats.distinct_samples else 'any rows'})")
    return 0


def _median(values: Any) -> float:
    import numpy as np

    return float(np.median(values))


def _compare(args: argparse.Namespace) -> int:
    from mechlens.sae import SAE, seed_stability

    if len(args.saes) < 2:
        raise ValueError(f"compare needs at least two SAE directories, got {len(args.saes)}")
    device = options.resolved_device(args)
    result = seed_stability([SAE.load(path, device=device) for path in args.saes], names=args.saes,
                            threshold=args.threshold)
    if args.json:
        options.print_json(result.to_json())
    else:
        print(result)
    return 0


def _export(args: argparse.Namespace) -> int:
    from mechlens.sae import SAE, export_saelens

    sae = SAE.load(args.sae)
    out = export_saelens(sae, args.out)
    if args.json:
        options.print_json({"out": str(out), "format": args.format, "arch": sae.config.arch, "width": sae.width,
                            "d_in": sae.d_in})
        return 0
    print(f"{args.sae} ({sae.config.arch}, {sae.width} latents) -> {out} (sae_lens.SAE.load_from_disk reads it)")
    return 0


def _import(args: argparse.Namespace) -> int:
    from mechlens.sae import import_saelens

    sae = import_saelens(args.peer)
    out = sae.save(args.out, metadata={"imported_from": str(args.peer), "peer_format": "saelens"})
    if args.json:
        options.print_json({"out": str(out), "arch": sae.config.arch, "width": sae.width, "d_in": sae.d_in,
                            "layer": sae.config.layer})
        return 0
    print(f"{args.peer} (SAELens) -> {out}: mechlens {sae.config.arch} SAE, {sae.width} latents on {sae.d_in}-dim rows"
          + (f", layer {sae.config.layer!r}" if sae.config.layer else ""))
    return 0
