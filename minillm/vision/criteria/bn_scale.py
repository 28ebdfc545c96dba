"""BN scaling-factor scores (Liu et al., ICCV 2017, "Learning Efficient Convolutional Networks through
Network Slimming").

A channel's score is ``|γ|`` of the BN that normalises it (averaged over the BNs of a residual-coupled
group), ranked globally without normalisation as in the paper. This is Torch-Pruning's own
``BNScaleImportance``; network slimming proper also trains with an L1 penalty on γ
(``minillm cnn train --slim-l1``), without which |γ| is a weaker signal.
"""

from __future__ import annotations

from typing import Any

import torch

from minillm.vision.criteria.base import ScoringContext
from minillm.vision.groups import require_torch_pruning


class BNScaleCriterion:
    needs_data = False

    def __init__(self) -> None:
        tp = require_torch_pruning()
        self._impl = tp.importance.BNScaleImportance(group_reduction="mean", normalizer=None)

    def calibrate(self, ctx: ScoringContext) -> None:
        """Weight-only criterion: nothing to calibrate."""

    def __call__(self, group: Any) -> torch.Tensor:
        scores = self._impl(group)
        if scores is None:
            raise ValueError("bn-scale needs a BatchNorm in every pruned group")
        return scores.float().cpu()
