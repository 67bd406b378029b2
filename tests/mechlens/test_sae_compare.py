"""``mechlens.sae.compare``: MMCS, Hungarian stability, absorption and splitting, against brute
force and hand-built SAEs whose answer is known."""
from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.cli import main
from mechlens.sae import (
    absorption,
    create_sae,
    max_cosines,
    mmcs,
    seed_stability,
    splitting,
    stability,
)
from mechlens.sae.synthetic import planted_dictionary


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _cos(u, v) -> float:
    dot = sum(float(a) * float(b) for a, b in zip(u, v))
    return dot / math.sqrt(sum(float(a) ** 2 for a in u) * sum(float(b) ** 2 for b in v))


def _random(n: int, d: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d))


# ---------------------------------------------------------------------------- MMCS
def test_max_cosines_and_mmcs_match_a_double_loop():
    learned, reference = _random(7, 5, 0) * 3.0, _random(6, 5, 1)  # norms do not matter
    expected = [max(_cos(r, l) for l in learned) for r in reference]
    got = max_cosines(learned, reference)
    assert got.shape == (6,)
    np.testing.assert_allclose(got, expected, atol=1e-12)  # float64 inputs stay float64
    assert mmcs(learned, reference) == pytest.approx(sum(expected) / 6, abs=1e-12)
    # signed: flipping the learned directions changes the answer (max of -cos, not of |cos|)
    flipped = [max(-_cos(r, l) for l in learned) for r in reference]
    np.testing.assert_allclose(max_cosines(-learned, reference), flipped, atol=1e-12)
    assert not np.allclose(flipped, expected)


def test_mmcs_chunked_equals_unchunked_and_accepts_every_dictionary_form():
    learned = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    reference = torch.randn(37, 8, generator=torch.Generator().manual_seed(1))
    whole = max_cosines(learned, reference, chunk_size=10_000)
    for chunk in (1, 4, 7):
        np.testing.assert_allclose(max_cosines(learned, reference, chunk_size=chunk), whole, atol=1e-6)
    sae = create_sae("topk", width=50, d_in=8, k=4)
    with torch.no_grad():
        sae.W_dec.copy_(learned)
    assert mmcs(sae, reference) == pytest.approx(mmcs(learned.numpy(), reference.numpy()), abs=1e-6)


def test_mmcs_of_planted_atoms_is_one_against_themselves_and_low_against_random_directions():
    planted = planted_dictionary(n_atoms=256, d=128, active=4, seed=0)
    assert mmcs(planted, planted) == pytest.approx(1.0, abs=1e-6)
    # a permuted, rescaled, slightly noised copy is still recovered
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(0))
    noisy = 2.0 * planted.atoms[perm] + 0.01 * torch.randn(256, 128, generator=torch.Generator().manual_seed(1))
    assert mmcs(noisy, planted) > 0.99
    random_sae = create_sae("topk", width=256, d_in=128, k=4, seed=3)
    score = mmcs(random_sae, planted)
    assert 0.1 < score < 0.4  # chance level ~ sqrt(2 ln 256 / 128) = 0.29


