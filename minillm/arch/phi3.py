"""Phi-3: fused ``qkv_proj`` (``[q; k; v]``) and ``gate_up_proj`` (``[gate; up]``), which the structural
adapter cuts by row blocks; the attention forward finds the q/k split at
``self.config.num_attention_heads · head_dim``, so per-layer head counts give the block its own config.
"""

from __future__ import annotations

from torch import nn

from minillm.arch.structural import StructuralAdapter


class Phi3Adapter(StructuralAdapter):
    model_types = ("phi3",)

    def attention_attributes(self, module: nn.Module, num_heads: int, num_kv_heads: int) -> dict[str, int]:
        return {**super().attention_attributes(module, num_heads, num_kv_heads),
                "config.num_attention_heads": num_heads}
