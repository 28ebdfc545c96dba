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

from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.sequential import Block
from minillm.calibration.stats import ColumnStats
from minillm.scoring.base import ScoreResult, ScoringContext, closing_linears
from minillm.scoring.gates import GateGradients, GateLayout, gate_gradients


def first_order(gradient: torch.Tensor) -> torch.Tensor:
    return gradient.abs()


def second_order(gradient: torch.Tensor, fisher: torch.Tensor) -> torch.Tensor:
    """``|G - ½F|``: the loss change of moving a gate from 1 to 0 with the Fisher as Hessian diagonal."""
    return (gradient - 0.5 * fisher).abs()


@dataclass(frozen=True)
class TaylorGateOptions:
    """Options of the taylor-gate criteria.

    checkpoint: recompute every decoder block in the backward pass of a resident model, keeping only
        block inputs between forward and backward (same gradients, less memory).
    """

    checkpoint: bool = True


def _gradients(ctx: ScoringContext, layout: GateLayout) -> GateGradients:
    return gate_gradients(ctx, layout, use_checkpoint=ctx.options_as(TaylorGateOptions).checkpoint)


def _result(ctx: ScoringContext, layout: GateLayout, values: torch.Tensor, passes: tuple[int, int],
            variant: str) -> ScoreResult:
    return ScoreResult(scores=layout.layer_scores(values), forward_passes=passes[0],
                       backward_passes=passes[1],
                       notes={"variant": variant, "gates": layout.size,
                              "checkpointing": ctx.options_as(TaylorGateOptions).checkpoint,
                              "backprop": "block-local" if ctx.run.offloaded else "whole model"})


def score_taylor_gate(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = _gradients(ctx, layout)
    return _result(ctx, layout, first_order(grads.gradient), (grads.forward_passes, grads.backward_passes),
                   "first-order")


def score_taylor_gate_fisher(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = _gradients(ctx, layout)
    return _result(ctx, layout, second_order(grads.gradient, grads.fisher),
                   (grads.forward_passes, grads.backward_passes), "second-order (diagonal Fisher)")


def activation_magnitude(ctx: ScoringContext, layout: GateLayout) -> torch.Tensor:
    """``M`` per gate: Σ |W|·x̄ over the group's closing-projection columns, normalised to mean 1 per kind."""

    def per_block(block: Block, stats: dict[nn.Linear, ColumnStats]) -> list[torch.Tensor]:
        o, closing = closing_linears(ctx.adapter, block.layer)
        head_dim = ctx.shapes[block.index].head_dim
        per_column_o = o.weight.abs().double().sum(0).cpu() * stats[o].mean_abs.cpu()
        per_column_c = closing.weight.abs().double().sum(0).cpu() * stats[closing].mean_abs.cpu()
        heads = per_column_o.view(-1, head_dim).sum(1)
        return [heads / heads.mean().clamp_min(1e-30), per_column_c / per_column_c.mean().clamp_min(1e-30)]

    parts = ctx.run.observe(lambda layer: closing_linears(ctx.adapter, layer), per_block, layout.layers,
                            "activation magnitudes")
    return torch.cat([part for index in layout.layers for part in parts[index]])


def score_taylor_gate_fms(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    grads = _gradients(ctx, layout)
    magnitude = activation_magnitude(ctx, layout)
    return _result(ctx, layout, first_order(grads.gradient) * magnitude,
                   (grads.forward_passes + 1, grads.backward_passes), "first-order x FMS factor")
