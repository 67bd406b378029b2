"""Spec strings everywhere (issue 17, item 5): every public entry point that takes a feature or
a target takes a spec string ("class:1", "channel:stage2:0", "layer:stage2", ...) as well as the
Feature object, through the one reader :func:`mechlens.features.as_feature` (lists through
:func:`mechlens.features.as_features`), and gives the same result for both. A bad spec is a
one-line ``ValueError`` that names the spec and the accepted forms.

Entry points covered (each is called with a spec string and with the equivalent Feature):

* features: ``feature_forward`` (one spec, a list of specs), ``as_feature`` / ``as_features``;
* TCAV (``mechlens.probes``): ``run_tcav(targets=["class:1"])`` and ``targets="class:1"``,
  ``target_gradients``, ``relative_tcav``;
* feature visualisation (``mechlens.featvis``): ``render`` (one spec, a list of specs),
  ``deepdream`` (a spec, and ``layer:NAME`` = the bare layer name), the objective builders
  ``feature``, ``per_image``, ``Objective``, ``Objective.feature``, ``as_objective``,
  ``FeatureTerm``, ``PerImageTerm``;
* attribution: ``attribute`` (one spec for the batch, one spec per sample), ``resolve_target``;
* evaluation: ``deletion_curve`` / ``insertion_curve`` (``perturbation_curve``),
  ``attribution_stability``, ``randomization_check``;
* the CLI: ``mechlens visualize --feature``, ``mechlens attribute --target``,
  ``mechlens dream --feature``, ``mechlens tcav --target`` against the library called with
  Feature objects.

The atlas (``mechlens.atlas.build_atlas``, ``feature_visualizer``, ``feature_attributor``) takes no feature
or target argument: it publishes the latents of the SAE it is given, addressed by index, so there is
no spec to accept there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechlens.attribution import attribute, resolve_target
from mechlens.cli import main
from mechlens.evaluation import attribution_stability, deletion_curve, insertion_curve, randomization_check
from mechlens.features import (
    Channel,
    ClassLogit,
    LayerEnergy,
    Neuron,
    as_feature,
    as_features,
    feature_forward,
)
from mechlens.featvis import (
    FeatureTerm,
    Objective,
    as_objective,
    deepdream,
    feature,
    per_image,
    render,
)
from mechlens.featvis.objectives import PerImageTerm
from mechlens.models import load_model, small_cnn
from mechlens.probes import ConceptSet, relative_tcav, run_tcav, target_gradients

LAYER = "stage2"
FLAT = "flatten"  # [B, C]
BAD = ["klass:1", "class:x", "channel:stage2", "3", "neuron:stage2:0:a"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _same(a, b) -> None:
    torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b), rtol=0, atol=0)


def _same_feature(a, b) -> None:
    assert type(a) is type(b) and a.name == b.name and a.layer == b.layer


# ----------------------------------------------------------------------------- the one reader
def test_as_feature_reads_specs_features_and_class_indices() -> None:
    channel = Channel(LAYER, 3)
    assert as_feature(channel) is channel
    _same_feature(as_feature("channel:stage2:3"), channel)
    _same_feature(as_feature("class:1"), ClassLogit(1))
    _same_feature(as_feature(1), ClassLogit(1))
    _same_feature(as_feature(np.int64(1)), ClassLogit(1))
    _same_feature(as_feature("layer:stage2"), LayerEnergy(LAYER))
    _same_feature(as_feature("neuron:stage2:0:1,2"), Neuron(LAYER, 0, (1, 2)))
    mixed = as_features(["class:1", channel, 2])
    assert [f.name for f in mixed] == ["class:1", "channel:stage2:3", "class:2"]
    assert [f.name for f in as_features("class:1")] == ["class:1"]
    with pytest.raises(TypeError, match="cannot use float"):
        as_feature(1.5)
    with pytest.raises(TypeError, match="bool"):
        as_feature(True)


def test_feature_forward_takes_specs(model, images) -> None:
    one = feature_forward(model, "channel:stage2:0", images, grads=False)
    _same(one.values, feature_forward(model, Channel(LAYER, 0), images, grads=False).values)
    many = feature_forward(model, ["class:1", "channel:stage2:0"], images, grads=False)
    _same(many.values, feature_forward(model, [ClassLogit(1), Channel(LAYER, 0)], images, grads=False).values)
    assert many.values.shape == (4, 2)


# ----------------------------------------------------------------------------- TCAV
def _sets(model):
    gen = torch.Generator().manual_seed(1)

    def images(n, shift=0.0):
        return [(torch.rand(3, 32, 32, generator=gen) + shift).clamp(0, 1) for _ in range(n)]

    concept = ConceptSet.from_dataset("bright", images(8, 0.4))
    randoms = [ConceptSet.from_dataset(f"random{i}", images(8)) for i in range(3)]
    examples = ConceptSet.from_dataset("examples", images(6))
    return concept, randoms, examples


def _rows(report) -> str:
    return json.dumps(report.rows(), sort_keys=True, default=str)


def test_run_tcav_takes_spec_targets(model) -> None:
    concept, randoms, examples = _sets(model)
    kwargs = dict(layers=LAYER, concepts=[concept], random_sets=randoms, examples=examples, seed=0)
    by_spec = run_tcav(model, targets=["class:1"], **kwargs)
    by_feature = run_tcav(model, targets=[ClassLogit(1)], **kwargs)
    assert [r["target"] for r in by_spec.rows()] == ["class:1"]
    assert _rows(by_spec) == _rows(by_feature)
    assert _rows(run_tcav(model, targets="class:1", **kwargs)) == _rows(by_feature)  # one spec, no list


def test_tcav_gradients_and_relative_tcav_take_specs(model) -> None:
    concept, randoms, examples = _sets(model)
    x = torch.stack([examples.dataset[i] for i in range(len(examples))])
    np.testing.assert_array_equal(target_gradients(model, LAYER, x, "channel:stage3:2"),
                                  target_gradients(model, LAYER, x, Channel("stage3", 2)))
    kwargs = dict(layer=LAYER, concept=concept, other=randoms[0], examples=examples, runs=2)
    by_spec = relative_tcav(model, target="class:1", **kwargs)
    by_feature = relative_tcav(model, target=ClassLogit(1), **kwargs)
    assert by_spec.target == "class:1" and by_spec.scores == by_feature.scores


# ----------------------------------------------------------------------------- feature visualisation
def test_render_takes_a_spec_and_a_list_of_specs(model) -> None:
    settings = dict(size=16, steps=3, seed=0)
    by_spec = render(model, "channel:stage2:0", **settings)
    _same(by_spec.images, render(model, Channel(LAYER, 0), **settings).images)
    specs = render(model, ["channel:stage2:0", "class:1"], **settings)
    features = render(model, [Channel(LAYER, 0), ClassLogit(1)], **settings)
    _same(specs.images, features.images)
    _same(specs.target_values, features.target_values)


def test_deepdream_takes_specs(model) -> None:
    photo = torch.rand(3, 40, 40, generator=torch.Generator().manual_seed(2))
    settings = dict(octaves=2, steps=2, jitter=4, tile_size=None, min_size=16, seed=0)
    by_spec = deepdream(model, photo, "channel:stage2:0", **settings)
    _same(by_spec.image, deepdream(model, photo, Channel(LAYER, 0), **settings).image)
    energy = deepdream(model, photo, "layer:stage2", **settings)
    _same(energy.image, deepdream(model, photo, LayerEnergy(LAYER), **settings).image)
    _same(energy.image, deepdream(model, photo, LAYER, **settings).image)  # a bare layer name = its energy


def test_objective_builders_take_specs(model, images) -> None:
    # read on a forward's activations outside any entry point: "flatten" is [B, C], whose layout
    # needs no model to be known (render above covers a conv layer through the entry point)
    fwd = feature_forward(model, [ClassLogit(1), Channel(FLAT, 0)], images, grads=False)
    act = {"": fwd.output, FLAT: fwd.activations[FLAT]}
    four = ["class:1", "channel:flatten:0", "class:2", "channel:flatten:1"]
    four_f = [ClassLogit(1), Channel(FLAT, 0), ClassLogit(2), Channel(FLAT, 1)]
    pairs = [
        (feature("channel:flatten:0"), feature(Channel(FLAT, 0))),
        (feature("class:1", 2), feature(ClassLogit(1), 2)),
        (Objective.feature("class:1"), Objective.feature(ClassLogit(1))),
        (Objective("channel:flatten:0"), Objective(Channel(FLAT, 0))),
        (as_objective("class:1"), as_objective(ClassLogit(1))),
        (per_image(four), per_image(four_f)),
        (Objective.per_image(four), Objective.per_image(four_f)),
        (as_objective(four), as_objective(four_f)),
        (Objective(FeatureTerm("channel:flatten:0", 1)), Objective(FeatureTerm(Channel(FLAT, 0), 1))),
        (Objective(PerImageTerm(four)), Objective(PerImageTerm(four_f))),
    ]
    for by_spec, by_feature in pairs:
        assert repr(by_spec) == repr(by_feature)
        _same(by_spec(act, images), by_feature(act, images))


# ----------------------------------------------------------------------------- attribution
def test_attribute_takes_specs(model, images) -> None:
    for method, kwargs in [("saliency", {}), ("integrated_gradients", {"n_steps": 4})]:
        by_spec = attribute(model, images, "class:1", method=method, **kwargs)
        by_feature = attribute(model, images, ClassLogit(1), method=method, **kwargs)
        assert by_spec.features == ["class:1"] * 4
        _same(by_spec.map, by_feature.map)
    per_sample = ["class:1", "channel:stage2:0", "class:1", "class:3"]
    by_spec = attribute(model, images, per_sample, method="saliency")
    by_feature = attribute(model, images, [ClassLogit(1), Channel(LAYER, 0), ClassLogit(1), ClassLogit(3)],
                           method="saliency")
    assert by_spec.features == per_sample
    _same(by_spec.map, by_feature.map)
    assert resolve_target(model, images, "channel:stage2:0").names == ["channel:stage2:0"] * 4


# ----------------------------------------------------------------------------- evaluation
def test_evaluation_functions_take_specs(model, images) -> None:
    saliency = attribute(model, images, ClassLogit(1), method="saliency")
    for curve in (deletion_curve, insertion_curve):
        by_spec = curve(model, images, "class:1", saliency, steps=4)
        _same(by_spec.scores, curve(model, images, ClassLogit(1), saliency, steps=4).scores)
    stable = attribution_stability(model, images, "channel:stage2:0", "saliency")
    _same(stable.spearman, attribution_stability(model, images, Channel(LAYER, 0), "saliency").spearman)
    check = dict(layers=["head*"], keep_maps=False)
    by_spec = randomization_check(model, images, "class:1", "saliency", **check)
    by_feature = randomization_check(model, images, ClassLogit(1), "saliency", **check)
    _same(by_spec.original, by_feature.original)
    _same(by_spec.spearman, by_feature.spearman)


# ----------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def tiny():
    return load_model("mechlens:small_cnn_tiny", device="cpu")


def test_cli_visualize_matches_render_of_the_feature(tiny, tmp_path, capsys) -> None:
    code = main(["visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "channel:stage2:0", "class:1",
                 "--size", "16", "--steps", "3", "--device", "cpu", "--out", str(tmp_path)])
    assert code == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "featvis.json").read_text())["features"]
    expected = render(tiny, Objective.per_image([Channel(LAYER, 0), ClassLogit(1)]), size=16, steps=3, seed=0,
                      decorrelate=True)
    assert [e["feature"] for e in written] == ["channel:stage2:0", "class:1"]
    assert [e["activation"] for e in written] == [float(v) for v in expected.target_values]


def test_cli_attribute_matches_attribute_of_the_feature(tiny, tmp_path, capsys) -> None:
    from PIL import Image
    from safetensors.torch import load_file

    from mechlens.cli.attribute import load_images

    path = tmp_path / "a.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(path)
    code = main(["attribute", "--model", "mechlens:small_cnn_tiny", "--image", str(path), "--method", "saliency",
                 "--target", "channel:stage2:1", "--save-maps", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    inputs = load_images([str(path)], tiny.preprocessing)
    expected = attribute(tiny.model, inputs, Channel(LAYER, 1), method="saliency")
    _same(load_file(str(tmp_path / "out" / "maps.safetensors"))["saliency"], expected.map.float())


def test_cli_dream_matches_deepdream_of_the_feature(tiny, tmp_path, capsys) -> None:
    from PIL import Image

    from mechlens.featvis import load_image

    photo = tmp_path / "photo.png"
    Image.fromarray((np.random.default_rng(1).random((48, 48, 3)) * 255).astype(np.uint8)).save(photo)
    code = main(["dream", "--model", "mechlens:small_cnn_tiny", "--image", str(photo), "--feature", "channel:stage2:0",
                 "--octaves", "1", "--steps", "2", "--device", "cpu", "--json", "--out", str(tmp_path / "d.png")])
    assert code == 0, capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out)
    expected = deepdream(tiny, load_image(str(photo)), Channel(LAYER, 0), octaves=1, steps=2, seed=0)
    assert summary["objective_after"] == pytest.approx(expected.objective_after.tolist(), rel=0, abs=0)


def _image_folder(folder, count, seed, shift=0.0):
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = np.clip(rng.random((64, 64, 3)) + shift, 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_cli_tcav_matches_run_tcav_of_the_feature(tiny, tmp_path, capsys) -> None:
    concept = _image_folder(tmp_path / "bright", 5, 0, shift=0.4)
    randoms = [_image_folder(tmp_path / f"random{i}", 5, 1 + i) for i in range(3)]
    examples = _image_folder(tmp_path / "examples", 4, 9)
    code = main(["tcav", "--model", "mechlens:small_cnn_tiny", "--layer", LAYER, "--concept", f"bright={concept}",
                 "--random", *map(str, randoms), "--examples", str(examples), "--target", "class:1",
                 "--device", "cpu", "--out", str(tmp_path / "out")])
    assert code == 0, capsys.readouterr().err
    written = json.loads((tmp_path / "out" / "tcav.json").read_text())
    sets = [ConceptSet.from_folder(f"random{i}", folder, image_size=64) for i, folder in enumerate(randoms)]
    report = run_tcav(tiny, layers=LAYER, concepts=[ConceptSet.from_folder("bright", concept, image_size=64)],
                      random_sets=sets, examples=ConceptSet.from_folder("examples", examples, image_size=64),
                      targets=[ClassLogit(1)])
    report.to_json(tmp_path / "expected.json")
    assert written == json.loads((tmp_path / "expected.json").read_text())
    assert [r["target"] for r in written["results"]] == ["class:1"]


# ----------------------------------------------------------------------------- bad specs
def _check_one_line(error: BaseException, spec: str) -> None:
    text = str(error)
    assert "\n" not in text and repr(spec) in text, text
    assert "expected" in text and ("class:INDEX" in text or ":LAYER:" in text), text


@pytest.mark.parametrize("spec", BAD)
def test_bad_specs_fail_with_one_line_naming_spec_and_forms(spec, model, images) -> None:
    calls = {
        "as_feature": lambda: as_feature(spec),
        "feature_forward": lambda: feature_forward(model, [spec], images),
        "attribute": lambda: attribute(model, images, spec, method="saliency"),
        "deletion_curve": lambda: deletion_curve(model, images, spec, torch.rand(4, 32, 32), steps=2),
        "render": lambda: render(model, [spec], size=16, steps=1),
        "objective": lambda: feature(spec),
        "target_gradients": lambda: target_gradients(model, LAYER, images, spec),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError) as info:
            call()
        _check_one_line(info.value, spec)


def test_bad_spec_fails_run_tcav_and_the_cli(model, tmp_path, capsys) -> None:
    concept, randoms, examples = _sets(model)
    with pytest.raises(ValueError) as info:
        run_tcav(model, layers=LAYER, concepts=[concept], random_sets=randoms, examples=examples,
                 targets=["class:1", "klass:1"])
    _check_one_line(info.value, "klass:1")
    code = main(["visualize", "--model", "mechlens:small_cnn_tiny", "--feature", "channel:stage2", "--steps", "1",
                 "--device", "cpu", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "'channel:stage2'" in err and "channel:LAYER:INDEX" in err, err
