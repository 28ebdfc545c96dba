"""Apply a prune plan: physically slice Linear rows/columns, or (for checking) mask groups to zero.

Physical removal keeps, per layer, the planned query heads (q rows, o columns), key/value heads
(k and v rows) and MLP channels (rows of each expanding projection, columns of the closing one), then
sets the attention block's width-dependent attributes through the adapter. Biases of sliced rows are
sliced with them; the closing projections' biases are untouched.

Masking zeroes the closing-projection columns of every removed group. A group whose output columns are
zero contributes nothing, so the masked dense model and the physically pruned model compute the same
function: the invariant the tests assert for every architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError
from minillm.plan import LayerPlan, PrunePlan


def _head_rows(heads: Sequence[int], head_dim: int, device: torch.device) -> torch.Tensor:
    index = torch.tensor(list(heads), dtype=torch.long, device=device)
    return (index[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


@torch.no_grad()
def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of the weight (0 = outputs, also slicing the bias; 1 = inputs)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = weight.shape[0]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = weight.shape[1]


def validate_layer_plan(plan: LayerPlan, num_heads: int, num_kv_heads: int) -> None:
    """A plan is valid if it keeps something and every kept kv head serves equally many query heads."""
    if not plan.heads or not plan.channels or not plan.kv_heads:
        raise UsageError(f"the plan empties layer {plan.index}; keep at least one head and one channel")
    group = num_heads // num_kv_heads
    kept_kv = set(plan.kv_heads)
    per_kv: dict[int, int] = {}
    for head in plan.heads:
        if head // group not in kept_kv:
            raise UsageError(f"layer {plan.index}: query head {head} reads a removed key/value head")
        per_kv[head // group] = per_kv.get(head // group, 0) + 1
    if set(per_kv) != kept_kv or len(set(per_kv.values())) != 1:
        raise UsageError(
            f"layer {plan.index}: kept query heads are not spread evenly over the kept key/value heads "
            "(GQA needs an integer num_key_value_groups)"
        )


def apply_plan(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> None:
    """Physically remove what ``plan`` drops, in place."""
    layers = adapter.decoder_layers(model)
    head_dim = adapter.head_dim(model.config)
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        shape = adapter.layer_shape(model, layer_plan.index)
        validate_layer_plan(layer_plan, shape.num_heads, shape.num_kv_heads)
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        device = attn.q.weight.device
        if len(layer_plan.heads) != shape.num_heads or len(layer_plan.kv_heads) != shape.num_kv_heads:
            q_rows = _head_rows(layer_plan.heads, head_dim, device)
            kv_rows = _head_rows(layer_plan.kv_heads, head_dim, device)
            _slice_linear(attn.q, q_rows, 0)
            _slice_linear(attn.k, kv_rows, 0)
            _slice_linear(attn.v, kv_rows, 0)
            _slice_linear(attn.o, q_rows, 1)
            attributes = adapter.attention_attributes(len(layer_plan.heads), len(layer_plan.kv_heads))
            for name, value in attributes.items():
                setattr(attn.module, name, value)
        if len(layer_plan.channels) != shape.intermediate:
            channels = torch.tensor(layer_plan.channels, dtype=torch.long)
            for linear in mlp.expand:
                _slice_linear(linear, channels, 0)
            _slice_linear(mlp.closing, channels, 1)
    if plan.is_uniform() and plan.layers and len(plan.layers) == len(layers):
        update = adapter.uniform_config_update(model.config, plan.layers[0].shape(head_dim))
        if update is not None:
            for key, value in update.items():
                setattr(model.config, key, value)
    if plan.hidden is not None:  # the other axes (issue 17): hidden size, then whole layers
        from minillm.surgery_hidden import slice_hidden

        slice_hidden(model, adapter, plan.hidden)
    if plan.kept_layers is not None:
        from minillm.surgery_depth import remove_layers

        remove_layers(model, adapter, plan.kept_layers)


@torch.no_grad()
def mask_plan(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> None:
    """Zero the closing-projection columns of every group ``plan`` removes (dense shapes kept).

    Hidden channels and whole layers have no zero-mask equivalent (RMSNorm averages over the kept
    channels; a skipped layer is not a zeroed one): plans cutting them are refused here.
    """
    if plan.hidden is not None or plan.kept_layers is not None:
        raise UsageError("masking covers heads and MLP channels only; this plan also cuts hidden channels "
                         "or whole layers (apply it with apply_plan)")
    layers = adapter.decoder_layers(model)
    head_dim = adapter.head_dim(model.config)
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        shape = adapter.layer_shape(model, layer_plan.index)
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        removed_heads = sorted(set(range(shape.num_heads)) - set(layer_plan.heads))
        if removed_heads:
            attn.o.weight[:, _head_rows(removed_heads, head_dim, attn.o.weight.device)] = 0
        removed_channels = sorted(set(range(shape.intermediate)) - set(layer_plan.channels))
        if removed_channels:
            mlp.closing.weight[:, torch.tensor(removed_channels, device=mlp.closing.weight.device)] = 0


def pruned_widths(plan: PrunePlan) -> list[dict[str, int]]:
    """Per-layer widths after the plan, for summaries and model cards (removed layers left out; ``layer``
    is the original index)."""
    kept = None if plan.kept_layers is None else set(plan.kept_layers)
    return [
        {"layer": p.index, "heads": len(p.heads), "kv_heads": len(p.kv_heads), "channels": len(p.channels)}
        for p in plan.layers if kept is None or p.index in kept
    ]
