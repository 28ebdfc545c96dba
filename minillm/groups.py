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

from minillm.arch.base import ArchAdapter, LayerShape, Projection, holder, projection_rows
from minillm.errors import UsageError
from minillm.plan import LayerCosts, LayerScores


def _row_cost(projection: Projection) -> int:
    return projection.in_features + (1 if projection.bias is not None else 0)


def layer_costs(adapter: ArchAdapter, layer: nn.Module, shape: LayerShape) -> LayerCosts:
    """Parameters that leave with one query head, one key/value head and one MLP channel.

    Rows of a fused projection cost what separate rows cost; a norm that covers heads (Cohere, OLMo 2)
    loses its share per head. Embeddings and the LM head are never cut, so they count only in the total
    (tied ones once), which is what ``--ratio`` divides by for every family.
    """
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    hd = shape.head_dim
    norm_share = {"q": 0, "k": 0}
    for norm in attn.norms:
        heads = shape.num_heads if norm.kind == "q" else shape.num_kv_heads
        norm_share[norm.kind] += sum(p.numel() for p in norm.module.parameters(recurse=False)) // heads
    return LayerCosts(
        query_head=hd * _row_cost(attn.q) + hd * attn.o.out_features + norm_share["q"],
        kv_head=hd * (_row_cost(attn.k) + _row_cost(attn.v)) + norm_share["k"],
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
    """Sum a per-weight importance (same shape as each weight) over every group of the layer.

    ``importance`` is called once per Linear; a fused projection's parts read their rows of it.
    """
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    cache: dict[nn.Linear, torch.Tensor] = {}

    def rows(projection: Projection) -> torch.Tensor:
        linear = holder(projection)
        if linear not in cache:
            cache[linear] = importance(linear)
        return projection_rows(projection, cache[linear])

    heads = rows(attn.q).reshape(shape.num_heads, -1).sum(1)
    heads = heads + rows(attn.o).reshape(-1, shape.num_heads, shape.head_dim).sum((0, 2))
    kv = rows(attn.k).reshape(shape.num_kv_heads, -1).sum(1)
    kv = kv + rows(attn.v).reshape(shape.num_kv_heads, -1).sum(1)
    channels = rows(mlp.closing).sum(0)
    for projection in mlp.expand:
        channels = channels + rows(projection).sum(1)
    return LayerScores(heads=heads.float().cpu(), kv_heads=kv.float().cpu(), channels=channels.float().cpu())


def count_parameters(model: nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once, also after accelerate's offload hooks have
    replaced one side of the tie by a copy during a forward pass)."""
    total = sum(p.numel() for p in model.parameters())
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(config, "tie_word_embeddings", False) and outputs is not None and inputs is not None \
            and outputs.weight is not inputs.weight and outputs.weight.shape == inputs.weight.shape:
        total -= outputs.weight.numel()
    return total
