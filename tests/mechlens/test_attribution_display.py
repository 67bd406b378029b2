"""How maps are shown (issue 20, point 3): Captum's normalisation exactly (outliers clipped by the
cumulative-sum threshold, four sign modes), degenerate maps warned about, colour bars labelled,
and Attribution results that display themselves in a notebook."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mechlens.attribution.display import DegenerateMapWarning, draw_map, figure, normalize_map

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CAPTUM_SIGNS = {"all": "all", "positive": "positive", "negative": "negative", "absolute": "absolute_value"}


@pytest.mark.parametrize("sign", sorted(CAPTUM_SIGNS))
@pytest.mark.parametrize("outlier", [0.0, 2.0, 10.0])
def test_normalisation_equals_captums(sign, outlier) -> None:
    from captum.attr._utils.visualization import _normalize_attr

    rng = np.random.default_rng(0)
    heat = rng.standard_normal((16, 16)) * rng.exponential(1.0, (16, 16))
    heat[3, 4] = 40.0  # one outlier that would wash out a plain max scaling
    heat[5, 5] = -35.0
    ours, threshold, problem = normalize_map(heat, sign, outlier)
    theirs = _normalize_attr(heat, CAPTUM_SIGNS[sign], outlier)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    assert problem == "" and threshold > 0
    if outlier > 0:  # whatever lies above the threshold is clipped, not scaled
        assert np.isclose(np.abs(ours).max(), 1.0) and threshold <= np.abs(heat).max()


def test_degenerate_maps_are_warned_about_not_drawn_blank() -> None:
    fig = figure(3, 3)
    ax = fig.add_subplot(1, 1, 1)
    with pytest.warns(DegenerateMapWarning, match="all zero"):
        problem = draw_map(ax, fig, np.zeros((8, 8)), title="gradcam · class:1")
    assert problem == "all zero" and "(all zero)" in ax.get_title()
    with pytest.warns(DegenerateMapWarning, match="zero once kept to sign='positive'"):
        draw_map(ax, fig, -np.ones((8, 8)), sign="positive")
    assert normalize_map(np.full((2, 2), np.nan))[2] == "not finite"
    partly = np.arange(4.0).reshape(2, 2)
    partly[0, 0] = np.nan
    shown, _, problem = normalize_map(partly)
    assert problem == "1 non-finite values shown as 0" and shown[0, 0] == 0 and np.isfinite(shown).all()
    with pytest.raises(ValueError, match="sign="):
        normalize_map(np.ones((2, 2)), "both")


def test_colour_bars_say_what_the_colours_mean() -> None:
    fig = figure(3, 3)
    ax = fig.add_subplot(1, 1, 1)
    draw_map(ax, fig, np.linspace(-1, 3, 64).reshape(8, 8), title="ig")
    labels = [a.get_ylabel() for a in fig.axes if a is not ax]
    assert labels and "signed" in labels[0] and "clip" in labels[0]


def test_an_attribution_displays_itself_and_its_repr_is_short() -> None:
    from mechlens.attribution import attribute
    from mechlens.models import load_model

    loaded = load_model("mechlens:small_cnn_tiny")
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    maps = attribute(loaded, images, "class:1", method="saliency")
    text = repr(maps)
    assert "tensor(" not in text and "method='saliency'" in text and len(text) < 300
    png = maps._repr_png_()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    fig = maps.plot(images, index=[0, 2], sign="absolute")
    titled = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titled) == 2 and all("class:1" in t for t in titled)
