"""The Gated, Matryoshka and Archetypal SAEs (``mechlens.sae.architectures``): parity with the
peer implementations weight for weight (dictionary_learning, SAELens, overcomplete; each test is
skipped when its peer is not installed), recovery of a planted dictionary through the normal
trainer, save / load, the command line, config validation."""
from __future__ import annotations

import itertools
import json

import pytest
import torch

from mechlens.sae import (
    SAE,
    ArchetypalConfig,
    ArchetypalSAE,
    GatedConfig,
    GatedSAE,
    MatryoshkaConfig,
    MatryoshkaSAE,
    SAEConfig,
    SAETrainer,
    TensorSource,
    TrainConfig,
    create_sae,
    evaluate,
    list_architectures,
    mmcs,
    planted_dictionary,
)
from mechlens.sae.architectures import prefix_errors
from mechlens.sae.losses import squared_error
from mechlens.sae.terms import LossContext

pytestmark = pytest.mark.usefixtures("one_torch_thread")

D, WIDTH, ROWS = 16, 48, 64


def _terms(sae: SAE, x: torch.Tensor, step: int = 10_000, train: TrainConfig | None = None):
    """What SAETrainer.train_step computes: the output, each term's value and the total loss."""
    train = train or TrainConfig(steps=100)
    out = sae(x)
    recon = squared_error(x, out.x_hat)
    values, total = {}, recon
    context = LossContext(x, out, step, train)
    for term in sae.loss_terms:
        value = term.compute(sae, context)
        values[term.name] = value
        if value is not None:
            total = total + term.coefficient(sae.config, step, train) * value
    return out, recon, values, total


