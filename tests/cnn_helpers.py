"""Tiny CNNs and data shared by the tests/test_cnn_*.py files (no downloads, no shared/ data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from minillm.vision.models import build_model

TINY_RESNET = {
    "arch": "resnet",
    "name": "tiny-resnet",
    "in_channels": 1,
    "num_classes": 5,
    "stage_widths": [6, 8, 10],
    "block_widths": [[4, 5], [6], [7, 3]],
}
TINY_VGG = {
    "arch": "vgg",
    "name": "tiny-vgg",
    "in_channels": 1,
    "num_classes": 5,
    "cfg": [6, "M", 8, 7, "M", 9],
}


def tiny_model(spec: dict, seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A tiny net with non-trivial BN statistics and biases, in eval mode."""
    model = build_model(spec, seed=seed).to(dtype).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=dtype) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=dtype) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=dtype))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=dtype) * 0.3)
    return model


def tiny_batch(n: int = 6, size: int = 8, classes: int = 5, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=g, dtype=dtype), torch.randint(
        0, classes, (n,), generator=g
    )


@pytest.fixture(autouse=True)
def single_thread():
    """The test nets are tiny: intra-op threads only add synchronisation cost on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
