"""``inspect``: what a model is made of and how far it can be pruned, without loading its weights.

The model is built from its config on the ``meta`` device (shapes, no memory, no download of weights),
so hub ids, local folders, GGUF files and minillm exports (per-layer widths via their remote-code file)
all cost only the config. Parameters are counted from that model, tied embeddings once, and split by
part; reachable ratios use the same per-group costs as planning (:func:`minillm.groups.layer_costs`)
and keep at least one head unit and one channel per layer, as :mod:`minillm.plan` does.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minillm.arch import adapter_for
from minillm.arch.base import ArchAdapter, RowBlock, holder
from minillm.errors import UsageError
from minillm.groups import layer_costs, prunable_layers

PARTS = ("embeddings", "attention", "mlp", "norms", "lm_head", "other")


@dataclass
class LayerGroups:
    """Prunable groups of one decoder layer and the parameters one of each removes."""

    layer: int
    heads: int
    kv_heads: int
    head_dim: int
    channels: int
    query_head_cost: int
    kv_head_cost: int
    channel_cost: int
    params: int


@dataclass
class ModelInfo:
    source: str
    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    tied_embeddings: bool
    total_params: int
    params_by_part: dict[str, int]
    layers: list[LayerGroups]
    reachable: dict[str, float]
    skip_first: int = 0
    skip_last: int = 0
    export: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _meta_model(source: str, trust_remote_code: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """The model skeleton on the meta device, and the export's minillm.json ({} if not an export)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from minillm.export import read_metadata
    from minillm.loading import _split_gguf, check_remote_code

    folder, gguf_file = _split_gguf(source)
    metadata = read_metadata(folder) if Path(folder).is_dir() else {}
    if gguf_file is None and not Path(folder).exists() and folder.startswith((".", "/")):
        raise UsageError(f"model folder {source!r} does not exist")
    check_remote_code(source, trust_remote_code)  # a minillm.json in the folder grants nothing
    trust = trust_remote_code
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=gguf_file, trust_remote_code=trust)
    except OSError as exc:
        raise UsageError(f"cannot load a model config from {source!r}: {str(exc).splitlines()[0]}") from exc
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    return model, metadata


def params_by_part(model: nn.Module) -> dict[str, int]:
    """Distinct parameters split into embeddings, attention, MLP, norms, lm_head (untied) and other."""
    adapter = adapter_for(model.config)
    part: dict[int, str] = {}
    for layer in adapter.decoder_layers(model):
        attn, mlp = adapter.attention(layer), adapter.mlp(layer)
        for p in attn.module.parameters():
            part[id(p)] = "attention"
        for linear in dict.fromkeys(holder(p) for p in (*mlp.expand, mlp.closing)):
            for p in linear.parameters():
                part[id(p)] = "mlp"
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            for p in module.parameters():
                part.setdefault(id(p), "embeddings")
        elif "norm" in type(module).__name__.lower():
            for p in module.parameters(recurse=False):
                part.setdefault(id(p), "norms")
    output = model.get_output_embeddings()
    if output is not None:
        for p in output.parameters():
            part.setdefault(id(p), "lm_head")  # tied weights were already counted as embeddings
    totals = dict.fromkeys(PARTS, 0)
    for p in model.parameters():  # deduplicated: a tied weight appears once
        totals[part.get(id(p), "other")] += p.numel()
    return totals


def structure(model: nn.Module, adapter: ArchAdapter) -> dict[str, str]:
    """What the adapter recognised in the first decoder layer and what a cut touches, in words."""
    names = {module: name.rsplit(".", 1)[-1] for name, module in model.named_modules()}
    layer = adapter.decoder_layers(model)[0]
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    shape = adapter.layer_shape(model, 0)
    if isinstance(attn.q, RowBlock):
        qkv = f"fused {names[holder(attn.q)]} (q/k/v row blocks cut and re-fused)"
    else:
        qkv = "/".join(names[p] for p in (attn.q, attn.k, attn.v))
    norms = ", ".join(
        f"{names[n.module]} ({'over all heads' if n.spans_heads else 'per head'}, sliced)" for n in attn.norms
    )
    listed = {n.module for n in attn.norms}
    shared = [name for name in ("q_norm", "k_norm", "q_layernorm", "k_layernorm")
              if isinstance(getattr(attn.module, name, None), nn.Module)
              and getattr(attn.module, name) not in listed]
    if shared:
        norms = ", ".join(filter(None, [norms, f"{'/'.join(shared)} (per head_dim, kept)"]))
    expand = [names[holder(p)] for p in mlp.expand]
    kind = "gated" if len(mlp.expand) == 2 else "plain"
    if len(set(expand)) < len(expand):
        expand = [f"fused {expand[0]} ([gate; up] halves)"]
    mode = "query heads only (one key/value head)" if shape.num_kv_heads == 1 < shape.num_heads else (
        "whole key/value groups (kv) or query heads evenly (query)")
    return {
        "adapter": type(adapter).__name__,
        "attention": f"{qkv} → {names[attn.o]}",
        "head norms": norms or "none",
        "mlp": f"{kind}: {' + '.join(dict.fromkeys(expand))} → {names[mlp.closing]}",
        "attention cuts": mode,
    }


