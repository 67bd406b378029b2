"""Scripted experiments: a directory with ``experiment.py`` (defining ``run(config, out)``) and
``config.json`` (plus optional ``quick.json`` for a reduced run). ``mechlens run DIR`` and
``mechlens demo`` use :func:`run_experiment`."""
from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

__all__ = ["experiments_root", "find_experiment", "load_config", "run_experiment"]


def experiments_root() -> Path:
    """The ``experiments/`` directory of the mechlens checkout (next to the package)."""
    return Path(__file__).resolve().parents[1] / "experiments"


def find_experiment(name: str | os.PathLike) -> Path:
    """An experiment directory from a path or a name under :func:`experiments_root`."""
    path = Path(name)
    candidates = [path, experiments_root() / path.name]
    for candidate in candidates:
        if (candidate / "experiment.py").is_file():
            return candidate
    root = experiments_root()
    available = sorted(p.parent.name for p in root.glob("*/experiment.py")) if root.is_dir() else []
    raise FileNotFoundError(
        f"no experiment at {name} (a directory with experiment.py); available: {', '.join(available) or 'none found'}"
    )


def _set(config: dict[str, Any], dotted: str, raw: str) -> None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    keys = dotted.split(".")
    node = config
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"--set {dotted}: {key!r} is not a section of the config")
    node[keys[-1]] = value


def load_config(directory: Path, *, config: str | os.PathLike | None = None, quick: bool = False,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The experiment's ``config.json`` (or ``quick.json`` / a given file) with ``KEY=VALUE``
    overrides (dotted keys, JSON values)."""
    path = Path(config) if config else directory / ("quick.json" if quick else "config.json")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = json.loads(path.read_text())
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        _set(data, key, value)
    return data


def run_experiment(name: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
                   quick: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Run an experiment into ``out``; writes ``out/config.json`` (what ran) and returns its result."""
    directory = find_experiment(name)
    settings = load_config(directory, config=config, quick=quick, overrides=overrides)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"experiment": directory.name, **settings}, indent=2))
    spec = importlib.util.spec_from_file_location(f"mechlens_experiment_{directory.name}", directory / "experiment.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "run"):
        raise AttributeError(f"{directory / 'experiment.py'} defines no run(config, out)")
    started = time.perf_counter()
    result = module.run(settings, out)
    print(f"experiment {directory.name} finished in {time.perf_counter() - started:.1f}s; outputs in {out}")
    return result
