"""Prunable groups of a decoder layer: their parameter costs and the sum of per-weight importances.

A *group* is an attention head (q rows + o columns; k/v rows per key/value head) or an MLP channel
(a row of every expanding projection + a column of the closing projection). Criteria that score single
weights (magnitude, Taylor, FMS) hand a per-weight importance tensor to :func:`sum_by_group`; criteria
that score groups directly build :class:`~minillm.plan.LayerScores` themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.errors import UsageError
from minillm.plan import LayerCosts, LayerScores


def _row_cost(linear: nn.Linear) -> int:
    return linear.in_features + (1 if linear.bias is not None else 0)


def layer_costs(adapter: ArchAdapter, layer: nn.Module, shape: LayerShape) -> LayerCosts:
    """Parameters that leave with one query head, one key/value head and one MLP channel."""
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    hd = shape.head_dim
    return LayerCosts(
        query_head=hd * _row_cost(attn.q) + hd * attn.o.out_features,
        kv_head=hd * (_row_cost(attn.k) + _row_cost(attn.v)),
        channel=sum(_row_cost(lin) for lin in mlp.expand) + mlp.closing.out_features,
    )


def prunable_layers(num_layers: int, skip_first: int = 0, skip_last: int = 0) -> list[int]:
    """Indices of the layers to prune; LLM-Pruner's LLaMA-7B setting keeps layers 0–3 and 30–31."""
    if skip_first < 0 or skip_last < 0:
        raise UsageError("--skip-first and --skip-last must be >= 0")
    layers = list(range(skip_first, num_layers - skip_last))
    if not layers:
        raise UsageError(
            f"--skip-first {skip_first} and --skip-last {skip_last} "
            f"leave none of the {num_layers} layers to prune"
        )
    return layers


WeightImportance = Callable[[nn.Linear], torch.Tensor]


def sum_by_group(adapter: ArchAdapter, layer: nn.Module, shape: LayerShape,
                 importance: WeightImportance) -> LayerScores:
    """Sum a per-weight importance (same shape as each weight) over every group of the layer."""
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    heads = importance(attn.q).reshape(shape.num_heads, -1).sum(1)
    heads = heads + importance(attn.o).reshape(-1, shape.num_heads, shape.head_dim).sum((0, 2))
    kv = importance(attn.k).reshape(shape.num_kv_heads, -1).sum(1)
    kv = kv + importance(attn.v).reshape(shape.num_kv_heads, -1).sum(1)
    channels = importance(mlp.closing).sum(0)
    for linear in mlp.expand:
        channels = channels + importance(linear).sum(1)
    return LayerScores(heads=heads.float().cpu(), kv_heads=kv.float().cpu(), channels=channels.float().cpu())
