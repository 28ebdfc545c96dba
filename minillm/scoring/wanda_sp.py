"""``wanda-sp``: Wanda's |W|·‖X‖ made structured (the baseline of the FLAP paper).

Per weight of the closing projection (``o`` for heads, down / fc2 for channels):
``|W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂`` the L2 norm of input column ``j`` over all calibration tokens,
summed over the group's columns. Key/value heads score 0 (they act only through their query heads).
One forward pass, no gradients. Paper: Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models" (https://arxiv.org/abs/2306.11695); structured variant as in An et al. (FLAP).
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.sequential import Block
from minillm.calibration.stats import ColumnStats
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext, closing_linears


def column_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Σ_i |W_ij| · ‖X_j‖ for every input column j."""
    return weight.detach().abs().double().sum(0).cpu() * sq_norm.double().cpu().sqrt()


def score_wanda_sp(ctx: ScoringContext) -> ScoreResult:
    def score_block(block: Block, stats: dict[nn.Linear, ColumnStats]) -> LayerScores:
        shape = ctx.shapes[block.index]
        o, closing = closing_linears(ctx.adapter, block.layer)
        heads = column_scores(o.weight, stats[o].sq_norm).view(shape.num_heads, shape.head_dim).sum(1)
        channels = column_scores(closing.weight, stats[closing].sq_norm)
        return LayerScores(heads=heads.float(), kv_heads=torch.zeros(shape.num_kv_heads),
                           channels=channels.float())

    scores = ctx.run.observe(lambda layer: closing_linears(ctx.adapter, layer), score_block, ctx.layers,
                             "wanda-sp")
    return ScoreResult(scores=scores, forward_passes=1)
