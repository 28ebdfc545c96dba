"""Atomic export of a pruned model: safetensors, config, tokenizer, ``minillm.json`` and a model card.

Everything is written to a temporary folder beside ``out`` and renamed into place at the end, so a
failure never leaves a half-written checkpoint. Uniform plans produce a stock config that vanilla
``from_pretrained`` loads. Per-layer widths get a small ``modeling_minillm.py`` registered through
``auto_map`` (load with ``trust_remote_code=True``); it imports only transformers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.arch.rebuild import stock_class, stock_rebuilds
from minillm.output_guard import atomic_output_dir, check_output_dir

__all__ = ["atomic_output_dir", "check_output_dir", "read_metadata", "save_pruned"]

REMOTE_CODE_FILE = "modeling_minillm.py"
METADATA_FILE = "minillm.json"


def _layer_shape_overrides(model: nn.Module, adapter: ArchAdapter) -> tuple[dict, dict, dict]:
    """Linear shapes, per-head norm parameter shapes and attention attributes of every layer."""
    names = {module: name for name, module in model.named_modules()}
    shapes: dict[str, list[int]] = {}
    params: dict[str, list[int]] = {}
    attributes: dict[str, dict[str, int]] = {}
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for linear in adapter.prunable_linears(layer):
            shapes[names[linear]] = [linear.out_features, linear.in_features, linear.bias is not None]
        attn = adapter.attention(layer)
        linears = {id(p) for lin in adapter.prunable_linears(layer) for p in lin.parameters()}
        for pname, param in attn.module.named_parameters():  # q/k norms, whatever their reading
            if id(param) not in linears:
                params[f"{names[attn.module]}.{pname}"] = list(param.shape)
        shape = adapter.layer_shape(model, index)
        attributes[names[attn.module]] = adapter.attention_attributes(attn.module, shape.num_heads,
                                                                      shape.num_kv_heads)
    return shapes, params, attributes


def _remote_code(base_class: str) -> str:
    template = resources.files("minillm").joinpath("templates/modeling_minillm.py.tmpl").read_text()
    return template.replace("{base_class}", base_class)


def add_remote_code(model: nn.Module, adapter: ArchAdapter, folder: Path, metadata: dict) -> dict:
    """If the stock config cannot express ``model``'s widths, record them in its config, point
    ``auto_map`` at a generated ``modeling_minillm.py`` written to ``folder``, and return ``metadata``
    marked ``trust_remote_code``; otherwise return ``metadata`` unchanged. Shared by both exporters."""
    if not needs_remote_code(model, adapter):
        return metadata
    shapes, params, attributes = _layer_shape_overrides(model, adapter)
    base_class = stock_class(model).__name__  # re-exporting one of our own per-layer models: its base
    config = model.config
    config.minillm_layer_shapes = shapes
    config.minillm_param_shapes = params
    config.minillm_module_attributes = attributes
    config.auto_map = {"AutoModelForCausalLM": "modeling_minillm.MinillmPrunedForCausalLM"}
    (folder / REMOTE_CODE_FILE).write_text(_remote_code(base_class))
    return {**metadata, "trust_remote_code": True}


def needs_remote_code(model: nn.Module, adapter: ArchAdapter) -> bool:
    """True when the stock class built from the config would not have these widths, head counts or
    biases (a vanilla load would fail, or silently drop e.g. a bias gained by FLAP's compensation)."""
    return not stock_rebuilds(model, adapter)


def save_pruned(model: nn.Module, tokenizer: Any, adapter: ArchAdapter, out: str | Path, metadata: dict,
                card: str, overwrite: bool = False, max_shard_size: str | int = "5GB",
                extra_files: Callable[[Path], None] | None = None, force: bool = False,
                inputs: Iterable[str | Path] = ()) -> Path:
    """Write the export atomically (rules of :mod:`minillm.output_guard`); returns the final folder."""
    with atomic_output_dir(out, overwrite, force, inputs) as tmp:
        metadata = add_remote_code(model, adapter, tmp, metadata)
        model.save_pretrained(tmp, safe_serialization=True, max_shard_size=max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / METADATA_FILE).write_text(json.dumps(metadata, indent=1, default=str))
        (tmp / "README.md").write_text(card)
        if extra_files is not None:
            extra_files(tmp)
    return Path(out)


def read_metadata(folder: str | Path) -> dict[str, Any]:
    """``minillm.json`` of an export ({} when the folder is not an export); a corrupt one is an error."""
    path = Path(folder) / METADATA_FILE
    if not path.is_file():
        return {}
    from minillm.loading import read_json_mapping

    return read_json_mapping(path, "re-export the model or remove the file")
