"""``mechlens capture``: stream layer activations of a model over a dataset into a store.

Runs as one process or under ``torchrun --nproc_per_node=N -m mechlens capture ...`` (each rank
writes its own shard). Rerunning the same command on the same ``--out`` resumes.
"""
from __future__ import annotations

import argparse
import signal
import sys
from typing import Any, TextIO

from mechlens.cli import options

__all__ = ["config_from_args", "register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``capture`` sub-command."""
    from activation_store import CommitPolicy
    from mechlens.capture.config import SPATIAL_MODES, STORE_DTYPES

    parser = subparsers.add_parser(
        "capture",
        help="capture layer activations over a dataset into an activation store",
        description=(
            "Run --model over --data and write the activations of each --layer (names or globs, e.g. "
            "'layer3' 'blocks.*') into the store at --out (created, or resumed after the last committed "
            "image). --device auto: cuda:LOCAL_RANK under torchrun, cuda when available, else cpu."
        ),
    )
    options.add_model_options(parser)
    options.LAYERS.add(parser, required=False)  # or the config file's "layers"
    options.add_data_options(parser, required=True)
    # Defaults None: a flag left out takes the --config file's value, else CaptureConfig's default.
    parser.add_argument("--config", metavar="FILE.json", default=None,
                        help="a CaptureConfig as JSON (a store's provenance.capture.config reruns that capture); "
                             "flags given explicitly override it (--seed and --device only when they differ "
                             "from their defaults)")
    parser.add_argument("--spatial", choices=SPATIAL_MODES, default=None,
                        help="all positions, k random positions, mean/max pooled or the CLS token (default: all)")
    parser.add_argument("--k", type=int, default=None, help="positions per image for --spatial random (default 16)")
    parser.add_argument("--dtype", choices=STORE_DTYPES, default=None, help="stored dtype (default: float16)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per forward (default: 64)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: cores - 1, at most 8)")
    parser.add_argument("--autocast", choices=("auto", "bf16", "fp16", "none"), default=None,
                        help="mixed precision of the forward (default auto: bf16 on CUDA, off on CPU)")
    parser.add_argument("--commit-every", default=None, metavar="SPEC",
                        help="commit (make rows durable for a resume) after this much work, whichever comes first: "
                             f"e.g. '5s', '2000rows', '256MB', '10s,512MiB' (default: {CommitPolicy()})")
    parser.add_argument("--allow-nonfinite", action="store_true",
                        help="store rows holding NaN/Inf and count them (default: stop at the first such batch)")
    parser.add_argument("--layout", default=None, metavar="LAYOUT[,LAYER=LAYOUT...]",
                        help="layout of layers the model does not describe (see `mechlens layers`: layout '?'): "
                             "nchw, nhwc, nlc, ncl or nc, for all layers or per layer, e.g. 'blocks.3=nhwc'")
    parser.add_argument("--num-prefix-tokens", type=int, default=None, metavar="N",
                        help="CLS/register tokens at the start of token maps, for a model that does not declare them")
    parser.add_argument("--max-images", type=int, default=None, help="capture only the first N images")
    options.SEED.add(parser)
    parser.add_argument("--backend", choices=("zarr", "hdf5"), default=None, help="store backend (default: zarr)")
    parser.add_argument("--compression", default=None, help="e.g. zstd (default: none)")
    options.add_run_options(parser, device="auto", out={"required": True, "metavar": "STORE"})
    parser.set_defaults(handler=run)


def _terminate(signum: int, frame: Any) -> None:
    # `kill` (SIGTERM) unwinds like Ctrl-C, so the rows of finished batches are committed.
    raise KeyboardInterrupt(f"signal {signum}")


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~mechlens.capture.CaptureConfig` of the command line: the ``--config`` file
    (if any) with the flags that were given on top of it."""
    import json
    from pathlib import Path

    from mechlens.capture.config import CaptureConfig, check_keys
    from mechlens.features.layout import parse_layout_option

    given: dict[str, Any] = {
        "layers": args.layer, "spatial": args.spatial, "k": args.k, "dtype": args.dtype,
        "batch_size": args.batch_size, "num_workers": args.workers, "max_images": args.max_images,
        "commit_every": args.commit_every, "layout": parse_layout_option(args.layout),
        "num_prefix_tokens": args.num_prefix_tokens, "backend": args.backend, "compression": args.compression,
        "autocast": args.autocast, **options.dataset_options(args), "device": options.requested_device(args),
        "nonfinite": "count" if args.allow_nonfinite else None, "progress": options.wants_progress(args),
    }
    overrides = {key: value for key, value in given.items() if value is not None}  # None: not given
    if overrides.get("autocast") == "none":
        overrides["autocast"] = None
    # --seed has a real default: without a file it always applies, with one only when changed
    if args.config is None or args.seed != options.SEED.kwargs["default"]:
        overrides["seed"] = args.seed
    stored: dict[str, Any] = {}
    if args.config is not None:
        path = Path(args.config)
        try:
            stored = json.loads(path.read_text())
            if not isinstance(stored, dict):
                raise ValueError(f"expected a JSON object, got {type(stored).__name__}")
            check_keys(stored, "capture config key", ValueError)
        except OSError as error:
            raise ValueError(f"cannot read --config {path}: {error.strerror or error}") from None
        except ValueError as error:  # JSON syntax, not an object, an unknown key
            raise ValueError(f"--config {path}: {error}") from None
    if not overrides.get("layers", stored.get("layers")):
        raise ValueError("no layers to capture: give --layer NAME ... (or a --config file with \"layers\")")
    return CaptureConfig(**{**stored, **overrides})


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens capture``; returns the exit code."""
    from mechlens.capture.job import capture_to_store

    out = out or sys.stdout
    config = config_from_args(args)  # a bad option or config file fails before the model loads
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        loaded = options.load_model_from_args(args)  # capture_to_store moves it to its device
        result = capture_to_store(loaded, args.data, args.out, config)
    finally:
        signal.signal(signal.SIGTERM, previous)
    summary = {
        "store": result.store, "rank": result.rank, "world_size": result.world_size,
        "images_assigned": result.images_assigned, "images_before": result.images_before,
        "images_captured": result.images_captured, "rows": result.rows,
        "skipped": len(result.skipped) + len(result.files_skipped), "files_resized": result.files_resized,
        "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 1),
        "megabytes": round(result.bytes_written / 1e6, 2), "nonfinite_rows": result.nonfinite_rows,
    }
    if args.json:
        options.print_json(summary, out)
    else:
        print(
            f"rank {result.rank}/{result.world_size}: {result.images_captured} images captured "
            f"({result.images_before} done before, {summary['skipped']} skipped"
            f"{f', {result.files_resized} resized' if result.files_resized else ''}) in {result.seconds:.1f}s "
            f"({result.images_per_second:.1f} images/s); rows {result.rows} -> {result.store}"
            f"{f'; rows with NaN/Inf kept: {result.nonfinite_rows}' if any(result.nonfinite_rows.values()) else ''}",
            file=out,
        )
        for skipped_file in result.files_skipped[:10]:
            print(f"  skipped file {skipped_file.path}: {skipped_file.reason}", file=out)
        for skipped in result.skipped[:10]:
            print(f"  skipped sample {skipped.sample_id}: {skipped.reason}", file=out)
    return 0
