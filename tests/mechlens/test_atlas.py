"""The feature atlas: content computed from the SAE and the store, escaping, and a real headless
browser (Debian's chromium driven by Playwright) loading, sorting and navigating it."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from activation_store import ActivationStore
from mechlens.atlas import build_atlas, logit_effects
from mechlens.capture import capture_to_store
from mechlens.probes import CAV

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def atlas_inputs(tmp_path_factory, trained_shapes_model):
    from mechlens.sae import TopKConfig, TrainConfig, feature_statistics, train_sae

    root = tmp_path_factory.mktemp("atlas")
    loaded = trained_shapes_model.loaded
    capture_to_store(loaded, "synthetic:shapes?n=160&artefact_class=square&artefact_p=0.95", root / "store",
                     layers="stage3", num_workers=0, progress=False)
    result = train_sae(root / "store", "stage3", TopKConfig(width=48, k=6), TrainConfig(steps=60, batch_size=256),
                       out=root / "sae", progress=False)
    sae = result.sae if hasattr(result, "sae") else result.saes[0]
    feature_statistics(sae, root / "store", top_k=6).save(root / "sae")
    return {"root": root, "loaded": loaded, "sae": sae}


@pytest.fixture(scope="module")
def atlas(atlas_inputs):
    root = atlas_inputs["root"]
    cav = CAV("<b>ruler & co</b>", "random", "stage3", vector=atlas_inputs["sae"].W_dec[0].detach().numpy().copy(),
              intercept=0.0, accuracy=1.0)
    cav.vector /= np.linalg.norm(cav.vector)
    return build_atlas(root / "sae", root / "store", atlas_inputs["loaded"], root / "site", cavs=[cav], progress=False)


def test_atlas_content_is_computed_from_the_sae_and_the_store(atlas, atlas_inputs):
    from mechlens.sae import FeatureStatistics

    stats = FeatureStatistics.load(atlas_inputs["root"] / "sae")
    data = json.loads((atlas.out / "atlas.json").read_text())
    published = [f["id"] for f in data["features"]]
    assert set(published) == set(np.flatnonzero(stats.frequency > 0).tolist())
    assert [f["frequency"] for f in data["features"]] == sorted((f["frequency"] for f in data["features"]), reverse=True)
    first = data["features"][0]
    assert first["max"] == pytest.approx(float(stats.max[first["id"]]))
    assert [e["sample"] for e in first["exemplars"]] == [int(s) for s in stats.top_samples[first["id"]] if s >= 0]
    index = ActivationStore(atlas_inputs["root"] / "store")["stage3"].read_index()
    labels = dict(zip(index.sample_id.tolist(), index.label.tolist()))
    assert all(e["label"] == labels[e["sample"]] for e in first["exemplars"])
    for f in data["features"][:5]:
        assert (atlas.out / "img" / f"{f['id']}-exemplars.png").exists()
        assert (atlas.out / "features" / f"{f['id']}.html").exists()
        assert sum(f["histogram"]) > 0
    # the CAV equal to latent 0's decoder direction is latent 0's best concept with cosine 1
    if 0 in published:
        zero = next(f for f in data["features"] if f["id"] == 0)
        assert zero["concept_cos"] == pytest.approx(1.0, abs=1e-5)


def test_user_text_is_escaped(atlas):
    page = (atlas.out / "index.html").read_text()
    assert "<b>ruler & co</b>" not in page
    assert "&lt;b&gt;ruler &amp; co&lt;/b&gt;" in page


def test_logit_effect_matches_a_finite_difference(atlas_inputs):
    loaded = atlas_inputs["loaded"]
    net = loaded.model.double()
    try:
        images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        direction = torch.randn(2, 128, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        effects = logit_effects(net, "stage3", images, direction)
        eps = 1e-5
        handle = net.stage3.register_forward_hook(lambda m, a, o: o + eps * direction[1].view(1, -1, 1, 1))
        with torch.no_grad():
            shifted = net(images)
        handle.remove()
        with torch.no_grad():
            base = net(images)
        numeric = ((shifted - base) / eps).mean(dim=0).numpy()
        np.testing.assert_allclose(effects[:, 1], numeric, rtol=1e-3, atol=1e-5)
    finally:
        loaded.model.float()


def test_atlas_refuses_a_foreign_directory(atlas_inputs, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    root = atlas_inputs["root"]
    with pytest.raises(FileExistsError, match="not an atlas"):
        build_atlas(root / "sae", root / "store", atlas_inputs["loaded"], tmp_path, progress=False)
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_atlas_in_a_real_headless_browser(atlas):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=BROWSER_ARGS)
        try:
            page = browser.new_page()
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            failed: list[str] = []
            page.on("requestfailed", lambda r: failed.append(r.url))
            page.goto(atlas.index.as_uri())
            page.wait_for_load_state("load")
            rows = page.locator("#features tbody tr")
            assert rows.count() == len(atlas.features)
            # every exemplar thumbnail of the first rows decoded (naturalWidth > 0)
            widths = page.eval_on_selector_all("#features img.thumb", "els => els.slice(0, 10).map(e => e.naturalWidth)")
            assert widths and min(widths) > 0

            def column(n: int) -> list[float]:
                return [float(v) for v in page.eval_on_selector_all(
                    f"#features tbody tr td:nth-child({n})", "els => els.map(e => e.getAttribute('data-value'))")]

            page.click("#features thead th:nth-child(5)")  # max: first click sorts descending
            maxes = column(5)
            assert maxes == sorted(maxes, reverse=True)
            page.click("#features thead th:nth-child(5)")
            assert column(5) == sorted(maxes)
            page.fill("#filter", "zzzz-no-such-text")
            assert page.locator("#shown").inner_text() == "0"
            page.fill("#filter", "")
            first_id = int(column(1)[0])
            page.click("#features tbody tr:first-child td:first-child a")
            page.wait_for_load_state("load")
            assert page.url.endswith(f"features/{first_id}.html")
            assert f"Feature #{first_id}" in page.inner_text("h1")
            shown = page.eval_on_selector_all("img", "els => els.map(e => e.naturalWidth)")
            assert shown and min(shown) > 0
            page.click("text=← atlas")
            page.wait_for_load_state("load")
            page.click("svg.map a >> nth=0")  # the overview map's points are links too
            page.wait_for_load_state("load")
            assert "/features/" in page.url
        finally:
            browser.close()
    assert not errors, errors
    assert not failed, failed
