"""The forward engine: the one owner of hooks, unwrapping and the train/eval policy (issue 18)."""
from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mechlens.engine import HookSet, StopAfter, eval_mode, replace_output, select_output, unwrap
from mechlens.models import load_model

PACKAGE = Path(__file__).resolve().parents[2] / "mechlens"
MODULE_HOOKS = {"register_forward_hook", "register_forward_pre_hook", "register_full_backward_hook",
                "register_backward_hook", "register_full_backward_pre_hook"}
# Documented exceptions: autograd tensor hooks that are a method's own backward rule.
TENSOR_HOOK_EXCEPTIONS = {"attribution/gradients.py"}


def _calls(name: set[str]) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in name:
                found.setdefault(str(path.relative_to(PACKAGE)), []).append(node.lineno)
    return found


def test_only_the_engine_registers_module_hooks() -> None:
    assert set(_calls(MODULE_HOOKS)) == {"engine/hooks.py"}, _calls(MODULE_HOOKS)
    assert set(_calls({"register_hook"})) <= TENSOR_HOOK_EXCEPTIONS, _calls({"register_hook"})


def test_no_module_restores_a_single_training_flag() -> None:
    """``net.train(was_training)`` loses the flags of models that mix train and eval modules; the
    engine's eval_mode restores every module's own (model training in models/ sets train mode on
    purpose and is the one exception)."""
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = str(path.relative_to(PACKAGE))
        if rel.startswith("engine/") or rel == "models/training.py":
            continue
        if "was_training" in path.read_text():
            offenders.append(rel)
    assert offenders == []


def _mixed() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(2, 3, 8, 8))
    net.train()
    net[1].eval()  # a frozen BatchNorm inside a model being fine-tuned
    return net


def _flags(net: nn.Module) -> list[bool]:
    return [m.training for m in net.modules()]


def test_eval_mode_restores_each_modules_own_flag_also_on_error() -> None:
    net = _mixed()
    before = _flags(net)
    with pytest.raises(RuntimeError):
        with eval_mode(net):
            assert not any(_flags(net))
            raise RuntimeError("boom")
    assert _flags(net) == before


def test_entry_points_leave_mixed_flags_as_they_found_them(tmp_path) -> None:
    from mechlens.capture import capture_to_store
    from mechlens.features import feature_forward
    from mechlens.probes import ConceptSet, concept_activations

    net = _mixed()
    before = _flags(net)
    x = torch.rand(4, 3, 8, 8)
    feature_forward(net, "channel:0:1", x, grads=False)
    assert _flags(net) == before
    dataset = torch.utils.data.TensorDataset(x, torch.zeros(4, dtype=torch.long))
    concept_activations(net, ConceptSet.from_dataset("c", dataset), "0")
    assert _flags(net) == before
    capture_to_store(net, dataset, tmp_path / "s",
                     layers=["0"], num_workers=0, normalize=False, progress=False)
    assert _flags(net) == before


def test_stop_after_skips_the_rest_of_the_network() -> None:
    ran = []
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3))
    with HookSet() as hooks:
        hooks.forward(net[2], lambda m, a, o: ran.append("last"))
        stopper = StopAfter(net, ["1"], hooks)
        assert stopper.run(net, torch.rand(1, 3, 8, 8)) is None
        assert ran == []
        stopper.armed = False
        assert stopper.run(net, torch.rand(1, 3, 8, 8)).shape == (1, 4, 4, 4) and ran == ["last"]
    assert len(hooks) == 0


def test_replace_output_edits_inside_the_block_only() -> None:
    net = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    x = torch.rand(2, 3)
    clean = net(x)
    with pytest.raises(ValueError):
        with replace_output(net, "0", lambda out: out * 0):
            assert torch.equal(net(x), torch.zeros(2, 3))
            raise ValueError("inside")
    assert torch.equal(net(x), clean)


def test_unwrap_and_select_output() -> None:
    loaded = load_model("mechlens:small_cnn_tiny")
    assert unwrap(loaded) is loaded.model and unwrap(loaded.model) is loaded.model
    with pytest.raises(TypeError, match="nn.Module or a LoadedModel"):
        unwrap("resnet18")

    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"logits": self.fc(x), "embedding": x}

    model = Two()
    x = torch.rand(4, 3)
    select_output(model, "logits")
    assert model(x).shape == (4, 2)
    select_output(model, "embedding")  # a second call replaces the first choice
    assert model(x).shape == (4, 3)
    with pytest.raises(KeyError, match="has keys logits, embedding"):
        select_output(model, "probs")(x)
    np.testing.assert_equal(len(model._forward_hooks), 1)
