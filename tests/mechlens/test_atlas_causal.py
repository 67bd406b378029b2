"""The atlas's causal effects and circuit page (issue 19, points 4 and 6): each feature page
shows the measured ablation effect per class beside the linear estimate of the same ablation,
flags where they disagree, for SAE latents, channels and directions alike, and skips it on
request; a circuit is published as a page that links its nodes to the atlas's feature pages."""
from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.atlas import FeatureSet, ablation_disagrees, build_atlas, channel_features, direction_features
from mechlens.capture import capture_to_store
from mechlens.data import build_dataset
from mechlens.features import Channel, Direction
from mechlens.interventions import ablate, attribution_patching, feature_circuit, intervened_forward
from mechlens.models import load_model
from mechlens.sae import TopKConfig, build_sae

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SPEC = "synthetic:shapes?n=32"
CAUSAL_IMAGES = 24  # fewer than the dataset: the panel takes the dataset's first images
SVG = "{http://www.w3.org/2000/svg}"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _sae(d_in: int, layer: str, seed: int) -> nn.Module:
    return build_sae(TopKConfig(width=16, k=4, d_in=d_in, layer=layer, layout="nchw"), seed=seed).eval()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("atlas_causal")
    loaded = load_model("mechlens:small_cnn_tiny")  # random weights, seeded
    capture_to_store(loaded, SPEC, root / "store", layers=["stage1", "stage2"], num_workers=0, progress=False)
    dataset = build_dataset(SPEC)
    images = torch.stack([dataset[i][0] for i in range(CAUSAL_IMAGES)])
    return {"root": root, "loaded": loaded, "images": images, "sae1": _sae(16, "stage1", 1), "sae2": _sae(32, "stage2", 2)}


@pytest.fixture(scope="module")
def circuit(inputs):
    return feature_circuit(inputs["loaded"], [inputs["sae1"], inputs["sae2"]], inputs["images"], "class:0",
                           nodes_per_layer=3)


@pytest.fixture(scope="module")
def sae_atlas(inputs, circuit):
    return build_atlas(inputs["sae2"], inputs["root"] / "store", inputs["loaded"], inputs["root"] / "sae-site",
                       causal_images=CAUSAL_IMAGES, circuit=circuit, progress=False)


def _feature(atlas, feature_id: int) -> dict:
    return next(f for f in atlas.data["features"] if f["id"] == feature_id)


def _measured(model, images: torch.Tensor, feature) -> np.ndarray:
    """The mean change of every logit when ``feature`` is ablated, computed independently."""
    with torch.no_grad():
        clean = model.model(images)
        after = intervened_forward(model, images, ablate(feature))
    return (after - clean).double().mean(dim=0).numpy()


def test_the_page_shows_the_measured_ablation_effect_of_each_class(sae_atlas, inputs):
    first = sae_atlas.data["features"][0]
    causal = first["causal"]
    assert causal["images"] == CAUSAL_IMAGES and "error term kept" in causal["ablation"]
    expected = _measured(inputs["loaded"], inputs["images"], inputs["sae2"].feature(first["id"]))
    effects = np.array([c["effect"] for c in causal["classes"]])
    np.testing.assert_allclose(effects, expected, atol=1e-5, rtol=0)
    assert all(c["ci_low"] <= c["effect"] <= c["ci_high"] for c in causal["classes"])
    # the linear figure is the first-order estimate of the same ablation: attribution patching's
    for c in causal["classes"][:2]:
        estimate = attribution_patching(inputs["loaded"], inputs["sae2"], inputs["images"], f"class:{c['class']}")
        assert c["linear"] == pytest.approx(float(estimate.effects[first["id"]]), rel=1e-4, abs=1e-7)
    page = (sae_atlas.out / "features" / f"{first['id']}.html").read_text()
    shown = next(c for c in causal["classes"] if c["shown"])
    assert "Causal effects (ablation)" in page
    assert f"{shown['effect']:+.3g} [{shown['ci_low']:+.3g}, {shown['ci_high']:+.3g}]" in page
    # the data tools read: atlas.json holds the same numbers
    stored = json.loads((sae_atlas.out / "atlas.json").read_text())
    assert _feature(sae_atlas, first["id"])["causal"] == stored["features"][0]["causal"]
    assert "causal effects" in stored["panels"]


