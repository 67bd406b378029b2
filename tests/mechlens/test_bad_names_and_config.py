"""Issue 15, items 3 and 5: names that would write outside the output folder are refused (CAV
files named after concepts, layer / shard / segment names read from a store's manifests, the
statistics cache), and config typos (``--set sae.widht=5``, unknown keys in a ``--config`` file)
are refused with the closest known key instead of silently running the default."""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import pytest

from activation_store import ActivationStore, InvalidNameError, LayerSpec, StoreError, StoreWriter, check_name, safe_join
from mechlens.cli import main


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line(text: str) -> str:
    assert "\n" not in text.strip() and "\r" not in text, text
    return text


# ----------------------------------------------------------------------------- the sanitiser
@pytest.mark.parametrize("name", ["layer1.0.conv1", "stage3", "blocks.11.attn:qkv", "rank-00003", "a_b-c"])
def test_dotted_and_ordinary_names_are_accepted_verbatim(tmp_path, name):
    assert check_name(name, "layer") == name
    path = safe_join(tmp_path, name, "layer", suffix=".json")
    assert path == tmp_path / f"{name}.json" and path.parent == tmp_path


@pytest.mark.parametrize("name", ["../../evil", "a/b", "a\\b", "..", ".", "", ".hidden", "-rf", "a..b", "x\n",
                                  "nul\x00byte", "é", "a" * 201])
def test_names_that_could_leave_the_folder_are_refused_with_one_line(tmp_path, name):
    with pytest.raises(InvalidNameError, match="invalid concept name") as info:
        safe_join(tmp_path, name, "concept")
    assert isinstance(info.value, ValueError)
    _one_line(str(info.value))


def test_safe_join_refuses_a_symlink_that_leads_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    root.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(InvalidNameError, match="outside"):
        safe_join(root / "link", "x", "layer", suffix=".json", within=root)


# ----------------------------------------------------------------------------- tcav / CAV files
def _cav(concept="ruler", layer="stage3", negative="random0"):
    from mechlens.probes import CAV

    return CAV(concept, negative, layer, vector=np.array([0.6, 0.8], np.float32), intercept=0.0, accuracy=1.0)


def test_save_cavs_refuses_a_concept_that_escapes_and_writes_nothing(tmp_path):
    from mechlens.probes import save_cavs

    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(ValueError, match=r"invalid concept name '\.\./\.\./evil'") as info:
        save_cavs([_cav("fine"), _cav("../../evil")], out / "cavs")
    _one_line(str(info.value))
    assert _files(tmp_path) == set()  # not even the good CAV: every name is checked first


