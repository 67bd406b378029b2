"""What the attribution parity tests share: the house test CNN with a non-trivial head, a batch
of images, and the relative error against a peer's map."""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from mechlens.models import small_cnn

TARGETS = [1, 4, 2]


def parity_cnn() -> torch.nn.Module:
    """small_cnn (5 classes, width 8, 3 stages) in eval mode, its head re-drawn with std 1 so the
    logits differ clearly between classes."""
    net = small_cnn(num_classes=5, width=8, depth=3, blocks_per_stage=1, seed=0).eval()
    torch.nn.init.normal_(net.head.weight, std=1.0, generator=torch.Generator().manual_seed(3))
    return net


def parity_images(n: int = 3, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(0))


def rel_error(ours: Any, theirs: Any) -> float:
    """Largest absolute difference over the peer map's largest magnitude (shapes must match; an
    all-zero reference is refused: the comparison would be vacuous)."""
    a = torch.as_tensor(np.asarray(ours.detach() if isinstance(ours, torch.Tensor) else ours), dtype=torch.float64)
    b = torch.as_tensor(np.asarray(theirs.detach() if isinstance(theirs, torch.Tensor) else theirs), dtype=torch.float64)
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    scale = b.abs().max().item()
    assert scale > 0, "the reference map is all zeros: the comparison would be vacuous"
    return (a - b).abs().max().item() / scale