def test_bad_dictionaries_are_one_line_errors():
    with pytest.raises(ValueError, match="same d"):
        mmcs(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="zero norm"):
        mmcs(torch.zeros(3, 4), torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"\[n, d\]"):
        mmcs([[1.0, 0.0]], torch.randn(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        stability(torch.tensor([[float("nan"), 1.0]]), torch.randn(2, 2))
    with pytest.raises(ValueError, match="chunk_size"):
        mmcs(torch.randn(3, 4), torch.randn(3, 4), chunk_size=0)
    with pytest.raises(ValueError, match="at least two"):
        seed_stability([torch.randn(3, 4)])


# ---------------------------------------------------------------------------- stability
def _brute_force_matching(a: np.ndarray, b: np.ndarray) -> tuple[float, tuple[int, ...]]:
    """Best mean signed cosine over every injective map of the smaller side into the larger."""
    cos = [[_cos(u, v) for v in b] for u in a]
    n, m = len(a), len(b)
    best = (-math.inf, ())
    if n <= m:
        for cols in itertools.permutations(range(m), n):
            best = max(best, (sum(cos[i][c] for i, c in enumerate(cols)) / n, cols))
    else:
        for rows in itertools.permutations(range(n), m):
            value = sum(cos[r][j] for j, r in enumerate(rows)) / m
            inverse = tuple(sorted(zip(rows, range(m))))
            best = max(best, (value, tuple(j for _, j in inverse)))
    return best


@pytest.mark.parametrize("shape_a, shape_b", [((6, 5), (6, 5)), ((4, 5), (6, 5)), ((6, 3), (4, 3))])
def test_stability_matches_brute_force_over_all_permutations(shape_a, shape_b):
    a, b = _random(*shape_a, seed=sum(shape_a)), _random(*shape_b, seed=10 + sum(shape_b))
    best, cols = _brute_force_matching(a, b)
    result = stability(a, b)
    assert result.mean_cosine == pytest.approx(best, abs=1e-12)
    assert result.matched == min(len(a), len(b)) and result.widths == (len(a), len(b))
    assert tuple(result.pairs[:, 1]) == cols  # random cosines: the optimum is unique
    expected_cos = [_cos(a[i], b[j]) for i, j in result.pairs]
    np.testing.assert_allclose(result.cosines, expected_cos, atol=1e-12)
    assert result.fraction_above == pytest.approx(float(np.mean(np.array(expected_cos) > 0.7)))


def test_stability_recovers_a_permuted_noised_copy_and_is_signed():
    a = _random(40, 64, seed=0)
    perm = np.random.default_rng(1).permutation(40)
    copy = 5.0 * a[perm] + 0.05 * _random(40, 64, seed=2)
    result = stability(a, copy)
    assert result.mean_cosine > 0.99 and result.fraction_above == 1.0
    np.testing.assert_array_equal(copy_index := result.pairs[:, 1], np.argsort(perm))
    assert list(result.pairs[:, 0]) == list(range(40)) and len(set(copy_index)) == 40
    flipped = stability(a, -a[perm])  # opposite directions are different features for non-negative latents
    assert flipped.mean_cosine < 0.4 and flipped.fraction_above == 0.0  # |cos| would give 1.0
    middle = float(np.median(result.cosines))  # the threshold is applied
    assert stability(a, copy, threshold=middle).fraction_above == pytest.approx(0.5)
    with pytest.raises(ValueError, match="threshold"):
        stability(a, copy, threshold=1.5)


def test_stability_of_an_sae_with_itself_is_one_and_of_independent_saes_is_low():
    sae = create_sae("topk", width=64, d_in=64, k=4, seed=0)
    same = stability(sae, sae)
    assert same.mean_cosine == pytest.approx(1.0, abs=1e-6) and same.fraction_above == 1.0
    np.testing.assert_array_equal(same.pairs[:, 1], np.arange(64))
    other = stability(sae, create_sae("topk", width=64, d_in=64, k=4, seed=1))
    assert other.mean_cosine < 0.4 and other.fraction_above == 0.0
    assert stability(sae, sae, chunk_size=5).mean_cosine == pytest.approx(1.0, abs=1e-6)


def test_seed_stability_summarises_every_pair():
    base = create_sae("topk", width=32, d_in=16, k=4, seed=0)
    permuted = create_sae("topk", width=32, d_in=16, k=4, seed=5)
    with torch.no_grad():
        permuted.W_dec.copy_(base.W_dec[torch.randperm(32, generator=torch.Generator().manual_seed(0))])
    independent = create_sae("topk", width=32, d_in=16, k=4, seed=9)
    result = seed_stability([base, permuted, independent], names=["a", "b", "c"])
    assert result.matrix[0, 1] == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(result.matrix, result.matrix.T)
    np.testing.assert_allclose(np.diag(result.matrix), 1.0)
    assert result.matrix[0, 2] < 0.6 and result.matrix[1, 2] == pytest.approx(result.matrix[0, 2], abs=1e-6)
    assert result.min == pytest.approx(result.matrix[0, 2])
    assert result.mean == pytest.approx((1.0 + 2 * result.matrix[0, 2]) / 3, abs=1e-6)
    assert [p["b"] for p in result.pairs()] == ["b", "c", "c"]
    text = str(result)
    assert "[2] c" in text and "1.000 (1.00)" in text
    html = result._repr_html_()
    assert html.startswith("<table>") and "<td>a</td>" in html


# ---------------------------------------------------------------------------- absorption
class _OracleSAE(nn.Module):
    """Decoder rows = the planted atoms; ``encode`` recovers the planted codes exactly (the atoms
    are linearly independent) and, with ``absorb``, silences each parent where a child fires."""

    def __init__(self, planted, absorb: bool):
        super().__init__()
        self.W_dec = nn.Parameter(planted.atoms.clone())
        self.pinv = torch.linalg.pinv(planted.atoms)
        self.parents = torch.as_tensor(planted.parents)
        self.absorb = absorb

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = (x @ self.pinv).clamp_min(0)
        z = torch.where(z > 1e-4, z, torch.zeros_like(z))  # pinv round-off is not a firing
        if self.absorb:
            for child in torch.nonzero(self.parents >= 0).flatten():
                parent = int(self.parents[child])
                z[:, parent] = torch.where(z[:, child] > 0, torch.zeros_like(z[:, parent]), z[:, parent])
        return z


@pytest.fixture(scope="module")
def hierarchy():
    planted = planted_dictionary(n_atoms=24, d=32, active=3, parents=4, children_per_parent=2, seed=0)
    rows, codes = planted.sample(3000, seed=1)
    return planted, rows, codes


def test_absorption_is_one_for_an_absorbing_sae_and_zero_for_the_true_codes(hierarchy):
    planted, rows, codes = hierarchy
    absorbed = absorption(_OracleSAE(planted, absorb=True), planted, rows, codes, batch_size=500)
    assert [p.parent for p in absorbed.parents] == [0, 3, 6, 9]
    assert [p.latent for p in absorbed.parents] == [0, 3, 6, 9]  # decoder rows are the atoms
    assert all(p.cosine == pytest.approx(1.0, abs=1e-5) and p.children == 2 for p in absorbed.parents)
    assert all(p.rows_with_child > 20 and p.rows_alone > 20 for p in absorbed.parents)
    assert absorbed.mean == pytest.approx(1.0) and absorbed.mean_alone == pytest.approx(0.0)
    truthful = absorption(_OracleSAE(planted, absorb=False), planted, rows, codes)
    assert truthful.mean == pytest.approx(0.0) and truthful.mean_alone == pytest.approx(0.0)
    # the counts are the planted ones
    active = codes.numpy() > 0
    with_child = active[:, 0] & (active[:, 1] | active[:, 2])
    assert absorbed.parents[0].rows_with_child == int(with_child.sum())
    assert absorbed.parents[0].rows_alone == int((active[:, 0] & ~with_child).sum())
    text = str(absorbed)
    assert text.startswith("absorption 1.000") and "atom    3 -> latent     3" in text
    assert "<td" in absorbed._repr_html_() and json.dumps(absorbed.to_json())


def test_absorption_rejects_inputs_without_a_hierarchy(hierarchy):
    planted, rows, codes = hierarchy
    flat = planted_dictionary(n_atoms=24, d=32, active=3, seed=0)
    with pytest.raises(ValueError, match="hierarchy"):
        absorption(_OracleSAE(flat, absorb=False), flat, rows, codes)
    with pytest.raises(ValueError, match="codes must be"):
        absorption(_OracleSAE(planted, absorb=False), planted, rows, codes[:, :5])
    with pytest.raises(ValueError, match="encode"):
        absorption(planted.atoms, planted, rows, codes)


# ---------------------------------------------------------------------------- splitting
def test_splitting_counts_latents_close_to_each_atom():
    planted = planted_dictionary(n_atoms=20, d=64, active=3, seed=0)
    atoms = planted.atoms
    g = torch.Generator().manual_seed(0)
    # atom 0 split into three latents, atom 1 missing, the rest one latent each
    split = [atoms[0] + 0.3 * torch.randn(64, generator=g) / 8 for _ in range(3)]
    decoder = torch.stack(split + [atoms[i] for i in range(2, 20)])
    result = splitting(decoder, planted)
    expected = [sum(_cos(row, atoms[i]) > 0.5 for row in decoder) for i in range(20)]
    assert result.counts.tolist() == expected
    assert expected[0] == 3 and expected[1] == 0 and set(expected[2:]) == {1}
    assert result.mean == pytest.approx(sum(expected) / 20)
    assert result.split_fraction == pytest.approx(1 / 20) and result.missed_fraction == pytest.approx(1 / 20)
    assert splitting(decoder, planted, chunk_size=3).counts.tolist() == expected
    assert "latents per feature above cosine 0.5" in str(result) and "<table>" in result._repr_html_()


def test_stability_result_displays_itself():
    result = stability(_random(5, 4, 0), _random(6, 4, 1))
    assert str(result).startswith("stability: mean matched cosine") and "5 x 6" in str(result)
    html = result._repr_html_()
    assert "mean_cosine" in html and "Hungarian" in html
    assert json.loads(json.dumps(result.to_json(with_pairs=True)))["matched"] == 5


# ---------------------------------------------------------------------------- CLI
def test_cli_compare_prints_the_pairwise_stability_table(tmp_path, capsys):
    a = create_sae("topk", width=32, d_in=16, k=4, seed=0)
    b = create_sae("topk", width=32, d_in=16, k=4, seed=7)
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec.flip(0))
    c = create_sae("topk", width=24, d_in=16, k=4, seed=3)
    paths = [str(sae.save(tmp_path / name)) for sae, name in ((a, "a"), (b, "b"), (c, "c"))]
    assert main(["sae", "compare", *paths, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["names"] == paths
    assert report["mean_cosine"][0][1] == pytest.approx(1.0, abs=1e-6)
    assert report["mean_cosine"][0][2] < 0.6 and report["min"] == pytest.approx(report["mean_cosine"][0][2])
    assert main(["sae", "compare", *paths[:2], "--threshold", "0.9"]) == 0
    printed = capsys.readouterr().out
    assert "above 0.9" in printed and f"[1] {paths[1]}" in printed and "1.000 (1.00)" in printed
    assert main(["sae", "compare", paths[0]]) == 2
    assert "at least two" in capsys.readouterr().err
    d8 = create_sae("topk", width=8, d_in=8, k=2).save(tmp_path / "d8")
    assert main(["sae", "compare", paths[0], str(d8)]) == 2
    assert "same d" in capsys.readouterr().err
