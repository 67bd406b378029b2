"""A third-party SAE architecture, defined outside the package and registered the public way:
the normal trainer applies the loss term it declares, it saves, reloads and resumes, and
``mechlens sae train`` offers its config fields as options."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch

from activation_store import LayerSpec, StoreWriter
from mechlens.cli import build_parser, main
from mechlens.sae import SAE, SAEConfig, SAETrainer, TrainConfig, list_architectures, register_sae, train_sae
from mechlens.sae.config import option
from mechlens.sae.terms import LossTerm, sparsity_warmup

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "plainl1"


@pytest.fixture
def plain_l1():
    """ReLU latents with an unweighted L1 penalty ``l1_weight * mean_n sum_i |z_ni|`` on unit-norm
    decoder rows: a config class and an SAE class, registered for the test only."""

    @dataclass(frozen=True)
    class PlainL1Config(SAEConfig):
        arch: ClassVar[str] = ARCH
        l1_weight: float = option(1.0, "weight of the plain L1 penalty")

        @property
        def name(self) -> str:
            return f"{ARCH}-w{self.width}-l1w{self.l1_weight:g}"

    def plain_l1_term(sae, ctx):
        return ctx.out.z.abs().sum(dim=-1).mean()

    @register_sae
    class PlainL1SAE(SAE):
        config_class = PlainL1Config
        loss_terms = (LossTerm("l1", "l1_weight", plain_l1_term, schedule=sparsity_warmup),)

        def activate(self, pre: torch.Tensor) -> torch.Tensor:
            return torch.relu(pre)

    from mechlens.sae import config as config_module
    from mechlens.sae import modules

    yield PlainL1Config, PlainL1SAE
    config_module._CONFIG_CLASSES.pop(ARCH, None)
    modules._ARCHITECTURES.pop(ARCH, None)


def _rows(n: int = 2048, d: int = 12, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    atoms = torch.nn.functional.normalize(torch.randn(24, d, generator=generator), dim=1)
    codes = torch.rand(n, 24, generator=generator) * (torch.rand(n, 24, generator=generator) < 0.15)
    return codes @ atoms + 0.05 * torch.randn(n, d, generator=generator)


def _batches(x: torch.Tensor, size: int = 128) -> list[torch.Tensor]:
    return [x[i:i + size] for i in range(0, len(x), size)]


def _train(steps: int = 60, **changes) -> TrainConfig:
    base = dict(steps=steps, batch_size=128, lr=1e-2, log_every=20, lr_warmup_fraction=0.02, device="cpu", init_rows=512,
                prefetch=1, sparsity_warmup_fraction=0.0)
    base.update(changes)
    return TrainConfig(**base)


def test_the_trainer_applies_the_declared_term_and_the_sae_saves_and_reloads(plain_l1, tmp_path):
    config_cls, sae_cls = plain_l1
    assert ARCH in list_architectures()
    x = _rows()
    configs = [config_cls(width=32, l1_weight=0.0), config_cls(width=32, l1_weight=2.0)]
    result = SAETrainer(configs, _train()).fit(_batches(x) * 4, progress=False, log_path=tmp_path / "log.csv")
    free, sparse = result.metrics
    # the term's columns are logged, with its scheduled coefficient
    assert free["l1_coeff"] == 0.0 and sparse["l1_coeff"] == 2.0
    assert "l1_loss" in (tmp_path / "log.csv").read_text().splitlines()[0].split(",")
    # the loss is the reconstruction plus the declared term (the coefficient is constant here)
    d = x.shape[1]
    assert sparse["loss"] == pytest.approx(sparse["mse"] * d + 2.0 * sparse["l1_loss"], rel=1e-5)
    assert free["loss"] == pytest.approx(free["mse"] * d, rel=1e-5)
    # and it did its job: much smaller activations, fewer active latents
    assert sparse["l1_loss"] < 0.5 * free["l1_loss"] and sparse["l0"] < free["l0"]

    path = result.saes[1].save(tmp_path / "sae")
    loaded = SAE.load(path)
    assert type(loaded) is sae_cls and loaded.config == result.saes[1].config
    assert torch.allclose(loaded.reconstruct(x[:64]), result.saes[1].reconstruct(x[:64]), atol=1e-6)


def test_a_resumed_run_of_the_new_architecture_is_the_same_run(plain_l1, tmp_path):
    config_cls, _ = plain_l1
    batches = _batches(_rows(seed=1)) * 2
    train = _train(steps=30, log_every=10, sparsity_warmup_fraction=0.5)
    whole = SAETrainer(config_cls(width=16, l1_weight=0.3), train).fit(batches, progress=False)
    SAETrainer(config_cls(width=16, l1_weight=0.3), train).fit(batches, until_step=15, progress=False,
                                                               checkpoint_dir=tmp_path / "ck")
    resumed = SAETrainer.from_checkpoint(tmp_path / "ck").fit(batches, progress=False)
    assert torch.equal(whole.sae.W_dec, resumed.sae.W_dec) and whole.log == [
        {**row, "elapsed_s": w["elapsed_s"]} for row, w in zip(resumed.log, whole.log)]
    assert [row["l1_coeff"] for row in whole.log] == pytest.approx([0.2, 0.3, 0.3])  # warm-up over 15 steps


def test_the_cli_offers_the_new_architectures_fields(plain_l1, tmp_path, capsys):
    from mechlens.cli.sae import _configs

    parser = build_parser()
    args = parser.parse_args(["sae", "train", "--store", "s", "--layer", "l", "--out", "o", "--arch", ARCH,
                              "--width", "16,32", "--l1-weight", "0,0.5", "--no-normalize-decoder"])
    configs = _configs(args)
    assert [(c.width, c.l1_weight, c.normalize_decoder) for c in configs] == [
        (16, 0.0, False), (16, 0.5, False), (32, 0.0, False), (32, 0.5, False)]
    help_text = parser._subparsers._group_actions[0].choices["sae"]._subparsers._group_actions[0] \
        .choices["train"].format_help()
    assert "--l1-weight" in help_text and "weight of the plain L1 penalty" in help_text

    x = _rows(n=1024).numpy().astype(np.float32)
    with StoreWriter(tmp_path / "store", model="m", layers={"l": LayerSpec(x.shape[1], "float32")}) as writer:
        ids = np.arange(len(x))
        writer.write({"l": x}, sample_ids=ids // 8, positions=ids % 8, labels=ids % 3)
    out = tmp_path / "sae"
    argv = ["sae", "train", "--store", str(tmp_path / "store"), "--layer", "l", "--arch", ARCH, "--width", "16",
            "--l1-weight", "0.2", "--steps", "20", "--batch-size", "128", "--log-every", "10", "--out", str(out),
            "--device", "cpu", "--no-progress", "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["saes"][0]["l1_coeff"] == pytest.approx(0.2) and report["saes"][0]["l1_loss"] > 0
    assert SAE.load(out).config.l1_weight == 0.2
    # an option of another architecture is an error, not silently ignored
    assert main([*argv, "--k", "4"]) == 2
    assert "--k (archetypal/batchtopk/matryoshka/topk) does not apply to --arch plainl1" in capsys.readouterr().err


def test_no_architecture_branch_is_left_in_the_trainer():
    from pathlib import Path

    import mechlens.sae.training as training

    text = Path(training.__file__).read_text()
    for name in ("TopKConfig", "ReLUConfig", "JumpReLUConfig", "BatchTopKConfig", "sparsity_coeff\")", "aux_coeff",
                 "multi_k", "\"topk\"", "\"relu\"", "\"jumprelu\""):
        assert name not in text.split('"""', 2)[2], name
