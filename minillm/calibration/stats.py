"""Running per-column statistics of the inputs of Linear layers, gathered in one calibration pass.

One collector serves every activation-aware criterion: mean |x| (FMS), squared L2 norm (Wanda-sp),
mean and variance (FLAP's fluctuation). Sums are kept in float64 so long calibration sets stay exact.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.hooks import input_hooks


@dataclass
class ColumnStats:
    """Sums over calibration tokens of x, |x| and x² for every input column of one Linear."""

    count: int
    total: torch.Tensor
    total_abs: torch.Tensor
    total_sq: torch.Tensor

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.total_abs / max(self.count, 1)

    @property
    def sq_norm(self) -> torch.Tensor:
        """Σ x² over tokens: ‖X_j‖² of Wanda."""
        return self.total_sq

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance over tokens (FLAP's fluctuation)."""
        n = max(self.count - 1, 1)
        return (self.total_sq - self.total**2 / max(self.count, 1)) / n


def collect_input_stats(modules: Sequence[nn.Linear], run: Callable[[], None]) -> dict[nn.Linear, ColumnStats]:
    """Run ``run()`` (forward passes over the calibration set) with hooks recording each module's inputs."""
    stats: dict[nn.Linear, ColumnStats] = {}

    def record(module: nn.Module, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1, x.shape[-1]).double()
        entry = stats.get(module)
        if entry is None:
            zeros = torch.zeros(flat.shape[-1], dtype=torch.float64, device=flat.device)
            entry = stats[module] = ColumnStats(0, zeros.clone(), zeros.clone(), zeros.clone())
        entry.count += flat.shape[0]
        entry.total += flat.sum(0)
        entry.total_abs += flat.abs().sum(0)
        entry.total_sq += (flat * flat).sum(0)

    with input_hooks(modules, record):
        run()
    return stats
