"""SAE interop: SAELens's directory format both ways, and in-memory peer SAEs (SAELens,
dictionary_learning, overcomplete) converted to mechlens SAEs, checked for parity against the real
peers (dev extras), plus the refusals and the ``mechlens sae export|import`` round trip."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from mechlens.cli import main
from mechlens.sae import SAE, SAEInteropError, TopKSAE, create_sae, export_saelens, from_peer, import_saelens

D_IN, WIDTH, K = 12, 40, 5


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sae_lens():
    import sae_lens  # ~8 s: once per module

    return sae_lens


@pytest.fixture(scope="module")
def dictionary_learning():
    import dictionary_learning.dictionary
    import dictionary_learning.trainers.batch_top_k
    import dictionary_learning.trainers.matryoshka_batch_top_k
    import dictionary_learning.trainers.top_k

    return dictionary_learning


@pytest.fixture(scope="module")
def overcomplete():
    # overcomplete 0.3 calls matplotlib.cm.get_cmap at import, which matplotlib 3.9 removed
    import matplotlib
    import matplotlib.cm as cm

    if not hasattr(cm, "get_cmap"):
        cm.get_cmap = matplotlib.colormaps.get_cmap
    import overcomplete.sae

    return overcomplete.sae


def _rows(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, D_IN, generator=torch.Generator().manual_seed(seed)) * 1.5 + 0.3


def _randomize(module: nn.Module, seed: int = 0, scale: float = 0.4) -> None:
    """Random values in every floating-point parameter, so no bias or threshold is a neutral 0."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * scale)


def _assert_same(ours: SAE, encode, decode, x: torch.Tensor, *, atol: float = 1e-5) -> torch.Tensor:
    """Same latents and reconstruction; the latents are sparse but not empty (the activation matters)."""
    with torch.no_grad():
        z_peer, z = encode(x), ours.encode(x)
        torch.testing.assert_close(z, z_peer, atol=atol, rtol=1e-5)
        torch.testing.assert_close(ours.decode(z_peer), decode(z_peer), atol=atol, rtol=1e-5)
    fired = (z_peer != 0).float().mean().item()
    assert 0.0 < fired < 0.9, fired
    return z_peer


def _mechlens_sae(arch: str) -> SAE:
    extra = {"k": K} if "topk" in arch else {}
    sae = create_sae(arch, width=WIDTH, d_in=D_IN, seed=3, layer="stage2.conv", pooling="mean", layout="nchw", **extra)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_enc.add_(torch.randn(sae.W_enc.shape, generator=g) * 0.2)
        sae.b_enc.copy_(torch.randn(WIDTH, generator=g) * 0.3)
        sae.b_dec.copy_(torch.randn(D_IN, generator=g) * 0.5)
        if arch == "batchtopk":
            sae.threshold.fill_(0.6)
            sae.threshold_updates.fill_(7)
        if arch == "jumprelu":
            sae.log_threshold.copy_(torch.empty(WIDTH).uniform_(0.1, 1.2, generator=g).log())
    return sae.eval()


# ---------------------------------------------------------------------------- SAELens directories
@pytest.mark.parametrize("arch, saelens_arch", [("relu", "standard"), ("topk", "topk"), ("batchtopk", "jumprelu"),
                                                ("jumprelu", "jumprelu")])
