"""FMS with true back-propagated gradients: the ablation isolating the cost of forward-only estimates.

Same formula as :mod:`minillm.scoring.fms` — ``Σ_group |W ⊙ G ⊙ x̄|`` — with ``G`` from back-propagation
(:mod:`minillm.scoring.backprop`) instead of SPSA. Comparing ``fms`` with ``fms-bp`` shows what the
noise of SPSA costs in plan quality; comparing their memory shows what back-propagation costs.
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.forward import run_forward
from minillm.calibration.stats import collect_input_stats
from minillm.groups import sum_by_group
from minillm.scoring.backprop import weight_gradients
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.fms import fms_importance


def score_fms_bp(ctx: ScoringContext) -> ScoreResult:
    linears = ctx.linears()
    stats = collect_input_stats(linears, lambda: run_forward(ctx.model, ctx.calibration))
    grads = weight_gradients(ctx, linears)

    def importance(linear: nn.Linear) -> torch.Tensor:
        return fms_importance(linear.weight, grads.gradient[linear], stats[linear].mean_abs)

    with torch.no_grad():
        scores = {i: sum_by_group(ctx.adapter, ctx.layer(i), ctx.shapes[i], importance) for i in ctx.layers}
    return ScoreResult(scores=scores, forward_passes=grads.forward_passes + 1,
                       backward_passes=grads.backward_passes)
