"""``fms-gate``: SPSA on one scalar gate per group instead of on every weight (beyond MINI-LLM).

The gates (:mod:`minillm.scoring.gates`) multiply each head's / channel's slice of the closing
projections' inputs; ``∂L/∂g`` at ``g = 1`` is the first-order loss change of removing the group, so
``s = |Ĝ_gate|`` is a complete criterion. SPSA's estimate agrees with the true gradient to a cosine of
roughly ``sqrt(K/d)`` for K perturbations of d dimensions: here d is a few thousand (heads + channels)
instead of ~10⁸ weights, so the same K buys a far better estimate. Docs: the measured curve.
Each perturbation costs two forward passes (``--spsa-steps`` K, ``--spsa-eps`` ε in gate units).
"""

from __future__ import annotations

import torch

from minillm.calibration.forward import input_device
from minillm.calibration.spsa import SpsaEstimate, estimate_gradient
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.gates import GateHolder, GateLayout, gated


def gate_spsa(ctx: ScoringContext, layout: GateLayout) -> tuple[SpsaEstimate, torch.Tensor]:
    """Run SPSA on the gate vector; returns the estimate and the (restored) gate tensor it perturbed."""
    dtype = ctx.adapter.mlp(ctx.layer(layout.layers[0])).closing.weight.dtype
    gates = torch.ones(layout.size, dtype=dtype, device=input_device(ctx.model))
    holder = GateHolder(gates)
    with gated(ctx, layout, holder):
        estimate = estimate_gradient(
            [gates], ctx.run.mean_loss, ctx.spsa,
            on_step=lambda step: ctx.report("SPSA gate perturbations", step + 1, ctx.spsa.steps),
        )
    return estimate, gates


def score_fms_gate(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    estimate, gates = gate_spsa(ctx, layout)
    gradient = estimate.gradient(0, torch.ones_like(gates))
    return ScoreResult(scores=layout.layer_scores(gradient.abs()), forward_passes=estimate.forward_passes,
                       notes={"spsa_steps": ctx.spsa.steps, "spsa_eps": ctx.spsa.eps, "gates": layout.size})
