"""The SAE training recipe: per-SAE learning rates (a sweep axis), the rate rule and the range
test on a validation split, the warm-up fraction, and the AuxK normalisation switch."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechlens.sae import (
    SAETrainer,
    TensorSource,
    TopKConfig,
    TrainConfig,
    find_learning_rate,
    lr_rule,
    train_sae,
)
from mechlens.sae.lr import default_rates, validation_split
from mechlens.sae.training import lr_factor, member_lr
from tests.mechlens.test_sae import sparse_dictionary_data, write_store


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def straddling_store(tmp_path_factory):
    """3000 rows, 8 per image, in chunks of 100 rows: images straddle chunk boundaries."""
    x, _ = sparse_dictionary_data(3000, d=16, atoms=48, k=3, seed=1)
    return write_store(tmp_path_factory.mktemp("recipe") / "s", x.numpy().astype(np.float32), chunk_rows=100)


def test_the_warmup_is_a_fraction_of_the_steps():
    short, long = TrainConfig(steps=100, lr_warmup_fraction=0.1), TrainConfig(steps=1000, lr_warmup_fraction=0.1)
    assert lr_factor(0, short) == pytest.approx(0.1) and lr_factor(9, short) == 1.0
    assert lr_factor(0, long) == pytest.approx(0.01) and lr_factor(49, long) == pytest.approx(0.5)
    assert lr_factor(99, long) == 1.0
    assert lr_factor(0, TrainConfig(steps=100, lr_warmup_fraction=0.0)) == 1.0
    # a config written before the fraction (lr_warmup_steps) is read as the same schedule
    old = TrainConfig.from_json({"steps": 1000, "lr_warmup_steps": 100})
    assert old.lr_warmup_fraction == pytest.approx(0.1)
    with pytest.raises(ValueError, match="lr_warmup_fraction must be in"):
        TrainConfig(lr_warmup_fraction=2.0)


def test_learning_rate_modes_and_per_config_rates():
    assert lr_rule(2 ** 14) == pytest.approx(1.4e-3) and lr_rule(2 ** 12) == pytest.approx(2.8e-3)
    assert lr_rule(512) == pytest.approx(7.92e-3, rel=1e-3)   # Gao et al.'s width^-1/2, our constant
    assert default_rates(2 ** 14) == pytest.approx([1.75e-4, 3.5e-4, 7e-4, 1.4e-3, 2.8e-3, 5.6e-3])
    assert TrainConfig().lr == "rule"
    config = TopKConfig(width=4096, k=8, d_in=4)
    assert member_lr(config, TrainConfig(lr=1e-3)) == 1e-3
    assert member_lr(config, TrainConfig(lr="rule")) == pytest.approx(2.8e-3)
    assert member_lr(config.replace(lr=5e-3), TrainConfig(lr="rule")) == 5e-3
    assert config.replace(lr=2e-3).name == "topk-w4096-k8-lr0.002" and config.name == "topk-w4096-k8"
    with pytest.raises(ValueError, match="lr='auto' needs a validation split"):
        member_lr(config, TrainConfig(lr="auto"))
    with pytest.raises(ValueError, match="lr must be a positive number or one of"):
        TrainConfig(lr="fast")
    with pytest.raises(ValueError, match="lr must be a positive number or None"):
        TopKConfig(width=8, k=2, lr=-1.0)


def test_rates_of_one_pass_are_applied_per_sae():
    x, _ = sparse_dictionary_data(2048, d=8, atoms=16, k=2, seed=0)
    configs = [TopKConfig(width=16, k=2, d_in=8, lr=rate) for rate in (1e-4, 1e-2)]
    train = TrainConfig(steps=20, batch_size=128, lr=1.0, lr_warmup_fraction=0.0, lr_decay_fraction=0.0, log_every=20,
                        device="cpu", init_rows=512)
    trainer = SAETrainer(configs, train)
    result = trainer.fit(TensorSource(x, 128), progress=False)
    assert [row["lr"] for row in result.metrics] == pytest.approx([1e-4, 1e-2])
    assert [m.optimizer.param_groups[0]["lr"] for m in trainer.members] == pytest.approx([1e-4, 1e-2])
    # the second member is exactly the SAE a run of its own at TrainConfig.lr = 1e-2 trains (its seed: seed + 1)
    alone = SAETrainer(configs[1].replace(lr=None), train.replace(lr=1e-2, seed=1)).fit(TensorSource(x, 128),
                                                                                    progress=False)
    assert torch.equal(alone.sae.W_dec, result.saes[1].W_dec)


def test_validation_split_holds_no_image_on_both_sides(straddling_store):
    view = straddling_store.layer("l")
    training, ids = validation_split(view, 0.2, seed=0)
    held = sorted(set(range(view.num_chunks)) - set(training))
    assert len(held) == 6 and len(training) == 24
    trained_images = set()
    for position in training:
        _, index = view.read_chunk(position, with_index=True)
        trained_images.update(index.sample_id.tolist())
    validation_images = set(view.read_index(ids).sample_id.tolist())
    assert validation_images and not validation_images & trained_images
    # the held-out rows really are those of the held-out chunks, minus boundary images only
    assert 0.7 * view.chunk_rows(held) < len(ids) <= view.chunk_rows(held)
    with pytest.raises(ValueError, match="validation fraction must be in"):
        validation_split(view, 1.5)


def test_range_test_chooses_the_rate_of_lowest_validation_fvu(straddling_store):
    train = TrainConfig(steps=150, batch_size=128, device="cpu", init_rows=512, prefetch=1, log_every=50)
    search = find_learning_rate(straddling_store, "l", TopKConfig(width=32, k=3), train, rates=[1e-5, 3e-3, 3e-2],
                                fraction=1.0, progress=False)
    rows = search.results["topk-w32-k3"]
    assert [r["lr"] for r in rows] == [1e-5, 3e-3, 3e-2]
    assert search.best_lr == min(rows, key=lambda r: r["fvu"])["lr"]
    assert search.best_lr != 1e-5  # a rate that cannot move the weights in 150 steps never wins
    assert rows[0]["fvu"] > 1.5 * min(r["fvu"] for r in rows)
    assert "chosen" in search._repr_html_() and "<- chosen" in str(search)


def test_train_with_lr_auto_trains_at_the_chosen_rate_and_saves_the_search(straddling_store, tmp_path):
    train = TrainConfig(steps=100, batch_size=128, device="cpu", init_rows=512, prefetch=1, log_every=50, lr="auto")
    result = train_sae(straddling_store, "l", TopKConfig(width=32, k=3), train, out=tmp_path / "sae", progress=False)
    chosen = result.lr_search.best_lr
    assert result.sae.config.lr == chosen and result.metrics[0]["lr"] == pytest.approx(0.0, abs=chosen)
    saved = json.loads((tmp_path / "sae" / "lr_search.json").read_text())
    assert saved["best"] == {"topk-w32-k3": chosen}
    assert (tmp_path / "sae" / "lr_search.png").stat().st_size > 1000
    assert json.loads((tmp_path / "sae" / "config.json").read_text())["config"]["lr"] == chosen


def test_cli_learning_rate_is_a_sweep_axis_or_auto(straddling_store, tmp_path, capsys):
    from mechlens.cli import main

    base = ["sae", "train", "--store", str(straddling_store.root), "--layer", "l", "--arch", "topk", "--width", "32",
            "--k", "3", "--steps", "20", "--batch-size", "128", "--no-progress", "--device", "cpu"]
    assert main([*base, "--lr", "1e-3,3e-3", "--out", str(tmp_path / "sweep")]) == 0
    assert sorted(p.name for p in (tmp_path / "sweep").iterdir()) == ["topk-w32-k3-lr0.001", "topk-w32-k3-lr0.003"]
    capsys.readouterr()
    assert main([*base, "--lr", "auto", "--out", str(tmp_path / "auto"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saes"][0]["peak_lr"] == report["lr_search"]["best"]["topk-w32-k3"]
    with pytest.raises(SystemExit) as stop:  # argparse refuses it: usage and one line, exit 2
        main([*base, "--lr", "quick", "--out", str(tmp_path / "bad")])
    assert stop.value.code == 2
    assert "expected a number, comma-separated numbers or one of" in capsys.readouterr().err


def test_cli_eval_prints_one_table_and_plots_the_frontier_per_architecture(straddling_store, tmp_path, capsys):
    from mechlens.cli import main

    base = ["sae", "train", "--store", str(straddling_store.root), "--layer", "l", "--width", "32", "--steps", "20",
            "--batch-size", "128", "--no-progress", "--device", "cpu", "--lr", "3e-3"]
    assert main([*base, "--arch", "topk", "--k", "2,4", "--out", str(tmp_path / "topk")]) == 0
    assert main([*base, "--arch", "batchtopk", "--k", "3", "--out", str(tmp_path / "btk")]) == 0
    capsys.readouterr()
    saes = [*sorted((tmp_path / "topk").iterdir()), tmp_path / "btk"]
    plot = tmp_path / "frontier.png"
    assert main(["sae", "eval", *map(str, saes), "--store", str(straddling_store.root), "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].split()[:4] == ["sae", "arch", "width", "rows"] and "FVU" in printed[0]
    assert [line.split()[1] for line in printed[1:4]] == ["topk", "topk", "batchtopk"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_batchtopk_threshold_calibrated_to_an_l0_gives_that_l0():
    from mechlens.sae import BatchTopKConfig, build_sae, evaluate

    sae = build_sae(BatchTopKConfig(width=64, k=5, d_in=16), seed=0).eval()
    x, _ = sparse_dictionary_data(3000, d=16, atoms=48, k=3, seed=2)
    batches = [x[i:i + 256] for i in range(0, 3000, 256)]   # batch by batch: the pool is merged exactly
    threshold = sae.calibrate_threshold(batches)
    assert float(sae.threshold) == threshold > 0
    assert evaluate(sae, batches).l0 == pytest.approx(5.0, abs=1e-3)
    # the same threshold as one batch of all the rows, BatchTopK's own selection
    acts = torch.relu(sae.pre_activations(x)).flatten()
    assert (acts > threshold).sum() == 5 * 3000
    sae.calibrate_threshold(batches, l0=2.5)
    assert evaluate(sae, batches).l0 == pytest.approx(2.5, abs=1e-3)
    with pytest.raises(ValueError, match="l0 must be in"):
        sae.calibrate_threshold(batches, l0=0)


@pytest.mark.parametrize("arch,rescale", [("topk", False), ("batchtopk", False), ("topk", True), ("batchtopk", True)])
def test_the_sparse_decoder_path_equals_the_dense_one_with_its_gradients(arch, rescale):
    """TopK / BatchTopK training decodes only the active rows (embedding_bag); the output and
    every gradient must be those of the dense decode of the generic SAE.forward."""
    from mechlens.sae import create_sae
    from mechlens.sae.losses import squared_error
    from mechlens.sae.modules import SAE

    options = {"rescale_acts_by_decoder_norm": True, "normalize_decoder": False} if rescale else {}
    sae = create_sae(arch, width=48, d_in=12, k=4, seed=3, **options).train()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if rescale:  # rows of norms 0.5..2: the rescaled decode divides by them
            sae.W_dec.mul_(torch.linspace(0.5, 2.0, 48)[:, None])
    x = torch.randn(37, 12, generator=torch.Generator().manual_seed(1))
    grads = []
    for forward in (sae.forward, lambda rows: SAE.forward(sae, rows)):
        sae.zero_grad(set_to_none=True)
        out = forward(x)
        squared_error(x, out.x_hat).backward()
        grads.append((out.x_hat.detach(), out.z.detach(), [p.grad.clone() for p in sae.parameters()]))
        if out.active is not None:  # the firing counts the trainer takes from the sparse forward
            counts = torch.bincount(out.active, weights=(out.active_values > 0).float(), minlength=48)
            assert torch.equal(counts, (out.z > 0).sum(0).float())
    (fast_x, fast_z, fast_g), (slow_x, slow_z, slow_g) = grads
    assert torch.allclose(fast_x, slow_x, atol=1e-5) and torch.equal(fast_z, slow_z)
    assert (fast_z > 0).sum() >= (4 * 37 if arch == "batchtopk" else 1)
    for fast, slow in zip(fast_g, slow_g):
        assert torch.allclose(fast, slow, atol=1e-5)


def test_batch_topk_selects_the_same_entries_as_topk_and_falls_back_when_the_sample_misleads():
    from mechlens.sae.modules import batch_topk

    generator = torch.Generator().manual_seed(0)
    flat = torch.relu(torch.randn(1024 * 512, generator=generator))
    values, indices = batch_topk(flat, 16, 512)
    reference = flat.topk(8192, sorted=False)
    assert torch.equal(indices.sort().values, reference.indices.sort().values)
    assert torch.equal(values, flat[indices])
    # the large values sit where the strided sample never looks (its floor is 0: every entry is a candidate),
    # or only where it looks (its floor passes fewer than 8192 entries: the full topk runs); exact either way
    hidden = torch.zeros(1024 * 512)
    hidden[torch.arange(1, 1024 * 512, 17)[:9000]] = 1.0 + torch.rand(9000, generator=generator)
    seen = torch.rand(1024 * 512, generator=generator)
    seen[torch.arange(0, 1024 * 512, 17)[:1000]] = 10.0 + torch.rand(1000, generator=generator)
    for flat in (hidden, seen):
        values, indices = batch_topk(flat, 16, 512)
        assert torch.equal(indices.sort().values, flat.topk(8192, sorted=False).indices.sort().values)


# ---------------------------------------------------------------------------- rescale by decoder norm
def _rescaled(arch: str, seed: int = 3):
    from mechlens.sae import create_sae

    sae = create_sae(arch, width=48, d_in=12, k=4, seed=seed, rescale_acts_by_decoder_norm=True,
                     normalize_decoder=False)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_dec.mul_(0.5 + 1.5 * torch.rand(48, 1, generator=generator))  # free norms 0.5..2
        sae.W_enc.add_(0.2 * torch.randn(sae.W_enc.shape, generator=generator))
        sae.b_enc.normal_(std=0.1, generator=generator)
        sae.b_dec.normal_(generator=generator)
    return sae


@pytest.mark.parametrize("arch", ["topk", "batchtopk"])
def test_rescale_by_decoder_norm_matches_saelens_training_forward_and_gradients(arch):
    """SAELens's TopK family selects on ``pre * ||W_dec_i||`` and decodes with unit rows (its
    default): the latents, reconstruction, MSE and every parameter's gradient must match."""
    pytest.importorskip("sae_lens")
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from mechlens.sae.losses import squared_error

    ours = _rescaled(arch).train()
    peer_class, config_class = {"topk": (TopKTrainingSAE, TopKTrainingSAEConfig),
                                "batchtopk": (BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig)}[arch]
    peer = peer_class(config_class(d_in=12, d_sae=48, k=4, rescale_acts_by_decoder_norm=True))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(peer, name).copy_(getattr(ours, name))
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(5)) * 2
    out = ours(x)
    recon = squared_error(x, out.x_hat)
    recon.backward()
    step = peer.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    torch.testing.assert_close(out.z, step.feature_acts.to_dense(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, step.sae_out, atol=1e-5, rtol=1e-5)
    assert recon.item() == pytest.approx(step.losses["mse_loss"].item(), rel=1e-5)
    step.losses["mse_loss"].backward()
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(peer, name).grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_rescaled_sae_folds_exactly_into_the_plain_form_and_on_export(arch, tmp_path):
    """fold_decoder_norm, the raw-space fold and the SAELens export all give the same latents and
    reconstruction as the rescaled SAE (BatchTopK: its inference threshold unchanged)."""
    from mechlens.sae import export_saelens, import_saelens
    from mechlens.sae.modules import fold_normalization

    sae = _rescaled(arch).eval()
    if arch != "topk":
        sae.threshold.fill_(0.3)
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(6))
    z, x_hat = sae.encode(x), sae.reconstruct(x)
    assert (z > 0).sum() > 20
    plain = sae.fold_decoder_norm()
    assert not plain.rescales_by_decoder_norm and plain is not sae
    torch.testing.assert_close(plain.W_dec.norm(dim=1), torch.ones(48))
    torch.testing.assert_close(plain.encode(x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.reconstruct(x), x_hat, atol=1e-5, rtol=1e-5)
    raw = fold_normalization(sae, scale=0.25)  # the SAE trained on x / 4, reading x
    torch.testing.assert_close(raw.encode(4 * x), z, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(raw.reconstruct(4 * x), 4 * x_hat, atol=1e-4, rtol=1e-5)
    back = import_saelens(export_saelens(sae, tmp_path / "lens"))
    torch.testing.assert_close(back.reconstruct(x), x_hat, atol=1e-5, rtol=1e-5)


def test_rescale_by_decoder_norm_refuses_a_unit_norm_constraint_and_archetypes():
    from mechlens.sae import BatchTopKConfig
    from mechlens.sae.architectures import ArchetypalConfig

    with pytest.raises(ValueError, match="normalize_decoder=False"):
        BatchTopKConfig(width=32, k=4, rescale_acts_by_decoder_norm=True)
    with pytest.raises(ValueError, match="archetypes"):
        ArchetypalConfig(width=32, k=4, rescale_acts_by_decoder_norm=True)


# ---------------------------------------------------------------------------- bf16 autocast
def test_bf16_autocast_trains_every_architecture_in_bfloat16_to_the_float32_fvu():
    from mechlens.sae import BatchTopKConfig, GatedConfig, JumpReLUConfig, planted_dictionary
    from mechlens.sae.architectures import MatryoshkaConfig

    planted = planted_dictionary(n_atoms=96, d=32, active=4, seed=0)
    rows, _ = planted.sample(30_000, seed=1)
    configs = [TopKConfig(width=96, k=4, d_in=32), BatchTopKConfig(width=96, k=4, d_in=32),
               JumpReLUConfig(width=96, d_in=32), MatryoshkaConfig(width=96, k=4, d_in=32), GatedConfig(width=96, d_in=32)]
    fvu, dtypes = {}, set()
    for autocast in (None, "bf16"):
        train = TrainConfig(steps=400, batch_size=256, lr=4e-3, device="cpu", autocast=autocast, log_every=100)
        trainer = SAETrainer(configs, train)
        trainer.initialise(init_rows=rows[:2048])
        hooks = [m.sae.register_forward_hook(lambda module, args, out: dtypes.add((autocast, out.pre.dtype)))
                 for m in trainer.members]
        result = trainer.fit(TensorSource(rows, 256), progress=False)
        for hook in hooks:
            hook.remove()
        assert all(p.dtype == torch.float32 for sae in result.saes for p in sae.parameters())  # Adam stays float32
        fvu[autocast] = [m["fvu"] for m in result.metrics]
    assert dtypes == {(None, torch.float32), ("bf16", torch.bfloat16)}  # the forward really ran in bfloat16
    # bf16 / float32 FVU over 5 architectures x seeds 0-2 measured 0.983-1.027; 8% leaves room for
    # other CPUs, while a loss summed in bfloat16 or a broken sparse decode is far off
    for got, want in zip(fvu["bf16"], fvu[None]):
        assert got == pytest.approx(want, rel=0.08)
    with pytest.raises(ValueError, match="autocast must be one of"):
        TrainConfig(autocast="fp8")


# ---------------------------------------------------------------------------- decoder learning rate
def test_the_decoder_steps_at_its_scale_of_the_rate_and_old_configs_keep_one_rate():
    from mechlens.sae import BatchTopKConfig, SAEConfig
    from mechlens.sae.architectures import ArchetypalConfig, MatryoshkaConfig

    assert BatchTopKConfig(width=8, k=2).decoder_lr_scale == 4.0  # the measured default (README)
    assert TopKConfig(width=8, k=2).decoder_lr_scale == MatryoshkaConfig(width=64, k=2).decoder_lr_scale == 1.0
    legacy = BatchTopKConfig(width=8, k=2).to_json()
    del legacy["decoder_lr_scale"]  # a config saved before the option trained its decoder at the SAE's rate
    assert SAEConfig.from_json(legacy).decoder_lr_scale == 1.0
    train = TrainConfig(steps=10, batch_size=16, lr=1e-3, device="cpu", lr_warmup_fraction=0.5)
    trainer = SAETrainer([BatchTopKConfig(width=16, k=2, d_in=4), TopKConfig(width=16, k=2, d_in=4)], train)
    trainer.initialise(init_rows=torch.randn(64, 4))
    trainer.train_step(torch.randn(16, 4))
    batchtopk, topk = (m.optimizer.param_groups for m in trainer.members)
    factor = lr_factor(0, train)
    assert [g["lr"] for g in batchtopk] == pytest.approx([4e-3 * factor, 1e-3 * factor])
    assert batchtopk[0]["params"] == [trainer.members[0].sae.W_dec]
    assert [g["lr"] for g in topk] == pytest.approx([1e-3 * factor])
    with pytest.raises(ValueError, match="decoder_lr_scale must be a positive number"):
        TopKConfig(width=8, k=2, decoder_lr_scale=0)
    with pytest.raises(ValueError, match="has no learnt decoder"):
        SAETrainer(ArchetypalConfig(width=16, k=2, d_in=4, decoder_lr_scale=2.0), train).initialise(
            init_rows=torch.randn(64, 4))