def _layer_groups(model: nn.Module) -> list[LayerGroups]:
    adapter = adapter_for(model.config)
    rows = []
    for i, layer in enumerate(adapter.decoder_layers(model)):
        shape = adapter.layer_shape(model, i)
        costs = layer_costs(adapter, layer, shape)
        rows.append(
            LayerGroups(
                i,
                shape.num_heads,
                shape.num_kv_heads,
                shape.head_dim,
                shape.intermediate,
                costs.query_head,
                costs.kv_head,
                costs.channel,
                sum(p.numel() for p in layer.parameters()),
            )
        )
    return rows


def _capacity(row: LayerGroups, attention: str, mlp: bool) -> int:
    """Most parameters the layer can lose while keeping one head unit and one channel."""
    group = row.heads // row.kv_heads
    heads = 0
    if attention == "kv" or (attention == "query" and group == 1):  # MHA: a query head is its kv group
        heads = (row.kv_heads - 1) * (group * row.query_head_cost + row.kv_head_cost)
    elif attention == "query":
        heads = (group - 1) * row.kv_heads * row.query_head_cost
    channels = (row.channels - 1) * row.channel_cost if mlp else 0
    return heads + channels


def reachable_ratios(
    layers: list[LayerGroups], total: int, skip_first: int = 0, skip_last: int = 0
) -> dict[str, float]:
    """Largest ``--ratio`` per setting; ``global`` sums every layer's capacity, ``uniform`` is bounded
    by the smallest layer (every pruned layer loses the same amount)."""
    chosen = [layers[i] for i in prunable_layers(len(layers), skip_first, skip_last)]
    settings = {
        "attention+mlp (head_mode kv)": ("kv", True),
        "attention+mlp (head_mode query)": ("query", True),
        "mlp only": ("none", True),
        "attention only (head_mode kv)": ("kv", False),
    }
    result = {}
    for name, (attention, mlp) in settings.items():
        capacities = [_capacity(row, attention, mlp) for row in chosen]
        result[f"{name}, global"] = sum(capacities) / total
        result[f"{name}, uniform"] = min(capacities) * len(capacities) / total
    return result


def inspect_model(source: str | nn.Module, skip_first: int = 0, skip_last: int = 0,
                  trust_remote_code: bool = False) -> ModelInfo:
    """Architecture, groups per layer, parameters by part and reachable ratios of ``source``."""
    if isinstance(source, nn.Module):
        model, metadata, name = source, {}, getattr(source.config, "_name_or_path", "in-memory model")
    else:
        (model, metadata), name = _meta_model(source, trust_remote_code), source
    config = model.config
    layers = _layer_groups(model)
    parts = params_by_part(model)
    total = sum(parts.values())
    export = {}
    if metadata:
        export = {
            key: metadata.get(key)
            for key in (
                "base_model",
                "criterion",
                "params_before",
                "params_after",
                "achieved_ratio",
                "layer_widths",
                "recipe",
                "command",
            )
        }
        export["plan"] = {
            k: metadata.get("plan", {}).get(k) for k in ("allocation", "head_mode", "target_ratio")
        }
    output = model.get_output_embeddings()
    tied = output is not None and output.weight is model.get_input_embeddings().weight
    return ModelInfo(
        source=name,
        model_type=config.model_type,
        architecture=type(model).__name__,
        num_layers=len(layers),
        hidden_size=int(config.hidden_size),
        vocab_size=int(config.vocab_size),
        tied_embeddings=bool(tied),
        total_params=total,
        params_by_part=parts,
        layers=layers,
        reachable=reachable_ratios(layers, total, skip_first, skip_last),
        skip_first=skip_first,
        skip_last=skip_last,
        export=export,
        structure=structure(model, adapter_for(config)),
    )
