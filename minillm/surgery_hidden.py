"""Hidden-size surgery (Minitron's embedding-channel pruning): slice the residual stream everywhere.

A hidden channel lives in: the input embedding's columns, the LM head's input columns (tied heads share
the embedding's tensor and stay tied), every residual-stream norm's weight (and bias), the input columns
of every projection reading the stream (q, k, v, gate/up or fc1) and the output rows (and bias) of every
projection writing it (o, down or fc2). Attention-internal norms (q_norm/k_norm) act on ``head_dim`` and
stay. After slicing, each RMSNorm averages over the kept channels only: the reference the tests compute.

Closed forms per family: where nothing else derives from ``hidden_size`` (Llama, Mistral, Qwen 2/3, Phi-3,
Granite, OLMo 2/3, Cohere, …) slicing alone is exact. Gemma multiplies the embedding by √hidden_size,
recomputed from the config on reload: its adapter rescales the embedding to keep the product and, with a
tied head, folds the inverse factor into the final norm (:meth:`ArchAdapter.hidden_size_changed`).
Families whose stock class derives ``head_dim`` (or a norm's width) from ``hidden_size / heads`` have no
closed form — the reloaded heads would change size — and their adapters refuse with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, holder
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
def slice_block_hidden(layer: nn.Module, adapter: ArchAdapter, index: torch.Tensor, hidden: int) -> None:
    """One decoder layer's part of the cut (``hidden``: the width before it): the input columns of every
    projection reading the stream (a fused qkv or gate_up once), the output rows of ``o`` and the closing
    projection, and the layer's residual-stream norms. Used by the in-memory surgery and, block by
    block, by the streaming export."""
    norms = adapter.block_hidden_norms(layer, hidden)  # found before any shape changes
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    for reader in dict.fromkeys(holder(p) for p in (attn.q, attn.k, attn.v, *mlp.expand)):
        slice_linear(reader, index, 1)
    for writer in (attn.o, mlp.closing):
        slice_linear(writer, index, 0)
    _slice_norms(norms, index)


@torch.no_grad()
def slice_outer_hidden(model: nn.Module, adapter: ArchAdapter, index: torch.Tensor) -> None:
    """The part outside the decoder layers: embedding columns, LM head columns (a tied head stays
    tied), the other residual-stream norms (the final one), then the family's own fix-ups
    (:meth:`~minillm.arch.base.ArchAdapter.hidden_size_changed`, e.g. Gemma's embedding normaliser).
    The config is not changed here."""
    hidden, kept = int(model.config.hidden_size), int(index.numel())
    layers = adapter.decoder_layers(model)
    inside = {id(m) for layer in layers for m in layer.modules()}
    norms = [n for n in adapter.hidden_norms(model) if id(n) not in inside]
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    tied = head is not None and head.weight is embedding.weight
    weight = embedding.weight
    embedding.weight = nn.Parameter(weight.index_select(1, index.to(weight.device)).clone(),
                                    requires_grad=weight.requires_grad)
    embedding.embedding_dim = kept
    if head is not None:
        if tied:
            head.weight = embedding.weight
            head.in_features = kept
        else:
            slice_linear(head, index, 1)
    _slice_norms(norms, index)
    adapter.hidden_size_changed(model, hidden, kept)


def _slice_norms(norms: Sequence[nn.Module], index: torch.Tensor) -> None:
    for norm in norms:
        _slice_vector(norm, "weight", index)
        _slice_vector(norm, "bias", index)
        if isinstance(getattr(norm, "normalized_shape", None), tuple):
            norm.normalized_shape = (int(index.numel()),)


def hidden_index(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int],
                 num_heads: int | None = None) -> torch.Tensor | None:
    """The kept channels as an index (None: nothing to cut), after the one-line checks."""
    hidden = int(model.config.hidden_size)
    kept = sorted(set(int(i) for i in kept))
    if len(kept) == hidden:
        return None
    check_hidden(adapter, model.config, len(kept), num_heads)
    if kept[0] < 0 or kept[-1] >= hidden:
        raise UsageError(f"kept hidden channels out of range for hidden size {hidden}")
    return torch.tensor(kept, dtype=torch.long)


def hidden_config_update(model: nn.Module, adapter: ArchAdapter, kept: int) -> dict[str, int]:
    """``head_dim`` made explicit (it no longer follows from hidden / heads) and the new hidden size."""
    return {"head_dim": adapter.head_dim(model.config), "hidden_size": kept}


@torch.no_grad()
def slice_hidden(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int],
                 num_heads: int | None = None) -> None:
    """Keep hidden channels ``kept`` (original indices) in every tensor that has them, in place.

    ``num_heads``: the head count the export will have (when heads are cut after this), for the
    divisibility check; the config's by default."""
    index = hidden_index(model, adapter, kept, num_heads)
    if index is None:
        return
    hidden = int(model.config.hidden_size)
    for layer in adapter.decoder_layers(model):
        slice_block_hidden(layer, adapter, index, hidden)
    slice_outer_hidden(model, adapter, index)
    for key, value in hidden_config_update(model, adapter, int(index.numel())).items():
        setattr(model.config, key, value)


def _kept_norm(module: nn.Module, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``module``'s own forward on the kept channels of ``x`` with its per-channel parameters sliced the
    same way (nothing is copied into the module; its hooks are not re-entered), zero elsewhere."""
    saved = dict(module._parameters)
    shape = getattr(module, "normalized_shape", None)
    keep = keep.to(x.device)
    try:
        for name, param in saved.items():
            if param is not None and param.dim() == 1:
                module._parameters[name] = param.index_select(0, keep.to(param.device))  # type: ignore[assignment]
        if isinstance(shape, tuple):
            module.normalized_shape = (int(keep.numel()),)
        small = type(module).forward(module, x.index_select(-1, keep))
    finally:
        module._parameters.update(saved)
        if isinstance(shape, tuple):
            module.normalized_shape = shape
    out = small.new_zeros((*x.shape[:-1], x.shape[-1]))
    out[..., keep] = small
    return out


@contextmanager
def kept_channels_only(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int]) -> Iterator[None]:
    """Run the dense model as the hidden cut to ``kept`` will compute, without changing a weight: every
    residual-stream norm normalises the kept channels only and passes nothing on the removed ones.

    Exact because nothing reads the residual stream except through those norms: the removed channels'
    values never reach a reader, and the kept ones are what the sliced model carries (Gemma's embedding
    normaliser included: the dense √h·e equals the rescaled √h'·e'). Used by the compensation walk
    (offloaded blocks too: the norms' weights are resident while their block runs).
    """
    keep = torch.tensor(sorted(set(int(i) for i in kept)), dtype=torch.long)
    handles = [norm.register_forward_hook(lambda module, args, output: _kept_norm(module, args[0], keep))
               for norm in adapter.hidden_norms(model)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