def test_save_cavs_keeps_dotted_layer_names_and_refuses_colliding_files(tmp_path):
    from mechlens.probes import CAV, save_cavs

    paths = save_cavs([_cav(layer="layer1.0.conv1")], tmp_path / "cavs")
    assert paths == [tmp_path / "cavs" / "ruler-layer1.0.conv1-vs-random0"]
    assert CAV.load(paths[0]).layer == "layer1.0.conv1"
    with pytest.raises(ValueError, match="would both be saved as"):  # 'a-b' + 'c' vs 'a' + 'b-c'
        save_cavs([_cav("a-b", "c"), _cav("a", "b-c")], tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_tcav_cli_refuses_concept_dot_dot_before_loading_the_model(tmp_path, capsys):
    folder = tmp_path / "work" / "concept"
    folder.mkdir(parents=True)
    out = tmp_path / "work" / "deep" / "out"
    before = _files(tmp_path)
    code = main(["tcav", "--model", "mechlens:small_cnn_tiny", "--layer", "stage2",
                 "--concept", f"../../evil={folder}", "--random", str(folder), "--examples", str(folder),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert "invalid concept name '../../evil'" in err and _one_line(err)
    assert _files(tmp_path) == before  # nothing under --out, nothing next to it
    code = main(["tcav", "--model", "mechlens:small_cnn_tiny", "--layer", "../stage2", "--concept", f"ok={folder}",
                 "--random", str(folder), "--examples", str(folder), "--out", str(out)])
    assert code == 2 and "invalid layer name '../stage2'" in capsys.readouterr().err
    assert _files(tmp_path) == before


def test_tcav_cli_saves_cavs_of_a_dotted_layer_inside_out(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)

    def folder(name, n, bright):
        path = tmp_path / name
        path.mkdir()
        for i in range(n):
            array = rng.integers(0, 256, (32, 32, 3)) // (1 if bright else 4)
            Image.fromarray(array.astype(np.uint8)).save(path / f"{i}.png")
        return path

    concept, random, examples = folder("concept", 8, True), folder("random", 24, False), folder("examples", 4, False)
    code = main(["tcav", "--model", "mechlens:small_cnn_tiny", "--num-classes", "3", "--layer", "stage2.0",
                 "--concept", f"bright={concept}", "--random", str(random), "--examples", str(examples),
                 "--num-random", "3", "--set-size", "6", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    saved = sorted(p.name for p in (tmp_path / "out" / "cavs").glob("*.safetensors"))
    assert saved == [f"bright-stage2.0-vs-random{i}.safetensors" for i in range(3)]


# ----------------------------------------------------------------------------- store manifests
def _store(path: Path) -> Path:
    layers = {"layer1.0.conv1": LayerSpec(3, "float32", chunk_rows=4), "b": LayerSpec(2, "float32", chunk_rows=4)}
    with StoreWriter(path, model="m", layers=layers) as writer:
        writer.write({"layer1.0.conv1": np.arange(30, dtype=np.float32).reshape(10, 3),
                      "b": np.ones((10, 2), np.float32)}, sample_ids=np.arange(10))
    return path


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_dotted_layer_statistics_are_cached_inside_the_store(tmp_path):
    store = ActivationStore(_store(tmp_path / "s"))
    stats = store.statistics("layer1.0.conv1")
    assert stats.count == 10 and (tmp_path / "s" / "stats" / "layer1.0.conv1.json").is_file()


def test_store_json_with_an_escaping_layer_name_is_refused_on_open_info_and_verify(tmp_path, capsys):
    root = _store(tmp_path / "deep" / "s")
    _edit_json(root / "store.json", lambda d: d["layers"].__setitem__("../../x", d["layers"].pop("b")))
    before = _files(tmp_path)
    with pytest.raises(StoreError, match=r"store\.json is damaged.*invalid layer name '\.\./\.\./x'") as info:
        ActivationStore(root)
    _one_line(str(info.value))
    assert main(["store", "verify", str(root), "--no-progress"]) != 0
    err = capsys.readouterr().err
    assert "'../../x'" in err and "store.json" in err and _one_line(err)
    assert main(["store", "info", str(root)]) != 0
    assert "'../../x'" in capsys.readouterr().err
    with pytest.raises(StoreError, match="invalid layer name"):  # a writer resuming the store refuses it too
        StoreWriter(root, model="m", layers={"../../x": LayerSpec(2, "float32")})
    assert _files(tmp_path) == before  # in particular no stats/ file next to the store


@pytest.mark.parametrize("field", ["segment file", "segment layer", "shard"])
def test_shard_manifest_with_an_escaping_name_is_refused(tmp_path, capsys, field):
    root = _store(tmp_path / "s")
    manifest = next((root / "shards").glob("*/manifest.json"))

    def edit(data):
        segment = data["segments"][0]
        if field == "segment file":
            segment["file"] = "../../../elsewhere.zarr"
        elif field == "segment layer":
            segment["layers"]["../x"] = segment["layers"].pop("b")
        else:
            data["shard"] = "../rank"

    _edit_json(manifest, edit)
    with pytest.raises(StoreError, match=r"manifest\.json is damaged.*invalid") as info:
        ActivationStore(root)
    _one_line(str(info.value))
    assert main(["store", "verify", str(root), "--no-progress"]) != 0
    assert "manifest.json" in capsys.readouterr().err


def test_statistics_never_writes_outside_the_store(tmp_path):
    root = _store(tmp_path / "s")
    store = ActivationStore(root)
    # past the manifest check (as if the name had slipped through): the cache path is refused
    bad = "../../x"
    store.manifest = dataclasses.replace(store.manifest, layers={**store.manifest.layers, bad: store.manifest.layers["b"]})
    store._tables[bad] = store._tables["b"]
    before = _files(tmp_path)
    with pytest.raises(InvalidNameError, match="invalid layer name"):
        store.statistics(bad)
    # a stats/ symlinked out of the store: refused rather than written through
    outside = tmp_path / "outside"
    outside.mkdir()
    os.symlink(outside, root / "stats")
    with pytest.raises(InvalidNameError, match="outside"):
        store.statistics("b")
    assert not any(outside.iterdir())
    assert _files(tmp_path) - before == {"outside", "s/stats"}


# ----------------------------------------------------------------------------- config keys
def test_demo_set_typo_is_refused_with_a_suggestion(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["demo", "--out", str(out), "--set", "sae.widht=5"]) == 2
    err = capsys.readouterr().err
    assert "--set sae.widht: unknown key 'widht' in section 'sae'; did you mean 'width'?" in err and _one_line(err)
    assert not out.exists()  # refused before anything ran


@pytest.mark.parametrize("override,message", [
    ("tcav.num_randon=3", "unknown key 'num_randon' in section 'tcav'; did you mean 'num_random'?"),
    ("lyaer=stage2", "unknown key 'lyaer' at the top level of the config; did you mean 'layer'?"),
    ("sae=5", "'sae' is a section of the config"),
    ("layer.x=1", "'layer' is a value, not a section"),
    ('sae={"width": 8, "kk": 2}', "unknown key 'kk' in section 'sae'; did you mean 'k'?"),
])
def test_set_refuses_unknown_keys_at_any_depth(override, message):
    from mechlens.experiments import find_experiment, load_config

    with pytest.raises((KeyError, ValueError)) as info:
        load_config(find_experiment("clever_hans"), overrides=[override])
    assert message in str(info.value) and _one_line(str(info.value))


def test_set_accepts_known_and_free_form_keys():
    from mechlens.experiments import find_experiment, load_config

    config = load_config(find_experiment("clever_hans"), quick=True,
                         overrides=["sae.width=64", 'model_cache="/m"', "workers=2", "recipe.seed=3"])
    assert config["sae"]["width"] == 64 and config["model_cache"] == "/m" and config["workers"] == 2
    assert config["recipe"] == {"seed": 3}  # an empty section in config.json is free-form (ShapesRecipe checks it)
    cascade = load_config(find_experiment("sanity_cascade"), quick=True,
                          overrides=["method_kwargs.integrated_gradients.n_steps=8"])  # a key of config.json
    assert cascade["method_kwargs"]["integrated_gradients"] == {"n_steps": 8}


def test_run_refuses_a_config_file_with_unknown_keys(tmp_path, capsys):
    config = tmp_path / "mine.json"
    config.write_text(json.dumps({"seed": 1, "widths": [64], "ks": [4], "stpes": 10}))
    out = tmp_path / "out"
    assert main(["run", "sae_sweep", "--config", str(config), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"config file {config}: unknown key 'stpes' at the top level of the config; did you mean 'steps'?" in err
    assert not out.exists()
