"""Random criterion: i.i.d. uniform scores from a seeded generator — the control every criterion must beat."""

from __future__ import annotations

import torch

from minillm.lstm.criteria.base import ScoreContext
from minillm.lstm.model import LstmLm


def score(model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(ctx.seed)
    return [torch.rand(size, generator=generator) for size in model.config.hidden_sizes]
