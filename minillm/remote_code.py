"""The generated ``modeling_minillm.py`` for exports whose per-layer widths a stock config cannot express.

Uniform plans produce a stock config that vanilla ``from_pretrained`` loads. Per-layer widths get a
small ``modeling_minillm.py`` registered through ``auto_map`` (load with ``trust_remote_code=True``);
it imports only transformers. Shared by both writers (:mod:`minillm.export`, :mod:`minillm.streaming_export`).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.arch.rebuild import stock_class, stock_rebuilds

REMOTE_CODE_FILE = "modeling_minillm.py"


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
