"""The model-family matrix (issue 17, item 3): the whole pipeline on random-weight models of every
supported family, each stage checked against a direct forward with a plain hook.

One test per family x stage (``layers``, ``capture``, ``sae``, ``attribution``, ``featvis``,
``tcav``); the harness, the families, their representative layers and their expected errors are
in ``tests/mechlens/_matrix.py``. A family's pipeline runs once (on the first of its tests, one
CPU thread, a few seconds) and its outcomes are shared by its stage tests. A check listed in the
family's ``expect`` table must fail with that error text (an unsupported combination must say
what is missing); every other check must pass. ``python benchmarks/model_matrix.py`` prints the
same matrix as a table with timings.
"""
from __future__ import annotations

import pytest

from tests.mechlens import _matrix as matrix

_RESULTS: dict[str, matrix.FamilyResult] = {}


@pytest.fixture(scope="module")
def matrix_dir(tmp_path_factory: pytest.TempPathFactory):
    return tmp_path_factory.mktemp("model_matrix")


def _result(family: matrix.Family, root) -> matrix.FamilyResult:
    if family.id not in _RESULTS:
        _RESULTS.clear()  # one family's outcomes at a time (its tests are consecutive)
        _RESULTS[family.id] = matrix.run_family(family, root / family.id)
    return _RESULTS[family.id]


_CASES = [
    pytest.param(family.id, stage, id=f"{family.id}-{stage}", marks=[pytest.mark.slow] if family.slow else [])
    for family in matrix.FAMILIES
    for stage in matrix.STAGES
]


@pytest.mark.parametrize(("family_id", "stage"), _CASES)
def test_model_matrix(family_id: str, stage: str, matrix_dir) -> None:
    result = _result(matrix.FAMILY[family_id], matrix_dir)
    problems = result.problems(stage)
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------- the harness itself
def test_every_check_has_a_stage_and_every_expectation_names_a_check() -> None:
    assert set(matrix.STAGE_OF) == {c for checks in matrix.CHECKS.values() for c in checks}
    for family in matrix.FAMILIES:
        unknown = set(family.expect) - set(matrix.STAGE_OF)
        assert not unknown, f"{family.id}: expectations for unknown checks {sorted(unknown)}"
        assert family.layout in ("nchw", "nhwc", "nlc"), family.id
    assert len({f.id for f in matrix.FAMILIES}) == len(matrix.FAMILIES)


def test_problems_compare_outcomes_with_the_expectation_table() -> None:
    family = matrix.Family("probe", "x", "layer", "nchw", expect={"capture:cls": "needs token maps"})
    result = matrix.FamilyResult(family)
    for check in matrix.STAGE_OF:
        result.outcomes[check] = matrix.Outcome("ok")
    result.outcomes["capture:cls"] = matrix.Outcome("error", "ValueError: spatial='cls' needs token maps [B, T, D]")
    assert result.problems() == []
    result.outcomes["capture:cls"] = matrix.Outcome("ok")  # an expected refusal that no longer happens
    assert result.problems("capture") and "expected the error" in result.problems("capture")[0]
    result.outcomes["capture:cls"] = matrix.Outcome("error", "TypeError: something else")
    assert "expected an error containing" in result.problems("capture")[0]
    result.outcomes["sae"] = matrix.Outcome("fail", "store row width 2 != 768 channels")
    assert result.problems("sae") == ["probe sae: expected to work, got FAIL: store row width 2 != 768 channels"]


def test_a_layout_misread_by_mechlens_fails_the_row_width_check(tmp_path) -> None:
    """The reference side of the harness: a channels-last layer read as NCHW has the wrong width."""
    import torch

    family = matrix.Family("probe", "x", "layer", "nhwc")

    class Loaded:  # what direct_forward needs of a LoadedModel
        model = torch.nn.Sequential()
        preprocessing = type("P", (), {"normalize": staticmethod(lambda x: x)})()

    Loaded.model.add_module("layer", torch.nn.Identity())
    ref = matrix.direct_forward(Loaded(), family, torch.rand(2, 3, 5, 7))  # read as [B, H=3, W=5, C=7]
    assert ref.channels == 7 and ref.positions == 15 and ref.grid == (3, 5)


def test_benchmark_quick_prints_one_json_line() -> None:
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, "benchmarks/model_matrix.py", "--quick"], cwd=root, capture_output=True,
                          text=True, timeout=600, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "model_matrix" and line["figures"]["families"] == 3
    assert line["figures"]["unexpected"] == 0 and set(line["ratios"]) == set(line["figures"]["per_family"])
