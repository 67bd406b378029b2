"""Scripted experiments: a directory with ``experiment.py`` (defining ``run(config, out)``) and
``config.json`` (plus optional ``quick.json`` for a reduced run). ``mechlens run DIR`` and
``mechlens demo`` use :func:`run_experiment`."""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

__all__ = ["ConfigKeyError", "config_schema", "experiments_root", "find_experiment", "load_config", "run_experiment"]


def experiments_root() -> Path:
    """Where the bundled experiments live: the checkout's ``experiments/`` (next to the package,
    an editable install), else the data files a wheel installs under
    ``<prefix>/share/mechlens/experiments`` (see pyproject.toml)."""
    checkout = Path(__file__).resolve().parents[1] / "experiments"
    if checkout.is_dir():
        return checkout
    for base in _data_prefixes():
        installed = base / "share" / "mechlens" / "experiments"
        if installed.is_dir():
            return installed
    return checkout


def _data_prefixes() -> list[Path]:
    import site
    import sys
    import sysconfig

    prefixes = [sysconfig.get_path("data"), sys.prefix, getattr(site, "getuserbase", lambda: None)()]
    return [Path(p) for p in dict.fromkeys(p for p in prefixes if p)]


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
        f"no experiment at {name} (a directory with experiment.py); available: "
        f"{', '.join(available) or 'none found'} (in {root})"
    )


class ConfigKeyError(KeyError, ValueError):
    """An unknown config key (``--set`` or ``--config``); ``str()`` is the plain one-line message."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


def _shown(text: str) -> str:
    """``text`` as typed when printable, else escaped, so that every message stays on one line."""
    return text if text.isprintable() else ascii(text)


def _where(path: Sequence[str]) -> str:
    return f"in section {'.'.join(path)!r}" if path else "at the top level of the config"


def _unknown(key: str, path: Sequence[str], known: Mapping[str, Any], source: str) -> KeyError:
    """``KeyError`` with a one-line message naming the key, its section and the closest known keys."""
    import difflib

    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.6)
    hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"known keys: {', '.join(sorted(known)) or 'none'}")
    return ConfigKeyError(f"{source}: unknown key {key!r} {_where(path)}; {hint}")


def _is_open(section: Any) -> bool:
    """An empty object in the default config is a free-form section (keyword arguments checked by
    whatever consumes them, e.g. ``recipe`` -> ``ShapesRecipe(**recipe)``)."""
    return isinstance(section, dict) and not section


def _check_keys(value: Any, schema: Any, path: list[str], source: str) -> None:
    """Refuse keys of ``value`` (a config or part of one) that ``schema`` does not define, at any depth."""
    if not isinstance(value, dict) or not isinstance(schema, dict) or _is_open(schema):
        if isinstance(schema, dict) and not _is_open(schema) and not isinstance(value, dict):
            raise ValueError(f"{source}: {'.'.join(path)!r} is a section of the config, not a single value; give "
                             f"its keys ({', '.join(sorted(schema))}) instead, e.g. {'.'.join(path)}.{sorted(schema)[0]}")
        return
    for key, item in value.items():
        if key not in schema:
            raise _unknown(key, path, schema, source)
        _check_keys(item, schema[key], path + [key], source)


def _merge_schema(a: Any, b: Any) -> Any:
    """Union of two config trees (the keys either defines)."""
    if isinstance(a, dict) and isinstance(b, dict):
        merged = dict(a)
        for key, value in b.items():
            merged[key] = _merge_schema(a[key], value) if key in a else value
        return merged
    return a if a is not None else b


def config_schema(directory: Path) -> dict[str, Any] | None:
    """The keys an experiment's config may hold: those of its ``config.json`` and ``quick.json``
    (their union, at every depth). ``None`` when the experiment has neither file."""
    schema: Any = None
    for name in ("config.json", "quick.json"):
        path = Path(directory) / name
        if path.is_file():
            data = _read_json(path)
            schema = data if schema is None else _merge_schema(schema, data)
    return schema


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {_shown(str(path))} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {_shown(str(path))} must hold a JSON object, got {type(data).__name__}")
    return data


def _set(config: dict[str, Any], dotted: str, raw: str, schema: dict[str, Any] | None = None) -> None:
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    source = f"--set {_shown(dotted)}"
    keys = dotted.split(".")
    if any(not key for key in keys):
        raise ValueError(f"{source}: empty key in {dotted!r}; use dotted keys such as sae.width=512")
    free = object()  # no schema here: a free-form section, or an experiment without config.json
    node, known = config, (free if schema is None else schema)
    for depth, key in enumerate(keys):
        if known is not free and not _is_open(known):
            if not isinstance(known, dict):
                raise ValueError(f"{source}: {'.'.join(keys[:depth])!r} is a value, not a section of the config; "
                                 f"set it with {'.'.join(keys[:depth])}=VALUE")
            if key not in known:
                raise _unknown(key, keys[:depth], known, source)
            known = known[key]
        else:
            known = free  # inside a free-form section: anything goes from here down
        if depth == len(keys) - 1:
            break
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ValueError(f"{source}: {'.'.join(keys[:depth + 1])!r} is a value, not a section of the config; "
                             f"set it with {_shown('.'.join(keys[:depth + 1]))}=VALUE")
    if known is not free:
        _check_keys(value, known, keys, source)
    node[keys[-1]] = value


def load_config(directory: Path, *, config: str | os.PathLike | None = None, quick: bool = False,
                overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The experiment's ``config.json`` (or ``quick.json`` / a given file) with ``KEY=VALUE``
    overrides (dotted keys, JSON values).

    Known keys are those of the experiment's ``config.json`` and ``quick.json``
    (:func:`config_schema`); an override or a ``config`` file with any other key, at any depth,
    is refused with the closest known keys (``--set sae.widht=5: unknown key 'widht' in section
    'sae'; did you mean 'width'?``), so a typo never silently runs the default. An empty object
    in those files (``"recipe": {}``) is a free-form section whose keys its consumer checks.
    """
    path = Path(config) if config else directory / ("quick.json" if quick else "config.json")
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    data = _read_json(path)
    schema = config_schema(directory)
    if config and schema is not None:
        _check_keys(data, schema, [], f"config file {_shown(str(path))}")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        _set(data, key, value, schema)
    return data


def run_experiment(name: str | os.PathLike, out: str | os.PathLike, *, config: str | os.PathLike | None = None,
                   quick: bool = False, overrides: Sequence[str] = (), progress: bool = False) -> dict[str, Any]:
    """Run an experiment into ``out``; writes ``out/config.json`` (what ran) and returns its result.
    ``progress``: the experiment may draw progress bars (it reads ``config["progress"]``); its log
    lines and this function's go to stderr, so stdout holds only what the caller prints."""
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
    result = module.run({**settings, "progress": progress}, out)
    print(f"experiment {directory.name} finished in {time.perf_counter() - started:.1f}s; outputs in {out}", file=sys.stderr)
    return result
