"""``wanda-sp``: Wanda's |W|·‖X‖ made structured (the baseline of the FLAP paper).

Per weight of the closing projection (``o`` for heads, down / fc2 for channels):
``|W_ij| · ‖X_j‖₂`` with ``‖X_j‖₂`` the L2 norm of input column ``j`` over all calibration tokens,
summed over the group's columns. Key/value heads score 0 (they act only through their query heads).
One forward pass, no gradients. Paper: Sun et al., "A Simple and Effective Pruning Approach for Large
Language Models" (https://arxiv.org/abs/2306.11695); structured variant as in An et al. (FLAP).
"""

from __future__ import annotations

import torch

from minillm.calibration.forward import run_forward
from minillm.calibration.stats import collect_input_stats
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def column_scores(weight: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Σ_i |W_ij| · ‖X_j‖ for every input column j."""
    return weight.detach().abs().double().sum(0).cpu() * sq_norm.double().cpu().sqrt()


def score_wanda_sp(ctx: ScoringContext) -> ScoreResult:
    closings = []
    for index in ctx.layers:
        layer = ctx.layer(index)
        closings += [ctx.adapter.attention(layer).o, ctx.adapter.mlp(layer).closing]
    stats = collect_input_stats(closings, lambda: run_forward(ctx.model, ctx.calibration))
    scores = {}
    for index, o, closing in zip(ctx.layers, closings[::2], closings[1::2], strict=True):
        shape = ctx.shapes[index]
        heads = column_scores(o.weight, stats[o].sq_norm).view(shape.num_heads, shape.head_dim).sum(1)
        channels = column_scores(closing.weight, stats[closing].sq_norm)
        scores[index] = LayerScores(heads=heads.float(), kv_heads=torch.zeros(shape.num_kv_heads),
                                    channels=channels.float())
    return ScoreResult(scores=scores, forward_passes=1)