def _rows(n: int = ROWS, d: int = D, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _randomise(sae: SAE, seed: int = 0) -> SAE:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sae.named_parameters():
            if name not in ("W_dec", "archetype_weights", "relaxation", "log_multiplier"):
                param.add_(0.3 * torch.randn(param.shape, generator=generator))
    return sae


@pytest.fixture(scope="module")
def overcomplete_sae():
    # overcomplete 0.3 calls matplotlib.cm.get_cmap, removed in matplotlib 3.9: restore the alias first
    import matplotlib
    import matplotlib.cm as cm

    if not hasattr(cm, "get_cmap"):
        cm.get_cmap = matplotlib.colormaps.get_cmap
    return pytest.importorskip("overcomplete.sae")


# ---------------------------------------------------------------------------- registry and configs
def test_the_architectures_are_registered_and_built_by_name():
    assert {"gated", "matryoshka", "archetypal"} <= set(list_architectures())
    assert type(create_sae("gated", width=8, d_in=4, l1_coeff=0.5)) is GatedSAE
    assert type(create_sae("matryoshka", width=8, d_in=4, k=2, group_sizes=(2, 6))) is MatryoshkaSAE
    assert type(create_sae("archetypal", width=8, d_in=4, k=2)) is ArchetypalSAE
    assert MatryoshkaConfig(width=64, k=4).resolved_group_sizes() == (8, 8, 16, 32)
    assert MatryoshkaConfig(width=4096, k=32, group_sizes="256+768+3072").name == "matryoshka-w4096-k32-g256_768_3072"
    config = MatryoshkaConfig(width=12, d_in=4, k=2, group_sizes=[4, 8])  # a list, as JSON gives it
    assert config.group_sizes == (4, 8)
    assert SAEConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    archetypal = ArchetypalConfig(width=8, d_in=4, k=2, n_candidates=32, delta=0.5, use_multiplier=False)
    assert SAEConfig.from_json(json.loads(json.dumps(archetypal.to_json()))) == archetypal


@pytest.mark.parametrize("make, message", [
    (lambda: MatryoshkaConfig(width=16, k=2, group_sizes=(4, 8)), "sum to 12, not the width 16"),
    (lambda: MatryoshkaConfig(width=16, k=2, group_sizes=(20, -4)), "positive integers"),
    (lambda: MatryoshkaConfig(width=16, k=2, group_sizes=()), "non-empty"),
    (lambda: MatryoshkaConfig(width=16, k=2, group_sizes="8+x"), r"integers separated by '\+'"),
    (lambda: GatedConfig(width=16, l1_coeff=-1.0), "l1_coeff must be >= 0"),
    (lambda: ArchetypalConfig(width=16, k=2, normalize_decoder=True), "normalize_decoder must be False"),
    (lambda: ArchetypalConfig(width=16, k=2, n_candidates=0), "n_candidates must be a positive integer"),
    (lambda: ArchetypalConfig(width=16, k=2, delta=-1.0), "delta must be >= 0"),
])
def test_configs_refuse_bad_fields_in_one_line(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_the_cli_offers_the_new_fields_and_parses_group_sizes():
    from mechlens.cli import build_parser
    from mechlens.cli.sae import _configs

    parser = build_parser()
    base = ["sae", "train", "--store", "s", "--layer", "l", "--out", "o"]
    configs = _configs(parser.parse_args([*base, "--arch", "matryoshka", "--width", "1024", "--k", "16",
                                          "--group-sizes", "64+192+768,512+512"]))
    assert [c.group_sizes for c in configs] == [(64, 192, 768), (512, 512)] and {c.k for c in configs} == {16}
    configs = _configs(parser.parse_args([*base, "--arch", "gated,archetypal", "--width", "64", "--l1-coeff", "2",
                                          "--n-candidates", "256", "--delta", "0.5", "--no-use-multiplier"]))
    assert [(c.arch, getattr(c, "l1_coeff", None)) for c in configs] == [("gated", 2.0), ("archetypal", None)]
    assert (configs[1].n_candidates, configs[1].delta, configs[1].use_multiplier) == (256, 0.5, False)


# ---------------------------------------------------------------------------- gated
def _gated_pair(free_decoder: bool):
    ours = _randomise(create_sae("gated", width=WIDTH, d_in=D, l1_coeff=0.3, seed=1), seed=2)
    if free_decoder:
        with torch.no_grad():
            ours.W_dec.mul_(torch.rand(WIDTH, 1, generator=torch.Generator().manual_seed(3)) + 0.5)
    return ours


def test_gated_matches_dictionary_learning_values_and_gradients():
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.gdm import GatedSAETrainer

    ours = _gated_pair(free_decoder=False)  # unit decoder rows: dictionary_learning's constrained Adam
    trainer = GatedSAETrainer(steps=100, activation_dim=D, dict_size=WIDTH, layer=0, lm_name="m", l1_penalty=0.3,
                              warmup_steps=0, sparsity_warmup_steps=None, device="cpu")
    peer = trainer.ae
    with torch.no_grad():
        peer.encoder.weight.copy_(ours.W_enc.T)
        peer.gate_bias.copy_(ours.b_enc)
        peer.decoder_bias.copy_(ours.b_dec)
        peer.r_mag.copy_(ours.r_mag)
        peer.mag_bias.copy_(ours.b_mag)
        peer.decoder.weight.copy_(ours.W_dec.T)
    x = _rows(scale=1.5)
    out, recon, values, total = _terms(ours, x)
    f, gate = peer.encode(x, return_gate=True)
    log = trainer.loss(x, step=99, logging=True)
    # z through pi_mag = (pi_gate - b_gate) exp(r_mag) + b_mag: a few ulps from the peer's x_enc
    torch.testing.assert_close(out.z, f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, peer.decode(f), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.relu(out.pre), gate, atol=1e-5, rtol=1e-5)
    assert recon.item() == pytest.approx(log.losses["mse_loss"], rel=1e-5)
    assert values["sparsity"].item() == pytest.approx(log.losses["sparsity_loss"], rel=1e-5)
    assert values["gate_aux"].item() == pytest.approx(log.losses["aux_loss"], rel=1e-5)
    assert total.item() == pytest.approx(log.losses["loss"], rel=1e-5)

    total.backward()
    trainer.loss(x, step=99).backward()
    # the decoder gradients differ by the norm weighting's, which is parallel to each row: once the
    # trainer (normalize_decoder) and dictionary_learning's ConstrainedAdam remove that component,
    # they are the same
    ours.remove_parallel_decoder_grad()
    W, G = peer.decoder.weight.T, peer.decoder.weight.grad.T
    peer_decoder_grad = G - (G * W).sum(dim=1, keepdim=True) * W
    pairs = [(ours.W_enc.grad, peer.encoder.weight.grad.T), (ours.b_enc.grad, peer.gate_bias.grad),
             (ours.b_dec.grad, peer.decoder_bias.grad), (ours.r_mag.grad, peer.r_mag.grad),
             (ours.b_mag.grad, peer.mag_bias.grad), (ours.W_dec.grad, peer_decoder_grad)]
    for mine, theirs in pairs:
        torch.testing.assert_close(mine, theirs, atol=1e-4, rtol=1e-4)


def test_gated_matches_saelens_with_a_free_decoder():
    pytest.importorskip("sae_lens")
    from sae_lens.saes.gated_sae import GatedTrainingSAE, GatedTrainingSAEConfig
    from sae_lens.saes.sae import TrainStepInput

    ours = _gated_pair(free_decoder=True)  # decoder norms in 0.5..1.5: the L1 is norm-weighted
    peer = GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D, d_sae=WIDTH, l1_coefficient=0.3))
    with torch.no_grad():
        for mine, theirs in ((ours.W_enc, peer.W_enc), (ours.b_enc, peer.b_gate), (ours.b_dec, peer.b_dec),
                             (ours.r_mag, peer.r_mag), (ours.b_mag, peer.b_mag), (ours.W_dec, peer.W_dec)):
            theirs.copy_(mine)
    x = _rows(seed=1, scale=1.5)
    out, recon, values, total = _terms(ours, x)
    step = peer.training_forward_pass(TrainStepInput(x, {"l1": 0.3}, None, 0, False))
    torch.testing.assert_close(out.z, step.feature_acts, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, step.sae_out, atol=1e-5, rtol=1e-5)
    assert recon.item() == pytest.approx(step.losses["mse_loss"].item(), rel=1e-5)
    assert 0.3 * values["sparsity"].item() == pytest.approx(step.losses["l1_loss"].item(), rel=1e-5)
    assert values["gate_aux"].item() == pytest.approx(step.losses["auxiliary_reconstruction_loss"].item(), rel=1e-5)
    assert total.item() == pytest.approx(step.loss.item(), rel=1e-5)
    # the one difference: the auxiliary term reaches the decoder in SAELens, never here (the paper's
    # frozen decoder, as dictionary_learning)
    ours.zero_grad()
    values["gate_aux"].backward()
    assert ours.W_dec.grad is None and ours.b_dec.grad is not None


