"""``random``: uniform random group scores — the floor every criterion must beat.

Seeded by ``ctx.seed`` through an explicit generator, so identical seeds give identical plans.
"""

from __future__ import annotations

import torch

from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def score_random(ctx: ScoringContext) -> ScoreResult:
    generator = torch.Generator().manual_seed(ctx.seed)
    scores = {}
    for index in ctx.layers:
        shape = ctx.shapes[index]
        scores[index] = LayerScores(
            heads=torch.rand(shape.num_heads, generator=generator),
            kv_heads=torch.rand(shape.num_kv_heads, generator=generator),
            channels=torch.rand(shape.intermediate, generator=generator),
        )
    return ScoreResult(scores=scores)
