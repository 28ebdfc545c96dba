"""``magnitude`` (L1) and ``magnitude-l2``: norms of each group's weights, no data at all.

L1 sums ``|W|`` over every weight of the group; L2 is the group's Euclidean norm
(``sqrt(Σ W²)``, per head / key-value head / channel). Known weakness, which the benchmark shows:
it ignores activations, so it removes channels that feed the few "massive activation" dimensions.
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.sequential import Block
from minillm.groups import sum_by_group
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def _score(ctx: ScoringContext, power: int) -> ScoreResult:
    def importance(linear: nn.Linear) -> torch.Tensor:
        return linear.weight.detach().abs().float().pow(power)

    def score_block(block: Block) -> LayerScores:
        sums = sum_by_group(ctx.adapter, block.layer, ctx.shapes[block.index], importance)
        if power == 2:
            return LayerScores(sums.heads.sqrt(), sums.kv_heads.sqrt(), sums.channels.sqrt())
        return sums

    return ScoreResult(scores=ctx.run.each(score_block, ctx.layers, "magnitude"), notes={"norm": f"L{power}"})


def score_magnitude_l1(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, 1)


def score_magnitude_l2(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, 2)
