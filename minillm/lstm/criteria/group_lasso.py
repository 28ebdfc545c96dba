"""Group-lasso criterion (intrinsic sparse structures, Wen et al., ICLR 2018): learn which units to drop.

Training adds λ·Σ_layers Σ_j ‖group_j‖₂ to the loss, where group_j is everything hidden unit j owns
(:mod:`minillm.lstm.groups`). The L2-of-groups penalty drives whole groups towards zero together, so
the sparse structure is learned by the training run rather than read off a dense model; units are then
ranked by their group norm. ``ctx.regularize`` bounds the regularised phase run here (from the given
model); with 0 steps the model is assumed trained with the penalty already
(``minillm lstm train --group-lasso λ``) and only the norms are read.

Note: this criterion changes the model's weights in place (the regularised phase is part of it).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minillm.lstm.criteria.base import ScoreContext
from minillm.lstm.groups import UnitGroup, group_norms, unit_groups
from minillm.lstm.model import LstmLm
from minillm.lstm.train import train_lm


def group_lasso_penalty(model: nn.Module, groups: Sequence[UnitGroup]) -> torch.Tensor:
    """Σ_layers Σ_units ‖group‖₂ (differentiable; multiply by λ)."""
    return torch.stack([norms.sum() for norms in group_norms(model, groups)]).sum()


def regularizer(config_groups: Sequence[UnitGroup], lam: float):
    """The ``extra_loss`` callable for :func:`minillm.lstm.train.train_lm`."""
    if lam < 0:
        raise ValueError(f"group-lasso λ must be >= 0, got {lam}")
    return lambda model: lam * group_lasso_penalty(model, config_groups)


def score(model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]:
    groups = unit_groups(model.config)
    steps = 0 if ctx.regularize is None else (ctx.regularize.max_steps or 0)
    if steps > 0:
        if ctx.train_ids is None:
            raise ValueError("the group_lasso criterion needs training data for its regularised phase")
        train_lm(model, ctx.train_ids, ctx.regularize, extra_loss=regularizer(groups, ctx.group_lasso),
                 on_step=ctx.on_step)
    with torch.no_grad():
        return group_norms(model, groups)
