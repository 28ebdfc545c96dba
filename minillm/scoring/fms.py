"""MINI-LLM's Feature Map Sensitivity with forward-only (SPSA) gradients: ``fms`` and ``fms-local``.

Per weight: ``|W_ij · Ĝ_ij · x̄_j|`` — weight × estimated gradient of the calibration loss × mean absolute
input activation of column j — summed over every weight of a group (see :mod:`minillm.groups`).

* ``fms``: ``Ĝ`` is SPSA on the full-model loss over all prunable Linear weights of the scored layers
  (:meth:`~minillm.calibration.sequential.Sequential.spsa`: resident models take two full forward
  passes per step, offloaded ones two perturbed streams through the blocks; the directions are
  regenerated from ``(seed, step, tensor index)``, so both give the same estimate). No
  gradient-sized copy of the model ever exists.
* ``fms-local``: each scored block gets its own SPSA estimate of the gradient of its output
  reconstruction error ``‖f_i(X_i; θ_i+δ) − f_i(X_i; θ_i)‖² / ‖f_i(X_i; θ_i)‖²`` (2K block passes per
  block, no full forward per perturbation). Caveat, measured in docs/benchmarks.md: the error is
  minimal at the dense weights, so its gradient there is zero and the two-sided difference keeps only
  third-order terms; the criterion leans on |W|·x̄.

Reference: "MINI-LLM: Memory-Efficient Structured Pruning for Large Language Models" (Cheng et al., 2024);
SPSA with seed-regenerated directions as in MeZO.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minillm.calibration.blocks import BlockBatch
from minillm.calibration.sequential import Block
from minillm.calibration.spsa import SpsaEstimate
from minillm.calibration.stats import ColumnStats
from minillm.groups import sum_by_group
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def fms_importance(
    weight: torch.Tensor, gradient: torch.Tensor, mean_abs_input: torch.Tensor
) -> torch.Tensor:
    """Per-weight feature-map sensitivity |W ⊙ G ⊙ x̄| (x̄ broadcast along the input dimension)."""
    x_bar = mean_abs_input.to(weight.device, torch.float32)[None, :]
    return (weight.float() * gradient.float() * x_bar).abs()


def positions(ctx: ScoringContext) -> dict[int, int]:
    """Per scored layer, the position of its first prunable Linear in the list of all scored ones
    (the SPSA seed stream: tensor ``k`` of the list always gets the same direction)."""
    result, start = {}, 0
    for index in ctx.layers:
        result[index] = start
        start += len(ctx.adapter.prunable_linears(ctx.layer(index)))
    return result


def indexed_weights(ctx: ScoringContext, start: dict[int, int], index: int, layer: nn.Module
                    ) -> list[tuple[int, torch.Tensor]]:
    if index not in start:
        return []
    return [(start[index] + k, lin.weight) for k, lin in enumerate(ctx.adapter.prunable_linears(layer))]


def score_block(ctx: ScoringContext, block: Block, estimate: SpsaEstimate, first: int,
                mean_abs: Sequence[torch.Tensor]) -> LayerScores:
    """Group sums of |W·Ĝ·x̄| for one resident block (Ĝ regenerated one tensor at a time)."""
    linears = ctx.adapter.prunable_linears(block.layer)
    position = {linear: first + k for k, linear in enumerate(linears)}
    x_bar = dict(zip(linears, mean_abs, strict=True))

    def importance(linear: nn.Linear) -> torch.Tensor:
        gradient = estimate.gradient(position[linear], linear.weight)
        return fms_importance(linear.weight, gradient, x_bar[linear])

    with torch.no_grad():
        return sum_by_group(ctx.adapter, block.layer, ctx.shapes[block.index], importance)


def mean_abs_inputs(ctx: ScoringContext) -> dict[int, list[torch.Tensor]]:
    """x̄ of every prunable Linear of the scored blocks (one calibration pass)."""

    def per_block(block: Block, stats: dict[nn.Linear, ColumnStats]) -> list[torch.Tensor]:
        return [stats[linear].mean_abs for linear in ctx.adapter.prunable_linears(block.layer)]

    return ctx.run.observe(ctx.adapter.prunable_linears, per_block, ctx.layers, "FMS statistics")


def score_fms(ctx: ScoringContext) -> ScoreResult:
    start = positions(ctx)
    x_bar = mean_abs_inputs(ctx)
    estimate = ctx.run.spsa(lambda index, layer: indexed_weights(ctx, start, index, layer), ctx.spsa)
    scores = ctx.run.each(lambda block: score_block(ctx, block, estimate, start[block.index],
                                                    x_bar[block.index]), ctx.layers, "FMS scores")
    return ScoreResult(scores=scores, forward_passes=estimate.forward_passes + 1,
                       notes={"spsa_steps": ctx.spsa.steps, "spsa_eps": ctx.spsa.eps,
                              "spsa_coefficients": list(estimate.coefficients)})


def reconstruction_error(outputs: Sequence[BlockBatch], targets: Sequence[torch.Tensor]) -> float:
    """‖Y − Ŷ‖² / ‖Ŷ‖² over all calibration tokens (float64 sums)."""
    num = sum(
        float((o.hidden.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets, strict=True)
    )
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


def score_fms_local(ctx: ScoringContext) -> ScoreResult:
    """FMS whose SPSA loss is each block's own output reconstruction error (no full forward per step)."""
    start = positions(ctx)

    def per_block(block: Block) -> LayerScores:
        targets = [batch.hidden for batch in block.forward()]
        indexed = indexed_weights(ctx, start, block.index, block.layer)
        estimate = block.spsa(indexed, ctx.spsa, lambda outputs: reconstruction_error(outputs, targets))
        linears = ctx.adapter.prunable_linears(block.layer)
        stats = block.stats(linears, advance=True)
        return score_block(ctx, block, estimate, start[block.index], [stats[lin].mean_abs for lin in linears])

    scores = ctx.run.run(per_block, layers=ctx.layers, task="FMS block-local scores").results
    return ScoreResult(scores=scores, forward_passes=1,
                       notes={"spsa_steps": ctx.spsa.steps, "spsa_eps": ctx.spsa.eps,
                              "block_forward_passes": (2 * ctx.spsa.steps + 2) * len(ctx.layers),
                              "loss": "block output reconstruction"})
