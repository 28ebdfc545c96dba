"""Taylor-gate: the exact first-order loss change of removing each group, at inference-like memory.

One scalar gate per query head and MLP channel (see :mod:`minillm.scoring.gates`); every weight is
frozen and only the gates require grad, so back-propagation allocates no weight gradient at all, and
activation checkpointing per decoder block keeps only the block inputs between forward and backward.

Variants (registry names):

* ``taylor-gate``: ``s = |∂L/∂g|`` at ``g = 1``. For an MLP channel this equals the signed sum of
  ``W ⊙ ∂L/∂W`` over its column of the closing projection (tests check the identity exactly).
* ``taylor-gate-fisher``: second order with the diagonal Fisher of the gates (mean over calibration
  sequences of the squared per-sequence gradient) standing in for the Hessian, as in LLM-Pruner:
  removing a group moves its gate by -1, so ``ΔL ≈ -G + ½F`` and ``s = |G - ½F|``.
* ``taylor-gate-fms``: the exact loss change re-weighted by FMS's weight × activation factor,
  ``s = |G| · M / mean(M)`` where ``M = Σ |W|·x̄`` over the group's closing-projection columns
  (x̄ = mean |input|) and the mean is over the groups of the same kind in that layer — it keeps
  the loss units (so global allocation still compares like with like) and favours groups whose
  large activations the first-order term alone may under-rate.
"""

from __future__ import annotations

import torch

from minillm.calibration.forward import run_forward
from minillm.calibration.stats import collect_input_stats
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.gates import GateLayout, gate_gradients


def first_order(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.abs()


def second_order(gradient: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``|G - ½F|``: the loss change of moving a gate from 1 to 0 with the Fisher as Hessian diagonal."""
    return (gradient - 0.5 * fisher).abs()


def _result(ctx: ScoringContext, layout: GateLayout, values: torch.Tensor, passes: tuple[int, int],
            variant: str) -> ScoreResult:
    return ScoreResult(scores=layout.layer_scores(values), forward_passes=passes[0],
                       backward_passes=passes[1],
                       notes={"variant": variant, "gates": layout.size,
                              "checkpointing": bool(ctx.options.get("checkpoint", True))})


def score_taylor_gate(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = gate_gradients(ctx, layout, use_checkpoint=bool(ctx.options.get("checkpoint", True)))
    return _result(ctx, layout, first_order(grads.gradient), (grads.forward_passes, grads.backward_passes),
                   "first-order")


def score_taylor_gate_fisher(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = gate_gradients(ctx, layout, use_checkpoint=bool(ctx.options.get("checkpoint", True)))
    return _result(ctx, layout, second_order(grads.gradient, grads.fisher),
                   (grads.forward_passes, grads.backward_passes), "second-order (diagonal Fisher)")


def activation_magnitude(ctx: ScoringContext, layout: GateLayout) -> torch.Tensor:
    """``M`` per gate: Σ |W|·x̄ over the group's closing-projection columns, normalised to mean 1 per kind."""
    closings = []
    for layer in layout.layers:
        block = ctx.layer(layer)
        closings += [ctx.adapter.attention(block).o, ctx.adapter.mlp(block).closing]
    stats = collect_input_stats(closings, lambda: run_forward(ctx.model, ctx.calibration))
    parts = []
    for head_dim, o, closing in zip(layout.head_dims, closings[::2], closings[1::2], strict=True):
        with torch.no_grad():
            per_column_o = o.weight.abs().double().sum(0).cpu() * stats[o].mean_abs.cpu()
            per_column_c = closing.weight.abs().double().sum(0).cpu() * stats[closing].mean_abs.cpu()
        heads = per_column_o.view(-1, head_dim).sum(1)
        parts += [heads / heads.mean().clamp_min(1e-30), per_column_c / per_column_c.mean().clamp_min(1e-30)]
    return torch.cat(parts)


def score_taylor_gate_fms(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = gate_gradients(ctx, layout, use_checkpoint=bool(ctx.options.get("checkpoint", True)))
    magnitude = activation_magnitude(ctx, layout)
    return _result(ctx, layout, first_order(grads.gradient) * magnitude,
                   (grads.forward_passes + 1, grads.backward_passes), "first-order x FMS factor")
