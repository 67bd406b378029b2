"""The options the sub-commands share, each defined once, and the helpers that read them.

A command adds a group: ``add_model_options`` (``--model`` or ``MODEL``, ``--weights``,
``--pretrained``, ``--num-classes``), ``add_data_options`` (``--data``, ``--resize``,
``--on-unreadable``), ``add_run_options`` (``--device``, ``--out``, ``--json``,
``--no-progress``), or one :class:`Option` (``SEED.add(parser)``, ``STORE``, ``LAYERS``: the
``--layer`` that takes several names; a command that takes one layer defines its own
``--layer LAYER``, with the same dest). The handler reads them back with
:func:`load_model_from_args`, :func:`dataset_options`, :func:`resolved_device` /
:func:`requested_device`, :func:`progress_bar` and :func:`print_json`. So a flag has one
name, one help text and one meaning in every command: a command may set only what an option
lists as ``variable`` (whether it is required, its default, its metavar), and
``tests/mechlens/test_cli_options.py`` checks every parser against these definitions.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from typing import Any, Mapping, TextIO

__all__ = [
    "Option", "SHARED", "MODEL", "WEIGHTS", "PRETRAINED", "NUM_CLASSES", "DATA", "RESIZE", "ON_UNREADABLE",
    "DEVICE", "OUT", "JSON", "NO_PROGRESS", "SEED", "STORE", "LAYERS", "DEBUG", "DEBUG_HELP",
    "add_model_options", "add_data_options", "add_run_options", "model_spec", "load_model_from_args",
    "dataset_options", "requested_device", "resolved_device", "progress_bar", "print_json",
]


@dataclass(frozen=True, eq=False)
class Option:
    """One shared command-line option: its flags and the ``add_argument`` keywords every
    command uses; ``variable`` names the keywords a command may choose itself."""

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any]
    variable: frozenset[str] = frozenset()

    def add(self, container: Any, **overrides: Any) -> argparse.Action:
        """Add the option to ``container`` (a parser or an argument group)."""
        fixed = set(overrides) - self.variable
        if fixed:
            raise TypeError(f"{self.flags[0]}: {sorted(fixed)} is fixed by its one definition in mechlens.cli.options")
        return container.add_argument(*self.flags, **{**self.kwargs, **overrides})


def _option(*flags: str, variable: tuple[str, ...] = (), **kwargs: Any) -> Option:
    return Option(flags, kwargs, frozenset(variable))


# ----------------------------------------------------------------------------- model and weights
MODEL = _option("--model", metavar="SPEC", variable=("required",), help=(
    "the model: timm:NAME, torchvision:NAME, mechlens:NAME, package.module:factory or a checkpoint directory"))
WEIGHTS = _option("--weights", metavar="PATH", help="the model's weights from a local .safetensors or state-dict file")
PRETRAINED = _option("--pretrained", action="store_true",
                     help="the library's pretrained weights (needs a download or the cache)")
NUM_CLASSES = _option("--num-classes", type=int, default=None, metavar="N", help="number of classes of the model's head")
# ----------------------------------------------------------------------------- data
DATA = _option("--data", metavar="DATA", variable=("required",), help=(
    "dataset: 'synthetic:shapes?n=512', 'digits', 'skimage:astronaut,coffee', 'folder:PATH' or an image "
    "folder with class subfolders"))
RESIZE = _option("--resize", action="store_true", help=(
    "resize images that differ from the model's input size (default: such images are an error)"))
ON_UNREADABLE = _option("--on-unreadable", choices=("skip", "error"), default=None,
                        help="unreadable images: skip and count (default) or stop with an error")
STORE = _option("--store", metavar="STORE", variable=("required",),
                help="activation store directory (as `mechlens capture` writes it)")
LAYERS = _option("--layer", "--layers", dest="layer", nargs="+", action="extend", metavar="LAYER",
                 variable=("required",), help=(
                     "one or more layer names, as `mechlens layers` lists them; repeatable (--layer a b --layer c)"))
# ----------------------------------------------------------------------------- running and output
DEVICE = _option("--device", metavar="DEVICE", variable=("default",), help=(
    "where to run: cpu, cuda, cuda:1, ... or auto (cuda when available, else cpu; default: %(default)s)"))
SEED = _option("--seed", type=int, default=0, metavar="N", help="seed of the command's random draws (default: %(default)s)")
OUT = _option("--out", metavar="DIR", variable=("required", "default", "metavar"),
              help="the output %(metavar)s (what the command writes there: see its description)")
JSON = _option("--json", action="store_true", help="print the result as JSON on stdout instead of text")
NO_PROGRESS = _option("--no-progress", action="store_true", help="draw no progress bars (on stderr)")
# ----------------------------------------------------------------------------- errors
DEBUG_HELP = "show the full traceback of an error instead of its one-line message"
# SUPPRESS as the default: a sub-command's parser would otherwise reset a ``--debug`` given before it
DEBUG = _option("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)

SHARED: tuple[Option, ...] = (MODEL, WEIGHTS, PRETRAINED, NUM_CLASSES, DATA, RESIZE, ON_UNREADABLE, STORE, LAYERS,
                              DEVICE, SEED, OUT, JSON, NO_PROGRESS, DEBUG)
"""Every shared option (``--model`` also has a positional form, ``MODEL``, for ``layers``)."""


# ----------------------------------------------------------------------------- adding them
def add_model_options(parser: argparse.ArgumentParser, *, positional: bool = False,
                      required: bool = True) -> argparse._ArgumentGroup:
    """The ``model`` group: ``--model``, ``--weights``, ``--pretrained``, ``--num-classes``.
    ``positional``: the model may also come first as ``MODEL`` (``mechlens layers MODEL``);
    :func:`model_spec` then takes whichever was given."""
    group = parser.add_argument_group("model")
    if positional:
        group.add_argument("model_positional", nargs="?", default=argparse.SUPPRESS, metavar="MODEL",
                           help="the model, as for --model (give one of the two)")
        MODEL.add(group, required=False)
    else:
        MODEL.add(group, required=required)
    for option in (WEIGHTS, PRETRAINED, NUM_CLASSES):
        option.add(group)
    return group


def add_data_options(parser: argparse.ArgumentParser, *, required: bool = False) -> argparse._ArgumentGroup:
    """The ``data`` group: ``--data``, ``--resize``, ``--on-unreadable``."""
    group = parser.add_argument_group("data")
    DATA.add(group, required=required)
    RESIZE.add(group)
    ON_UNREADABLE.add(group)
    return group


def add_run_options(parser: argparse.ArgumentParser, *, device: str | None = None, out: Mapping[str, Any] | None = None,
                    json: bool = True, progress: bool = True) -> argparse._ArgumentGroup:
    """The ``run and output`` group: ``--device`` (when ``device`` names its default, ``"cpu"``
    or ``"auto"``), ``--out`` (when ``out`` gives its ``required`` / ``default`` / ``metavar``),
    ``--json`` and ``--no-progress``."""
    group = parser.add_argument_group("run and output")
    if device is not None:
        DEVICE.add(group, default=device)
    if out is not None:
        OUT.add(group, **out)
    if json:
        JSON.add(group)
    if progress:
        NO_PROGRESS.add(group)
    return group


# ----------------------------------------------------------------------------- reading them
def model_spec(args: argparse.Namespace) -> str:
    """The model spec given as ``--model`` or, where the command takes it, as ``MODEL``."""
    positional = getattr(args, "model_positional", None)
    flag = getattr(args, "model", None)
    if positional is not None and flag is not None:
        raise ValueError(f"the model is given twice ({positional!r} and --model {flag!r}): give one")
    spec = positional if positional is not None else flag
    if spec is None:
        raise ValueError("no model: give MODEL or --model SPEC")
    return spec


def load_model_from_args(args: argparse.Namespace, *, device: Any = None) -> Any:
    """:func:`mechlens.models.load_model` of the model group's options (``device``: move the model
    there; ``None`` leaves it where it was built)."""
    from mechlens.models import load_model as load

    return load(model_spec(args), pretrained=args.pretrained, weights=args.weights, num_classes=args.num_classes,
                device=device)



def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The data group's policies as keyword arguments of ``build_dataset`` / ``capture_to_store``."""
    return {"on_size_mismatch": "resize" if args.resize else None, "on_unreadable": args.on_unreadable}


