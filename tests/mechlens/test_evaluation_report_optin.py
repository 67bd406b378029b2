"""The method report's opt-in checks (``evaluate_methods(checks=[..., "manipulation", "roar"])``):
the manipulation check runs once per report and feeds every method's row, ROAR retrains through
the report and resumes from its cache, and both feed the verdicts with a stated reason. Only the
plumbing is asserted here (few fine-tuning steps, one retraining epoch); what the checks measure
on trained models is tested in test_evaluation_manipulation.py and test_evaluation_roar.py."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig
from mechlens.evaluation.manipulation import ManipulatedModel, ManipulationResult
from mechlens.evaluation.report import (
    CHECKS,
    MANIPULATION_REASON,
    OPTIONAL_CHECKS,
    default_attack,
    evaluate_methods,
)
from mechlens.evaluation.roar import RetrainRecipe, RoarResult
from mechlens.models import small_cnn
from mechlens.models.training import train_classifier

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the modules (``mechlens.evaluation`` re-exports a function named ``roar``)
manipulation_module = importlib.import_module("mechlens.evaluation.manipulation")
roar_module = importlib.import_module("mechlens.evaluation.roar")

CONFIG = SyntheticShapesConfig(num_samples=192, image_size=32, classes=("circle", "square", "stripes"), seed=0,
                               split="train")


def make_model() -> torch.nn.Module:
    return small_cnn(3, width=8, depth=3, blocks_per_stage=1, stem_stride=2, seed=0)


@pytest.fixture(scope="module")
def shapes():
    """A small shapes CNN trained for two epochs (enough for non-degenerate maps), its training
    images and a held-out test split."""
    train = SyntheticShapes(CONFIG)
    model = make_model()
    train_classifier(model, train, epochs=2, batch_size=64, seed=0, progress=False)
    test_x, test_y = SyntheticShapes(CONFIG.replace(num_samples=48, split="test")).to_tensors()
    train_x, train_y = train.to_tensors()
    return model.eval(), (train_x[:64], train_y[:64]), (test_x, test_y)


def _counting(monkeypatch, module, name):
    calls = []
    real = getattr(module, name)

    def counted(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def test_the_default_run_leaves_the_opt_in_checks_out(shapes) -> None:
    model, _, (x, _) = shapes
    assert OPTIONAL_CHECKS == {"manipulation", "roar"} and OPTIONAL_CHECKS <= set(CHECKS)
    report = evaluate_methods(model, x[:2], None, ["saliency"], deletion_steps=4)
    assert report.settings["checks"] == [c for c in CHECKS if c not in OPTIONAL_CHECKS]
    assert not any(c.startswith(("manipulation_", "roar_")) for c in report.columns)


def test_manipulation_runs_once_and_fills_every_row(shapes, monkeypatch, tmp_path) -> None:
    model, _, (x, _) = shapes
    calls = _counting(monkeypatch, manipulation_module, "manipulation_check")
    report = evaluate_methods(model, x[:6], None, ["saliency", "gradcam", "occlusion"],
                              checks=["deletion", "insertion", "manipulation"], deletion_steps=4,
                              method_kwargs={"occlusion": {"window": 8}}, manipulation_options={"steps": 3})
    assert len(calls) == 1  # once per report, not once per method
    (args, kwargs), = calls
    assert kwargs["methods"] == ["saliency", "gradcam", "occlusion"] and kwargs["attack"] == ["gradcam"]
    assert kwargs["steps"] == 3 and kwargs["method_kwargs"]["gradcam"]["layer"] == report.settings["layer"]
    for column in ("manipulation_moved", "manipulation_preserved", "manipulation_attacked", "manipulation_mass_gain",
                   "manipulation_spearman"):
        assert column in report.columns and all(column in row for row in report.rows), column
    assert [r["manipulation_attacked"] for r in report.rows] == [False, True, False]
    assert report.settings["manipulation"]["attacked"] == ["gradcam"]
    assert all(any("manipulation" in reason for reason in row["reasons"]) for row in report.rows)
    data = json.loads(report.to_json())
    assert data["details"]["(manipulation)"]["manipulation"]["attacked"] == ["gradcam"]
    assert "manipulation_spearman" in report.to_csv().splitlines()[0]
    assert "manipulation_moved" in report.text()
    assert (tmp_path / "r" / "report.png") in report.save(tmp_path / "r")


def _fake_manipulation(moved: dict[str, bool], preserved: bool) -> ManipulationResult:
    region = torch.zeros(32, 32, dtype=torch.bool)
    rows = [{"method": m, "family": "cam", "mass_before": 0.2, "mass_after": 0.5 if v else 0.2,
             "mass_gain": 0.3 if v else 0.0, "spearman": 0.1 if v else 0.9, "moved": v} for m, v in moved.items()]
    return ManipulationResult(attacked=["gradcam"], layer="stage3", region=region, rows=rows,
                              agreement=1.0 if preserved else 0.5, max_logit_change=0.1, mean_kl=0.01, tolerance=0.95,
                              manipulated=ManipulatedModel(model=None, methods=["gradcam"], layer="stage3",
                                                           region=region))


# two methods that agree (HiResCAM is Grad-CAM at a layer read through average pooling) and "pass"
PASSING = {"randomization": lambda ctx, m: {"randomization": "passes", "randomization_rho": 0.1}}


@pytest.mark.parametrize("preserved", [True, False])
def test_a_method_moved_by_a_fine_tune_that_kept_the_predictions_is_not_trusted(shapes, monkeypatch, preserved) -> None:
    model, _, (x, _) = shapes
    fake = _fake_manipulation({"gradcam": True, "hirescam": False}, preserved)
    monkeypatch.setattr(manipulation_module, "manipulation_check", lambda *a, **k: fake)
    report = evaluate_methods(model, x[:4], None, ["gradcam", "hirescam"],
                              checks={**PASSING, "manipulation": CHECKS["manipulation"]})
    rows = {r["method"]: r for r in report.rows}
    assert rows["hirescam"]["verdict"] == "trust" and rows["hirescam"]["manipulation_moved"] is False
    reasons = "; ".join(rows["gradcam"]["reasons"])
    if preserved:
        assert rows["gradcam"]["verdict"] == "use with care" and MANIPULATION_REASON in reasons
        assert "moved the maps of gradcam" in report.summary
    else:  # the fine-tune changed the predictions: no evidence against the method
        assert rows["gradcam"]["verdict"] == "trust" and "not conclusive" in reasons


def test_manipulation_refuses_what_it_cannot_attack_before_any_work(shapes, monkeypatch) -> None:
    model, _, (x, _) = shapes
    monkeypatch.setattr(manipulation_module, "manipulation_check", lambda *a, **k: pytest.fail("ran"))
    assert default_attack(["saliency", "gradcam"]) == ["gradcam"]
    assert default_attack(["occlusion", "input_x_gradient", "saliency"]) == ["input_x_gradient"]
    with pytest.raises(ValueError, match="cannot attack occlusion.*saliency"):
        evaluate_methods(model, x[:2], None, ["saliency", "occlusion"], checks=["manipulation"],
                         manipulation_attack="occlusion")
    with pytest.raises(ValueError, match="none of the methods.*can be attacked.*--attack"):
        evaluate_methods(model, x[:2], None, ["occlusion"], checks=["manipulation"])
    with pytest.raises(ValueError, match="unknown attribution method 'gradcm'"):
        evaluate_methods(model, x[:2], None, ["saliency"], checks=["manipulation"], manipulation_attack=["gradcm"])
    with pytest.raises(ValueError, match="add 'manipulation' to checks"):
        evaluate_methods(model, x[:2], None, ["saliency"], checks=["deletion"], manipulation_attack="saliency")
    with pytest.raises(ValueError, match="add 'roar' to checks"):
        evaluate_methods(model, x[:2], None, ["saliency"], checks=["deletion"], roar_data=((x, x), (x, x)))
    with pytest.raises(ValueError, match="pass roar_data=\\(train, test\\)"):
        evaluate_methods(model, x[:2], None, ["saliency"], checks=["roar"])
    with pytest.raises(ValueError, match="the report's target .*class:N"):
        evaluate_methods(model, x[:2], "channel:stage2:0", ["saliency"], checks=["manipulation"])


def test_roar_through_the_report_is_cached_and_resumes(shapes, monkeypatch, tmp_path) -> None:
    model, train, test = shapes
    calls = _counting(monkeypatch, roar_module, "roar")
    kwargs = dict(checks=["roar"], roar_data=(train, test), roar_fractions=(0.5,), cache_dir=tmp_path / "cache",
                  roar_recipe=RetrainRecipe(make_model, epochs=1, batch_size=32))
    first = evaluate_methods(model, test[0][:4], None, ["saliency", "gradcam"], **kwargs)
    assert len(calls) == 1 and calls[0][0][3] == ["saliency", "gradcam"]  # one run for all methods
    assert first.settings["roar"]["trained"] == 4 and first.settings["roar"]["from_cache"] == 0  # unmodified, 2, random
    for column in ("roar_faithful", "roar_accuracy", "roar_random_accuracy", "roar_drop", "roar_random_drop"):
        assert all(column in row for row in first.rows), column
    for row in first.rows:
        if row["roar_chance_p"] < 0.05:  # faithful only when significant, unfaithful when not below random
            expected = True if row["roar_gap_p"] < 0.05 else (False if row["roar_drop"] <= row["roar_random_drop"] else None)
            assert row["roar_faithful"] is expected
            assert any("under ROAR" in reason for reason in row["reasons"])
        else:  # one epoch may leave the unmodified retrain at chance: then no verdict
            assert row["roar_faithful"] is None
            assert any(reason.startswith("ROAR inconclusive") for reason in row["reasons"])
    again = evaluate_methods(model, test[0][:4], None, ["saliency", "gradcam"], **kwargs)
    assert (again.settings["roar"]["trained"], again.settings["roar"]["from_cache"]) == (0, 4)
    assert [r["roar_accuracy"] for r in again.rows] == [r["roar_accuracy"] for r in first.rows]
    assert json.loads(again.to_json())["details"]["(roar)"]["roar"]["from_cache"] == 4


def test_a_method_no_better_than_random_under_roar_is_not_trusted(shapes, monkeypatch) -> None:
    model, train, test = shapes
    fake = RoarResult(fractions=[0.0, 0.5], accuracy={"gradcam": [0.9, 0.5], "hirescam": [0.9, 0.85],
                                                      "random": [0.9, 0.8]},
                      settings={"test_images": 100, "majority_share": 0.34})
    monkeypatch.setattr(roar_module, "roar", lambda *a, **k: fake)
    report = evaluate_methods(model, test[0][:4], None, ["gradcam", "hirescam"],
                              checks={**PASSING, "roar": CHECKS["roar"]}, roar_data=(train, test))
    rows = {r["method"]: r for r in report.rows}
    assert rows["gradcam"]["roar_faithful"] is True and rows["gradcam"]["verdict"] == "trust"
    assert rows["gradcam"]["roar_gap_p"] < 1e-4  # 0.5 vs 0.8 on 100 images
    assert rows["hirescam"]["roar_faithful"] is False and rows["hirescam"]["verdict"] == "use with care"
    assert any(reason.startswith("not faithful under ROAR") for reason in rows["hirescam"]["reasons"])
    assert "Under ROAR the top pixels of hirescam" in report.summary


def test_roar_at_chance_gives_no_verdict(shapes, monkeypatch) -> None:
    """A retrain that learnt nothing on the unmodified data makes every drop zero: ROAR then says
    nothing (binomial test against always answering the majority class), instead of 'not faithful'."""
    model, train, test = shapes
    # 40 of 100 right with a 34% majority class: p = 0.13 (one-sided binomial), not above chance
    fake = RoarResult(fractions=[0.0, 0.5], accuracy={"gradcam": [0.40, 0.40], "random": [0.40, 0.40]},
                      settings={"test_images": 100, "majority_share": 0.34})
    assert 0.05 < fake.chance_p_value() < 0.2
    monkeypatch.setattr(roar_module, "roar", lambda *a, **k: fake)
    report = evaluate_methods(model, test[0][:4], None, ["gradcam"], checks={**PASSING, "roar": CHECKS["roar"]},
                              roar_data=(train, test))
    row = report.rows[0]
    assert row["roar_faithful"] is None and "roar_chance_p" in row
    assert any(reason.startswith("ROAR inconclusive") for reason in row["reasons"])
    assert "Under ROAR" not in report.summary
    learnt = RoarResult(fractions=[0.0, 0.5], accuracy={"gradcam": [0.60, 0.40], "random": [0.60, 0.55]},
                        settings={"test_images": 100, "majority_share": 0.34})
    assert learnt.chance_p_value() < 1e-4
    with pytest.raises(ValueError, match="does not record its test set"):
        RoarResult(fractions=[0.0, 0.5], accuracy={"gradcam": [0.6, 0.4]}).chance_p_value()


def test_a_small_roar_gap_is_not_called_faithful(shapes, monkeypatch) -> None:
    """1 point below random on 100 test images is within sampling noise: not established, which
    neither earns nor blocks trust; 1 point above random is 'not faithful'."""
    model, train, test = shapes
    fake = RoarResult(fractions=[0.0, 0.5], accuracy={"gradcam": [0.9, 0.79], "hirescam": [0.9, 0.81],
                                                      "random": [0.9, 0.80]},
                      settings={"test_images": 100, "majority_share": 0.34})
    monkeypatch.setattr(roar_module, "roar", lambda *a, **k: fake)
    report = evaluate_methods(model, test[0][:4], None, ["gradcam", "hirescam"],
                              checks={**PASSING, "roar": CHECKS["roar"]}, roar_data=(train, test))
    rows = {r["method"]: r for r in report.rows}
    assert rows["gradcam"]["roar_faithful"] is None and 0.3 < rows["gradcam"]["roar_gap_p"] < 0.5
    assert any(r.startswith("faithfulness under ROAR not established") for r in rows["gradcam"]["reasons"])
    assert rows["hirescam"]["roar_faithful"] is False
