"""Streaming (block-by-block) modes of the weight / activation criteria.

The criteria: ``wanda-sp``, ``flap``, ``magnitude``.

Activation criteria need the input statistics of each block's Linears; block by block these come from
one pass of the calibration batch through the resident block (its outputs feed the next block), so the
statistics are the ones a full forward pass would record. The per-group math is the criterion's own
pure function, so streaming and in-memory scoring give the same plan (tests/test_streaming.py).
Data-free criteria (magnitude) simply run the criterion on one resident layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

import torch
from torch import nn

from minillm.calibration.blocks import (
    capture_first_block_inputs,
    resident,
    run_block,
    run_block_with_stats,
)
from minillm.calibration.stats import ColumnStats
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext

T = TypeVar("T")
BlockScorer = Callable[[ScoringContext, int, dict[nn.Linear, ColumnStats]], T]


def stream_block_stats(
    ctx: ScoringContext, linears: Callable[[nn.Module], list[nn.Linear]], per_block: BlockScorer[T]
) -> dict[int, T]:
    """One calibration pass, one resident block at a time: ``per_block`` of each scored block's statistics.

    ``per_block`` runs while the block is resident (so it may read its weights) and returns something
    small (scores, per-channel vectors), keyed by layer index in the result.
    """
    layers = ctx.adapter.decoder_layers(ctx.model)
    hidden = capture_first_block_inputs(ctx.model, ctx.adapter, ctx.calibration)
    results: dict[int, T] = {}
    scored = set(ctx.layers)
    for i, layer in enumerate(layers[: max(ctx.layers) + 1]):
        with resident(layer):
            if i not in scored:
                hidden = run_block(layer, hidden)
                continue
            hidden, stats = run_block_with_stats(layer, hidden, linears(layer))
            with torch.no_grad():
                results[i] = per_block(ctx, i, stats)
        ctx.report("scores (streaming)", len(results), len(ctx.layers))
    return results


def stream_block_scores(
    ctx: ScoringContext,
    linears: Callable[[nn.Module], list[nn.Linear]],
    score_block: BlockScorer[LayerScores],
) -> ScoreResult:
    """:func:`stream_block_stats` for criteria whose layer scores need no other layer."""
    return ScoreResult(scores=stream_block_stats(ctx, linears, score_block), forward_passes=1,
                       notes={"streaming": True})


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


def stream_flap(ctx: ScoringContext) -> ScoreResult:
    """FLAP block by block: per-channel fluctuation and means while each block is resident, then the
    cross-layer standardisation of :func:`minillm.scoring.flap.flap_result` (same scores as in memory)."""
    from minillm.scoring.flap import flap_result, layer_fluctuation

    def per_block(ctx: ScoringContext, index: int, stats: dict[nn.Linear, ColumnStats]):
        layer = ctx.layer(index)
        return layer_fluctuation(ctx.adapter.attention(layer).o, ctx.adapter.mlp(layer).closing, stats)

    return flap_result(ctx, stream_block_stats(ctx, _closings(ctx), per_block), streaming=True)


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
