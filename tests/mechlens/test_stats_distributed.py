"""Feature statistics across ranks: 2 and 3 CPU ranks (gloo, spawned here, joining the group from
torchrun's environment variables) give exactly the statistics of one process; ties are broken
canonically (value, then row id); save() writes once; bad ranks and mismatched ranks are refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from activation_store import ActivationStore, LayerSpec, StoreWriter
from mechlens.sae.modules import SAE, create_sae
from mechlens.sae.stats import STATS_JSON, STATS_TENSORS, FeatureStatistics, feature_statistics
from tests.mechlens._ranks import run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROWS, DIM, PER_SAMPLE, CHUNK_ROWS = 3000, 16, 7, 50
ARRAYS = ("frequency", "mean", "mean_active", "max", "top_values", "top_rows", "top_samples", "top_positions")
# name -> feature_statistics keywords; every rank and the single process run each of them
CASES = {
    "distinct": dict(top_k=5, distinct_samples=True, batch_size=128),
    "any_rows": dict(top_k=5, distinct_samples=False, batch_size=128),
    "split_chunks": dict(top_k=4, distinct_samples=True, batch_size=32),  # batches smaller than a chunk
    "max_rows": dict(top_k=5, distinct_samples=True, batch_size=128, max_rows=1234),  # ends inside a chunk
}
JOIN_TIMEOUT_S = 90.0


def _write(path: Path, data: np.ndarray) -> None:
    """Two shards (store order: shard 0's rows, then shard 1's), several commits each, 50-row chunks."""
    spec = LayerSpec(DIM, "float32")
    ids = np.arange(len(data))
    for shard, part in enumerate((ids[:1800], ids[1800:])):
        with StoreWriter(path, model="m", layers={"l": spec}, shard=shard, chunk_bytes=CHUNK_ROWS * DIM * 4) as writer:
            for piece in np.array_split(part, 4):
                writer.write({"l": data[piece]}, sample_ids=piece // PER_SAMPLE, positions=piece % PER_SAMPLE,
                             labels=np.zeros(len(piece), np.int64))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stats_dist")
    rng = np.random.default_rng(3)
    data = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    # exact ties: each sample's last row repeats its first (a sample's maximum reached twice,
    # often in two chunks read by different ranks), and rows 2200-2299 (shard 1) repeat 300-399 (shard 0)
    first = np.arange(0, ROWS, PER_SAMPLE)
    last = np.minimum(first + PER_SAMPLE - 1, ROWS - 1)
    data[last] = data[first]
    data[2200:2300] = data[300:400]
    # and ten copies of five strong rows fill chunk 20 (rows 1000-1049): a batch's own top-k
    # then has to choose between tied rows
    data[1000:1050] = np.tile(3 * data[1000:1005], (10, 1))
    _write(root / "store", data)
    bad = data.copy()
    bad[2222] = np.nan  # a non-finite row on one rank only
    _write(root / "bad", bad)
    sae = create_sae("relu", width=24, d_in=DIM, seed=7, layer="l")
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-5.0, 0.3, 24))  # rare latents too: fewer than k firing rows
    sae.save(root / "sae")
    return root


def _worker(rank: int, world_size: int, root: str) -> None:
    """One rank, as torchrun starts it: the environment names the group, feature_statistics joins it."""
    root_path = Path(root)
    out = root_path / f"world{world_size}"
    sae = SAE.load(root_path / "sae")
    store = ActivationStore(root_path / "store")
    report: dict[str, str] = {}
    try:
        for name, kwargs in CASES.items():
            stats = feature_statistics(sae, store, **kwargs)
            assert stats.rank == rank
            np.savez(out / f"{name}-{rank}.npz", rows=stats.rows, **{a: getattr(stats, a) for a in ARRAYS})
        stats.save(out / f"own-{rank}")  # only rank 0 writes
        stats.save(out / "shared")  # every rank calls it, as `mechlens sae stats` does
        try:
            feature_statistics(sae, store, max_rows=1000 + rank)
        except ValueError as error:
            report["mismatch"] = str(error)
        try:
            feature_statistics(sae, root_path / "bad", batch_size=128)
        except Exception as error:  # noqa: BLE001 - the type is what the test checks
            report["bad"] = f"{type(error).__name__}: {error}"
    finally:
        (out / f"report-{rank}.json").write_text(json.dumps(report))
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _spawn(root: Path, world_size: int) -> None:
    (root / f"world{world_size}").mkdir()
    run_ranks(world_size, _worker, str(root), join=False, timeout=JOIN_TIMEOUT_S)


def _brute_force_top(z: np.ndarray, samples: np.ndarray, k: int, distinct: bool) -> list[np.ndarray]:
    """The canonical exemplars: by value descending, then row id ascending; with ``distinct`` a
    sample's first row (lowest id) at its maximum."""
    tops = []
    for j in range(z.shape[1]):
        order = np.argsort(-z[:, j], kind="stable")
        order = order[z[order, j] > 0]
        if distinct:
            _, first = np.unique(samples[order], return_index=True)
            order = order[np.sort(first)]
        tops.append(order[:k])
    return tops


