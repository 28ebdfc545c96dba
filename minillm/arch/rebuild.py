"""Can the stock class rebuild a pruned model from its config? Checked by building it, not assumed.

Whether a config field expresses a width depends on each family's ``__init__`` (GPT-NeoX and StableLM
derive ``head_dim`` from ``hidden_size``; OPT has no ``head_dim`` at all; phi3 reads head counts from
the config at run time). Rather than trusting a list, :func:`stock_rebuilds` builds the stock model on
the ``meta`` device (no memory) from the would-be config and compares every prunable Linear (shape and
bias), every per-head norm and every head-count attribute with the pruned model. Only then does
surgery write the config fields, and only then does the export skip its remote-code file.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, holder
from minillm.errors import UsageError


def stock_class(model: nn.Module) -> type[nn.Module]:
    """The transformers class a model (or one of our per-layer remote-code models) is built from."""
    if type(model).__name__ == "MinillmPrunedForCausalLM":
        return type(model).__mro__[1]
    return type(model)


def _signature(adapter: ArchAdapter, layer: nn.Module) -> list[Any]:
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    parts: list[Any] = [
        (lin.out_features, lin.in_features, lin.bias is not None) for lin in adapter.prunable_linears(layer)
    ]
    parts += [(p.out_features, type(p).__name__) for p in (attn.q, attn.k, attn.v, *mlp.expand)]
    parts += [tuple(norm.module.weight.shape) for norm in attn.norms]
    attributes = adapter.attention_attributes(attn.module, 1, 1)
    parts += sorted(attributes)
    for name in ("head_dim", "head_size", "num_heads", "num_attention_heads", "num_key_value_heads",
                 "num_key_value_groups"):
        value = getattr(attn.module, name, None)
        parts.append(value if isinstance(value, int) else None)
    for name in attributes:
        if name.startswith("config."):  # a head count the forward reads from the block's config
            parts.append(getattr(attn.module.config, name.removeprefix("config.")))
    return parts


def stock_rebuilds(model: nn.Module, adapter: ArchAdapter, update: dict[str, Any] | None = None) -> bool:
    """True when the stock class built from ``model.config`` (+ ``update``) has ``model``'s widths."""
    config = copy.deepcopy(model.config)
    for key, value in (update or {}).items():
        setattr(config, key, value)
    for key in ("auto_map", "minillm_layer_shapes", "minillm_module_attributes", "minillm_param_shapes"):
        if key in config.__dict__:
            delattr(config, key)
    try:
        with torch.device("meta"):
            stock = stock_class(model)(config)
    except (ValueError, TypeError, RuntimeError):
        return False  # the config rejects these widths (e.g. hidden_size % num_attention_heads)
    ours = adapter.decoder_layers(model)
    try:  # the stock build may not even be recognised (phi's qk_layernorm sized hidden // heads)
        theirs = adapter.decoder_layers(stock)
        if len(ours) != len(theirs):
            return False
        pairs = zip(ours, theirs, strict=True)
        return all(_signature(adapter, a) == _signature(adapter, b) for a, b in pairs)
    except UsageError:
        return False


__all__ = ["holder", "stock_class", "stock_rebuilds"]
