"""The atlas publishes any feature set (channels of a layer, CAV directions) and takes panels
defined outside the package (docs/extending.md): one class with a name, a batched compute step
and a template."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechlens.atlas import (
    ExemplarsPanel,
    HistogramPanel,
    Panel,
    build_atlas,
    channel_features,
    direction_features,
)
from mechlens.capture import capture_to_store
from mechlens.models import load_model
from mechlens.probes import CAV

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class NormPanel(Panel):
    """The norm of each feature's direction (a toy panel): computed for all features at once."""

    name = "direction norm"
    template = "<p class='norm'>direction norm {{ '%.3f' % f.direction_norm }}</p>"

    def __init__(self) -> None:
        self.calls = 0

    def compute(self, ctx, pages) -> None:
        self.calls += 1
        norms = ctx.features.directions[torch.as_tensor(ctx.ids)].norm(dim=1)
        for page, norm in zip(pages, norms.tolist()):
            page["direction_norm"] = norm


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("atlas-sets")
    torch.manual_seed(0)
    loaded = load_model("mechlens:small_cnn_tiny")
    capture_to_store(loaded, "synthetic:shapes?n=24", root / "store", layers="stage1", num_workers=0,
                     progress=False, dtype="float32")
    return root, loaded


def test_the_channels_of_a_layer_with_a_third_party_panel(small_store) -> None:
    root, loaded = small_store
    from activation_store import ActivationStore

    dim = ActivationStore(root / "store")["stage1"].dim
    panel = NormPanel()
    result = build_atlas(channel_features("stage1", dim, [0, 1, 2]), root / "store", loaded, root / "channels",
                         panels=[ExemplarsPanel(), HistogramPanel(rows=500), panel], exemplars=3, progress=False)
    data = json.loads((result.out / "atlas.json").read_text())
    assert panel.calls == 1 and data["panels"] == ["exemplars", "histogram", "direction norm"]
    assert {f["spec"] for f in data["features"]} <= {"channel:stage1:0", "channel:stage1:1", "channel:stage1:2"}
    first = data["features"][0]
    assert first["direction_norm"] == pytest.approx(1.0)
    assert "direction norm 1.000" in (result.out / "features" / f"{first['id']}.html").read_text()
    # a channel's statistics are the store's own values of that channel
    rows = np.asarray(ActivationStore(root / "store")["stage1"][:], dtype=np.float64)
    assert first["max"] == pytest.approx(rows[:, first["id"]].max(), rel=1e-5)


def test_cav_directions_are_published_by_name(small_store) -> None:
    root, loaded = small_store
    from activation_store import ActivationStore

    dim = ActivationStore(root / "store")["stage1"].dim
    rng = np.random.default_rng(0)
    cavs = [CAV(name, "random", "stage1", vector=rng.standard_normal(dim), intercept=0.0, accuracy=1.0)
            for name in ("stripes", "dots")]
    result = build_atlas(direction_features("stage1", cavs), root / "store", loaded, root / "cavs", exemplars=2,
                         progress=False, histogram_rows=500, effect_images=4)
    data = json.loads((result.out / "atlas.json").read_text())
    assert {f["spec"] for f in data["features"]} <= {"stripes", "dots"} and data["features"]
    with pytest.raises(ValueError, match="fitted at layer 'stage9'"):
        direction_features("stage1", [CAV("x", "random", "stage9", vector=np.ones(dim), intercept=0.0, accuracy=1.0)])


def test_the_cli_publishes_channels(small_store, capsys) -> None:
    from mechlens.cli import main

    root, _ = small_store
    assert main(["atlas", "--channels", "stage1:0,3", "--store", str(root / "store"), "--model", "mechlens:small_cnn_tiny",
                 "--out", str(root / "cli"), "--exemplars", "2", "--no-progress", "--json"]) == 0
    data = json.loads((root / "cli" / "atlas.json").read_text())
    assert {f["spec"] for f in data["features"]} <= {"channel:stage1:0", "channel:stage1:3"}
    assert main(["atlas", "--channels", "stage1:x", "--store", str(root / "store"), "--model", "mechlens:small_cnn_tiny",
                 "--out", str(root / "bad")]) != 0
    assert "integer channels" in capsys.readouterr().err
