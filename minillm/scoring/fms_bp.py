"""FMS with exact gradients: ``fms-bp`` (plain back-propagation) and ``fms-lowmem`` (block-local).

Same formula as :mod:`minillm.scoring.fms` — ``Σ_group |W ⊙ G ⊙ x̄|`` — with ``G`` the exact gradient
of the mean calibration loss instead of SPSA's estimate. ``fms-bp`` back-propagates through the whole
resident model (the ablation that shows what SPSA's noise costs in quality and what back-propagation
costs in memory); ``fms-lowmem`` gets the same gradients from the block-local backward pass, one block's
weight gradients at a time, at about the memory of a forward pass (MINI-LLM's formula with ``fms-bp``'s
quality: 77.0 vs ``fms``'s 5,207 wiki.test perplexity at 0.2 uniform on SmolLM2, docs/benchmarks.md).
Offloaded models always take the block-local path.
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.sequential import Block
from minillm.groups import sum_by_group
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.fms import fms_importance, mean_abs_inputs


def _score(ctx: ScoringContext, whole_model: bool) -> ScoreResult:
    x_bar = mean_abs_inputs(ctx)

    def per_block(block: Block, grads: dict[nn.Linear, torch.Tensor], _: object) -> LayerScores:
        linears = ctx.adapter.prunable_linears(block.layer)
        mean_abs = dict(zip(linears, x_bar[block.index], strict=True))

        def importance(linear: nn.Linear) -> torch.Tensor:
            return fms_importance(linear.weight, grads[linear], mean_abs[linear])

        return sum_by_group(ctx.adapter, block.layer, ctx.shapes[block.index], importance)

    scores, passes = ctx.run.weight_gradients(ctx.adapter.prunable_linears, per_block, ctx.layers,
                                              whole_model=whole_model)
    return ScoreResult(scores=scores, forward_passes=passes + 1, backward_passes=1,
                       notes={"backprop": "whole model" if whole_model and not ctx.run.offloaded
                              else "block-local"})


def score_fms_bp(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, whole_model=True)


def score_fms_lowmem(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, whole_model=False)
