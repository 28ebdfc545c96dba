"""MINI-LLM's Feature Map Sensitivity with forward-only (SPSA) gradients.

Per weight: ``|W_ij · Ĝ_ij · x̄_j|`` — weight × estimated gradient of the calibration loss × mean absolute
input activation of column j — summed over every weight of a group (see :mod:`minillm.groups`).
``Ĝ`` comes from :func:`minillm.calibration.spsa.estimate_gradient` over all prunable Linear weights of the
scored layers; it is regenerated one tensor at a time, so no gradient-sized copy of the model exists.

Reference: "MINI-LLM: Memory-Efficient Structured Pruning for Large Language Models" (Cheng et al., 2024).
"""

from __future__ import annotations

import torch
from torch import nn

from minillm.calibration.forward import mean_loss, run_forward
from minillm.calibration.spsa import estimate_gradient
from minillm.calibration.stats import collect_input_stats
from minillm.groups import sum_by_group
from minillm.scoring.base import ScoreResult, ScoringContext


def fms_importance(
    weight: torch.Tensor, gradient: torch.Tensor, mean_abs_input: torch.Tensor
) -> torch.Tensor:
    """Per-weight feature-map sensitivity |W ⊙ G ⊙ x̄| (x̄ broadcast along the input dimension)."""
    x_bar = mean_abs_input.to(weight.device, torch.float32)[None, :]
    return (weight.float() * gradient.float() * x_bar).abs()


def score_fms(ctx: ScoringContext) -> ScoreResult:
    linears = ctx.linears()
    stats = collect_input_stats(linears, lambda: run_forward(ctx.model, ctx.calibration))
    weights = [linear.weight for linear in linears]
    estimate = estimate_gradient(
        weights,
        lambda: mean_loss(ctx.model, ctx.calibration),
        ctx.spsa,
        on_step=lambda step: ctx.report("SPSA perturbations", step + 1, ctx.spsa.steps),
    )
    position = {linear: i for i, linear in enumerate(linears)}

    def importance(linear: nn.Linear) -> torch.Tensor:
        with torch.no_grad():
            gradient = estimate.gradient(position[linear], linear.weight)
            return fms_importance(linear.weight, gradient, stats[linear].mean_abs)

    scores = {}
    for done, index in enumerate(ctx.layers):
        scores[index] = sum_by_group(ctx.adapter, ctx.layer(index), ctx.shapes[index], importance)
        ctx.report("FMS scores", done + 1, len(ctx.layers))
    return ScoreResult(scores=scores, forward_passes=estimate.forward_passes + 1,
                       notes={"spsa_steps": ctx.spsa.steps, "spsa_eps": ctx.spsa.eps})
