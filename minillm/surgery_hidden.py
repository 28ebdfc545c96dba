"""Hidden-size surgery (Minitron's embedding-channel pruning): slice the residual stream everywhere.

A hidden channel lives in: the input embedding's columns, the LM head's input columns (tied heads share
the embedding's tensor and stay tied), every residual-stream norm's weight (and bias), the input columns
of every projection reading the stream (q, k, v, gate/up or fc1) and the output rows (and bias) of every
projection writing it (o, down or fc2). Attention-internal norms (q_norm/k_norm) act on ``head_dim`` and
stay. After slicing, each RMSNorm averages over the kept channels only: the reference the tests compute.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError
from minillm.slicing import slice_linear


def check_hidden(adapter: ArchAdapter, config: Any, kept: int, num_heads: int | None = None) -> None:
    """Refuse (one line) a hidden size this family or its stock config cannot hold."""
    blocker = adapter.hidden_pruning_blocker(config)
    if blocker:
        raise UsageError(blocker)
    heads = num_heads or int(config.num_attention_heads)
    if kept < 1:
        raise UsageError("the plan removes every hidden channel; lower --ratio")
    if kept % heads:
        raise UsageError(
            f"hidden size {kept} is not divisible by the {heads} attention heads, which the stock config "
            f"requires; use --round-to {heads} (or a multiple) or another --ratio"
        )


@torch.no_grad()
def _slice_vector(module: nn.Module, name: str, index: torch.Tensor) -> None:
    value = getattr(module, name, None)
    if isinstance(value, nn.Parameter):
        setattr(module, name, nn.Parameter(value.index_select(0, index.to(value.device)).clone(),
                                           requires_grad=value.requires_grad))


@torch.no_grad()
def slice_hidden(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int]) -> None:
    """Keep hidden channels ``kept`` (ascending original indices) in every tensor that has them, in place."""
    hidden = int(model.config.hidden_size)
    kept = sorted(set(int(i) for i in kept))
    if len(kept) == hidden:
        return
    check_hidden(adapter, model.config, len(kept))
    if kept[0] < 0 or kept[-1] >= hidden:
        raise UsageError(f"kept hidden channels out of range for hidden size {hidden}")
    index = torch.tensor(kept, dtype=torch.long)
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    norms = adapter.hidden_norms(model)  # found before any shape changes
    weight = embedding.weight
    embedding.weight = nn.Parameter(weight.index_select(1, index.to(weight.device)).clone(),
                                    requires_grad=weight.requires_grad)
    embedding.embedding_dim = len(kept)
    if head is not None:
        if tied:
            head.weight = embedding.weight
            head.in_features = len(kept)
        else:
            slice_linear(head, index, 1)
    for norm in norms:
        _slice_vector(norm, "weight", index)
        _slice_vector(norm, "bias", index)
        if isinstance(getattr(norm, "normalized_shape", None), tuple):
            norm.normalized_shape = (len(kept),)
    for layer in adapter.decoder_layers(model):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        for reader in (attn.q, attn.k, attn.v, *mlp.expand):
            slice_linear(reader, index, 1)
        for writer in (attn.o, mlp.closing):
            slice_linear(writer, index, 0)
    config = model.config
    config.head_dim = adapter.head_dim(config)  # explicit: it no longer follows from hidden / heads
    config.hidden_size = len(kept)
