"""FLAP's choice re-made on the pruned prefix: which heads and channels a layer keeps, at the plan's counts.

Why: ``flap`` scores every layer once, on the dense model's activations. In the sequential compensation
pass each block sees the outputs of the blocks already cut and refitted before it, and the moments it
gathers there for the refit (``H``, the means) already hold FLAP's fluctuation metric, ``Var(x_j) ·
‖W[:, j]‖²`` (:func:`minillm.scoring.flap.fluctuation`). Re-choosing the groups with it costs nothing extra
and picks what matters to the inputs this block will really get (SlimGPT's argument for selecting on the
pruned prefix). The plan's counts never change, so the export's shape and size are the dry run's.

Grouped-query attention stays exact: whole kv groups are ranked by the mean over their columns, and
inside the kept groups every group keeps the same number of query heads.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from minillm.arch.base import LayerShape
from minillm.compensation.hessian import InputMoments
from minillm.plan import LayerPlan
from minillm.scoring.flap import fluctuation


def _columns(linear: nn.Linear, moments: InputMoments) -> torch.Tensor:
    return fluctuation(linear.weight, moments.variance)


def _top(scores: torch.Tensor, candidates: list[int], count: int) -> list[int]:
    """The ``count`` best of ``candidates`` (ties: the lower index), in index order."""
    index = torch.tensor(candidates, dtype=torch.long)
    order = torch.sort(scores[index], descending=True, stable=True).indices[:count]
    return sorted(index[order].tolist())


def fluctuation_heads(plan: LayerPlan, shape: LayerShape, o: nn.Linear, moments: InputMoments) -> LayerPlan:
    """The plan's kv-group and query-head counts, the groups and heads of highest mean fluctuation."""
    if len(plan.heads) == shape.num_heads or len(plan.heads) % max(len(plan.kv_heads), 1):
        return plan  # nothing cut, or kv groups of unequal head counts (not a GQA-exact plan): as planned
    per_head = _columns(o, moments).view(shape.num_heads, shape.head_dim).mean(1)
    group = shape.heads_per_kv
    per_kv = per_head.view(shape.num_kv_heads, group).mean(1)
    kv_heads = _top(per_kv, list(range(shape.num_kv_heads)), len(plan.kv_heads))
    each = len(plan.heads) // len(plan.kv_heads)
    heads = [h for k in kv_heads for h in _top(per_head, list(range(k * group, (k + 1) * group)), each)]
    return replace(plan, kv_heads=kv_heads, heads=sorted(heads))


def fluctuation_channels(plan: LayerPlan, shape: LayerShape, closing: nn.Linear,
                         moments: InputMoments) -> LayerPlan:
    """The plan's channel count, the channels of highest fluctuation."""
    if len(plan.channels) == shape.intermediate:
        return plan
    return replace(plan, channels=_top(_columns(closing, moments), list(range(shape.intermediate)),
                                       len(plan.channels)))
