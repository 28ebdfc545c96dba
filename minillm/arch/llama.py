"""Llama-style decoders: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (per-head q_norm/k_norm).

They share module names (``model.layers[i].self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj``),
so one adapter serves them. Qwen2's q/k/v biases are sliced with their rows; Qwen3's q_norm/k_norm
act on ``head_dim`` and are shared by all heads, so removing heads leaves them untouched.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter, AttentionLinears, MlpLinears


class LlamaAdapter(ArchAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")
    hidden_pruning = True  # pre-norm, RMSNorm, nothing else sized by hidden_size

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.model.layers

    def attention(self, layer: nn.Module) -> AttentionLinears:
        attn = layer.self_attn
        return AttentionLinears(module=attn, q=attn.q_proj, k=attn.k_proj, v=attn.v_proj, o=attn.o_proj)

    def mlp(self, layer: nn.Module) -> MlpLinears:
        mlp = layer.mlp
        return MlpLinears(module=mlp, expand=(mlp.gate_proj, mlp.up_proj), closing=mlp.down_proj)

    def bias_config_flags(self, config: Any) -> dict[str, str]:
        # Llama: attention_bias (q/k/v/o) and mlp_bias (gate/up/down); Qwen3: attention_bias only;
        # Mistral and Qwen2 build fixed biases (none / q,k,v only) with no flag.
        return {"llama": {"attn": "attention_bias", "mlp": "mlp_bias"},
                "qwen3": {"attn": "attention_bias"}}.get(config.model_type, {})