def requested_device(args: argparse.Namespace) -> str | None:
    """``--device``, ``None`` for ``auto``: for library functions that pick the device themselves
    (``capture_to_store``: ``cuda:LOCAL_RANK`` under ``torchrun``)."""
    return None if args.device == "auto" else args.device


def resolved_device(args: argparse.Namespace) -> str:
    """``--device`` with ``auto`` resolved: ``cuda`` when available, else ``cpu``. Under
    ``torchrun`` a bare ``cuda`` is the rank's own GPU, ``cuda:LOCAL_RANK``."""
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1 and torch.cuda.device_count():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0')) % torch.cuda.device_count()}"
    return device


def _stderr_is_terminal() -> bool:
    return bool(getattr(sys.stderr, "isatty", lambda: False)())


def wants_progress(args: argparse.Namespace) -> bool:
    """Whether to draw progress bars (``progress=`` of the library calls): on stderr when it is a
    terminal, never with ``--no-progress``, so error lines and logs stay one line each."""
    return not bool(getattr(args, "no_progress", False)) and _stderr_is_terminal()


def progress_bar(args: argparse.Namespace, **kwargs: Any) -> Any:
    """A progress bar the CLI draws itself (``tqdm`` keywords), shown when :func:`wants_progress`."""
    from tqdm.auto import tqdm

    return tqdm(disable=not wants_progress(args), leave=False, file=sys.stderr, **kwargs)


def print_json(value: Any, out: TextIO | None = None, **kwargs: Any) -> None:
    """``--json``: ``value`` as strict JSON (NaN / infinity as ``null``), one line unless ``indent``."""
    from activation_store.jsonutil import dumps

    print(dumps(value, **kwargs), file=out or sys.stdout)
