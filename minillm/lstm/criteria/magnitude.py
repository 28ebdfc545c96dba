"""Magnitude criterion: the L2 norm of everything a hidden unit owns.

score_j = ‖group_j‖₂ over its four gate rows (W_ih, W_hh, biases), its W_hh column and its consumer's
input column (:mod:`minillm.lstm.groups`). Data-free; the structured analogue of weight magnitude.
"""

from __future__ import annotations

import torch

from minillm.lstm.criteria.base import ScoreContext
from minillm.lstm.groups import group_norms, unit_groups
from minillm.lstm.model import LstmLm


@torch.no_grad()
def score(model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]:
    return group_norms(model, unit_groups(model.config))
