"""Parity with overcomplete's TopK SAE (a dev extra) on the same stored activations, and the
``benchmarks/sae_vs_peers.py`` quick run."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from activation_store import LayerSpec, StoreWriter
from mechlens.sae import Normalizer, SAETrainer, StoreSource, TopKConfig, TrainConfig, create_sae, evaluate

ROOT = Path(__file__).resolve().parents[2]


# The SAEs here are tiny: one intra-op thread is as fast on an idle machine and immune to the
# OpenMP barrier stalls of two threads on two shared cores (measured on the project's 2-core
# machine with one other busy process: 0.8 s vs 13-45 s for the same 150-step training).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def overcomplete_sae():
    # overcomplete 0.3 calls matplotlib.cm.get_cmap, which matplotlib 3.9 removed: restore the
    # alias before importing it (its SAE code does not plot; only the import needs it).
    import matplotlib
    import matplotlib.cm as cm

    if not hasattr(cm, "get_cmap"):
        cm.get_cmap = matplotlib.colormaps.get_cmap
    sae = pytest.importorskip("overcomplete.sae")
    return sae


@pytest.fixture(scope="module")
def cnn_store(tmp_path_factory):
    """Per-position rows of ``stage2`` of a random-init small CNN on 300 synthetic images."""
    from mechlens.capture import capture
    from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig
    from mechlens.features import as_position_rows
    from mechlens.models import small_cnn

    model = small_cnn(num_classes=5, seed=0).eval()
    images = SyntheticShapes(SyntheticShapesConfig(num_samples=300, image_size=64, seed=0))
    with torch.no_grad(), capture(model, ["stage2"]) as cap:
        model(images.render(np.arange(300)))
    rows, _ = as_position_rows(cap["stage2"], "nchw")
    b, p, c = rows.shape
    path = tmp_path_factory.mktemp("peers") / "store"
    with StoreWriter(path, model="mechlens:small_cnn", layers={"stage2": LayerSpec(c, "float32", chunk_rows=2048)}) as w:
        w.write({"stage2": rows.reshape(b * p, c).numpy()}, sample_ids=np.repeat(np.arange(b), p),
                positions=np.tile(np.arange(p), b))
    from activation_store import ActivationStore

    return ActivationStore(path)


class _Peer:
    def __init__(self, model):
        self.model = model.eval()

    def encode(self, x):
        return self.model.encode(x)[1]

    def decode(self, z):
        return self.model.decode(z)


def _copy_peer_weights(ours, peer) -> None:
    with torch.no_grad():
        linear = peer.encoder.final_block[0]
        ours.W_enc.copy_(linear.weight.T)
        ours.b_enc.copy_(linear.bias)
        dictionary = peer.dictionary._weights
        ours.W_dec.copy_(dictionary / dictionary.norm(dim=1, keepdim=True))
        ours.b_dec.zero_()


def test_same_weights_give_the_same_codes_and_reconstructions(overcomplete_sae):
    torch.manual_seed(0)
    peer = overcomplete_sae.TopKSAE(24, 96, top_k=5).train()
    peer.get_dictionary()  # training mode normalises the dictionary rows, as ours are
    ours = create_sae("topk", width=96, d_in=24, k=5)
    _copy_peer_weights(ours, peer)
    peer.eval()
    x = torch.randn(200, 24)
    with torch.no_grad():
        _, peer_codes = peer.encode(x)
        assert torch.allclose(ours.eval().encode(x), peer_codes, atol=1e-5)
        assert torch.allclose(ours.reconstruct(x), peer.decode(peer_codes), atol=1e-5)


def test_training_parity_on_stored_activations(overcomplete_sae, cnn_store):
    """Same stored rows (centred and scaled once), same batches in the same order, same initial
    weights, width, k, steps, batch size, learning rate and gradient clipping, no LR schedule and
    no AuxK: FVU on held-out rows within 0.05 of overcomplete's (and not worse by more than
    0.005), L0 equal. Ours is usually a little better: its decoder update removes the gradient
    component along each unit-norm row before Adam, overcomplete renormalises afterwards."""
    torch.manual_seed(0)
    view = cnn_store["stage2"]
    width, k, steps, batch, lr = 256, 8, 300, 256, 1e-3
    normaliser = Normalizer.from_statistics(cnn_store.statistics("stage2"), center=True)
    held_out = normaliser.apply(torch.from_numpy(view.read_rows(np.arange(view.num_rows - 2048, view.num_rows))))
    source = StoreSource(view, batch, seed=0)
    batches = [normaliser.apply(torch.from_numpy(b.data)) for _, b in zip(range(steps), source.iterate(0))]

    peer = overcomplete_sae.TopKSAE(view.dim, width, top_k=k).train()
    peer.get_dictionary()
    train = TrainConfig(steps=steps, batch_size=batch, lr=lr, lr_warmup_fraction=0.0, lr_decay_fraction=0.0,
                        grad_clip=1.0, normalize=False, b_dec_init="zeros", device="cpu", log_every=100)
    trainer = SAETrainer(TopKConfig(width=width, k=k, d_in=view.dim, aux_coeff=0.0), train)
    trainer.initialise(normalizer=Normalizer.identity())
    _copy_peer_weights(trainer.members[0].sae, peer)
    ours = trainer.fit(batches, progress=False).sae

    from overcomplete.sae.losses import mse_l1

    optimizer = torch.optim.Adam(peer.parameters(), lr=lr)
    overcomplete_sae.train_sae(peer, batches, lambda *a: mse_l1(*a, penalty=0.0), optimizer, nb_epochs=1,
                               clip_grad=1.0, monitoring=0)
    mine, theirs = evaluate(ours, [held_out]), evaluate(_Peer(peer), [held_out])
    assert theirs.fvu < 0.5 and mine.fvu < 0.5  # both learnt the data
    assert abs(mine.fvu - theirs.fvu) <= 0.05, (mine, theirs)
    assert mine.fvu <= theirs.fvu + 0.005, (mine, theirs)
    assert mine.l0 == pytest.approx(theirs.l0, abs=0.05 * k)


def test_benchmark_quick_run_prints_its_json_line():
    """Both kinds of data, both architectures, mechlens and the three peers (each installed as a
    dev extra), each at the rate of the sweep its validation FVU prefers."""
    for peer in ("sae_lens", "dictionary_learning", "overcomplete"):
        pytest.importorskip(peer)
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sae_vs_peers.py"), "--quick", "--threads", "1"],
                            capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["benchmark"] == "sae_vs_peers"
    figures, ratios = line["figures"], line["ratios"]
    settings = figures["settings"]
    assert settings["lr_sweep"] == [2e-3, 8e-3] and figures["notes"] == []
    peers = ("saelens", "dictionary_learning", "overcomplete")
    for kind in ("conv", "planted"):
        for arch in ("topk", "batchtopk"):
            results = figures["results"][kind][arch]
            assert set(results) == {"mechlens", *peers}
            for system, r in results.items():
                assert r["lr"] in settings["lr_sweep"], (kind, arch, system)
                assert set(r["validation_fvu_by_lr"]) == {"0.002", "0.008"}
                assert r["validation_fvu"] == min(r["validation_fvu_by_lr"].values())
                assert 0 < r["fvu"] < 1.0 and r["l0"] > 0 and 0 <= r["dead_pct"] <= 100, (kind, arch, system, r)
                assert r["rows_per_s"] > 0 and r["peak_memory_mib"] > 0
                k = settings["planted_k"] if kind == "planted" else settings["k"]
                # matched L0: TopK keeps k per row; BatchTopK thresholds are calibrated to a mean of k
                assert r["l0_at_k"] == pytest.approx(k, abs=0.05), (kind, arch, system, r)
                if arch == "topk":
                    assert r["fvu_at_k"] == r["fvu"] and r["l0"] == pytest.approx(k, abs=0.05)
                if kind == "planted":
                    assert 0 < r["mmcs"] <= 1.0
                else:
                    assert r["mmcs"] is None
            best = figures["best_peer"][f"{kind}_{arch}"]
            assert best in peers and results[best]["fvu_at_k"] == min(results[p]["fvu_at_k"] for p in peers)
            prefix = f"{kind}_{arch}_"
            assert ratios[prefix + "fvu_vs_best_peer"] == pytest.approx(
                results["mechlens"]["fvu_at_k"] / results[best]["fvu_at_k"], rel=1e-3)
            assert ratios[prefix + "dead_pct_minus_best_peer"] == pytest.approx(
                results["mechlens"]["dead_pct_at_k"] - results[best]["dead_pct_at_k"], abs=0.02)
            for peer in peers:
                assert ratios[prefix + f"rows_per_s_vs_{peer}"] == pytest.approx(
                    results["mechlens"]["rows_per_s"] / results[peer]["rows_per_s"], rel=1e-2)
    # a planted dictionary is recovered by mechlens at k = active
    assert figures["results"]["planted"]["topk"]["mechlens"]["mmcs"] > 0.9