# ---------------------------------------------------------------------------- matryoshka
GROUPS = (8, 8, 16, 16)


def _matryoshka() -> MatryoshkaSAE:
    return _randomise(create_sae("matryoshka", width=WIDTH, d_in=D, k=4, group_sizes=GROUPS, seed=1), seed=4)


def test_matryoshka_matches_saelens_total_loss_and_latents():
    pytest.importorskip("sae_lens")
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                        MatryoshkaBatchTopKTrainingSAEConfig)
    from sae_lens.saes.sae import TrainStepInput

    ours = _matryoshka()
    widths = list(itertools.accumulate(GROUPS))
    assert ours.prefix_widths() == widths
    peer = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(d_in=D, d_sae=WIDTH, k=4,
                                                                                matryoshka_widths=widths))
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(peer, name).copy_(getattr(ours, name))
    x = _rows(seed=2, scale=2.0)
    out, recon, values, total = _terms(ours, x)
    step = peer.training_forward_pass(TrainStepInput(x, {}, None, 0, False))
    torch.testing.assert_close(out.z, step.feature_acts, atol=1e-5, rtol=1e-5)
    inner = [step.losses[f"inner_mse_loss_{w}"].item() for w in widths[:-1]]
    errors = [e.item() for e in prefix_errors(ours, x, out.z)]
    assert errors == pytest.approx([*inner, step.losses["mse_loss"].item()], rel=1e-5)
    assert values["matryoshka"].item() == pytest.approx(sum(inner), rel=1e-5)  # the full width is the trainer's
    assert total.item() == pytest.approx(step.loss.item(), rel=1e-5)  # SAELens: sum of every prefix, full once


