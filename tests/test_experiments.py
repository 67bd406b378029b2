"""Scripted experiments: the Clever Hans main job at a reduced size (its report must find the
shortcut from computed figures), the SAE sweep and the attribution sanity cascade, and the
``mechlens run`` / ``mechlens demo`` commands."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from mechlens.experiments import find_experiment, load_config, run_experiment


@pytest.fixture(scope="module")
def model_cache(request: pytest.FixtureRequest, trained_shapes_model) -> str:
    # the same cache as the trained_shapes_model fixture, so the model is trained once per session
    cache = getattr(request.config, "cache", None)
    assert trained_shapes_model.checkpoint is not None
    return str(cache.mkdir("mechlens_shapes_model")) if cache is not None else str(trained_shapes_model.checkpoint.parent)


@pytest.fixture(scope="module")
def clever_hans(tmp_path_factory, model_cache):
    out = tmp_path_factory.mktemp("clever_hans")
    figures = run_experiment("clever_hans", out, quick=True, overrides=[f'model_cache="{model_cache}"'])
    return out, figures


def test_clever_hans_report_finds_the_shortcut_from_computed_figures(clever_hans):
    out, f = clever_hans
    # Thresholds, and why: a model that ignored the ruler would classify squares equally well
    # with and without it (drop ~0; measured ~0.8 here); TCAV of a concept the class does not use
    # is not significant after Bonferroni (tested in test_tcav); an SAE latent that merely fires
    # on squares would have its top exemplars on the shape, not on the ruler's cells (< 75%);
    # the ruler covers ~5% of the image, so a pointing-game rate >= 0.5 is 10x chance.
    acc = f["accuracy"]
    assert acc["square_with_ruler"] - acc["square_without_ruler"] >= 0.2
    best_tcav = min(f["tcav"], key=lambda r: r["p_adjusted"])
    assert best_tcav["significant"] and best_tcav["p_adjusted"] < 0.05 and best_tcav["tcav_mean"] > 0.9
    assert f["sae"]["ruler_latents"] and f["sae"]["best_latent_ruler_fraction"] >= 0.75
    assert f["pointing_game"]["integrated_gradients / class square"] >= 0.5 > 10 * f["pointing_chance"] - 0.5
    assert f["shortcut_found"] and all(f["checks"].values())
    report = (out / "report.md").read_text()
    assert "The shortcut was found." in report
    assert f"{acc['square_with_ruler']:.3f}" in report and f"{acc['square_without_ruler']:.3f}" in report
    assert f"latent {f['sae']['best_latent']}" in report
    assert json.loads((out / "figures.json").read_text())["shortcut_found"] is True
    for name in ("report.html", "tcav.png", "tcav.csv", "attribution.png", "atlas/index.html"):
        assert (out / name).is_file(), name
    assert len(list((out / "featvis").glob("*.png"))) >= 2
    atlas = json.loads((out / "atlas" / "atlas.json").read_text())
    best = next(x for x in atlas["features"] if x["id"] == f["sae"]["best_latent"])
    assert best["has_vis"] and best["attributions"]


def test_sae_sweep_experiment(tmp_path, model_cache):
    result = run_experiment("sae_sweep", tmp_path, quick=True, overrides=[f'model_cache="{model_cache}"'])
    sweep = sorted(result["sweep"], key=lambda r: r["k"])
    assert [r["k"] for r in sweep] == [2, 8, 32]
    # TopK keeps k latents per row, minus those whose pre-activation is <= 0 (ReLU after the top-k)
    assert all(0.5 * r["k"] < r["l0"] <= r["k"] + 1e-6 for r in sweep), sweep
    assert sweep[0]["fvu"] > sweep[1]["fvu"] > sweep[2]["fvu"]  # more latents per row, better fidelity
    assert (tmp_path / "fvu_vs_l0.png").stat().st_size > 5000 and (tmp_path / "sweep.csv").exists()


def test_sanity_cascade_experiment(tmp_path, model_cache):
    result = run_experiment("sanity_cascade", tmp_path, quick=True, overrides=[f'model_cache="{model_cache}"'])
    final = result["final_spearman"]
    assert final["guided_backprop"] > 0.6 > final["gradcam"]
    assert result["verdict"]["guided_backprop"] == "fails"  # the verdict uses the registry's rule
    data = json.loads((tmp_path / "cascade.json").read_text())
    assert data["gradcam"]["layers"] == ["head", "stage3.1", "stage3.0"]
    assert (tmp_path / "summary.png").exists() and (tmp_path / "cascade-guided_backprop.png").exists()


def test_config_overrides_and_unknown_experiments(tmp_path):
    directory = find_experiment("experiments/clever_hans")
    config = load_config(directory, quick=True, overrides=["sae.k=4", "layer=stage2", 'model_cache="/m"'])
    assert config["sae"]["k"] == 4 and config["layer"] == "stage2" and config["model_cache"] == "/m"
    with pytest.raises(KeyError, match="unknown key 'note' at the top level"):  # keys not in config.json are typos
        load_config(directory, quick=True, overrides=['note="hi"'])
    with pytest.raises(FileNotFoundError, match="available: .*clever_hans"):
        find_experiment("no_such_experiment")
    from mechlens.cli import main

    assert main(["run", "no_such_experiment", "--out", str(tmp_path)]) == 2


def test_every_experiment_ships_in_the_wheel_and_is_found_after_a_plain_install(tmp_path, monkeypatch):
    """`pip install mechlens` (not editable) has no checkout: the experiments come as data files
    (pyproject.toml [tool.setuptools.data-files]) and experiments_root() finds them there."""
    import shutil
    import tomllib

    from mechlens import experiments as module

    repo = Path(__file__).resolve().parents[1]
    shipped = tomllib.loads((repo / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    for directory in sorted(p.parent for p in (repo / "experiments").glob("*/experiment.py")):
        patterns = shipped.get(f"share/mechlens/experiments/{directory.name}", [])
        assert f"experiments/{directory.name}/*.py" in patterns and f"experiments/{directory.name}/*.json" in patterns
    # an installed layout: no experiments/ next to the package, the data files under the prefix
    fake_package = tmp_path / "site-packages" / "mechlens" / "experiments.py"
    fake_package.parent.mkdir(parents=True)
    prefix = tmp_path / "prefix"
    shutil.copytree(repo / "experiments" / "sanity_cascade", prefix / "share" / "mechlens" / "experiments" / "sanity_cascade")
    monkeypatch.setattr(module, "__file__", str(fake_package))
    monkeypatch.setattr(module, "_data_prefixes", lambda: [prefix])
    assert module.find_experiment("sanity_cascade") == prefix / "share" / "mechlens" / "experiments" / "sanity_cascade"
    monkeypatch.setattr(module, "_data_prefixes", lambda: [tmp_path / "nowhere"])
    with pytest.raises(FileNotFoundError, match="none found"):
        module.find_experiment("sanity_cascade")


CHROMIUM = __import__("shutil").which("chromium") or __import__("shutil").which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_the_report_reads_in_a_real_browser(clever_hans):
    """The report as a reader sees it: no console error, every image decodes, every link resolves,
    nothing wider than the window, each figure inside its claim's section, the verdict on top."""
    from playwright.sync_api import sync_playwright

    out, f = clever_hans
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 800})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto((out / "report.html").as_uri())
            page.wait_for_load_state("load")
            images = page.eval_on_selector_all("img", "els => els.map(e => [e.getAttribute('src'), e.naturalWidth])")
            assert len(images) >= 6 and all(width > 0 for _, width in images), images
            links = page.eval_on_selector_all("a", "els => els.map(e => e.getAttribute('href'))")
            assert links and all((out / link).is_file() for link in links), links
            assert page.evaluate("document.documentElement.scrollWidth") <= 1000
            for section, picture in (("behaviour", "behaviour.png"), ("interventions", "interventions.png"),
                                     ("audit", "audit/audit.png"), ("tcav", "tcav.png"), ("attribution", "attribution.png")):
                assert page.locator(f"section#{section} img[src='{picture}']").count() == 1, section
            for latent in f["interventions"]["latents"]:  # each latent that carries the ruler, with its exemplars
                assert page.locator(f"section#latents a[href='atlas/features/{latent}.html']").count() >= 1
            top = page.locator("#verdict").bounding_box()
            assert top is not None and top["y"] < 200 and "The shortcut was found." in page.inner_text("#verdict")
            page.screenshot(path=str(out / "report-screenshot.png"), full_page=False)
        finally:
            browser.close()
    assert not errors, errors


def test_the_demo_time_benchmark_runs_quick_and_ends_with_its_json_line(model_cache):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "demo_time.py"), "--quick", "--model-cache", model_cache,
                           "--threads", "1"], capture_output=True, text=True, timeout=900, cwd=root)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "demo_time" and line["figures"]["shortcut_found"] is True
    assert set(line["figures"]["stages_seconds"]) >= {"model", "sae", "tcav", "atlas"}
    assert 0 < sum(line["ratios"].values()) <= 1.05
