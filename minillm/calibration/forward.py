"""The mean calibration loss of a whole resident model (what whole-model SPSA differentiates)."""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.blocks import input_device
from minillm.calibration.data import CalibrationSet

__all__ = ["input_device", "mean_loss"]


def mean_loss(model: nn.Module, calibration: CalibrationSet) -> float:
    """Mean next-token cross-entropy over the calibration set, without any autograd state."""
    device = input_device(model)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in calibration.batches():
            batch = batch.to(device)
            loss = model(input_ids=batch, labels=batch, use_cache=False).loss
            tokens = batch.numel() - batch.shape[0]
            total += float(loss) * tokens
            count += tokens
    return total / count