def test_export_loads_in_saelens_with_the_same_outputs(sae_lens, tmp_path, arch, saelens_arch):
    ours = _mechlens_sae(arch)
    export_saelens(ours, tmp_path / "sl")
    assert sorted(p.name for p in (tmp_path / "sl").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert peer.cfg.architecture() == saelens_arch
    assert peer.cfg.normalize_activations == "none" and peer.cfg.apply_b_dec_to_input
    assert peer.cfg.metadata.hook_name == "stage2.conv"
    x = _rows()
    z = _assert_same(ours, peer.encode, peer.decode, x)
    if arch in ("batchtopk", "jumprelu"):  # the threshold matters: some positive pre-activations are cut
        with torch.no_grad():
            pre = ours.pre_activations(x)
        assert bool(((pre > 0) & (z == 0)).any())


def _saelens_sae(sae_lens, arch: str, **cfg):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig, StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig

    cls, config_cls = {"standard": (StandardSAE, StandardSAEConfig), "topk": (TopKSAE, TopKSAEConfig),
                       "jumprelu": (JumpReLUSAE, JumpReLUSAEConfig)}[arch]
    sae = cls(config_cls(d_in=D_IN, d_sae=WIDTH, **cfg))
    _randomize(sae)
    if arch == "jumprelu":  # some thresholds <= 0 (a plain ReLU there), most positive
        with torch.no_grad():
            sae.threshold.copy_(torch.linspace(-0.2, 0.9, WIDTH))
    return sae


@pytest.mark.parametrize("arch, cfg, expected", [
    ("standard", {}, "relu"),
    ("standard", {"apply_b_dec_to_input": False}, "relu"),
    ("topk", {"k": K}, "topk"),
    ("topk", {"k": K, "rescale_acts_by_decoder_norm": True, "apply_b_dec_to_input": False}, "topk"),
    ("jumprelu", {}, "jumprelu"),
    ("jumprelu", {"apply_b_dec_to_input": False}, "jumprelu"),
])
def test_import_of_a_saelens_directory_has_the_same_outputs(sae_lens, tmp_path, arch, cfg, expected):
    peer = _saelens_sae(sae_lens, arch, **cfg)
    if cfg.get("rescale_acts_by_decoder_norm"):  # decoder norms far from 1, so the rescaling matters
        with torch.no_grad():
            peer.W_dec.mul_(torch.linspace(0.3, 3.0, WIDTH)[:, None])
    peer.save_model(tmp_path / "sl")
    ours = import_saelens(tmp_path / "sl")
    assert ours.config.arch == expected and not ours.training
    _assert_same(ours, peer.encode, peer.decode, _rows())


def test_batchtopk_saved_by_saelens_imports_as_batchtopk(sae_lens, tmp_path):
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    trainer = BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=WIDTH, k=K))  # rescales by |W_dec|
    _randomize(trainer)
    with torch.no_grad():
        trainer.W_dec.mul_(torch.linspace(0.3, 3.0, WIDTH)[:, None])
        trainer.topk_threshold = torch.tensor(0.7, dtype=torch.double)
    trainer.save_inference_model(tmp_path / "sl")  # written as jumprelu, one threshold per latent
    assert json.loads((tmp_path / "sl" / "cfg.json").read_text())["architecture"] == "jumprelu"
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    ours = import_saelens(tmp_path / "sl")
    assert ours.config.arch == "batchtopk" and ours.config.k == K
    assert float(ours.threshold) == pytest.approx(0.7)
    _assert_same(ours, peer.encode, peer.decode, _rows())
    # the in-memory training SAE converts to the same thing, and its batch top-k matches in training mode
    converted = from_peer(trainer)
    assert converted.config.arch == "batchtopk"
    _assert_same(converted, peer.encode, peer.decode, _rows())
    x = _rows(32, seed=5)
    with torch.no_grad():
        z_train = trainer.encode(x)
        torch.testing.assert_close(converted.train().encode(x), z_train, atol=1e-5, rtol=1e-5)
    assert (z_train != 0).sum().item() == K * 32


def test_export_import_round_trip_keeps_the_mechlens_config(tmp_path):
    for arch in ("relu", "topk", "batchtopk", "jumprelu"):
        ours = _mechlens_sae(arch)
        back = import_saelens(export_saelens(ours, tmp_path / arch))
        assert back.config == ours.config
        assert type(back) is type(ours)
        x = _rows()
        with torch.no_grad():
            torch.testing.assert_close(back.encode(x), ours.encode(x), atol=0, rtol=0)
            torch.testing.assert_close(back.reconstruct(x), ours.reconstruct(x), atol=0, rtol=0)


def test_in_memory_saelens_sae_converts(sae_lens):
    peer = _saelens_sae(sae_lens, "topk", k=K, rescale_acts_by_decoder_norm=True)
    ours = from_peer(peer)
    assert isinstance(ours, TopKSAE)
    _assert_same(ours, peer.encode, peer.decode, _rows())


