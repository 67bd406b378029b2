"""An attribution method registered from outside the package (docs/extending.md): one
decorated function; ``attribute``, the registry, pixel space and the finiteness check apply."""
from __future__ import annotations

import pytest
import torch

from mechlens.attribution import Attribution, attribute, get_method, input_gradients, register_method, resolve_target
from mechlens.models import small_cnn


def gradient_sign(model, inputs, target=None):
    """The sign of the input gradient (a toy method)."""
    target = resolve_target(model, inputs, target)
    grads, values = input_gradients(model, inputs, target)
    return Attribution(map=grads.sign(), method="gradient_sign", features=target.names, values=values.detach(),
                       kind="input", input_shape=tuple(inputs.shape))


@pytest.fixture
def registered():
    """Register the method for one test and take it out again (other tests list the registry)."""
    from mechlens.attribution import base

    register_method("gradient_sign", kind="input", family="gradient", overwrite=True)(gradient_sign)
    yield
    base._METHODS.pop("gradient_sign", None)


def test_a_third_party_method_is_called_like_a_built_in_one(registered) -> None:
    torch.manual_seed(0)
    model = small_cnn(num_classes=3, width=8, depth=2, seed=0).eval()
    x = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    result = attribute(model, x, "class:1", method="gradient_sign")
    saliency = attribute(model, x, "class:1", method="saliency", abs=False)
    assert torch.equal(result.map, saliency.map.sign())
    assert get_method("gradient_sign").description == "The sign of the input gradient (a toy method)."