def test_matryoshka_matches_dictionary_learning_up_to_its_constant_scale():
    pytest.importorskip("dictionary_learning")
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKTrainer

    ours = _matryoshka()
    trainer = MatryoshkaBatchTopKTrainer(steps=100, activation_dim=D, dict_size=WIDTH, k=4, layer=0, lm_name="m",
                                         group_fractions=[g / WIDTH for g in GROUPS], warmup_steps=10, device="cpu")
    assert trainer.ae.group_sizes.tolist() == list(GROUPS)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(trainer.ae, name).copy_(getattr(ours, name))
    x = _rows(seed=3, scale=2.0)
    out, recon, values, total = _terms(ours, x)
    log = trainer.loss(x, step=0, logging=True)
    torch.testing.assert_close(out.z, log.f, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.x_hat, log.x_hat, atol=1e-5, rtol=1e-5)
    # dictionary_learning: mean over groups of (1/G) * error_g = sum of the same errors / G^2
    assert total.item() / len(GROUPS) ** 2 == pytest.approx(log.losses["loss"], rel=1e-5)


def test_matryoshka_uses_the_batchtopk_threshold_at_inference():
    sae = _matryoshka()
    x = _rows(n=256, seed=5)
    out = sae(x)
    assert (out.z > 0).sum().item() == 4 * 256
    sae.after_step(out)
    assert sae.threshold.item() == pytest.approx(out.z[out.z > 0].min().item())
    z = sae.eval().encode(x)
    assert torch.equal(z > 0, torch.relu(out.pre) > sae.threshold)


# ---------------------------------------------------------------------------- archetypal
def _archetypal_pair(overcomplete_sae, delta: float = 0.5):
    from overcomplete.sae.modules import TieableEncoder

    ours = create_sae("archetypal", width=WIDTH, d_in=D, k=4, n_candidates=80, delta=delta, seed=1)
    ours.set_archetypes(_rows(n=500, seed=6))
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        # off the constraints, so that both sides' projections are exercised
        ours.archetype_weights.copy_(torch.rand(ours.archetype_weights.shape, generator=generator) * 1.2 - 0.2)
        ours.relaxation.copy_(torch.randn(ours.relaxation.shape, generator=generator))
        ours.log_multiplier.fill_(0.3)
        ours.b_enc.copy_(0.3 * torch.randn(WIDTH, generator=generator))
        ours.b_dec.copy_(0.3 * torch.randn(D, generator=generator))
    encoder = TieableEncoder(D, WIDTH, bias=True, weight_init=ours.W_enc.T.detach().clone())
    with torch.no_grad():
        encoder.bias.copy_(ours.b_enc)
    peer = overcomplete_sae.RATopKSAE(D, WIDTH, points=ours.archetypes.clone(), top_k=4, delta=delta,
                                      encoder_module=encoder)
    with torch.no_grad():
        peer.dictionary.W.copy_(ours.archetype_weights)
        peer.dictionary.Relax.copy_(ours.relaxation)
        peer.dictionary.multiplier.copy_(ours.log_multiplier)
    return ours, peer