# ---------------------------------------------------------------------------- dictionary_learning
def test_dictionary_learning_autoencoders_convert(dictionary_learning):
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE
    from dictionary_learning.trainers.top_k import AutoEncoderTopK

    x = _rows()
    cases = {"relu": AutoEncoder(D_IN, WIDTH), "topk": AutoEncoderTopK(D_IN, WIDTH, K),
             "batchtopk": BatchTopKSAE(D_IN, WIDTH, K), "jumprelu": JumpReluAutoEncoder(D_IN, WIDTH)}
    for i, (arch, peer) in enumerate(cases.items()):
        _randomize(peer, seed=10 + i)
        if arch == "batchtopk":
            peer.threshold.fill_(0.5)
        if arch == "jumprelu":  # b_dec is not subtracted (apply_b_dec_to_input False): folded into b_enc
            assert peer.apply_b_dec_to_input is False
            with torch.no_grad():
                peer.threshold.copy_(torch.linspace(-0.1, 0.8, WIDTH))
        ours = from_peer(peer)
        assert ours.config.arch == arch, arch
        z = _assert_same(ours, peer.encode, peer.decode, x)
        if arch == "topk":
            assert bool(((z != 0).sum(1) <= K).all())


def test_dictionary_learning_untrained_batchtopk_threshold_is_a_relu(dictionary_learning):
    from dictionary_learning.trainers.batch_top_k import BatchTopKSAE

    peer = BatchTopKSAE(D_IN, WIDTH, K)  # threshold -1: encode keeps every positive activation
    _randomize(peer, seed=2)
    ours = from_peer(peer)
    assert float(ours.threshold) == 0.0 and int(ours.threshold_updates) == 0
    z = peer.encode(_rows())
    assert torch.equal(z, torch.relu(peer.encoder(_rows() - peer.b_dec)))
    _assert_same(ours, peer.encode, peer.decode, _rows())


# ---------------------------------------------------------------------------- overcomplete
from tests.mechlens.test_sae_peers import _Peer as _Overcomplete  # noqa: E402  (encode / decode of a peer)


def test_overcomplete_saes_convert(overcomplete):
    from overcomplete.sae.modules import MLPEncoder

    x = _rows()
    topk = overcomplete.TopKSAE(D_IN, WIDTH, top_k=K)
    bn_encoder = MLPEncoder(D_IN, WIDTH, nb_blocks=0, norm_layer=nn.BatchNorm1d)  # affine in eval mode: folded
    jump = overcomplete.JumpSAE(D_IN, WIDTH, encoder_module=bn_encoder)
    for i, peer in enumerate((topk, jump)):
        _randomize(peer, seed=20 + i)
        with torch.no_grad():
            for module in peer.modules():
                if isinstance(module, nn.BatchNorm1d):
                    module.running_mean.copy_(torch.randn(WIDTH) * 0.2)
                    module.running_var.copy_(torch.rand(WIDTH) + 0.5)
            if hasattr(peer, "thresholds"):
                peer.thresholds.copy_(torch.linspace(-3.0, -0.5, WIDTH))
        wrapped = _Overcomplete(peer)
        ours = from_peer(peer)
        assert ours.config.arch == ("topk" if peer is topk else "jumprelu")
        _assert_same(ours, wrapped.encode, wrapped.decode, x, atol=2e-5)


def test_overcomplete_batchtopk_keeps_codes_equal_to_its_threshold(overcomplete):
    peer = overcomplete.BatchTopKSAE(D_IN, WIDTH, top_k=K * 8)
    _randomize(peer, seed=30)
    x = _rows()
    peer.train()
    peer.encode(x)  # sets running_threshold
    peer.eval()
    with torch.no_grad():
        codes = peer.encoder(x)[1]
    peer.running_threshold = codes[codes > 0].median()  # exactly one of the codes: overcomplete keeps it (>=)
    ours = from_peer(peer)
    z = _assert_same(ours, *(lambda w: (w.encode, w.decode))(_Overcomplete(peer)), x)
    assert bool((z == peer.running_threshold).any())


