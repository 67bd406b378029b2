"""The atlas at scale (issue 23): the features dealt out in chunks between torchrun ranks, pages
written one by one and atomically, a killed build resumed, stale pages refused or rebuilt, and
the scaling benchmark's quick run.

What "the same atlas" means here: two gloo ranks (spawned by the test, joining the group from
torchrun's environment) and one process write the same set of files, and every one of them --
feature pages, per-feature records (``features/<id>.json``: the page's data, its files, the
settings digest), images (exemplars, quantile bands, feature visualizations, Grad-CAM
overlays), ``index.html``, ``atlas.json``, ``settings.json`` -- is byte-identical: the chunks are
cut the same whatever the number of ranks, so every batched computation sees the same batch.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mechlens.atlas.build import build_atlas
from mechlens.atlas.callbacks import feature_attributor, feature_visualizer
from mechlens.capture import capture_to_store
from mechlens.models import load_model
from mechlens.sae import SAE, TopKConfig, build_sae, feature_statistics
from tests.mechlens._ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[2]
SPEC = "synthetic:shapes?n=48&size=32"
CHUNK = 4
SETTINGS = dict(exemplars=3, histogram_rows=400, effect_images=8, causal_images=8, chunk=CHUNK, progress=False)
JOIN_TIMEOUT_S = 180.0


class _Stop(Exception):
    """The failure a test injects to interrupt a build."""


def _model():
    return load_model("mechlens:small_cnn_tiny", input_size=32)


def _callbacks(loaded, sae, log: dict | None = None, steps: int = 2):
    """The visualizer and attributor of the atlas; with ``log``, every feature they are asked to
    render is appended to ``log["vis"]`` / ``log["attr"]`` (same settings: a wrapper is not a change)."""
    visualize = feature_visualizer(loaded, sae, size=16, steps=steps, batch=CHUNK)
    attribute = feature_attributor(loaded, sae)
    if log is None:
        return visualize, attribute

    def counted_visualize(ids):
        log.setdefault("vis", []).extend(int(i) for i in ids)
        return visualize(ids)

    def counted_attribute(index, images):  # pragma: no cover - the panel uses the batched form
        log.setdefault("attr", []).append(int(index))
        return attribute(index, images)

    def counted_batched(ids, images):
        log.setdefault("attr", []).extend(int(i) for i in ids)
        return attribute.batched(ids, images)

    counted_visualize.settings = visualize.settings
    counted_attribute.settings, counted_attribute.batched = attribute.settings, counted_batched
    return counted_visualize, counted_attribute


def _build(inputs: dict, out: Path, log: dict | None = None, steps: int = 2, **kwargs):
    loaded = inputs["loaded"]
    visualize, attribute = _callbacks(loaded, inputs["sae"], log, steps=steps)
    return build_atlas(inputs["root"] / "sae", inputs["root"] / "store", loaded, out, visualize=visualize,
                       attribute=attribute, **{**SETTINGS, **kwargs})


def _files(site: Path) -> dict[str, bytes]:
    return {str(p.relative_to(site)): p.read_bytes() for p in sorted(site.rglob("*")) if p.is_file()}


def _feature_of(name: str) -> int | None:
    """The feature a page file belongs to (``features/12.json``, ``img/12-vis.png``), else None."""
    folder, _, file = name.partition("/")
    if folder not in ("features", "img"):
        return None
    return int(file.split("-")[0].split(".")[0])


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, one_torch_thread):
    root = tmp_path_factory.mktemp("atlas_scale")
    loaded = _model()
    capture_to_store(loaded, SPEC, root / "store", layers="stage2", num_workers=0, progress=False)
    sae = build_sae(TopKConfig(width=24, k=4, d_in=32, layer="stage2", layout="nchw"), seed=3).eval()
    sae.save(root / "sae")
    feature_statistics(sae, root / "store", top_k=3).save(root / "sae")
    return {"root": root, "loaded": loaded, "sae": SAE.load(root / "sae")}


@pytest.fixture(scope="module")
def single(inputs):
    """The reference: one process, uninterrupted, with the renders counted."""
    log: dict = {}
    result = _build(inputs, inputs["root"] / "one", log)
    assert len(result.features) > 3 * CHUNK, "the tests need several chunks"
    return result, log


def _rank(rank: int, world_size: int, root: str, run: str, fail_after: int) -> None:
    """One rank as torchrun starts it: the environment names the group, build_atlas joins it.
    With ``fail_after``, rank 1 fails after that many pages (the others carry on, then hear of it)."""
    root_path = Path(root)
    log: dict = {}
    written: list[int] = []

    def on_page(feature: int) -> None:
        written.append(feature)
        if rank == 1 and len(written) == fail_after:
            raise _Stop("killed")

    inputs = {"root": root_path, "loaded": _model(), "sae": SAE.load(root_path / "sae")}
    report: dict = {"error": None}
    try:
        result = _build(inputs, root_path / "two", log, on_page=on_page)
        report.update(rendered=result.rendered, reused=result.reused, ranks=result.ranks, has_data=bool(result.data))
    except Exception as error:  # noqa: BLE001 - the test reads what each rank was told
        report["error"] = f"{type(error).__name__}: {error}"
    report.update(vis=log.get("vis", []), attr=log.get("attr", []), written=written)
    (root_path / f"{run}-rank{rank}.json").write_text(json.dumps(report))


def _spawn(root: Path, world_size: int, run: str, fail_after: int = 0) -> list[dict]:
    run_ranks(world_size, _rank, str(root), run, fail_after, join=False, timeout=JOIN_TIMEOUT_S)
    return [json.loads((root / f"{run}-rank{r}.json").read_text()) for r in range(world_size)]


def test_two_gloo_ranks_build_the_same_atlas_as_one_process_and_resume_after_a_failed_rank(inputs, single):
    result, log = single
    root, ids = inputs["root"], result.features
    chunks = [ids[k:k + CHUNK] for k in range(0, len(ids), CHUNK)]
    dealt = [[i for k, c in enumerate(chunks) if k % 2 == rank for i in c] for rank in range(2)]
    # rank 1 fails once its first chunk is written; rank 0 writes all of its own, then both raise
    first = _spawn(root, 2, "first", fail_after=CHUNK)
    assert first[1]["error"] == "_Stop: killed" and first[1]["vis"] == dealt[1][:CHUNK]
    assert first[0]["error"].startswith("RuntimeError: rank 1 of the atlas build failed (_Stop: killed)")
    assert first[0]["vis"] == dealt[0] and first[0]["written"] == dealt[0]  # disjoint: its own chunks only
    assert not (root / "two" / "atlas.json").exists()
    # the rerun renders only the chunks rank 1 never reached, dealt out again
    second = _spawn(root, 2, "second")
    missing = dealt[1][CHUNK:]
    assert all(report["error"] is None for report in second)
    assert sorted(second[0]["vis"] + second[1]["vis"]) == sorted(missing)
    assert sorted(second[0]["attr"] + second[1]["attr"]) == sorted(missing)
    assert second[0]["rendered"] == [i for i in ids if i in missing] and second[0]["reused"] == len(ids) - len(missing)
    assert [r["ranks"] for r in second] == [2, 2] and [r["has_data"] for r in second] == [True, False]
    # the same atlas as one process wrote, byte for byte (every chunk was computed whole)
    one, two = _files(root / "one"), _files(root / "two")
    assert sorted(one) == sorted(two)
    differ = [name for name in one if one[name] != two[name]]
    assert not differ, f"{len(differ)} of {len(one)} files differ, e.g. {differ[:5]}"
    kinds = {name.rsplit(".", 1)[-1] for name in one}
    assert {"html", "json", "png"} <= kinds and any(name.endswith("-vis.png") for name in one)
    assert any("-attr-" in name for name in one) and "atlas.json" in one and "index.html" in one
    assert log["vis"] == ids and result.rendered == ids and result.ranks == 1


def test_an_interrupted_build_resumes_and_renders_only_the_missing_pages(inputs, single):
    reference, _ = single
    ids, out = reference.features, inputs["root"] / "resume"
    stop_after = CHUNK + CHUNK // 2  # in the middle of the second chunk
    written: list[int] = []

    def interrupt(feature: int) -> None:
        written.append(feature)
        if len(written) == stop_after:
            raise _Stop("killed")

    first: dict = {}
    with pytest.raises(_Stop):
        _build(inputs, out, first, on_page=interrupt)
    assert first["vis"] == ids[:2 * CHUNK]  # two chunks computed, the second cut short while writing
    assert not (out / "atlas.json").exists() and not (out / "index.html").exists()
    finished = ids[:stop_after]
    assert sorted(int(p.stem) for p in (out / "features").glob("*.json")) == sorted(finished)
    stamps = {(f, ext): (out / "features" / f"{f}.{ext}").stat().st_mtime_ns for f in finished for ext in ("html", "json")}

    again: dict = {}
    result = _build(inputs, out, again)
    missing = ids[stop_after:]
    assert again["vis"] == missing and sorted(again["attr"]) == sorted(missing)  # only the missing ones
    assert result.rendered == missing and result.reused == len(finished)
    assert all((out / "features" / f"{f}.{ext}").stat().st_mtime_ns == stamp
               for (f, ext), stamp in stamps.items())  # the finished pages were not rewritten
    assert [f["id"] for f in result.data["features"]] == ids
    # every page outside the cut chunk is what the uninterrupted build wrote, byte for byte; the
    # cut chunk's missing two were computed as a batch of two (valid, not bit-equal visualizations)
    one, resumed = _files(inputs["root"] / "one"), _files(out)
    assert sorted(one) == sorted(resumed)
    recomputed = set(ids[stop_after:2 * CHUNK])
    differ = [n for n in one if one[n] != resumed[n] and n not in ("index.html", "atlas.json")
              and _feature_of(n) not in recomputed]
    assert not differ, differ[:5]
    for feature in recomputed:
        record = json.loads(resumed[f"features/{feature}.json"])
        assert record["page"]["has_vis"] and record["page"]["exemplars"] and record["page"]["attributions"]


def test_pages_under_other_settings_are_refused_or_rebuilt_and_missing_files_redone(inputs, single):
    reference, _ = single
    ids, out = reference.features, inputs["root"] / "stale"
    shutil.copytree(inputs["root"] / "one", out)
    log: dict = {}
    same = _build(inputs, out, log)
    assert not log and same.rendered == [] and same.reused == len(ids)
    assert (out / "atlas.json").read_bytes() == (inputs["root"] / "one" / "atlas.json").read_bytes()

    (out / "img" / f"{ids[5]}-vis.png").unlink()  # a page whose files are not all there is redone
    log = {}
    assert _build(inputs, out, log).rendered == [ids[5]] and log["vis"] == [ids[5]]

    before = _files(out)
    with pytest.raises(ValueError, match=r"other settings \(changed: .*visualize\.steps \(2 -> 3\)"):
        _build(inputs, out, steps=3, on_change="refuse")
    assert _files(out) == before  # refused before anything was touched

    log = {}
    with pytest.warns(UserWarning, match=r"settings changed .*exemplars \(3 -> 2\).*rebuilding every page"):
        rebuilt = _build(inputs, out, log, exemplars=2)
    assert log["vis"] == ids and rebuilt.rendered == ids and rebuilt.reused == 0
    assert all(len(f["exemplars"]) <= 2 for f in rebuilt.data["features"])
    assert not list((out / "img").glob("*-ex2.png"))  # the old third exemplars are gone with the old pages


def test_bad_scale_arguments_are_refused_with_what_to_pass(inputs, tmp_path):
    with pytest.raises(ValueError, match="chunk must be a positive number"):
        _build(inputs, tmp_path / "a", chunk=0)
    with pytest.raises(ValueError, match="on_change must be one of 'rebuild', 'refuse'"):
        _build(inputs, tmp_path / "a", on_change="overwrite")
    with pytest.raises(TypeError, match="dist must be a mechlens._distributed.DistContext"):
        _build(inputs, tmp_path / "a", dist="gloo")
    with pytest.raises(TypeError, match="on_page must be a callable"):
        _build(inputs, tmp_path / "a", on_page=3)
    with pytest.raises(ValueError, match="feature_visualizer needs batch >= 1"):
        feature_visualizer(inputs["loaded"], inputs["sae"], batch=0)
    assert not (tmp_path / "a").exists()


def test_the_scaling_benchmark_quick_run_prints_its_json_line():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "atlas_scaling.py"), "--quick"], cwd=ROOT,
                          capture_output=True, text=True, timeout=240, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "atlas_scaling"
    figures, ratios = line["figures"], line["ratios"]
    for side in ("one_at_a_time", "batched"):
        assert set(figures["seconds_per_feature"][side]) == {"8", "16"}
        assert all(v > 0 for v in figures["seconds_per_feature"][side].values())
        assert ratios["per_feature_cost_growth"][side] > 0
    assert set(ratios["batching_speedup"]) == {"8", "16"} and all(np.isfinite(list(ratios["batching_speedup"].values())))
