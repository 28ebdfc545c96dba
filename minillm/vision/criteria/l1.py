"""Filter-norm scores (Li et al., ICLR 2017, "Pruning Filters for Efficient ConvNets").

A channel's score is the L1 norm of the filter that produces it; when several convs write the same
channel (a ResNet residual stream), their filter norms are averaged. Raw norms grow with a layer's
fan-in, so they are not comparable across layers (Li et al. prune layer by layer); for the global
ranking each group's scores are divided by their mean, Torch-Pruning's default normaliser.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.vision.criteria.base import ScoringContext, group_items, root_size


def filter_l1(weight: torch.Tensor) -> torch.Tensor:
    """L1 norm of each output filter of a conv/linear weight ``[out, ...]``."""
    return weight.detach().abs().flatten(1).sum(1)


def mean_normalise(scores: torch.Tensor) -> torch.Tensor:
    mean = scores.mean()
    return scores / mean if mean > 0 else scores


class L1Criterion:
    needs_data = False

    def __init__(self, normalise: bool = True) -> None:
        self.normalise = normalise

    def calibrate(self, ctx: ScoringContext) -> None:
        """Weight-only criterion: nothing to calibrate."""

    def __call__(self, group: Any) -> torch.Tensor:
        total = torch.zeros(root_size(group), dtype=torch.float64)
        count = torch.zeros(root_size(group), dtype=torch.float64)
        for layer, kind, idxs, root_idxs in group_items(group):
            if kind == "out" and isinstance(layer, (nn.Conv2d, nn.Linear)):
                total[root_idxs] += filter_l1(layer.weight)[idxs].double().cpu()
                count[root_idxs] += 1
        scores = (total / count.clamp(min=1)).float()
        return mean_normalise(scores) if self.normalise else scores