# ---------------------------------------------------------------------------- gated, matryoshka, archetypal
def test_gated_sae_both_ways_and_from_dictionary_learning(sae_lens, dictionary_learning, tmp_path):
    from dictionary_learning.dictionary import GatedAutoEncoder
    from sae_lens import GatedSAE, GatedSAEConfig

    ours = create_sae("gated", width=WIDTH, d_in=D_IN, seed=5, layer="blocks.3")
    _randomize(ours, seed=6)
    ours.eval()
    export_saelens(ours, tmp_path / "sl")
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert peer.cfg.architecture() == "gated"
    _assert_same(ours, peer.encode, peer.decode, _rows())
    assert type(import_saelens(tmp_path / "sl")) is type(ours)

    peer = GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=WIDTH, apply_b_dec_to_input=False))
    _randomize(peer, seed=7)
    peer.save_model(tmp_path / "peer")
    back = import_saelens(tmp_path / "peer")
    assert back.config.arch == "gated"
    _assert_same(back, peer.encode, peer.decode, _rows())

    dl = GatedAutoEncoder(D_IN, WIDTH)
    _randomize(dl, seed=8)
    converted = from_peer(dl)
    assert converted.config.arch == "gated"
    _assert_same(converted, dl.encode, dl.decode, _rows())


def test_matryoshka_sae_both_ways_and_from_the_peers(sae_lens, dictionary_learning, tmp_path):
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE
    from sae_lens.saes.matryoshka_batchtopk_sae import (MatryoshkaBatchTopKTrainingSAE,
                                                         MatryoshkaBatchTopKTrainingSAEConfig)

    ours = create_sae("matryoshka", width=WIDTH, d_in=D_IN, k=K, group_sizes=(8, 12, 20), layer="blocks.3")
    _randomize(ours, seed=9)
    with torch.no_grad():
        ours.threshold.fill_(0.3)
    ours.eval()
    export_saelens(ours, tmp_path / "sl")
    metadata = json.loads((tmp_path / "sl" / "cfg.json").read_text())["metadata"]
    assert metadata["training_architecture"] == "matryoshka_batchtopk"
    assert metadata["training_architecture_details"]["matryoshka_widths"] == [8, 20, 40]
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    _assert_same(ours, peer.encode, peer.decode, _rows())
    assert import_saelens(tmp_path / "sl").config == ours.config

    trainer = MatryoshkaBatchTopKTrainingSAE(MatryoshkaBatchTopKTrainingSAEConfig(
        d_in=D_IN, d_sae=WIDTH, k=K, matryoshka_widths=[10, 40]))
    _randomize(trainer, seed=10)
    trainer.topk_threshold = torch.tensor(0.4, dtype=torch.double)
    converted = from_peer(trainer)
    assert converted.config.arch == "matryoshka" and converted.config.resolved_group_sizes() == (10, 30)
    trainer.save_inference_model(tmp_path / "trainer")
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "trainer"))
    _assert_same(converted, peer.encode, peer.decode, _rows())
    assert import_saelens(tmp_path / "trainer").config.arch == "matryoshka"

    dl = MatryoshkaBatchTopKSAE(D_IN, WIDTH, K, [16, 24])
    _randomize(dl, seed=11)
    dl.threshold.fill_(0.5)
    converted = from_peer(dl)
    assert converted.config.arch == "matryoshka" and converted.config.resolved_group_sizes() == (16, 24)
    _assert_same(converted, dl.encode, dl.decode, _rows())


def test_archetypal_sae_exports_its_fused_dictionary_and_converts_from_overcomplete(sae_lens, overcomplete, tmp_path):
    ours = create_sae("archetypal", width=WIDTH, d_in=D_IN, k=K, seed=12)
    ours.set_archetypes(_rows(64, seed=13))
    _randomize(ours, seed=14, scale=0.1)
    with pytest.raises(SAEInteropError, match=r"call sae.eval\(\) first"):
        export_saelens(ours.train(), tmp_path / "sl")
    ours.eval()
    export_saelens(ours, tmp_path / "sl")
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    assert peer.cfg.architecture() == "topk"
    _assert_same(ours, peer.encode, peer.decode, _rows())

    ra = overcomplete.RATopKSAE(D_IN, WIDTH, points=_rows(50, seed=15), top_k=K)
    _randomize(ra, seed=16, scale=0.1)
    wrapped = _Overcomplete(ra)  # eval: overcomplete fuses (and projects) its dictionary
    converted = from_peer(ra)
    assert converted.config.arch == "archetypal" and converted.config.n_candidates == 50
    _assert_same(converted, wrapped.encode, wrapped.decode, _rows())


