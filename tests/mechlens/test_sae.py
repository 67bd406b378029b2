"""Sparse autoencoders: architectures, configs, training (ground truth, resume), metrics,
splicing, feature statistics and bad input."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from activation_store import ActivationStore, LayerSpec, StoreWriter
from mechlens.features import SAELatent, parse_feature
from mechlens.models import small_cnn
from mechlens.sae import (
    SAE,
    BatchTopKConfig,
    BatchTopKSAE,
    JumpReLUConfig,
    JumpReLUSAE,
    NonFiniteActivationsError,
    Normalizer,
    ReLUConfig,
    SAECheckpointError,
    SAEConfig,
    SAETrainer,
    TensorSource,
    TopKConfig,
    TopKSAE,
    TrainConfig,
    create_sae,
    evaluate,
    feature_statistics,
    fold_normalization,
    geometric_median,
    list_architectures,
    plot_fvu_vs_l0,
    spliced_metrics,
    train_sae,
)
from mechlens.sae.losses import auxk_loss, jumprelu, step_l0
from mechlens.sae.stats import FeatureStatistics


# The SAEs here are tiny: one intra-op thread is as fast on an idle machine and immune to the
# OpenMP barrier stalls of two threads on two shared cores (measured on the project's 2-core
# machine with one other busy process: 0.8 s vs 13-45 s for the same 150-step training).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ---------------------------------------------------------------------------- helpers
def sparse_dictionary_data(n: int, d: int = 32, atoms: int = 96, k: int = 3, seed: int = 0):
    """Rows that are sparse non-negative combinations of ``atoms`` unit directions (superposition)."""
    g = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    support = torch.rand(n, atoms, generator=g).argsort(dim=1)[:, :k]
    values = torch.rand(n, k, generator=g) * 2 + 0.5
    codes = torch.zeros(n, atoms).scatter_(1, support, values)
    return codes @ dictionary, dictionary


def write_store(path, data: np.ndarray, *, layer: str = "l", chunk_rows: int = 128, rows_per_sample: int = 8,
                meta: dict | None = None) -> ActivationStore:
    spec = LayerSpec(data.shape[1], "float32", chunk_rows=chunk_rows, meta=meta or {})
    n = len(data)
    with StoreWriter(path, model="m", layers={layer: spec}) as writer:
        for start in range(0, n, 500):
            ids = np.arange(start, min(start + 500, n))
            writer.write({layer: data[ids]}, sample_ids=ids // rows_per_sample, positions=ids % rows_per_sample,
                         labels=(ids // rows_per_sample) % 3)
    return ActivationStore(path)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    x, _ = sparse_dictionary_data(3000, d=16, atoms=48, k=3, seed=1)
    x = x + 0.5  # a mean offset: b_dec and the normaliser have something to do
    return write_store(tmp_path_factory.mktemp("sae") / "s", x.numpy().astype(np.float32))


def quick_train(**changes) -> TrainConfig:
    base = dict(steps=60, batch_size=128, lr=3e-3, log_every=20, dead_window=2000, lr_warmup_fraction=0.08, device="cpu",
                init_rows=1024, prefetch=1)
    base.update(changes)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------- registry and configs
def test_registry_lists_and_creates_every_architecture():
    assert list_architectures() == ["archetypal", "batchtopk", "gated", "jumprelu", "matryoshka", "relu", "topk"]
    assert list_architectures("*topk") == ["batchtopk", "topk"]
    sae = create_sae("topk", width=8, d_in=4, k=2)
    assert isinstance(sae, TopKSAE) and sae.W_enc.shape == (4, 8) and sae.W_dec.shape == (8, 4)
    assert isinstance(create_sae("batchtopk", width=8, d_in=4, k=2), BatchTopKSAE)
    assert isinstance(create_sae("jumprelu", width=8, d_in=4), JumpReLUSAE)
    with pytest.raises(ValueError, match="unknown SAE architecture 'topkk'.*Did you mean topk"):
        create_sae("topkk", width=8, d_in=4)
    with pytest.raises(TypeError, match="l1_coeff"):
        create_sae("topk", width=8, d_in=4, l1_coeff=1.0)


def test_init_recipe_encoder_is_decoder_transpose_with_unit_rows():
    sae = create_sae("topk", width=32, d_in=8, k=4)
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)
    relu = create_sae("relu", width=32, d_in=8)
    assert torch.allclose(relu.W_dec.norm(dim=1), torch.full((32,), 0.1), atol=1e-6)  # free decoder, norm 0.1


@pytest.mark.parametrize("config", [
    ReLUConfig(width=64, d_in=8, l1_coeff=2.5, layer="stage2", pooling="mean"),
    TopKConfig(width=64, d_in=8, k=7, aux_k=16, aux_coeff=0.1, layout="nchw", multi_k=28),
    BatchTopKConfig(width=64, d_in=8, k=3, threshold_momentum=0.9),
    JumpReLUConfig(width=64, l0_coeff=0.1, bandwidth=0.01, init_threshold=0.02, input_scale=2.0),
])
def test_config_json_round_trip(config):
    text = json.dumps(config.to_json())
    back = SAEConfig.from_json(json.loads(text))
    assert back == config and type(back) is type(config)
    assert json.loads(text)["arch"] == config.arch


def test_train_config_json_round_trip_and_unknown_keys():
    config = TrainConfig(steps=123, batch_size=64, lr=1e-3, adam_betas=(0.8, 0.95), center=True, b_dec_init="mean")
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    with pytest.raises(ValueError, match="'stpes' \\(did you mean 'steps'\\?\\)"):
        TrainConfig.from_json({"stpes": 10})
    with pytest.raises(ValueError, match="unknown topk SAE config key"):
        SAEConfig.from_json({"arch": "topk", "width": 8, "kk": 3})


def test_k_larger_than_width_is_refused():
    with pytest.raises(ValueError, match="k=65 is larger than the width 64"):
        TopKConfig(width=64, k=65)
    with pytest.raises(ValueError, match="k=9 is larger than the width 8"):
        create_sae("batchtopk", width=8, d_in=4, k=9)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        TopKConfig(width=0)
    with pytest.raises(ValueError, match="multi_k must be in \\(8, 64\\]"):
        TopKConfig(width=64, k=8, multi_k=4)


# ---------------------------------------------------------------------------- architectures
def test_topk_and_batchtopk_sparsity():
    x = torch.randn(50, 8)
    topk = create_sae("topk", width=32, d_in=8, k=5)
    z = topk.encode(x)
    assert ((z > 0).sum(1) <= 5).all() and (z >= 0).all()
    pre = topk.pre_activations(x)
    assert torch.equal(z.argmax(1), pre.argmax(1))  # the largest pre-activation is always kept
    batch = create_sae("batchtopk", width=32, d_in=8, k=5).train()
    out = batch(x)
    assert int((out.z > 0).sum()) == 5 * 50  # k per row on average, not per row
    assert (out.z > 0).sum(1).float().std() > 0
    batch.after_step(out)
    smallest = out.z[out.z > 0].min()
    assert torch.isclose(batch.threshold, smallest)  # first update takes the value
    batch.eval()
    z_eval = batch.encode(x)
    assert torch.equal(z_eval > 0, torch.relu(batch.pre_activations(x)) > smallest)


def test_relu_l1_is_weighted_by_decoder_norm():
    sae = create_sae("relu", width=6, d_in=3, seed=1)
    with torch.no_grad():
        sae.W_dec.mul_(torch.arange(1, 7, dtype=torch.float32)[:, None])
    x = torch.randn(10, 3) * 5
    out = sae(x)
    expected = (out.z.abs() * sae.W_dec.norm(dim=1)).sum(1).mean()
    assert torch.allclose(sae.sparsity_loss(out), expected)


def test_jumprelu_straight_through_gradients_use_a_rectangle_kernel():
    pre = torch.tensor([[0.47, 0.52, 0.30], [0.49, 0.20, 0.90]], requires_grad=True)
    theta = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    eps = 0.1
    z = jumprelu(pre, theta, eps)
    assert torch.equal(z.detach(), torch.tensor([[0.0, 0.52, 0.0], [0.0, 0.0, 0.9]]))
    z.sum().backward()
    # d/dpre = H(pre - theta); d/dtheta = -(theta/eps) * #{|pre - theta| < eps/2}
    assert torch.equal(pre.grad, torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.allclose(theta.grad, torch.tensor([-(0.5 / eps) * 2, -(0.5 / eps) * 1, 0.0]))
    theta.grad = None
    pre.grad = None
    l0 = step_l0(pre, theta, eps)
    assert float(l0.detach()) == pytest.approx(1.0)  # two active entries over two rows
    l0.backward()
    assert torch.equal(pre.grad, torch.zeros_like(pre))
    assert torch.allclose(theta.grad, torch.tensor([-(1 / eps) * 2, -(1 / eps) * 1, 0.0]) / 2)


def test_auxk_reconstructs_the_residual_from_the_top_dead_latents():
    torch.manual_seed(0)
    pre, residual, W = torch.randn(4, 6), torch.randn(4, 3), torch.randn(6, 3)
    dead = torch.tensor([0, 2, 5])
    assert float(auxk_loss(residual, pre[:, :0], W[:0], 2)) == 0.0  # no dead latent
    loss = auxk_loss(residual, pre[:, dead], W[dead], 2)
    masked = torch.full_like(pre, float("-inf"))
    masked[:, dead] = pre[:, dead]
    top = masked.topk(2, dim=1)
    recon = torch.zeros_like(pre).scatter(1, top.indices, torch.relu(top.values)) @ W
    squared = (recon - residual).pow(2).sum(1).mean()
    # normalised (the default, Gao et al.): divided by the residual's variance summed over d
    variance = (residual - residual.mean(0)).pow(2).sum(1).mean()
    assert torch.allclose(loss, squared / variance)
    assert torch.allclose(auxk_loss(residual, pre[:, dead], W[dead], 2, normalize=False), squared)
    # linear: the chosen pre-activations as they are, negative ones included
    linear = torch.zeros_like(pre).scatter(1, top.indices, top.values) @ W
    assert (top.values < 0).any()  # so the two forms differ here
    assert torch.allclose(auxk_loss(residual, pre[:, dead], W[dead], 2, normalize=False, relu=False),
                          (linear - residual).pow(2).sum(1).mean())


def test_auxk_revives_dead_latents(small_store):
    """Half the latents pushed out of the top-k on purpose (encoder bias -2) mostly stay dead
    without AuxK and come back with it."""
    x = torch.from_numpy(small_store["l"][:])
    dead_fraction = {}
    for aux_coeff in (0.0, 1.0):
        train = quick_train(steps=150, dead_window=256, normalize=False, b_dec_init="zeros")
        trainer = SAETrainer(TopKConfig(width=48, k=3, d_in=16, aux_coeff=aux_coeff), train)
        trainer.initialise(normalizer=Normalizer.identity())
        with torch.no_grad():
            trainer.members[0].sae.b_enc[:24] = -2.0
        result = trainer.fit(TensorSource(x, 128), progress=False)
        dead_fraction[aux_coeff] = evaluate(result.sae, [x]).dead_fraction
    assert dead_fraction[0.0] >= 0.35 and dead_fraction[1.0] <= 0.2, dead_fraction


def test_decoder_gradient_parallel_component_is_removed():
    sae = create_sae("topk", width=16, d_in=8, k=2)
    sae.W_dec.grad = torch.randn(16, 8)
    sae.remove_parallel_decoder_grad()
    assert torch.allclose((sae.W_dec.grad * sae.W_dec).sum(1), torch.zeros(16), atol=1e-6)


def test_folding_the_normalisation_keeps_latents_and_maps_reconstructions_back():
    sae = create_sae("jumprelu", width=24, d_in=6, init_threshold=0.1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
    shift, scale = torch.randn(6), 0.37
    raw = torch.randn(40, 6) * 3 + 1
    normalised = (raw - shift) * scale
    folded = fold_normalization(sae.eval(), scale=scale, shift=shift)
    assert torch.allclose(folded.encode(raw), sae.encode(normalised), atol=1e-5)
    assert torch.allclose(folded.reconstruct(raw), sae.reconstruct(normalised) / scale + shift, atol=1e-5)
    assert folded.config.input_scale == pytest.approx(scale) and folded.config.input_centered


def test_geometric_median_resists_outliers():
    g = torch.Generator().manual_seed(0)
    points = torch.randn(400, 5, generator=g) * 0.1 + 2.0
    outliers = torch.full((40, 5), 100.0)
    both = torch.cat([points, outliers])
    assert (geometric_median(both) - 2.0).abs().max() < 0.1
    assert (both.mean(0) - 2.0).abs().min() > 5  # the mean is dragged away


# ---------------------------------------------------------------------------- training
def test_topk_sae_recovers_a_known_overcomplete_dictionary():
    """Ground truth: 96 unit atoms in 32 dimensions (3x overcomplete), 3 active per row. The learnt
    decoder rows must match the atoms: mean over atoms of the best cosine similarity >= 0.9."""
    x, dictionary = sparse_dictionary_data(40_000, d=32, atoms=96, k=3, seed=0)
    train = TrainConfig(steps=500, batch_size=256, lr=4e-3, lr_warmup_fraction=0.04, log_every=100, dead_window=20_000,
                        device="cpu", seed=0)
    result = SAETrainer(TopKConfig(width=192, k=3), train).fit(TensorSource(x, 256, seed=0), progress=False)
    decoder = result.sae.W_dec.detach()
    decoder = decoder / decoder.norm(dim=1, keepdim=True)
    best = (dictionary @ decoder.T).max(dim=1).values
    assert best.mean() >= 0.9, f"mean max cosine {best.mean():.3f}"
    assert (best > 0.9).float().mean() > 0.85
    metrics = evaluate(result.sae, [x[:8000]])
    assert metrics.fvu < 0.1 and metrics.l0 == pytest.approx(3.0)
    # a random dictionary of the same size is far from it: the test can fail
    random_rows = torch.nn.functional.normalize(torch.randn(192, 32), dim=1)
    assert (dictionary @ random_rows.T).max(dim=1).values.mean() < 0.7


def test_train_sae_on_a_store_streams_and_saves_saes_that_read_raw_rows(small_store, tmp_path):
    configs = [TopKConfig(width=48, k=2), TopKConfig(width=48, k=6)]
    result = train_sae(small_store, "l", configs, quick_train(steps=120), out=tmp_path / "out", progress=False,
                       log_path=tmp_path / "log.csv")
    assert [p.name for p in result.paths] == ["topk-w48-k2", "topk-w48-k6"]
    rows = small_store["l"][:]
    fvu = [evaluate(sae, [rows]).fvu for sae in result.saes]
    assert fvu[1] < fvu[0] < 0.6  # more latents per row, better reconstruction; both learnt something
    loaded = SAE.load(result.paths[1])
    assert loaded.config.layer == "l" and loaded.config.d_in == 16 and loaded.config.input_scale != 1.0
    x = torch.from_numpy(rows[:64])
    assert torch.allclose(loaded.reconstruct(x), result.saes[1].reconstruct(x), atol=1e-6)
    with open(tmp_path / "log.csv") as handle:
        log = list(csv.DictReader(handle))
    assert {row["sae"] for row in log} == {"0", "1"} and max(int(r["step"]) for r in log) == 120
    assert float(log[-1]["l0"]) == pytest.approx(6.0)


def test_normaliser_from_store_statistics_gives_unit_mean_squared_norm_per_dimension(small_store):
    stats = small_store.statistics("l")
    rows = torch.from_numpy(small_store["l"][:])
    for center in (False, True):
        normaliser = Normalizer.from_statistics(stats, center=center)
        x = normaliser.apply(rows)
        assert x.pow(2).sum(1).mean() == pytest.approx(16.0, rel=1e-3)
        assert (x.mean(0).abs().max() < 1e-3) == center


@pytest.mark.parametrize("arch", ["relu", "jumprelu", "batchtopk", "multi-topk"])
def test_other_architectures_train_and_reconstruct(small_store, arch):
    config = {"relu": ReLUConfig(width=48, l1_coeff=0.3), "jumprelu": JumpReLUConfig(width=48, l0_coeff=0.05),
              "batchtopk": BatchTopKConfig(width=48, k=4), "multi-topk": TopKConfig(width=48, k=4, multi_k=16)}[arch]
    result = train_sae(small_store, "l", config, quick_train(steps=150), progress=False)
    metrics = evaluate(result.sae, [small_store["l"][:]])
    assert metrics.fvu < 0.5, metrics
    assert 0 < metrics.l0 < 24, metrics  # sparse: well under half the latents


def test_sparsity_coefficient_controls_l0(small_store):
    configs = [JumpReLUConfig(width=48, l0_coeff=c) for c in (0.01, 0.5)]
    result = train_sae(small_store, "l", configs, quick_train(steps=150), progress=False)
    low, high = (evaluate(sae, [small_store["l"][:]]) for sae in result.saes)
    assert high.l0 < low.l0 and high.fvu > low.fvu


def test_resume_gives_the_same_result_as_uninterrupted_training(small_store, tmp_path):
    # 3000 rows / 128 = 23 batches per epoch: the interruption at step 27 falls mid-epoch
    configs = [TopKConfig(width=48, k=3), BatchTopKConfig(width=32, k=2)]
    train = quick_train(steps=50, dead_window=300, log_every=10)
    whole = train_sae(small_store, "l", configs, train, progress=False)
    first = train_sae(small_store, "l", configs, train, progress=False, checkpoint_dir=tmp_path / "ck",
                      until_step=27)  # between two logs
    assert first.steps == 27 and (tmp_path / "ck" / "trainer.json").is_file()
    # rerunning without resume must not silently start over on top of the interrupted run
    with pytest.raises(SAECheckpointError, match=r"already holds a trainer checkpoint; pass resume=True \(--resume\)"):
        train_sae(small_store, "l", configs, train, progress=False, checkpoint_dir=tmp_path / "ck")
    resumed = train_sae(small_store, "l", configs, train, progress=False, checkpoint_dir=tmp_path / "ck", resume=True)
    assert resumed.steps == 50 and resumed.rows == whole.rows
    for a, b in zip(whole.saes, resumed.saes):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    strip = lambda log: [{k: v for k, v in row.items() if k != "elapsed_s"} for row in log]  # noqa: E731
    assert strip(resumed.log) == strip(whole.log)


def test_resume_with_another_width_is_refused(small_store, tmp_path):
    train = quick_train(steps=20)
    train_sae(small_store, "l", TopKConfig(width=48, k=3), train, progress=False, checkpoint_dir=tmp_path / "ck",
              until_step=5)
    with pytest.raises(SAECheckpointError, match=r"trained topk\(width=48, d_in=16\).*asks for topk\(width=32"):
        train_sae(small_store, "l", TopKConfig(width=32, k=3), train, progress=False, checkpoint_dir=tmp_path / "ck",
                  resume=True)
    with pytest.raises(SAECheckpointError, match="different training settings \\['lr'\\]"):
        train_sae(small_store, "l", TopKConfig(width=48, k=3), train.replace(lr=1.0), progress=False,
                  checkpoint_dir=tmp_path / "ck", resume=True)


# ---------------------------------------------------------------------------- bad input
def test_layer_not_in_the_store(small_store):
    with pytest.raises(KeyError, match="layer 'll' is not in the store.*did you mean \\['l'\\]"):
        train_sae(small_store, "ll", TopKConfig(width=8, k=2), quick_train(), progress=False)


def test_config_width_mismatch_with_the_store(small_store):
    with pytest.raises(ValueError, match="d_in=5, but layer 'l'.*has width 16"):
        train_sae(small_store, "l", TopKConfig(width=8, k=2, d_in=5), quick_train(), progress=False)


def test_nan_rows_are_named_by_store_row_id(tmp_path):
    data = np.random.default_rng(0).standard_normal((600, 8)).astype(np.float32)
    data[[137, 401]] = np.nan
    store = write_store(tmp_path / "s", data)
    with pytest.raises(NonFiniteActivationsError, match=r"store row ids \[137\]|store row ids \[401\]|\[137, 401\]"):
        train_sae(store, "l", TopKConfig(width=16, k=2), quick_train(b_dec_init="zeros", normalize=False),
                  progress=False)
    with pytest.raises(NonFiniteActivationsError, match="in 2 row\\(s\\).*rows \\[137, 401\\]"):
        TensorSource(torch.from_numpy(data), 64)
    batches = [torch.from_numpy(data[i:i + 100]) for i in range(0, 600, 100)]
    with pytest.raises(NonFiniteActivationsError, match="batch 1 .*rows \\[37\\] of batch 1 \\(rows \\[137\\] of the stream"):
        SAETrainer(TopKConfig(width=16, k=2), quick_train(normalize=False, b_dec_init="zeros")).fit(batches,
                                                                                                   progress=False)


def test_loading_a_checkpoint_of_another_width(tmp_path):
    create_sae("topk", width=32, d_in=8, k=2).save(tmp_path / "w32")
    other = create_sae("topk", width=64, d_in=8, k=2)
    with pytest.raises(SAECheckpointError, match="width 32 on 8-dim rows, but this SAE has width 64"):
        other.load_weights(tmp_path / "w32")
    with pytest.raises(SAECheckpointError, match="not a saved SAE"):
        SAE.load(tmp_path / "nothing")
    with pytest.raises(SAECheckpointError, match="holds a 'topk' SAE"):
        JumpReLUSAE.load(tmp_path / "w32")


@pytest.mark.parametrize("arch", ["relu", "topk", "batchtopk", "jumprelu"])
def test_save_load_round_trip(tmp_path, arch):
    extra = {"k": 3} if "topk" in arch else {}
    sae = create_sae(arch, width=20, d_in=6, seed=3, layer="stage1", pooling="mean", **extra)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if arch == "batchtopk":
            sae.threshold.fill_(0.25)
    sae.save(tmp_path / arch, metadata={"note": "x"})
    loaded = SAE.load(tmp_path / arch)
    assert type(loaded) is type(sae) and loaded.config == sae.config and not loaded.training
    for key, value in sae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    x = torch.randn(30, 6)
    assert torch.equal(loaded.encode(x), sae.eval().encode(x))
    assert not list(tmp_path.rglob("*.pt")) and not list(tmp_path.rglob("*.pkl"))


# ---------------------------------------------------------------------------- metrics
def test_evaluate_matches_a_direct_computation():
    torch.manual_seed(0)
    sae = create_sae("relu", width=12, d_in=5, seed=2)
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-3, 0.5, 12))  # some latents can never fire
    x = torch.randn(300, 5)
    metrics = evaluate(sae, [x[:100], x[100:]], dense_threshold=0.3)
    with torch.no_grad():
        z, x_hat = sae.encode(x), sae.reconstruct(x)
    xd, hd = x.double(), x_hat.double()
    assert metrics.rows == 300
    assert metrics.mse == pytest.approx(float((hd - xd).pow(2).mean()), rel=1e-6)
    assert metrics.fvu == pytest.approx(float((hd - xd).pow(2).sum() / (xd - xd.mean(0)).pow(2).sum()), rel=1e-6)
    density = (z > 0).double().mean(0)
    assert metrics.l0 == pytest.approx(float((z > 0).sum(1).double().mean()))
    assert metrics.dead_fraction == pytest.approx(float((density == 0).double().mean()))
    assert 0 < metrics.dead_fraction < 1
    assert metrics.dense_fraction == pytest.approx(float((density > 0.3).double().mean()))
    assert metrics.histogram.sum() == int((density > 0).sum())
    assert evaluate(sae, [x], max_rows=50).rows == 50


def test_fvu_vs_l0_plot_is_a_png(tmp_path):
    x = torch.randn(200, 6)
    points = [(f"k={k}", evaluate(create_sae("topk", width=24, d_in=6, k=k), [x])) for k in (1, 4)]
    path = plot_fvu_vs_l0(points, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------- splicing
def identity_relu_sae(channels: int, layer: str) -> SAE:
    """An exact reconstruction in SAE clothing: identity weights on non-negative rows."""
    sae = create_sae("relu", width=channels, d_in=channels, layer=layer)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(channels))
        sae.W_dec.copy_(torch.eye(channels))
    return sae.eval()


def _images(n: int, seed: int = 0):
    from mechlens.data.synthetic import SyntheticShapes, SyntheticShapesConfig

    data = SyntheticShapes(SyntheticShapesConfig(num_samples=n, image_size=32, seed=seed, split="test"))
    return data


def test_splicing_a_perfect_reconstruction_changes_nothing():
    model = small_cnn(num_classes=5, width=8, seed=0).eval()
    with torch.no_grad():  # the initial head (std 0.01) gives near-uniform outputs; make them peaked
        model.head.weight.normal_(std=2.0, generator=torch.Generator().manual_seed(0))
    data = _images(48)
    sae = identity_relu_sae(16, "stage1")  # stage1 ends in a ReLU: rows are non-negative
    result = spliced_metrics(model, sae, data, batch_size=16)
    assert result.samples == 48
    assert result.kl == 0.0
    assert result.accuracy_change == 0.0 and result.ce_spliced == pytest.approx(result.ce_clean, abs=1e-6)
    # a bad reconstruction does change the output: the measure can fail
    with torch.no_grad():
        sae.W_dec.mul_(0.3)
    assert spliced_metrics(model, sae, data, batch_size=16).kl > 1e-3
    # the model's hooks are gone and its mode restored
    assert not any(m._forward_hooks for m in model.modules()) and not model.training


def test_spliced_sae_trained_on_the_layer_recovers_most_of_the_loss(trained_shapes_model, tmp_path):
    model = trained_shapes_model.model.eval()
    from mechlens.capture import capture
    from mechlens.features import as_position_rows

    images = trained_shapes_model.train_dataset()
    ids = np.arange(600)
    with torch.no_grad(), capture(model, ["stage3"]) as cap:
        model(images.render(ids))
    rows, _ = as_position_rows(cap["stage3"], "nchw")
    b, p, c = rows.shape
    store = write_store(tmp_path / "s", rows.reshape(b * p, c).numpy(), layer="stage3", rows_per_sample=p,
                        meta={"spatial": "all", "layout": "nchw", "spatial_shape": [4, 4]})
    result = train_sae(store, "stage3", TopKConfig(width=256, k=16), quick_train(steps=150, batch_size=256),
                       progress=False)
    assert result.sae.config.pooling == "all" and result.sae.config.layout == "nchw"
    held_out = trained_shapes_model.test_dataset()
    spliced = spliced_metrics(model, result.sae, held_out, max_samples=300)
    assert spliced.samples == 300
    assert spliced.clean_accuracy > 0.9
    assert spliced.ce_recovered > 0.8, spliced
    assert abs(spliced.accuracy_change) < 0.1 and spliced.kl < 0.5


# ---------------------------------------------------------------------------- feature statistics
def _brute_force_top(z: np.ndarray, samples: np.ndarray, k: int, distinct: bool):
    tops = []
    for j in range(z.shape[1]):
        order = np.argsort(-z[:, j], kind="stable")
        order = order[z[order, j] > 0]
        if distinct:
            seen, keep = set(), []
            for row in order:
                if samples[row] not in seen:
                    seen.add(samples[row])
                    keep.append(row)
            order = np.array(keep, dtype=np.int64)
        tops.append(order[:k])
    return tops


@pytest.mark.parametrize("distinct", [False, True])
def test_feature_statistics_match_brute_force(tmp_path, distinct):
    rng = np.random.default_rng(5)
    data = rng.standard_normal((1100, 6)).astype(np.float32)
    store = write_store(tmp_path / "s", data, chunk_rows=100, rows_per_sample=7)
    sae = create_sae("relu", width=10, d_in=6, seed=4, layer="l")
    with torch.no_grad():
        sae.b_enc.copy_(torch.linspace(-4, 0.2, 10))  # rare latents too (fewer than k firing rows)
    stats = feature_statistics(sae, store, top_k=5, distinct_samples=distinct, batch_size=128)
    z = sae.encode(torch.from_numpy(data)).detach().numpy()
    index = store["l"].read_index()
    assert stats.rows == 1100
    np.testing.assert_allclose(stats.frequency, (z > 0).mean(0))
    np.testing.assert_allclose(stats.mean, z.astype(np.float64).mean(0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(stats.max, z.max(0), rtol=1e-6)
    tops = _brute_force_top(z, index.sample_id, 5, distinct)
    assert any(len(t) < 5 for t in tops) and any(len(t) == 5 for t in tops)
    for j, expected in enumerate(tops):
        got = stats.top_rows[j]
        np.testing.assert_array_equal(got[:len(expected)], expected)
        assert (got[len(expected):] == -1).all()
        np.testing.assert_allclose(stats.top_values[j][:len(expected)], z[expected, j], rtol=1e-6)
        np.testing.assert_array_equal(stats.top_samples[j][:len(expected)], index.sample_id[expected])
        np.testing.assert_array_equal(stats.top_positions[j][:len(expected)], index.position[expected])
    if distinct:
        for j in range(10):
            valid = stats.top_samples[j][stats.top_rows[j] >= 0]
            assert len(set(valid.tolist())) == len(valid)
    stats.save(tmp_path / "sae")
    back = FeatureStatistics.load(tmp_path / "sae")
    np.testing.assert_array_equal(back.top_rows, stats.top_rows)
    assert back.exemplars(0) == stats.exemplars(0) and back.distinct_samples == distinct


# ---------------------------------------------------------------------------- features
def test_sae_feature_spec_builds_an_sae_latent(tmp_path):
    sae = create_sae("topk", width=20, d_in=8, k=3, layer="stage1", layout="nchw")
    sae.save(tmp_path / "sae")
    feature = parse_feature(f"sae:{tmp_path / 'sae'}:7")
    assert isinstance(feature, SAELatent) and feature.layer == "stage1" and feature.index == 7
    act = torch.rand(2, 8, 4, 4)
    rows = act.flatten(2).transpose(1, 2).reshape(-1, 8)
    expected = sae.eval().encode(rows)[:, 7].reshape(2, 4, 4)
    assert torch.allclose(feature.readout(act), expected)
    with pytest.raises(IndexError, match="latent 20 is out of range"):
        parse_feature(f"sae:{tmp_path / 'sae'}:20")