def test_archetypal_matches_overcomplete_dictionary_codes_gradients_and_steps(overcomplete_sae):
    ours, peer = _archetypal_pair(overcomplete_sae)
    ours.train(), peer.train()
    x = _rows(seed=8)
    # overcomplete has no decoder bias: it reads x - b_dec, and b_dec is added back
    optimizers = [torch.optim.Adam([ours.W_enc, ours.b_enc, ours.archetype_weights, ours.relaxation,
                                    ours.log_multiplier], lr=1e-2),
                  torch.optim.Adam([peer.encoder.weight, peer.encoder.bias, peer.dictionary.W, peer.dictionary.Relax,
                                    peer.dictionary.multiplier], lr=1e-2)]
    for _ in range(3):  # forward (projection + dictionary), loss, backward, step: the same on both sides
        out = ours(x)
        _, z, x_hat = peer(x - ours.b_dec.detach())
        torch.testing.assert_close(ours.W_dec, peer.dictionary.get_dictionary(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.z, z, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.x_hat, x_hat + ours.b_dec, atol=1e-5, rtol=1e-5)
        for optimizer in optimizers:
            optimizer.zero_grad()
        squared_error(x, out.x_hat).backward()
        squared_error(x - ours.b_dec.detach(), x_hat).backward()
        torch.testing.assert_close(ours.archetype_weights.grad, peer.dictionary.W.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.relaxation.grad, peer.dictionary.Relax.grad, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.W_enc.grad.T, peer.encoder.weight.grad, atol=1e-5, rtol=1e-5)
        for optimizer in optimizers:
            optimizer.step()
        ours.after_step(out)
    assert (ours.relaxation.norm(dim=1) <= 0.5 + 1e-5).all()
    torch.testing.assert_close(ours.archetype_weights.sum(dim=1), torch.ones(WIDTH))
    ours.eval(), peer.eval()  # both fuse the dictionary
    torch.testing.assert_close(ours.W_dec, peer.get_dictionary(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.reconstruct(x), peer(x - ours.b_dec)[2] + ours.b_dec, atol=1e-5, rtol=1e-5)


def test_archetypal_takes_its_archetypes_from_the_first_training_batch():
    sae = create_sae("archetypal", width=8, d_in=D, k=2, n_candidates=20)
    with torch.no_grad():
        sae.b_dec.fill_(0.5)  # as the trainer sets it: the archetypes are the rows seen from b_dec
    assert not sae.has_archetypes
    x = _rows(n=32, seed=9)
    sae.train()(x)
    assert sae.has_archetypes
    rows = {tuple(r.tolist()) for r in x - 0.5}
    archetypes = [tuple(c.tolist()) for c in sae.archetypes]
    assert all(c in rows for c in archetypes) and len(set(archetypes)) == 20  # drawn without replacement
    torch.testing.assert_close(sae.W_dec, sae.archetypes[:8])  # W = I, Lambda = 0, m = 0 at first
    kept = sae.archetypes.clone()
    sae(_rows(n=32, seed=10))
    assert torch.equal(sae.archetypes, kept)  # only once
    with pytest.raises(ValueError, match=r"archetypes are rows \[N, 16\]"):
        sae.set_archetypes(torch.zeros(3, 5))
    rigid = create_sae("archetypal", width=8, d_in=D, k=2, delta=0.0).train()  # no relaxation at all
    out = rigid(x)
    assert torch.isfinite(out.x_hat).all() and not rigid.relaxation.any()


# ---------------------------------------------------------------------------- save / load
@pytest.mark.parametrize("arch", ["gated", "matryoshka", "archetypal"])
def test_save_and_load_round_trip(arch, tmp_path):
    kwargs = {"gated": {"l1_coeff": 0.7}, "matryoshka": {"k": 4, "group_sizes": GROUPS},
              "archetypal": {"k": 4, "n_candidates": 64}}[arch]
    sae = _randomise(create_sae(arch, width=WIDTH, d_in=D, seed=3, **kwargs), seed=5).train()
    x = _rows(n=128, seed=11)
    sae.after_step(sae(x))  # archetypes from x; the BatchTopK threshold set
    sae.eval()
    loaded = SAE.load(sae.save(tmp_path / arch))
    assert type(loaded) is type(sae) and loaded.config == sae.config
    for name, tensor in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    torch.testing.assert_close(loaded.reconstruct(x), sae.reconstruct(x), atol=0, rtol=0)


# ---------------------------------------------------------------------------- recovery of a planted dictionary
# 64 unit atoms in 32 dimensions, 4 active per row (random directions score ~0.72), 300 steps of 256
# rows at lr 1e-2 through SAETrainer. MMCS of the planted atoms to the decoder rows and FVU of the
# exported SAE on raw rows, measured over planted / training seeds 0, 1, 2 and 1 vs 2 threads
# (identical at both thread counts):
#   gated (l1_coeff 2, width 64)                           MMCS 0.9891 .. 0.9920  FVU 0.071 .. 0.079
#   matryoshka (k 4, groups 64+32): all rows / first 64    MMCS 0.9878 .. 0.9921 (both)  FVU 0.067 .. 0.077
#   archetypal (k 4, width 64; rows 3 x + 1: an offset     MMCS 0.9951 .. 0.9953  FVU 0.059 .. 0.066
#     that b_dec takes and the archetypes must not carry;
#     without centring them on b_dec: MMCS 0.70)
# The thresholds leave a margin of about 0.04 (MMCS) and 0.07 (FVU) to the worst seed.
RECOVERY = {  # config, scale and offset of the rows
    "gated": (GatedConfig(width=64, d_in=32, l1_coeff=2.0), 1.0, 0.0),
    "matryoshka": (MatryoshkaConfig(width=96, d_in=32, k=4, group_sizes=(64, 32)), 1.0, 0.0),
    "archetypal": (ArchetypalConfig(width=64, d_in=32, k=4), 3.0, 1.0),
}


@pytest.mark.parametrize("arch", list(RECOVERY))
def test_recovers_a_planted_dictionary(arch, tmp_path):
    config, scale, offset = RECOVERY[arch]
    planted = planted_dictionary(n_atoms=64, d=32, active=4, seed=0)
    rows, _ = planted.sample(8192, seed=100)
    rows = scale * rows + offset
    train = TrainConfig(steps=300, batch_size=256, lr=1e-2, device="cpu", init_rows=1024, seed=0, log_every=50,
                        prefetch=1)
    result = SAETrainer(config, train).fit(TensorSource(rows, 256, seed=0), progress=False)
    sae = result.sae
    assert mmcs(sae, planted) > 0.95
    if arch == "matryoshka":  # the first prefix alone holds the planted atoms
        assert mmcs(sae.W_dec[:64], planted) > 0.95
    # the exported SAE reads raw rows (normalisation folded in: for the archetypal SAE, into its
    # fused dictionary and, through input_scale, into the one recomputed in training mode)
    assert evaluate(sae, [rows[:2048]]).fvu < 0.15
    if arch == "archetypal":
        fused = sae.W_dec.clone()
        sae.train()(rows[:8])
        torch.testing.assert_close(sae.W_dec.detach(), fused, atol=1e-5, rtol=1e-5)
        sae.eval()
    loaded = SAE.load(sae.save(tmp_path / arch))
    torch.testing.assert_close(loaded.reconstruct(rows[:64]), sae.reconstruct(rows[:64]), atol=0, rtol=0)


def test_a_resumed_archetypal_run_is_the_same_run(tmp_path):
    planted = planted_dictionary(n_atoms=16, d=8, active=2, seed=1)
    rows, _ = planted.sample(1024, seed=1)
    config = ArchetypalConfig(width=16, d_in=8, k=2, n_candidates=32)
    train = TrainConfig(steps=20, batch_size=64, lr=1e-2, device="cpu", init_rows=256, log_every=10, prefetch=1)
    whole = SAETrainer(config, train).fit(TensorSource(rows, 64), progress=False)
    SAETrainer(config, train).fit(TensorSource(rows, 64), until_step=10, progress=False, checkpoint_dir=tmp_path)
    resumed = SAETrainer.from_checkpoint(tmp_path).fit(TensorSource(rows, 64), progress=False)
    for name, tensor in whole.sae.state_dict().items():
        assert torch.equal(resumed.sae.state_dict()[name], tensor), name
