"""``mechlens evaluate`` end to end, and the report behind it (``evaluate_methods``): the sanity
checks and faithfulness metrics of many methods on one model, a verdict per method."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from mechlens.cli import main
from mechlens.evaluation.report import CHECKS, VERDICTS, evaluate_methods, map_agreement
from mechlens.models import load_model, save_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = "synthetic:shapes?n=8&seed=3"


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("evaluate_cli")
    loaded = load_model("mechlens:small_cnn_tiny")
    with torch.no_grad():  # a head that separates the classes, so the maps are not all zero
        torch.nn.init.normal_(loaded.model.head.weight, std=1.0, generator=torch.Generator().manual_seed(0))
    return save_weights(loaded.model, root / "tiny.safetensors")


def _args(weights: Path, out: Path, *extra: str) -> list[str]:
    return ["evaluate", "--model", "mechlens:small_cnn_tiny", "--weights", str(weights), "--data", DATA,
            "--images", "4", "--out", str(out), *extra]


def test_evaluate_cli_writes_table_verdicts_and_plots(tiny_weights, tmp_path, capsys) -> None:
    out = tmp_path / "report"
    code = main(_args(tiny_weights, out, "--methods", "saliency,gradcam", "occlusion"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    with open(out / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["saliency", "gradcam", "occlusion"]
    for column in ("verdict", "randomization", "randomization_rho", "faithful", "ins_minus_del", "ins_minus_del_random",
                   "deletion_auc", "insertion_auc", "agreement", "agrees_with", "pointing_game", "iou", "stability",
                   "registry_randomization", "reasons"):
        assert column in rows[0], column
    assert all(r["verdict"] in VERDICTS for r in rows)
    assert all(r["randomization"] in ("passes", "fails", "inconclusive") for r in rows)
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["layer"] == "stage3" and report["settings"]["images"] == 4
    assert len(report["agreement"]) == 3 and report["agreement"][0][0] == 1.0
    assert "randomization" in report["details"]["gradcam"] and "deletion" in report["details"]["(random)"]
    assert "corroborate" in report["summary"].lower()
    assert (out / "report.png").read_bytes()[:4] == b"\x89PNG"
    # the printed table and one verdict line per method
    assert "verdict" in captured.out and "gradcam: " in captured.out and "wrote report.csv" in captured.out


def test_evaluate_cli_json_and_chosen_checks(tiny_weights, tmp_path, capsys) -> None:
    out = tmp_path / "quick"
    code = main(_args(tiny_weights, out, "--methods", "saliency", "input_x_gradient", "--checks", "deletion,insertion",
                      "--masks", "none", "--json"))
    captured = capsys.readouterr()
    assert code == 0, captured.err
    printed = json.loads(captured.out)
    assert set(printed["verdicts"]) == {"saliency", "input_x_gradient"}
    row = printed["rows"][0]
    assert "randomization" not in row and "pointing_game" not in row and "stability" not in row
    # without the check the verdict falls back on what the registry measured, and says so
    assert "registry says" in row["reasons"]


def test_evaluate_cli_bad_method_is_one_line_with_close_matches(tiny_weights, tmp_path, capsys) -> None:
    code = main(_args(tiny_weights, tmp_path / "bad", "--methods", "salency,gradcam"))
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("mechlens evaluate: error: unknown attribution method 'salency'")
    assert "Did you mean saliency" in err
    assert not (tmp_path / "bad").exists()  # refused before any work
    code = main(_args(tiny_weights, tmp_path / "bad", "--checks", "randomisation"))
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Did you mean randomization" in err


def test_report_on_the_shortcut_model(trained_shapes_model, record_figures) -> None:
    """On the trained shapes model (8 test images) the report says what the literature says:
    Guided Backprop and the gradient's magnitude fail the randomization check (their maps keep
    Spearman 0.96 and 0.83 with the trained model's), gradient x input and Grad-CAM pass (0.06,
    0.34) and are faithful (insertion - deletion AUC 3.7 and 3.2 against -0.01 for a random map)."""
    clf = trained_shapes_model
    test = clf.test_dataset()
    images, masks = test.render(list(range(8))), test.object_masks(list(range(8)))
    report = evaluate_methods(clf.loaded, images, None, ["saliency", "input_x_gradient", "gradcam", "guided_backprop"],
                              masks=masks)
    rows = {r["method"]: r for r in report.rows}
    record_figures(**{f"{m}_{k}": r[k] for m, r in rows.items() for k in ("randomization_rho", "ins_minus_del", "agreement")})
    assert rows["guided_backprop"]["randomization"] == "fails" and rows["guided_backprop"]["verdict"] == "do not trust"
    assert rows["saliency"]["randomization"] == "fails" and rows["saliency"]["verdict"] == "do not trust"
    for method in ("input_x_gradient", "gradcam"):
        assert rows[method]["randomization"] == "passes" and rows[method]["faithful"], method
    assert set(report.trusted) <= {"input_x_gradient", "gradcam"}
    assert "Do not trust: saliency, guided_backprop" in report.summary
    assert report.to_pandas().shape[0] == 4 and "<table>" in report._repr_html_()
    assert report.row("grad_cam")["method"] == "gradcam"


def test_checks_are_pluggable_and_errors_are_clear(trained_shapes_model) -> None:
    clf = trained_shapes_model
    images = clf.test_dataset().render([0, 1])
    checks = {"deletion": CHECKS["deletion"], "insertion": CHECKS["insertion"],
              "max_value": lambda ctx, m: {"max_value": float(ctx.attribution(m).heatmap().amax())}}
    report = evaluate_methods(clf.loaded, images, None, ["gradcam"], checks=checks)
    assert "max_value" in report.columns and report.rows[0]["max_value"] > 0
    with pytest.raises(ValueError, match="unknown check.*Did you mean randomization"):
        evaluate_methods(clf.loaded, images, None, ["gradcam"], checks=["randomisation"])
    with pytest.raises(ValueError, match="masks must be"):
        evaluate_methods(clf.loaded, images, None, ["gradcam"], masks=torch.ones(3, 64, 64, dtype=torch.bool))
    with pytest.raises(ValueError, match="name a method twice"):
        evaluate_methods(clf.loaded, images, None, ["gradcam", "grad_cam"])


def test_map_agreement_compares_at_a_common_resolution() -> None:
    fine = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    coarse = torch.nn.functional.interpolate(torch.nn.functional.avg_pool2d(fine[:, None], 4), size=(32, 32))[:, 0]
    assert (map_agreement(fine, coarse) > 0.99).all()  # the same map at two resolutions agrees
    other = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(1))
    assert (map_agreement(fine, other).abs() < 0.5).all()