@pytest.mark.timeout(150)
@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_merge_to_the_single_process_statistics(world, world_size):
    _spawn(world, world_size)
    out = world / f"world{world_size}"
    sae = SAE.load(world / "sae")
    store = ActivationStore(world / "store")
    for name, kwargs in CASES.items():
        single = feature_statistics(sae, store, **kwargs)
        assert single.rows == kwargs.get("max_rows", ROWS)
        for rank in range(world_size):
            merged = np.load(out / f"{name}-{rank}.npz")
            assert int(merged["rows"]) == single.rows
            for array in ("max", "top_values", "top_rows", "top_samples", "top_positions"):
                np.testing.assert_array_equal(merged[array], getattr(single, array), err_msg=f"{name}: {array}")
            for array in ("frequency", "mean", "mean_active"):
                np.testing.assert_allclose(merged[array], getattr(single, array), rtol=1e-12, atol=0,
                                           err_msg=f"{name}: {array}")
    # written once, by rank 0; every rank called save()
    assert sorted(p.name for p in (out / "own-0").iterdir()) == [STATS_JSON, STATS_TENSORS]
    assert not any((out / f"own-{rank}").exists() for rank in range(1, world_size))
    assert sorted(p.name for p in (out / "shared").iterdir()) == [STATS_JSON, STATS_TENSORS]
    back = FeatureStatistics.load(out / "shared")
    np.testing.assert_array_equal(back.top_rows, feature_statistics(sae, store, **CASES["max_rows"]).top_rows)
    reports = [json.loads((out / f"report-{rank}.json").read_text()) for rank in range(world_size)]
    for report in reports:  # every rank refuses, none hangs in a collective
        assert "ranks were given different passes (max_rows: [1000, 1001" in report["mismatch"]
    owner = [rank for rank, report in enumerate(reports) if report["bad"].startswith("NonFiniteActivationsError")]
    assert len(owner) == 1 and "store row ids [2222]" in reports[owner[0]]["bad"]
    for rank, report in enumerate(reports):
        if rank != owner[0]:
            assert report["bad"].startswith(f"RuntimeError: feature statistics failed on rank {owner[0]} of "
                                            f"{world_size}: NonFiniteActivationsError")


def test_single_process_breaks_ties_canonically(world):
    sae = SAE.load(world / "sae")
    store = ActivationStore(world / "store")
    data = store["l"][:]
    index = store["l"].read_index()
    z = sae.encode(torch.from_numpy(data)).detach().numpy()
    # the ties are real: duplicated rows encode to the same bits
    np.testing.assert_array_equal(z[2200:2300], z[300:400])
    for name, kwargs in CASES.items():
        limit = kwargs.get("max_rows", ROWS)
        stats = feature_statistics(sae, store, **kwargs)
        tops = _brute_force_top(z[:limit], index.sample_id[:limit], kwargs["top_k"], kwargs["distinct_samples"])
        assert any(len(t) < kwargs["top_k"] for t in tops) and any(len(t) == kwargs["top_k"] for t in tops)
        for j, expected in enumerate(tops):
            np.testing.assert_array_equal(stats.top_rows[j][:len(expected)], expected, err_msg=f"{name}: latent {j}")
            assert (stats.top_rows[j][len(expected):] == -1).all()
            np.testing.assert_array_equal(stats.top_values[j][:len(expected)], z[expected, j])
            np.testing.assert_array_equal(stats.top_samples[j][:len(expected)], index.sample_id[expected])
            np.testing.assert_array_equal(stats.top_positions[j][:len(expected)], index.position[expected])
        np.testing.assert_allclose(stats.frequency, (z[:limit] > 0).mean(0), rtol=1e-12)
    # the ties are exercised: equal values side by side among the exemplars (a row and its copy),
    # and samples whose maximum is reached twice (first and last row) shown at their first row
    rows_case = feature_statistics(sae, store, **CASES["any_rows"])
    assert ((rows_case.top_values[:, 1:] == rows_case.top_values[:, :-1]) & (rows_case.top_rows[:, 1:] >= 0)).any()
    distinct = feature_statistics(sae, store, **CASES["distinct"])
    at_first = (distinct.top_rows >= 0) & (distinct.top_positions == 0)
    twin = np.minimum(distinct.top_rows + PER_SAMPLE - 1, ROWS - 1)
    assert (at_first & (z[twin, np.arange(z.shape[1])[:, None]] == distinct.top_values)).any()


def test_bad_rank_or_world_size_is_refused(world):
    sae = SAE.load(world / "sae")
    store = ActivationStore(world / "store")
    with pytest.raises(ValueError, match="rank 2 is not in a world of size 2"):
        feature_statistics(sae, store, rank=2, world_size=2)
    with pytest.raises(ValueError, match="rank -1 is not in a world of size 2"):
        feature_statistics(sae, store, rank=-1, world_size=2)
    with pytest.raises(ValueError, match="rank 0 is not in a world of size 0"):
        feature_statistics(sae, store, rank=0, world_size=0)
    with pytest.raises(ValueError, match="needs a process group .* launch with torchrun"):
        feature_statistics(sae, store, rank=1, world_size=2)
    with pytest.raises(ValueError, match="max_rows must be positive"):
        feature_statistics(sae, store, max_rows=0)
    stats = feature_statistics(sae, store, rank=0, world_size=1, top_k=2)
    assert stats.rank == 0 and stats.rows == ROWS


def test_save_on_a_rank_other_than_0_writes_nothing(world, tmp_path):
    sae = SAE.load(world / "sae")
    stats = feature_statistics(sae, ActivationStore(world / "store"), top_k=2)
    stats.rank = 1
    assert stats.save(tmp_path / "r1") == tmp_path / "r1" and not (tmp_path / "r1").exists()
    stats.rank = 0
    stats.save(tmp_path / "r0")
    assert sorted(p.name for p in (tmp_path / "r0").iterdir()) == [STATS_JSON, STATS_TENSORS]
