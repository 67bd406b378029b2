"""``mechlens layers MODEL``: list a model's layers with their output shapes (one dry forward)."""
from __future__ import annotations

import argparse
import sys
from typing import Any, TextIO

from mechlens.cli import options

__all__ = ["register", "run", "format_shape"]


def format_shape(shape: Any, *, drop_batch: bool = True) -> str:
    """``(1, 64, 8, 8)`` -> ``"[64, 8, 8]"``; nested outputs keep their structure."""
    if shape is None:
        return "None"
    if isinstance(shape, str):
        return shape
    if isinstance(shape, dict):
        return "{" + ", ".join(f"{k}: {format_shape(v, drop_batch=drop_batch)}" for k, v in shape.items()) + "}"
    if isinstance(shape, tuple) and all(isinstance(v, int) for v in shape):
        dims = shape[1:] if drop_batch and shape else shape
        return "[" + ", ".join(str(v) for v in dims) + "]"
    return "(" + ", ".join(format_shape(v, drop_batch=drop_batch) for v in shape) + ")"


def _per_sample(shape: Any) -> Any:
    """An output shape for ``--json``: the batch dimension dropped, nested outputs as lists / dicts."""
    if isinstance(shape, dict):
        return {k: _per_sample(v) for k, v in shape.items()}
    if isinstance(shape, tuple) and all(isinstance(v, int) for v in shape):
        return list(shape[1:])
    if isinstance(shape, (tuple, list)):
        return [_per_sample(v) for v in shape]
    return shape


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``layers`` sub-command."""
    parser = subparsers.add_parser(
        "layers",
        help="list a model's layers with their output shapes",
        description=(
            "List the dotted layer names of MODEL (timm:NAME, torchvision:NAME, mechlens:NAME, "
            "package.module:factory or a checkpoint directory; as MODEL or --model) with module type, output "
            "shape per sample (one dry forward with random input on --device) and parameter count."
        ),
    )
    options.add_model_options(parser, positional=True)
    parser.add_argument("--input-size", nargs=3, type=int, metavar=("C", "H", "W"),
                        help="input size for the dry forward (default: the model's preprocessing)")
    parser.add_argument("--filter", action="append", metavar="GLOB",
                        help="only layers matching this name or glob (repeatable), e.g. 'layer4.*' or '**.relu'")
    parser.add_argument("--max-depth", type=int, default=None, metavar="D",
                        help="only layers with at most D dotted segments")
    options.add_run_options(parser, device="cpu", progress=False)  # one dry forward: nothing to wait for
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Handler of ``mechlens layers``; returns the exit code."""
    from mechlens.features import layer_shapes

    out = out or sys.stdout
    device = options.resolved_device(args)
    loaded = options.load_model_from_args(args, device=device)
    input_size = tuple(args.input_size) if args.input_size else loaded.preprocessing.input_size
    infos = layer_shapes(loaded.model, input_size, args.filter, device=device)
    if args.max_depth is not None:
        infos = [i for i in infos if i.name.count(".") < args.max_depth]
    total = sum(p.numel() for p in loaded.model.parameters())
    if args.json:
        options.print_json({
            "model": loaded.spec, "type": type(loaded.model).__name__, "parameters": total,
            "input_size": list(input_size), "preprocessing": loaded.preprocessing.source,
            "layers": [{"name": i.name, "type": i.type,
                        "output_shape": _per_sample(i.output_shape) if i.calls else None, "calls": i.calls,
                        "layout": i.layout, "num_prefix_tokens": i.num_prefix_tokens, "params": i.num_params}
                       for i in infos],
        }, out)
        return 0
    print(
        f"{loaded.spec}  ({type(loaded.model).__name__}, {total:,} parameters, input "
        f"{list(input_size)}, preprocessing: {loaded.preprocessing.source})",
        file=out,
    )
    rows = [("name", "type", "output shape", "layout", "params")]
    unknown = 0
    for info in infos:
        shape = format_shape(info.output_shape) if info.calls else "(did not run)"
        if info.calls > 1:
            shape += f"  x{info.calls} calls (last shown)"
        layout = info.layout or ("?" if info.calls and isinstance(info.output_shape, tuple) else "")
        unknown += layout == "?"
        if info.layout == "nlc" and info.num_prefix_tokens:
            layout += f"+{info.num_prefix_tokens}"  # CLS/register tokens first
        rows.append((info.name, info.type, shape, layout, f"{info.num_params:,}"))
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    for k, row in enumerate(rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:<{widths[3]}}  "
              f"{row[4]:>10}".rstrip(), file=out)
        if k == 0:
            print("-" * (sum(widths) + 18), file=out)
    print(f"{len(infos)} layers (output shapes per sample, batch dimension omitted; layout nlc+N: N prefix tokens)",
          file=out)
    if unknown:
        print(f"{unknown} layer(s) with layout '?': the model does not say it; pass --layout when you capture one",
              file=out)
    return 0
