"""SAE training on data-parallel ranks (2-3 CPU processes, gloo): a step on the ranks equals one
process's step on the concatenated batch, checkpoints are written once and resume at the same or
another world size, and bad set-ups are refused."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mechlens.sae.architectures import MatryoshkaConfig
from mechlens.sae.config import BatchTopKConfig, JumpReLUConfig, TopKConfig, TrainConfig
from tests.mechlens._ranks import free_port, run_ranks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D_IN, BATCH, STEPS = 16, 48, 24


def sweep() -> list[Any]:
    # one pass trains a sweep: per-row TopK with AuxK (a short dead window, so it runs), the
    # batch-wide BatchTopK and Matryoshka selections, and the JumpReLU threshold
    return [TopKConfig(width=64, k=4, aux_k=8), BatchTopKConfig(width=64, k=4),
            MatryoshkaConfig(width=64, k=4, group_sizes=(16, 48)), JumpReLUConfig(width=64)]


def train_config(**overrides: Any) -> TrainConfig:
    settings = dict(steps=STEPS, batch_size=BATCH, lr=3e-3, init_rows=2 * BATCH, dead_window=3 * BATCH, log_every=8,
                    device="cpu", seed=5)
    settings.update(overrides)
    return TrainConfig(**settings)


def global_batches(steps: int = STEPS) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    atoms = torch.randn(40, D_IN, generator=generator)
    batches = []
    for _ in range(steps):
        codes = torch.rand(BATCH, 40, generator=generator) * (torch.rand(BATCH, 40, generator=generator) < 0.1)
        batches.append(codes @ atoms + 0.3)
    return batches


def state_of(trainer: Any) -> dict[str, Any]:
    return {"step": trainer.step, "rows": trainer.rows_seen,
            "saes": [{k: v.detach().clone() for k, v in m.sae.state_dict().items()} for m in trainer.members],
            "since": [m.rows_since_fired.clone() for m in trainer.members], "log": trainer.log}


def _train_part(rank: int, world: int, out: str) -> None:
    from mechlens._distributed import distributed_context
    from mechlens.sae.training import SAETrainer

    part = BATCH // world
    local = [b[rank * part:(rank + 1) * part] for b in global_batches()]
    trainer = SAETrainer(sweep(), train_config(), dist=distributed_context(rank, world))
    trainer.fit(local, progress=False)
    torch.save(state_of(trainer), Path(out) / f"rank{rank}.pt")


@pytest.mark.parametrize("world", [2, 3])
def test_a_step_on_the_ranks_equals_one_process_on_the_concatenated_batch(world, tmp_path):
    from mechlens.sae.training import SAETrainer

    single = SAETrainer(sweep(), train_config())
    single.fit(global_batches(), progress=False)
    expected = state_of(single)
    run_ranks(world, _train_part, str(tmp_path))
    states = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    assert any(row["aux_loss"] > 0 for row in expected["log"] if row["sae"] == 0)  # AuxK did run
    for state in states:
        assert (state["step"], state["rows"]) == (STEPS, STEPS * BATCH)
        for member, (got, want) in enumerate(zip(state["saes"], expected["saes"])):
            for name in want:
                # gradients summed in another order differ in the last bits: measured max |diff| 2.4e-7
                # (worlds 2 and 3, 1 thread), so 2e-5 leaves ~100x; a rank that selects BatchTopK from
                # its own part, or steps on its own gradient, is off by orders of magnitude more
                assert torch.allclose(got[name], want[name], atol=2e-5, rtol=1e-4), (member, name)
        for got, want in zip(state["since"], expected["since"]):
            assert torch.equal(got, want)  # dead-latent counters see the global batch's firing
        for got, want in zip(state["log"], expected["log"]):
            assert got.keys() == want.keys()
            for key in ("loss", "mse", "fvu", "l0", "dead_fraction", "aux_loss"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    for a, b in zip(states[0]["saes"], states[-1]["saes"]):
        assert all(torch.equal(a[name], b[name]) for name in a)  # every rank holds the very same SAEs


# ---------------------------------------------------------------------------- train_sae on a store
@pytest.fixture(scope="module")
def store_path(tmp_path_factory) -> str:
    from activation_store import LayerSpec, StoreWriter

    path = tmp_path_factory.mktemp("ddp") / "acts"
    rows = torch.cat(global_batches(40)).numpy()
    with StoreWriter(path, model="m", layers={"l": LayerSpec(D_IN, "float32")}, chunk_bytes=96 * D_IN * 4) as writer:
        writer.write({"l": rows}, sample_ids=np.arange(len(rows)))
    return str(path)


def _store_run(rank: int, world: int, store: str, out: str, checkpoint: str, until: int | None, resume: bool) -> None:
    from mechlens.sae.training import train_sae

    result = train_sae(store, "l", [TopKConfig(width=64, k=4), BatchTopKConfig(width=64, k=4)], train_config(),
                       checkpoint_dir=checkpoint, resume=resume, progress=False, until_step=until,
                       out=out if until is None else None, rank=rank, world_size=world,
                       log_path=Path(checkpoint) / "log.csv")
    torch.save({"step": result.steps, "rows": result.rows,
                "saes": [{k: v.clone() for k, v in s.state_dict().items()} for s in result.saes]},
               Path(checkpoint) / f"result-rank{rank}.pt")


def _same_saes(a: list[dict], b: list[dict], exact: bool = True) -> bool:
    close = torch.equal if exact else (lambda x, y: torch.allclose(x, y, atol=1e-5))
    return all(close(x[name], y[name]) for x, y in zip(a, b) for name in x)


def test_train_sae_on_two_ranks_checkpoints_once_and_resumes_at_the_same_or_another_world_size(store_path, tmp_path):
    from mechlens.sae.training import train_sae

    whole, split = tmp_path / "whole", tmp_path / "split"
    run_ranks(2, _store_run, store_path, str(tmp_path / "out-whole"), str(whole), None, False)
    full = [torch.load(whole / f"result-rank{r}.pt") for r in range(2)]
    assert _same_saes(full[0]["saes"], full[1]["saes"])
    assert (full[0]["step"], full[0]["rows"]) == (STEPS, STEPS * BATCH)
    assert sorted(p.name for p in (tmp_path / "out-whole").iterdir()) == ["batchtopk-w64-k4", "topk-w64-k4"]
    log = (whole / "log.csv").read_text().splitlines()
    assert len(log) == 1 + 2 * (STEPS // 8)  # rank 0 alone writes the log: a header, then each SAE per log step

    # stopped at step 10 and resumed on 2 ranks: the very same run
    run_ranks(2, _store_run, store_path, "", str(split), 10, False)
    assert sorted(p.name for p in split.glob("state-step*")) == ["state-step000000010.safetensors"]
    run_ranks(2, _store_run, store_path, str(tmp_path / "out-split"), str(split), None, True)
    resumed = torch.load(split / "result-rank0.pt")
    assert _same_saes(resumed["saes"], full[0]["saes"])

    # resumed in one process from the 2-rank checkpoint: the schedule, Adam and counters go on
    other = tmp_path / "other"
    run_ranks(2, _store_run, store_path, "", str(other), 10, False)
    result = train_sae(store_path, "l", [TopKConfig(width=64, k=4), BatchTopKConfig(width=64, k=4)], train_config(),
                       checkpoint_dir=other, resume=True, progress=False)
    assert (result.steps, result.rows) == (STEPS, STEPS * BATCH)
    assert [row["step"] for row in result.log if row["sae"] == 0] == [8, 16, 24]
    import csv

    with open(whole / "log.csv") as handle:
        two_ranks = list(csv.DictReader(handle))
    first = next(row for row in result.log if row["step"] == 8 and row["sae"] == 0)
    assert first["fvu"] == pytest.approx(float(two_ranks[0]["fvu"]), rel=1e-6)  # the 2-rank part, kept
    # the rows after the resume are another split of the chunks, so the SAEs differ from the
    # 2-rank run's, but training went on from its state: a fresh start would be far worse
    assert not _same_saes([s.state_dict() for s in result.saes], full[0]["saes"])
    last = [row["fvu"] for row in result.log if row["step"] == STEPS]
    assert all(row <= 1.5 * float(want["fvu"]) for row, want in zip(last, two_ranks[-2:]))


def _refusal(rank: int, world: int, store: str, batch: int, queue_dir: str) -> None:
    from mechlens.sae.training import train_sae

    try:
        train_sae(store, "l", TopKConfig(width=64, k=4), train_config(batch_size=batch), progress=False,
                  rank=rank, world_size=world)
    except ValueError as error:
        (Path(queue_dir) / f"error{rank}.txt").write_text(str(error))


def test_bad_splits_are_refused_with_what_to_pass(store_path, tmp_path):
    from mechlens.sae.training import SAETrainer

    run_ranks(2, _refusal, store_path, 47, str(tmp_path))
    assert "multiple of the world size" in (tmp_path / "error0.txt").read_text()
    from mechlens.sae.architectures import ArchetypalConfig
    from mechlens._distributed import DistContext

    with pytest.raises(ValueError, match="one process"):
        SAETrainer(ArchetypalConfig(width=64, k=4), train_config(), dist=DistContext(0, 2, 0, False))


def test_the_cli_trains_under_torchrun_and_reports_once(store_path, tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                           "127.0.0.1", "--master_port", str(free_port()), "-m", "mechlens", "sae", "train",
                           "--store", store_path, "--layer", "l", "--arch", "topk", "--width", "32", "--k", "4",
                           "--steps", "12", "--batch-size", "48", "--lr", "3e-3", "--device", "cpu", "--no-progress",
                           "--out", str(tmp_path / "sae")], capture_output=True, text=True, env=env, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("trained 1 SAE(s) for 12 steps on 576 rows") == 1  # 12 x the global batch, said once
    assert (tmp_path / "sae" / "config.json").is_file()


def test_the_ddp_benchmark_runs_quick_and_ends_with_its_json_line():
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "sae_ddp.py"), "--quick"], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-2000:]
    line = json.loads(done.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "sae_ddp" and set(line["figures"]["rows_per_s"]) == {"1", "2"}
    assert line["ratios"]["scaling_efficiency_2"] > 0