class _Kinked(nn.Module):
    """Logit 0 is ``relu(channel 0 - 1.8)``, kinked below the channel's values (about 2): its
    gradient says ablating the channel costs about 2, ablation measures about 0.2. Logit 1 is
    channel 1 itself, so its linear estimate is exact."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Conv2d(3, 2, 1)
        with torch.no_grad():
            self.feat.weight.zero_()
            self.feat.weight[0, 0] = 0.2
            self.feat.weight[1, 1] = 0.2
            self.feat.bias.copy_(torch.tensor([2.0, 1.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.feat(x)
        return torch.stack([torch.relu(h[:, 0] - 1.8).mean(dim=(1, 2)), h[:, 1].mean(dim=(1, 2))], dim=1)


def test_a_disagreement_is_flagged_where_the_linear_estimate_is_wrong_and_only_there(tmp_path):
    net = _Kinked().eval()
    spec = "synthetic:shapes?n=16&size=16"
    capture_to_store(net, spec, tmp_path / "store", layers=["feat"], num_workers=0, progress=False)
    atlas = build_atlas(channel_features("feat", 2), tmp_path / "store", net, tmp_path / "site",
                        class_names=["kinked", "straight"], causal_images=16, progress=False)
    kinked, straight = _feature(atlas, 0)["causal"], _feature(atlas, 1)["causal"]
    linear, measured = kinked["classes"][0]["linear"], kinked["classes"][0]["effect"]
    # linear: -mean(channel 0); measured: -(mean(channel 0) - 1.8), the channel never below 1.8
    assert linear < -2 and linear - measured == pytest.approx(-1.8, abs=1e-4)
    assert [c["disagree"] for c in kinked["classes"]] == [True, False] and kinked["disagrees"]
    assert straight["classes"][1]["linear"] == pytest.approx(straight["classes"][1]["effect"], abs=1e-5)
    assert not straight["disagrees"]
    page = (atlas.out / "features" / "0.html").read_text()
    c = kinked["classes"][0]
    assert (f"the linear estimate says\n{c['linear']:+.3g} on kinked; ablation measures {c['effect']:+.3g} "
            f"[{c['ci_low']:+.3g}, {c['ci_high']:+.3g}]: they disagree") in page
    assert 'class="badge">disagree' in page
    # the index marks the feature, so a filter on "disagree" finds it
    assert re.search(r'href="features/0.html">#0</a>\s*<span class="badge"[^>]*>disagree', (atlas.out / "index.html").read_text())
    assert not re.search(r'href="features/1.html">#1</a>\s*<span', (atlas.out / "index.html").read_text())
    agreeing = (atlas.out / "features" / "1.html").read_text()
    assert "they disagree" not in agreeing and 'class="badge"' not in agreeing
    assert "agree on every class" in agreeing


def test_the_disagreement_rule():
    # the example: +0.64 estimated, +0.02 [-0.01, 0.05] measured
    assert ablation_disagrees(np.array([0.64]), np.array([0.02]), np.array([-0.01]), np.array([0.05])).tolist() == [True]
    # within a factor of about 2, or inside the interval: agree; noise around 0 is not a sign flip
    assert ablation_disagrees(np.array([0.3, 0.2, 1.0, 1e-4]), np.array([0.4, 0.21, 1.0, -1e-4]),
                              np.array([0.38, 0.1, 0.9, -2e-4]), np.array([0.42, 0.3, 1.1, -0.5e-4])).tolist() == [False] * 4
    # opposite signs, the interval clear of 0
    assert ablation_disagrees(np.array([-0.1, 1.0]), np.array([0.05, 1.0]), np.array([0.01, 0.9]),
                              np.array([0.09, 1.1])).tolist() == [True, False]


@pytest.mark.parametrize("kind", ["channel", "direction"])
def test_channel_and_direction_atlases_get_the_panel(inputs, tmp_path, kind):
    if kind == "channel":
        features = channel_features("stage2", 32, channels=[0, 3, 5, 7])
        as_feature = lambda i: Channel("stage2", [0, 3, 5, 7][i])  # noqa: E731
        ablation = "channel zeroed"
    else:
        vectors = torch.randn(3, 32, generator=torch.Generator().manual_seed(4))
        features = direction_features("stage2", vectors, names=["a", "b", "c"])
        as_feature = lambda i: Direction("stage2", vectors[i] / vectors[i].norm())  # noqa: E731
        ablation = "direction projected out"
    atlas = build_atlas(features, inputs["root"] / "store", inputs["loaded"], tmp_path / "site",
                        causal_images=CAUSAL_IMAGES, progress=False)
    assert all(f["causal"]["ablation"] == ablation and len(f["causal"]["classes"]) == 5 for f in atlas.data["features"])
    first = atlas.data["features"][0]
    expected = _measured(inputs["loaded"], inputs["images"], as_feature(first["id"]))
    np.testing.assert_allclose([c["effect"] for c in first["causal"]["classes"]], expected, atol=1e-5, rtol=0)
    assert "Causal effects (ablation)" in (atlas.out / "features" / f"{first['id']}.html").read_text()
    assert atlas.circuit is None and not (atlas.out / "circuit.html").exists()


def test_causal_false_skips_the_panel(inputs, tmp_path):
    atlas = build_atlas(inputs["sae2"], inputs["root"] / "store", inputs["loaded"], tmp_path / "site", causal=False,
                        progress=False)
    assert "causal effects" not in atlas.data["panels"]
    assert all(f["causal"] is None for f in atlas.data["features"])
    assert "Causal effects" not in (atlas.out / "features" / f"{atlas.features[0]}.html").read_text()


class _Plain(FeatureSet):
    """A third-party feature set with no :meth:`FeatureSet.feature`: nothing to intervene on."""

    def __init__(self) -> None:
        super().__init__("stage2", 32, torch.eye(32)[:2], "two plain channels")

    def encode(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[:, :2]

    def spec(self, index: int) -> str:
        return f"plain {index}"


def test_a_set_that_cannot_be_ablated_is_published_without_the_numbers(inputs, tmp_path):
    atlas = build_atlas(_Plain(), inputs["root"] / "store", inputs["loaded"], tmp_path / "site", progress=False)
    assert all(set(f["causal"]) == {"skipped"} for f in atlas.data["features"])
    assert "not measured: _Plain names no feature" in (atlas.out / "features" / f"{atlas.features[0]}.html").read_text()


class _Balance(HTMLParser):
    """Start and end tags nest properly (void elements aside)."""

    VOID = {"meta", "link", "img", "br", "hr", "input"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.links: list[str] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs).get("href", ""))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        if tag == "a":
            self.links.append(dict(attrs).get("href", ""))

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def test_the_circuit_page_links_its_nodes_to_the_atlas(sae_atlas, circuit):
    out = sae_atlas.out
    assert sae_atlas.circuit == out / "circuit.html"
    html = (out / "circuit.html").read_text()
    parser = _Balance()
    parser.feed(html)
    assert not parser.errors and parser.stack == []
    svg = ET.fromstring(re.search(r"<svg.*</svg>", html, re.S).group(0))  # well-formed XML
    linked = {a.get("href"): a for a in svg.iter(f"{SVG}a")}
    published = set(sae_atlas.features)
    in_atlas = [n for n in circuit.nodes if n.layer == "stage2" and n.latent in published]
    assert in_atlas, "the test needs circuit nodes that the atlas publishes"
    for node in in_atlas:
        group = linked[f"features/{node.latent}.html"]
        assert group.find(f"{SVG}g/{SVG}title").text.startswith(f"latent {node.latent} of stage2")
        (image,) = group.iter(f"{SVG}image")
        assert image.get("href") == f"img/{node.latent}-ex0.png" and (out / image.get("href")).is_file()
        assert f"features/{node.latent}.html" in parser.links
    # other layers' nodes, and the error nodes, have neither a link nor a thumbnail
    assert len(linked) == len(in_atlas) and len(list(svg.iter(f"{SVG}image"))) == len(in_atlas)
    assert all((out / link).is_file() for link in parser.links)
    for node in circuit.nodes:
        assert f"<td>{node.layer}</td>" in html and f"{node.effect:+.4g}" in html
    assert f"{circuit.faithfulness:.3f}" in html and f"{circuit.completeness:.3f}" in html
    index = (out / "index.html").read_text()
    assert 'href="circuit.html"' in index
    recorded = json.loads((out / "atlas.json").read_text())["circuit"]
    assert recorded["page"] == "circuit.html" and recorded["faithfulness"] == pytest.approx(circuit.faithfulness)
    assert {n["name"]: n["page"] for n in recorded["nodes"]} == {
        n.name: f"features/{n.latent}.html" if n in in_atlas else None for n in circuit.nodes}
    assert json.loads((out / "circuit.json").read_text())["size"] == circuit.size


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_circuit_page_in_a_real_headless_browser(sae_atlas):
    from playwright.sync_api import sync_playwright

    from tests.mechlens.test_atlas import BROWSER_ARGS

    errors: list[str] = []
    failed: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(sae_atlas.index.as_uri())
            page.click("#circuit-link")
            page.wait_for_load_state("load")
            assert page.url.endswith("/circuit.html")
            page.click("svg a >> nth=0")  # a node of the circuit opens its feature page
            page.wait_for_load_state("load")
            assert re.search(r"/features/\d+\.html$", page.url)
            assert "Causal effects (ablation)" in page.inner_text("main")
        finally:
            browser.close()
    assert not errors, errors
    assert not failed, failed


def test_the_atlas_command_publishes_a_saved_circuit_and_can_skip_causal_effects(inputs, circuit, tmp_path, capsys):
    import json

    from mechlens.cli import main
    from mechlens.interventions import Circuit

    (tmp_path / "circuit.json").write_text(circuit.to_json())
    again = Circuit.load(tmp_path / "circuit.json")
    assert again.to_dict() == json.loads(circuit.to_json()) and again.to_svg() == circuit.to_svg()
    sae_dir = inputs["sae2"].save(tmp_path / "sae")
    argv = ["atlas", "--sae", str(sae_dir), "--store", str(inputs["root"] / "store"), "--model", "mechlens:small_cnn_tiny",
            "--circuit", str(tmp_path / "circuit.json"), "--no-causal", "--out", str(tmp_path / "site"), "--json", "--no-progress"]
    assert main(argv) == 0
    assert (tmp_path / "site" / "circuit.html").exists()
    data = json.loads((tmp_path / "site" / "atlas.json").read_text())
    assert all(not f.get("causal") for f in data["features"])
    (tmp_path / "bad.json").write_text("{}")
    assert main([*argv[:-5], "--circuit", str(tmp_path / "bad.json"), "--out", str(tmp_path / "site2")]) == 2
    assert "not a circuit" in capsys.readouterr().err


def test_flagged_features_come_first_with_a_badge_and_paths_are_relative(inputs, tmp_path):
    atlas = build_atlas(inputs["sae2"], inputs["root"] / "store", inputs["loaded"], tmp_path / "site", causal=False,
                        max_features=2, flagged={5: "ruler"}, progress=False)
    ids = [f["id"] for f in atlas.data["features"]]
    assert ids[0] == 5 and len(ids) == 3  # flagged first, published beyond max_features
    index = (tmp_path / "site" / "index.html").read_text()
    assert 'class="badge flag"' in index and str(inputs["root"]) not in index
    assert 'class="badge flag">ruler' in (tmp_path / "site" / "features" / "5.html").read_text()
    with pytest.raises(ValueError, match="never fire"):
        build_atlas(inputs["sae2"], inputs["root"] / "store", inputs["loaded"], tmp_path / "site2", causal=False,
                    flagged={999: "x"}, progress=False)


def test_pages_link_similar_features_the_map_is_coloured_and_the_histogram_has_axes(sae_atlas):
    data = sae_atlas.data["features"]
    published = {f["id"] for f in data}
    first = data[0]
    assert first["similar"] and all(s["id"] in published and s["id"] != first["id"] for s in first["similar"])
    cosines = [s["cos"] for s in first["similar"]]
    assert cosines == sorted(cosines, reverse=True)
    page = (sae_atlas.out / "features" / f"{first['id']}.html").read_text()
    assert f'href="{first["similar"][0]["id"]}.html"' in page
    assert "rows (log)" in page and "activation</text>" in page
    index = (sae_atlas.out / "index.html").read_text()
    classes = {f["top_classes"][0]["name"] for f in data if f["top_classes"]}
    assert all(f">{name}</text>" in index for name in classes) and 'fill-opacity:0.75' in index


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_a_large_index_shows_its_first_rows_and_the_rest_on_request(tmp_path):
    from playwright.sync_api import sync_playwright

    from mechlens.atlas.templates import SORT_JS

    rows = "".join(f'<tr><td class="num" data-value="{i}">#{i}</td><td>{"square" if i % 3 == 0 else "circle"}</td></tr>'
                   for i in range(1200))
    (tmp_path / "atlas.js").write_text(SORT_JS)
    (tmp_path / "index.html").write_text(
        '<!doctype html><html><body><span id="shown"></span><input id="filter"><table id="features"><thead><tr>'
        f'<th data-type="num">id</th><th>class</th></tr></thead><tbody>{rows}</tbody></table>'
        '<button id="more" style="display:none"></button><script src="atlas.js"></script></body></html>')
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto((tmp_path / "index.html").as_uri())
            visible = "() => Array.from(document.querySelectorAll('#features tbody tr')).filter(r => r.style.display !== 'none').length"
            assert page.evaluate(visible) == 500 and page.inner_text("#shown") == "1200"
            page.fill("#filter", "square")
            assert page.inner_text("#shown") == "400" and page.evaluate(visible) == 400 and not page.is_visible("#more")
            page.fill("#filter", "")
            page.click("#more")
            assert page.evaluate(visible) == 1200
        finally:
            browser.close()


def test_exemplars_below_the_top_sit_in_their_activation_band(sae_atlas):
    seen = 0
    for feature in sae_atlas.data["features"]:
        top = feature["max"]
        for band in feature["quantiles"]:
            for n, image in enumerate(band["images"]):
                assert band["low"] * top < image["value"] <= band["high"] * top + 1e-6
                assert (sae_atlas.out / "img" / f"{feature['id']}-q{band['index']}-{n}.png").is_file()
                seen += 1
    assert seen > 0
    page = (sae_atlas.out / "features" / f"{sae_atlas.data['features'][0]['id']}.html").read_text()
    assert "Below the top" in page


def test_published_pages_name_no_absolute_path(inputs, tmp_path):
    sae_dir = inputs["sae2"].save(tmp_path / "sae")
    atlas = build_atlas(str(sae_dir), inputs["root"] / "store", inputs["loaded"], tmp_path / "site", causal=False,
                        max_features=3, progress=False)
    specs = [f["spec"] for f in atlas.data["features"]]
    assert all(spec.startswith("sae:../sae:") for spec in specs), specs
    for page in (tmp_path / "site").rglob("*.html"):
        text = page.read_text()
        assert str(tmp_path) not in text and "/work/" not in text and "/tmp/" not in text, page


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_map_recolours_by_density_and_pages_show_crops_and_coactivation(sae_atlas):
    from playwright.sync_api import sync_playwright

    first = sae_atlas.data["features"][0]
    assert first["crops"] and first.get("coactive") is not None
    assert (sae_atlas.out / "img" / f"{first['id']}-crop0.png").is_file()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto((sae_atlas.out / "index.html").as_uri())
            # the colour the browser paints (computed), not an attribute a stylesheet may override
            fills = "() => Array.from(document.querySelectorAll('svg.map circle[data-class-fill]')).map(c => getComputedStyle(c).fill)"
            by_class = page.evaluate(fills)
            assert len(set(by_class)) > 1  # coloured by top class, not one default blue
            page.select_option("#mapcolour", "density")
            by_density = page.evaluate(fills)
            viridis = {"rgb(68, 1, 84)", "rgb(59, 82, 139)", "rgb(33, 145, 140)", "rgb(94, 201, 98)", "rgb(253, 231, 37)"}
            assert by_density != by_class and set(by_density) <= viridis
        finally:
            browser.close()


def test_pages_show_a_diversity_batch_of_visualizations(inputs, tmp_path):
    from mechlens.atlas import channel_features, feature_visualizer

    channels = channel_features("stage1", 16, [0, 1])
    visualize = feature_visualizer(inputs["loaded"], channels, size=16, steps=2, diversity=2)
    atlas = build_atlas(channels, inputs["root"] / "store", inputs["loaded"], tmp_path / "site", causal=False,
                        visualize=visualize, progress=False)
    for feature in atlas.data["features"]:
        assert feature["has_vis"] and feature["vis_more"] == 2
        for name in ("vis", "vis1", "vis2"):
            assert (tmp_path / "site" / "img" / f"{feature['id']}-{name}.png").is_file()
    assert "Diversity batch" in (tmp_path / "site" / "features" / f"{atlas.data['features'][0]['id']}.html").read_text()
