"""Bias compensation: fold the mean output of removed groups into the closing projection's bias.

FLAP's observation: a removed channel ``j`` contributed ``W[:, j] · x_j`` to the closing projection's
output; replacing ``x_j`` by its calibration mean ``x̄_j`` keeps the first moment of the output, and the
constant ``Σ_{j removed} W[:, j] · x̄_j`` is a bias. Applied to the *dense* model before surgery (or
before masking, for the mask ≡ surgery check), so both see exactly the same compensation. Projections
without a bias gain one; the export then records it (see :mod:`minillm.export`), so the checkpoint
loads with the bias instead of silently dropping it.

``--compensation bias`` folds the same quantity block by block on the pruned prefix
(:func:`minillm.compensation.refit.fold_mean`); :func:`fold_removed_means` here folds the dense model's
means (what ``compare`` uses for FLAP). :func:`set_closings` writes compensated closing projections
(the sequential pass's results for offloaded blocks) into a model or a meta skeleton; the bias helpers
below then make any bias a closing projection gained loadable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.plan import PrunePlan


@torch.no_grad()
def _fold(linear: nn.Linear, columns: list[int], mean: torch.Tensor) -> None:
    if not columns:
        return
    index = torch.tensor(columns, dtype=torch.long, device=linear.weight.device)
    shift = linear.weight.index_select(1, index).double() @ mean.to(linear.weight.device).double()[index]
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)
    linear.bias.add_(shift.to(linear.bias.dtype))


def fold_removed_means(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
                       means: dict[str, torch.Tensor]) -> None:
    """Add ``W[:, removed] @ mean[removed]`` to each closing projection's bias (dense model, in place)."""
    layers = adapter.decoder_layers(model)
    head_dim = adapter.head_dim(model.config)
    for layer_plan in plan.layers:
        layer = layers[layer_plan.index]
        shape = adapter.layer_shape(model, layer_plan.index)
        attn_mean = means.get(f"{layer_plan.index}.attn")
        if attn_mean is not None:
            removed = sorted(set(range(shape.num_heads)) - set(layer_plan.heads))
            columns = [h * head_dim + d for h in removed for d in range(head_dim)]
            _fold(adapter.attention(layer).o, columns, attn_mean)
        mlp_mean = means.get(f"{layer_plan.index}.mlp")
        if mlp_mean is not None:
            removed = sorted(set(range(shape.intermediate)) - set(layer_plan.channels))
            _fold(adapter.mlp(layer).closing, removed, mlp_mean)


@torch.no_grad()
def set_closings(model: nn.Module, adapter: ArchAdapter, updates: dict[int, dict[str, Any]],
                 layers: list[int] | None = None) -> None:
    """Give closing projections their compensated weight and bias (``{layer: {"attn"|"mlp": update}}``,
    updates with ``.weight`` / ``.bias``). On a meta skeleton only the bias's existence matters."""
    blocks = adapter.decoder_layers(model)
    for index, families in updates.items():
        if layers is not None and index not in layers:
            continue
        for family, update in families.items():
            linear = adapter.closings(blocks[index])[family]
            device, dtype = linear.weight.device, linear.weight.dtype
            if device.type != "meta":  # new tensors: the old ones may be shared with the source model
                linear.weight = nn.Parameter(update.weight.to(device, dtype, copy=True), requires_grad=False)
            if update.bias is not None:
                bias = (torch.zeros(linear.out_features, dtype=dtype, device=device) if device.type == "meta"
                        else update.bias.to(device, dtype, copy=True))
                linear.bias = nn.Parameter(bias, requires_grad=False)


def expressible_biases(model: nn.Module, adapter: ArchAdapter) -> dict[str, str]:
    """Structure families ("attn", "mlp") whose closing projection gained a bias that a config flag of the
    stock class can express (e.g. Llama's ``attention_bias`` / ``mlp_bias``), mapped to that flag."""
    flags = adapter.bias_config_flags(model.config)
    return {
        family: flag
        for family, flag in flags.items()
        if not getattr(model.config, flag, False)
        and any(adapter.closings(layer)[family].bias is not None for layer in adapter.decoder_layers(model))
    }


@torch.no_grad()
def express_biases(model: nn.Module, adapter: ArchAdapter, families: dict[str, str],
                   layers: list[nn.Module] | None = None) -> None:
    """Turn on the families' config flags and give their other projections zero biases.

    The stock class then rebuilds the model exactly, so the export loads with vanilla ``from_pretrained``
    (no remote code) — at the price of a zero bias per output of q/k/v (attention) or gate/up (MLP),
    about 0.1% of a Llama's parameters, counted in the reported parameter totals like any other.
    """
    for flag in families.values():
        setattr(model.config, flag, True)
    for layer in adapter.decoder_layers(model) if layers is None else layers:
        linears = []
        if "attn" in families:
            attn = adapter.attention(layer)
            linears += [attn.q, attn.k, attn.v, attn.o]
        if "mlp" in families:
            mlp = adapter.mlp(layer)
            linears += [*mlp.expand, mlp.closing]
        for linear in linears:
            if linear.bias is None:
                linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                                       device=linear.weight.device), requires_grad=False)


def compensate(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
               means: dict[str, torch.Tensor]) -> dict[str, str]:
    """:func:`fold_removed_means`, then :func:`express_biases` where the config can.

    Returns the families expressed through config flags (empty when the export needs remote code)."""
    fold_removed_means(model, adapter, plan, means)
    families = expressible_biases(model, adapter)
    express_biases(model, adapter, families)
    return families
