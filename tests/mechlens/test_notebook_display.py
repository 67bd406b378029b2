"""Results display themselves in a notebook (issue 20, point 5): every result's repr is short
(no tensor or array dump), tabular results render an HTML table and convert to pandas, figures
render a PNG or SVG. Each "cell" below is what a user would type."""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DUMP = re.compile(r"tensor\(|array\(|Conv2d\(|\n")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from mechlens.attribution import attribute
    from mechlens.capture import capture_to_store
    from mechlens.data import build_dataset
    from mechlens.interventions import ablate, attribution_patching, feature_circuit, intervention_effects
    from mechlens.models import load_model
    from mechlens.probes import ConceptSet, random_concept_sets, run_tcav
    from mechlens.sae import TopKConfig, TrainConfig, evaluate_store, feature_statistics, train_sae
    from activation_store import ActivationStore

    root = tmp_path_factory.mktemp("notebook")
    loaded = load_model("mechlens:small_cnn_tiny")
    spec = "synthetic:shapes?n=40&size=64"
    capture_to_store(loaded, spec, root / "store", layers=["stage1", "stage2"], spatial="all", progress=False)
    store = ActivationStore(root / "store")
    saes = [train_sae(root / "store", layer, TopKConfig(width=16, k=4), TrainConfig(steps=20, batch_size=256),
                      out=root / f"sae-{layer}", progress=False) for layer in ("stage1", "stage2")]
    saes = [(r.sae if hasattr(r, "sae") else r.saes[0]).eval() for r in saes]
    dataset = build_dataset(spec)
    images = torch.stack([dataset[i][0] for i in range(12)])
    labels = torch.tensor([int(dataset[i][1]) for i in range(12)])
    concept = ConceptSet.from_dataset("first", dataset, list(range(0, 6)))
    randoms = random_concept_sets(dataset, 3, 6, seed=0, exclude=list(range(12)))
    examples = ConceptSet.from_dataset("examples", dataset, list(range(6, 12)))
    return {
        "model": loaded,
        "store": store,
        "attribution": attribute(loaded, images[:3], "class:1", method="saliency"),
        "metrics": evaluate_store(saes[1], store),
        "statistics": feature_statistics(saes[1], store, top_k=4),
        "effects": intervention_effects(loaded, (images, labels), {"off": ablate("channel:stage2:0")}, ["class:0"],
                                        bootstrap=200),
        "latent effects": attribution_patching(loaded, saes[1], images, "class:0"),
        "circuit": feature_circuit(loaded, saes, images, "class:0", nodes_per_layer=2),
        "tcav": run_tcav(loaded, layers="stage2", concepts=[concept], random_sets=randoms, examples=examples, targets=[0]),
    }


TABLES = ("metrics", "statistics", "effects", "latent effects", "tcav")


@pytest.mark.parametrize("name", ["model", "store", "attribution", "metrics", "statistics", "effects", "latent effects",
                                  "circuit", "tcav"])
def test_reprs_are_short_and_dump_nothing(results, name) -> None:
    text = repr(results[name])
    assert len(text) < 400 and not DUMP.search(text), text[:400]


@pytest.mark.parametrize("name", TABLES)
def test_tabular_results_render_a_table_and_convert_to_pandas(results, name) -> None:
    html = results[name]._repr_html_()
    assert html.startswith("<table>") and "<th>" in html and "<td" in html and "array(" not in html
    if name != "metrics":
        frame = results[name].to_pandas()
        assert len(frame) >= 1 and len(frame.columns) >= 3


def test_figures_render_themselves(results) -> None:
    assert results["attribution"]._repr_png_()[:4] == b"\x89PNG"
    import xml.etree.ElementTree as ElementTree

    ElementTree.fromstring(results["circuit"]._repr_svg_())


def test_python_defaults_match_the_cli_and_one_image_is_a_batch_of_one() -> None:
    import mechlens
    from mechlens.attribution import attribute, suggest_cam_layer
    from mechlens.models import load_model

    loaded = load_model("mechlens:small_cnn_tiny")
    image = mechlens.to_input(mechlens.load_image("skimage:astronaut"), loaded)[0]  # [3, 64, 64] pixels
    assert tuple(image.shape) == (3, 64, 64) and 0 <= float(image.min()) and float(image.max()) <= 1
    maps = attribute(loaded, image, "class:0", method="gradcam")  # no layer=: the CLI's default
    assert maps.extras["layer"] == suggest_cam_layer(loaded, (3, 64, 64)) and maps.map.shape[0] == 1
    named = attribute(loaded, image[None], "class:0", method="gradcam", layer=maps.extras["layer"])
    torch.testing.assert_close(named.map, maps.map)
    with pytest.raises(ValueError, match=r"pixels in \[0, 1\]"):
        mechlens.to_input(torch.full((3, 8, 8), 2.0), loaded)
    batch = mechlens.to_input([torch.rand(3, 100, 80), "skimage:coffee"], loaded)
    assert tuple(batch.shape) == (2, 3, 64, 64)
