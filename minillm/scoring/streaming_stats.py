"""Streaming (block-by-block) modes of the weight / activation criteria: ``wanda-sp``, ``magnitude``.

Activation criteria need the input statistics of each block's Linears; block by block these come from
one pass of the calibration batch through the resident block (its outputs feed the next block), so the
statistics are the ones a full forward pass would record. The per-group math is the criterion's own
pure function, so streaming and in-memory scoring give the same plan (tests/test_streaming.py).
Data-free criteria (magnitude) simply run the criterion on one resident layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch
from torch import nn

from minillm.calibration.blockwise import (
    capture_first_block_inputs,
    resident,
    run_block,
    run_block_with_stats,
)
from minillm.calibration.stats import ColumnStats
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext

BlockScorer = Callable[[ScoringContext, int, dict[nn.Linear, ColumnStats]], LayerScores]


def stream_block_scores(
    ctx: ScoringContext, linears: Callable[[nn.Module], list[nn.Linear]], score_block: BlockScorer
) -> ScoreResult:
    """One calibration pass, one resident block at a time: statistics of ``linears(layer)`` → scores."""
    layers = ctx.adapter.decoder_layers(ctx.model)
    hidden = capture_first_block_inputs(ctx.model, ctx.adapter, ctx.calibration)
    scores = {}
    scored = set(ctx.layers)
    for i, layer in enumerate(layers[: max(ctx.layers) + 1]):
        with resident(layer):
            if i not in scored:
                hidden = run_block(layer, hidden)
                continue
            hidden, stats = run_block_with_stats(layer, hidden, linears(layer))
            with torch.no_grad():
                scores[i] = score_block(ctx, i, stats)
        ctx.report("scores (streaming)", len(scores), len(ctx.layers))
    return ScoreResult(scores=scores, forward_passes=1, notes={"streaming": True})


def _closings(ctx: ScoringContext) -> Callable[[nn.Module], list[nn.Linear]]:
    return lambda layer: [ctx.adapter.attention(layer).o, ctx.adapter.mlp(layer).closing]


def stream_wanda_sp(ctx: ScoringContext) -> ScoreResult:
    from minillm.scoring.wanda_sp import column_scores

    def score_block(ctx: ScoringContext, index: int, stats: dict[nn.Linear, ColumnStats]) -> LayerScores:
        layer, shape = ctx.layer(index), ctx.shapes[index]
        o, closing = ctx.adapter.attention(layer).o, ctx.adapter.mlp(layer).closing
        heads = column_scores(o.weight, stats[o].sq_norm).view(shape.num_heads, shape.head_dim).sum(1)
        channels = column_scores(closing.weight, stats[closing].sq_norm)
        return LayerScores(
            heads=heads.float(), kv_heads=torch.zeros(shape.num_kv_heads), channels=channels.float()
        )

    return stream_block_scores(ctx, _closings(ctx), score_block)


def _data_free(name: str) -> Callable[[ScoringContext], ScoreResult]:
    def stream(ctx: ScoringContext) -> ScoreResult:
        from minillm.scoring import CRITERIA

        criterion = CRITERIA.get(name)
        layers = ctx.adapter.decoder_layers(ctx.model)
        scores, notes = {}, {}
        for done, index in enumerate(ctx.layers):
            with resident(layers[index]):
                result = criterion(replace(ctx, layers=[index]))
            scores.update(result.scores)
            notes = result.notes
            ctx.report("scores (streaming)", done + 1, len(ctx.layers))
        return ScoreResult(scores=scores, notes={**notes, "streaming": True})

    return stream


stream_magnitude_l1 = _data_free("magnitude")
stream_magnitude_l2 = _data_free("magnitude-l2")
