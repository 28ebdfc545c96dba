"""Apply a prune plan: physically slice Linear rows/columns, or (for checking) mask groups to zero.

Physical removal keeps, per layer, the planned query heads (q rows, o columns), key/value heads
(k and v rows) and MLP channels (rows of each expanding projection, columns of the closing one), then
sets the attention block's width-dependent attributes through the adapter. A fused projection (qkv,
gate_up) is cut once, keeping the union of its parts' kept rows in their original order, which is the
re-fused layout. Norms that cover heads are sliced with them. Biases of sliced rows are sliced with
them; the closing projections' biases are untouched.

Masking zeroes the closing-projection columns of every removed group. A group whose output columns are
zero contributes nothing, so the masked dense model and the physically pruned model compute the same
function: the invariant the tests assert for every architecture. A norm whose statistic spans all heads
(OLMo 2's ``q_norm``) also sees the removed heads; the mask then zeroes their q/k rows and rescales the
norm so the kept heads are normalised as they are after the cut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from minillm.arch.base import (
    ArchAdapter,
    AttentionLinears,
    HeadNorm,
    holder,
    holder_rows,
    set_module_attribute,
)
from minillm.arch.rebuild import stock_rebuilds
from minillm.errors import UsageError
from minillm.plan import LayerPlan, PrunePlan
from minillm.slicing import slice_linear


def _head_rows(heads: Sequence[int], head_dim: int, device: torch.device) -> torch.Tensor:
    index = torch.tensor(list(heads), dtype=torch.long, device=device)
    return (index[:, None] * head_dim + torch.arange(head_dim, device=device)[None, :]).reshape(-1)


@torch.no_grad()
def _slice_norm(norm: HeadNorm, heads: Sequence[int], head_dim: int) -> None:
    """Keep the kept heads' entries of every parameter of a per-head norm (``(heads, hd)`` or flat)."""
    for name, param in list(norm.module.named_parameters(recurse=False)):
        if param.dim() == 2:
            index = torch.tensor(list(heads), dtype=torch.long, device=param.device)
        else:
            index = _head_rows(heads, head_dim, param.device)
        setattr(norm.module, name, nn.Parameter(param.index_select(0, index).clone(),
                                                requires_grad=param.requires_grad))


def _cut_rows(cuts: dict[nn.Linear, list[torch.Tensor]]) -> None:
    """Slice each holder Linear once to the union of the rows its parts keep (original order)."""
    for linear, parts in cuts.items():
        rows = torch.cat(parts).sort().values
        if rows.numel() != linear.out_features:
            slice_linear(linear, rows, 0)


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


def _cut_attention(attn: AttentionLinears, adapter: ArchAdapter, plan: LayerPlan, head_dim: int) -> None:
    device = holder(attn.q).weight.device
    q_rows = _head_rows(plan.heads, head_dim, device)
    kv_rows = _head_rows(plan.kv_heads, head_dim, device)
    cuts: dict[nn.Linear, list[torch.Tensor]] = {}
    for projection, rows in ((attn.q, q_rows), (attn.k, kv_rows), (attn.v, kv_rows)):
        cuts.setdefault(holder(projection), []).append(holder_rows(projection, rows))
    _cut_rows(cuts)
    slice_linear(attn.o, q_rows, 1)
    for norm in attn.norms:
        _slice_norm(norm, plan.heads if norm.kind == "q" else plan.kv_heads, head_dim)
    for name, value in adapter.attention_attributes(attn.module, len(plan.heads), len(plan.kv_heads)).items():
        set_module_attribute(attn.module, name, value)


def apply_plan(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> None:
    """Physically remove what ``plan`` drops, in place."""
    layers = adapter.decoder_layers(model)
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        shape = adapter.layer_shape(model, layer_plan.index)
        validate_layer_plan(layer_plan, shape.num_heads, shape.num_kv_heads)
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        if len(layer_plan.heads) != shape.num_heads or len(layer_plan.kv_heads) != shape.num_kv_heads:
            _cut_attention(attn, adapter, layer_plan, shape.head_dim)
        if len(layer_plan.channels) != shape.intermediate:
            channels = torch.tensor(layer_plan.channels, dtype=torch.long)
            cuts: dict[nn.Linear, list[torch.Tensor]] = {}
            for projection in mlp.expand:
                cuts.setdefault(holder(projection), []).append(holder_rows(projection, channels))
            _cut_rows(cuts)
            slice_linear(mlp.closing, channels, 1)
    if plan.hidden is not None:  # the other axes (issue 17): hidden size (before the config's head count
        from minillm.surgery_hidden import slice_hidden  # is set: it must divide the new hidden size)

        heads = {len(p.heads) for p in plan.layers}
        slice_hidden(model, adapter, plan.hidden, heads.pop() if len(heads) == 1 else None)
    if plan.is_uniform() and plan.layers and len(plan.layers) == len(layers):
        update = adapter.uniform_config_update(model.config, adapter.layer_shape(model, plan.layers[0].index))
        if update is not None and stock_rebuilds(model, adapter, update):
            for key, value in update.items():
                setattr(model.config, key, value)
    if plan.kept_layers is not None:  # then whole layers
        from minillm.surgery_depth import remove_layers

        remove_layers(model, adapter, plan.kept_layers)


@torch.no_grad()
def _mask_spanning_norm(attn: AttentionLinears, norm: HeadNorm, removed: list[int], total: int,
                        head_dim: int) -> None:
    """Zero the removed heads' rows feeding a norm over all heads, and rescale it for the kept ones.

    With ``r`` of ``n`` entries zero, an RMS over all ``n`` is ``sqrt(k/n)`` times the RMS over the
    ``k`` kept ones (``eps`` scaled by ``k/n`` too), so weight ``·sqrt(k/n)`` gives exactly the cut norm.
    """
    projection = attn.q if norm.kind == "q" else attn.k
    rows = holder_rows(projection, _head_rows(removed, head_dim, holder(projection).weight.device))
    linear = holder(projection)
    linear.weight[rows] = 0
    if linear.bias is not None:
        linear.bias[rows] = 0
    kept_fraction = (total - len(removed)) / total
    norm.module.weight.mul_(kept_fraction ** 0.5)
    for eps_name in ("variance_epsilon", "eps"):
        if isinstance(getattr(norm.module, eps_name, None), float):
            setattr(norm.module, eps_name, getattr(norm.module, eps_name) * kept_fraction)


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
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        shape = adapter.layer_shape(model, layer_plan.index)
        head_dim = shape.head_dim
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        removed_heads = sorted(set(range(shape.num_heads)) - set(layer_plan.heads))
        if removed_heads:
            attn.o.weight[:, _head_rows(removed_heads, head_dim, attn.o.weight.device)] = 0
        removed_kv = sorted(set(range(shape.num_kv_heads)) - set(layer_plan.kv_heads))
        for norm in attn.norms:
            removed, total = removed_heads, shape.num_heads
            if norm.kind == "k":
                removed, total = removed_kv, shape.num_kv_heads
            if norm.spans_heads and removed:
                _mask_spanning_norm(attn, norm, removed, total, head_dim)
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
