"""FMS with SPSA gradients, block by block: the streaming mode of ``fms`` and the block-local ``fms-local``.

Full loss (``fms`` under ``--streaming``). One SPSA step needs L(θ+εz) and L(θ−εz) of the *whole* model.
Instead of two full forward passes over a model whose weights are offloaded, the calibration batch
flows through the blocks once with two streams: each block is loaded once (onto its accelerate
execution device), its weights are perturbed in place by +εz, the "+" stream goes through, they move
to −εz, the "−" stream goes through, and they move back; z is regenerated from ``(seed, step, tensor
index)`` on the device where the block runs, never stored. Both losses then come from the model's own
head (:func:`~minillm.calibration.blocks.loss_from_hidden`). Every weight sees exactly the same
arithmetic as in the in-memory estimator, so the same seed gives the same coefficients (up to float
summation order) and the same plan. Offloaded blocks are perturbed in their loaded copies, which are
dropped afterwards, so the offloaded source is never modified.

Block-local (``fms-local``). Each scored block gets its own SPSA estimate of the gradient of its output
reconstruction error ``‖f_i(X_i; θ_i+δ) − f_i(X_i; θ_i)‖² / ‖f_i(X_i; θ_i)‖²`` (X_i = dense inputs):
2K block forwards per block and no full forward per perturbation. Caveat, measured in
docs/benchmarks.md: a reconstruction error is minimal at the dense weights, so its gradient there is
zero and the two-sided difference keeps only third-order terms; the estimate carries far less signal
than the full-loss one and the criterion leans on |W|·x̄.

Reference: MINI-LLM (Cheng et al., 2024); SPSA with seed-regenerated directions as in MeZO.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minillm.calibration.blocks import (
    BlockBatch,
    capture_first_block_inputs,
    head_resident,
    loss_from_hidden,
    resident,
    run_block,
    run_block_with_stats,
)
from minillm.calibration.spsa import SpsaEstimate, shift_indexed
from minillm.groups import sum_by_group
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.fms import fms_importance

Indexed = Sequence[tuple[int, nn.Linear]]


def positions(ctx: ScoringContext) -> dict[int, list[tuple[int, nn.Linear]]]:
    """Per scored layer, its Linears with their index in the global tensor list (the SPSA seed stream)."""
    result, start = {}, 0
    for index in ctx.layers:
        linears = ctx.adapter.prunable_linears(ctx.layer(index))
        result[index] = list(enumerate(linears, start=start))
        start += len(linears)
    return result


def shift(indexed: Indexed, scale: float, seed: int, step: int) -> None:
    """θ ← θ + scale·z_step for these tensors only, z regenerated on each tensor's device."""
    shift_indexed(((index, linear.weight) for index, linear in indexed), scale, seed, step)


def _score_block(
    ctx: ScoringContext, index: int, indexed: Indexed, estimate: SpsaEstimate, batches: list[BlockBatch]
) -> tuple[list[BlockBatch], LayerScores]:
    """Run one (resident) block with input-statistics hooks, then score it from Ĝ, W and mean |x|."""
    layer = ctx.layer(index)
    outputs, stats = run_block_with_stats(layer, batches, [lin for _, lin in indexed])
    position = {linear: i for i, linear in indexed}

    def importance(linear: nn.Linear) -> torch.Tensor:
        gradient = estimate.gradient(position[linear], linear.weight)
        return fms_importance(linear.weight, gradient, stats[linear].mean_abs)

    with torch.no_grad():
        scores = sum_by_group(ctx.adapter, layer, ctx.shapes[index], importance)
    return outputs, scores


def stream_fms(ctx: ScoringContext) -> ScoreResult:
    """FMS with the full-model loss, one resident block at a time (2K+1 passes, like the in-memory one)."""
    layers = ctx.adapter.decoder_layers(ctx.model)
    config = ctx.spsa
    first = capture_first_block_inputs(ctx.model, ctx.adapter, ctx.calibration)
    indexed = positions(ctx)
    estimate = SpsaEstimate(config=config)
    for step in range(config.steps):
        plus, minus = first, first
        for i, layer in enumerate(layers):
            mine = indexed.get(i, [])
            with resident(layer):
                shift(mine, config.eps, config.seed, step)
                plus = run_block(layer, plus)
                shift(mine, -2.0 * config.eps, config.seed, step)
                minus = run_block(layer, minus)
                shift(mine, config.eps, config.seed, step)
        with head_resident(ctx.model, ctx.adapter):
            loss_plus = loss_from_hidden(ctx.model, ctx.adapter, plus)
            loss_minus = loss_from_hidden(ctx.model, ctx.adapter, minus)
        estimate.coefficients.append((loss_plus - loss_minus) / (2.0 * config.eps))
        estimate.forward_passes += 2
        ctx.report("SPSA perturbations (streaming)", step + 1, config.steps)
    scores = {}
    hidden = first
    last = max(ctx.layers)
    for i, layer in enumerate(layers[: last + 1]):
        with resident(layer):
            if i in indexed:
                hidden, scores[i] = _score_block(ctx, i, indexed[i], estimate, hidden)
                ctx.report("FMS scores (streaming)", len(scores), len(ctx.layers))
            else:
                hidden = run_block(layer, hidden)
    return ScoreResult(
        scores=scores,
        forward_passes=estimate.forward_passes + 1,
        notes={
            "spsa_steps": config.steps,
            "spsa_eps": config.eps,
            "streaming": True,
            "spsa_coefficients": list(estimate.coefficients),
        },
    )


def reconstruction_error(outputs: Sequence[BlockBatch], targets: Sequence[torch.Tensor]) -> float:
    """‖Y − Ŷ‖² / ‖Ŷ‖² over all calibration tokens (float64 sums)."""
    num = sum(
        float((o.hidden.double() - t.double()).pow(2).sum()) for o, t in zip(outputs, targets, strict=True)
    )
    den = sum(float(t.double().pow(2).sum()) for t in targets)
    return num / max(den, 1e-30)


def stream_fms_local(ctx: ScoringContext) -> ScoreResult:
    """FMS whose SPSA loss is each block's own output reconstruction error (no full forward per step)."""
    layers = ctx.adapter.decoder_layers(ctx.model)
    config = ctx.spsa
    indexed = positions(ctx)
    hidden = capture_first_block_inputs(ctx.model, ctx.adapter, ctx.calibration)
    scores, block_passes = {}, 0
    last = max(ctx.layers)
    for i, layer in enumerate(layers[: last + 1]):
        with resident(layer):
            if i not in indexed:
                hidden = run_block(layer, hidden)
                continue
            targets = [b.hidden for b in run_block(layer, hidden)]
            estimate = SpsaEstimate(config=config)
            for step in range(config.steps):
                shift(indexed[i], config.eps, config.seed, step)
                loss_plus = reconstruction_error(run_block(layer, hidden), targets)
                shift(indexed[i], -2.0 * config.eps, config.seed, step)
                loss_minus = reconstruction_error(run_block(layer, hidden), targets)
                shift(indexed[i], config.eps, config.seed, step)
                estimate.coefficients.append((loss_plus - loss_minus) / (2.0 * config.eps))
            block_passes += 2 * config.steps + 2
            hidden, scores[i] = _score_block(ctx, i, indexed[i], estimate, hidden)
        ctx.report("FMS block-local scores", len(scores), len(ctx.layers))
    return ScoreResult(
        scores=scores,
        forward_passes=1,
        notes={
            "spsa_steps": config.steps,
            "spsa_eps": config.eps,
            "streaming": True,
            "block_forward_passes": block_passes,
            "loss": "block output reconstruction",
        },
    )
