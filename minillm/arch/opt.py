"""OPT decoders: biases everywhere, ``fc1``/``fc2`` MLP, multi-head attention (no GQA).

OPT's attention derives ``head_dim = hidden_size // num_attention_heads`` and reshapes with the
module attribute ``num_heads``, so the config cannot express fewer heads: head-pruned OPT exports go
through the per-layer (remote-code) path, which sets ``num_heads`` per block. MLP-only pruning is
expressed by ``ffn_dim`` and loads with vanilla transformers.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter, AttentionLinears, LayerShape, MlpLinears


class OptAdapter(ArchAdapter):
    model_types = ("opt",)

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.decoder.layers

    def attention(self, layer: nn.Module) -> AttentionLinears:
        attn = layer.self_attn
        return AttentionLinears(module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.out_proj)

    def mlp(self, layer: nn.Module) -> MlpLinears:
        return MlpLinears(module=layer, expand=(layer.fc1,), closing=layer.fc2)

    def hidden_pruning_blocker(self, config: Any) -> str | None:
        return ("--structures hidden has no exact form for opt: its attention derives head_dim = "
                "hidden_size / num_attention_heads; prune attn, mlp or layers")

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config: Any) -> int:
        return int(config.num_attention_heads)

    def intermediate_size(self, config: Any) -> int:
        return int(config.ffn_dim)

    def attention_attributes(self, module: nn.Module, num_heads: int, num_kv_heads: int) -> dict[str, int]:
        return {"num_heads": num_heads}

    def uniform_config_update(self, config: Any, shape: LayerShape) -> dict[str, int] | None:
        if shape.num_heads != config.num_attention_heads:
            return None
        return {"ffn_dim": shape.intermediate}