# ---------------------------------------------------------------------------- refusals
def test_an_sae_that_computes_otherwise_is_not_exported(tmp_path):
    class AbsTopK(TopKSAE):  # a subclass that changes the latents
        def activate(self, pre):
            return super().activate(pre.abs())

    sae = AbsTopK(create_sae("topk", width=WIDTH, d_in=D_IN, k=K).config)
    with pytest.raises(SAEInteropError, match=r"'topk' SAE \(AbsTopK\) has no exact SAELens equivalent; SAELens "
                                              r"export supports relu, topk, batchtopk, jumprelu"):
        export_saelens(sae, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_inexact_saelens_configs_are_refused(sae_lens, tmp_path):
    peer = _saelens_sae(sae_lens, "standard")
    peer.save_model(tmp_path / "sl")
    cfg_file = tmp_path / "sl" / "cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg_file.write_text(json.dumps({**cfg, "normalize_activations": "layer_norm"}))
    with pytest.raises(SAEInteropError, match="normalize_activations='layer_norm' cannot be represented exactly"):
        import_saelens(tmp_path / "sl")
    cfg_file.write_text(json.dumps({**cfg, "architecture": "abstopk", "k": 3}))
    with pytest.raises(SAEInteropError, match="architecture 'abstopk' has no exact mechlens equivalent; importable: "
                                              "standard, topk, jumprelu"):
        import_saelens(tmp_path / "sl")
    cfg_file.write_text(json.dumps({k: v for k, v in cfg.items() if k != "metadata"}))
    with pytest.raises(SAEInteropError, match="was not written by SAELens 6"):
        import_saelens(tmp_path / "sl")
    with pytest.raises(SAEInteropError, match="is not a SAELens SAE directory: expected cfg.json"):
        import_saelens(tmp_path)


def test_unknown_and_inexact_peers_are_refused(dictionary_learning, overcomplete):
    with pytest.raises(TypeError, match=r"from_peer does not know torch.nn.modules.linear.Linear; supported: sae_lens"):
        from_peer(nn.Linear(3, 4))
    from dictionary_learning.trainers.matryoshka_batch_top_k import MatryoshkaBatchTopKSAE

    matryoshka = MatryoshkaBatchTopKSAE(D_IN, WIDTH, K, [10, 30])
    matryoshka.active_groups = 1
    with pytest.raises(SAEInteropError, match="only 1 of 2 groups are active"):
        from_peer(matryoshka)
    layer_norm = overcomplete.TopKSAE(D_IN, WIDTH, top_k=K, encoder_module="mlp_ln_1")  # Linear + LayerNorm
    with pytest.raises(SAEInteropError, match="encoder normalisation LayerNorm is not a per-latent affine map"):
        from_peer(layer_norm)
    mlp = overcomplete.TopKSAE(D_IN, WIDTH, top_k=K, encoder_module="mlp_bn_3")
    with pytest.raises(SAEInteropError, match=r"an MLP encoder with 2 hidden block\(s\) is not linear"):
        from_peer(mlp)


# ---------------------------------------------------------------------------- CLI
def test_cli_export_import_round_trip(sae_lens, tmp_path, capsys):
    ours = _mechlens_sae("jumprelu")
    ours.save(tmp_path / "ours")
    assert main(["sae", "export", str(tmp_path / "ours"), str(tmp_path / "sl"), "--format", "saelens"]) == 0
    assert "sae_lens" in capsys.readouterr().out
    peer = sae_lens.SAE.load_from_disk(str(tmp_path / "sl"))
    _assert_same(ours, peer.encode, peer.decode, _rows())
    assert main(["sae", "import", str(tmp_path / "sl"), str(tmp_path / "back"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["arch"] == "jumprelu" and report["width"] == WIDTH and report["layer"] == "stage2.conv"
    back = SAE.load(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(back.encode(_rows()), ours.encode(_rows()))
    assert torch.equal(back.threshold.detach(), ours.threshold.detach())
    assert main(["sae", "import", str(tmp_path / "nothing"), str(tmp_path / "x")]) == 2
    assert "is not a SAELens SAE directory" in capsys.readouterr().err
