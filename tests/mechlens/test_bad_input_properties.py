"""Property-based tests (Hypothesis) of bad input, issue 15: random names (separators, '..', NUL,
control characters, unicode, empty, very long), feature specs, dataset specs that fail fast, and
config keys, fed through the one name sanitiser and the parsers. Properties:

(a) a name the sanitiser accepts, joined under an output folder, resolves to a direct child of
    it (and distinct accepted names give distinct paths); store manifests accept exactly the
    names the sanitiser accepts;
(b) every refusal is a ValueError / KeyError (a missing folder may be a FileNotFoundError) whose
    message is one line.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from activation_store import InvalidNameError, StoreError, check_name, safe_join  # noqa: E402
from activation_store.manifest import read_shard_manifest, read_store_manifest  # noqa: E402

# database=None: no .hypothesis/ folder in the checkout; failures print their example instead
SETTINGS = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
TRICKY = list("ab._-:/\\\x00 \n\r\t\u2028\u00e9\u4e2d") + ["..", "../", "~", "$HOME", "%2e"]

names = st.one_of(
    st.text(max_size=40),  # any unicode, control characters included
    st.lists(st.sampled_from(TRICKY), max_size=12).map("".join),
    st.lists(st.sampled_from(["..", ".", "a", "b1", "layer1.0.conv1", ""]), min_size=1, max_size=5).map("/".join),
    st.sampled_from(["", ".", "..", "../../evil", "/etc/passwd", "C:\\x", "x\x00y", "a" * 200, "a" * 201,
                     "a" * 10_000, "layer1.0.conv1", "blocks.11.attn:qkv", "-rf", ".hidden", "a..b", "ok\n"]),
    st.builds(lambda head, tail: head + tail, st.sampled_from(["a", "..", "/", "x" * 190]), st.text(max_size=300)),
)


def one_line(error: BaseException) -> str:
    message = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    assert message and len(message.splitlines()) == 1, repr(message)
    return message


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("out")


# ----------------------------------------------------------------------------- (a) the sanitiser
@SETTINGS
@given(name=names)
def test_an_accepted_name_stays_inside_the_output_folder(out_dir, name):
    try:
        check_name(name, "layer")
    except InvalidNameError as error:
        assert isinstance(error, ValueError) and one_line(error).startswith("invalid layer name")
        with pytest.raises(InvalidNameError):
            safe_join(out_dir, name, "layer")
        return
    path = safe_join(out_dir, name, "layer", suffix=".json")
    assert path.resolve().parent == out_dir.resolve() and path.name == name + ".json"
    assert not set(name) & {"/", "\\", "\x00", "\n"} and ".." not in name and 1 <= len(name) <= 200


@SETTINGS
@given(a=names, b=names)
def test_distinct_accepted_names_give_distinct_paths(out_dir, a, b):
    try:
        pa, pb = safe_join(out_dir, a, "concept"), safe_join(out_dir, b, "concept")
    except InvalidNameError:
        return
    assert (pa == pb) == (a == b)


@settings(max_examples=100, deadline=None, database=None)
@given(name=names)
def test_store_manifests_accept_exactly_the_names_the_sanitiser_accepts(out_dir, name):
    root = out_dir / "store"
    shard = root / "shards" / "rank-00000"
    shard.mkdir(parents=True, exist_ok=True)
    try:
        check_name(name, "layer")
        valid = True
    except InvalidNameError:
        valid = False
    layer = {"dim": 2, "dtype": "float32", "chunk_rows": 4, "meta": {}}
    (root / "store.json").write_text(json.dumps({"format": "mechlens-activation-store", "version": 1, "model": "m",
                                                 "backend": "zarr", "layers": {name: layer}}))
    segment = {"id": 0, "file": name, "layers": {name: {"rows": 1, "checksums": ["00"]}}}
    (shard / "manifest.json").write_text(json.dumps({"shard": name, "generation": 1, "segments": [segment]}))
    for read, path in ((read_store_manifest, root), (read_shard_manifest, shard / "manifest.json")):
        if valid:
            read(path)
        else:
            with pytest.raises(StoreError) as info:
                read(path)
            assert "invalid" in one_line(info.value)


# ----------------------------------------------------------------------------- (b) parsers
specs = st.builds(lambda kind, rest: f"{kind}:{rest}" if kind else rest,
                  st.sampled_from(["class", "channel", "neuron", "layer", "sae", "cav", "", "bogus", "CLASS"]),
                  st.one_of(st.text(max_size=30), st.lists(st.sampled_from(TRICKY + ["1", "-2", ":", ","]),
                                                           max_size=10).map("".join)))


@SETTINGS
@given(spec=specs)
def test_feature_specs_parse_or_fail_with_one_line(spec):
    from mechlens.features import Feature, parse_feature

    try:
        feature = parse_feature(spec)
    except (ValueError, KeyError) as error:
        one_line(error)
        return
    assert isinstance(feature, Feature) and isinstance(feature.name, str)


@pytest.fixture(scope="module")
def missing_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("datasets") / "missing"


printable = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
dataset_specs = st.one_of(
    # an unknown kind that is no existing directory either ('/' left out: never a path to a real folder)
    printable.filter(lambda t: not set(t) & set(":?/")).map(lambda t: "zz" + t),
    printable.filter(lambda t: t != "shapes" and "?" not in t).map(lambda t: "synthetic:" + t),
    st.text(alphabet=string.ascii_lowercase, min_size=1, max_size=8).map(lambda k: f"synthetic:shapes?zz{k}=1"),
    st.text(alphabet=string.ascii_lowercase + "_", min_size=1, max_size=8).map(lambda k: f"digits?zz{k}=1"),
    printable.filter(lambda t: "?" not in t).map(lambda t: "skimage:zz" + t.replace(",", "")),
    st.sampled_from(["synthetic:shapes?n=abc", "synthetic:shapes?size=", "synthetic:shapes?&&=", "synthetic:shapes?n",
                     "digits?size=1&size", "skimage:", "skimage:?size=8"]),
)


@SETTINGS
@given(spec=dataset_specs)
def test_dataset_specs_that_fail_fast_fail_with_one_line(spec):
    from mechlens.data import build_dataset

    with pytest.raises((ValueError, KeyError)) as info:
        build_dataset(spec)
    one_line(info.value)


@settings(max_examples=100, deadline=None, database=None)
@given(name=printable.filter(lambda t: "?" not in t and "/" not in t))
def test_a_missing_folder_spec_fails_with_one_line(missing_dir, name):
    from mechlens.data import build_dataset

    # one component under a folder that does not exist (no '/': never an absolute or existing path)
    with pytest.raises((ValueError, KeyError, FileNotFoundError)) as info:
        build_dataset(f"folder:{missing_dir / 'sub' / name}")
    one_line(info.value)


# ----------------------------------------------------------------------------- (b) config keys
KNOWN = ["seed", "layer", "sae", "width", "k", "steps", "tcav", "num_random", "recipe", "model_cache", "featvis"]
keys = st.lists(st.one_of(st.sampled_from(KNOWN + ["widht", "lyaer", "sea", "", "0"]), st.text(max_size=8)),
                min_size=1, max_size=4).map(".".join)
values = st.sampled_from(["1", "0.5", '"x"', "null", "[1, 2]", '{"width": 8}', '{"nope": 1}', "not json", ""])


def _fits(schema, value) -> bool:
    """Whether ``value`` fits where ``schema`` is: a non-empty section needs an object of known keys."""
    if isinstance(schema, dict) and schema:
        return isinstance(value, dict) and all(k in schema and _fits(schema[k], v) for k, v in value.items())
    return True  # a value, or an empty (free-form) section


def _set_is_valid(schema, path, value) -> bool:
    """The oracle for ``--set PATH=VALUE``: every key known (anything under a free-form section)."""
    if "" in path:
        return False
    node = schema
    for key in path:
        if isinstance(node, dict) and not node:
            return True
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return _fits(node, value)


@pytest.fixture(scope="module")
def clever_hans():
    from mechlens.experiments import config_schema, find_experiment

    directory = find_experiment("clever_hans")
    return directory, config_schema(directory)


@SETTINGS
@given(key=keys, value=values)
def test_set_accepts_exactly_the_known_keys(clever_hans, key, value):
    from mechlens.experiments import load_config

    directory, schema = clever_hans
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    valid = _set_is_valid(schema, key.split("."), parsed)
    try:
        config = load_config(directory, quick=True, overrides=[f"{key}={value}"])
    except (ValueError, KeyError) as error:
        one_line(error)
        assert not valid, f"--set {key}={value} was refused: {error}"
        return
    assert valid, f"--set {key!r}={value!r} was accepted but names a key the config does not have"
    node = config
    for part in key.split(".")[:-1]:
        node = node[part]
    assert node[key.split(".")[-1]] == parsed


configs = st.recursive(st.one_of(st.integers(), st.text(max_size=5), st.none()),
                       lambda inner: st.dictionaries(st.one_of(st.sampled_from(KNOWN + ["widht", "zz"]),
                                                               st.text(max_size=6)), inner, max_size=4),
                       max_leaves=8).filter(lambda c: isinstance(c, dict))


@settings(max_examples=100, deadline=None, database=None)
@given(data=configs)
def test_a_config_file_is_accepted_exactly_when_its_keys_are_known(clever_hans, tmp_path_factory, data):
    from mechlens.experiments import load_config

    directory, schema = clever_hans
    path = tmp_path_factory.getbasetemp() / "config-under-test.json"
    path.write_text(json.dumps(data))
    try:
        loaded = load_config(directory, config=path)
    except (ValueError, KeyError) as error:
        one_line(error)
        assert not _fits(schema, data), f"config {data!r} was refused: {error}"
        return
    assert _fits(schema, data) and loaded == data, f"config {data!r} with unknown keys was accepted"
