"""GPT-NeoX (Pythia): one fused ``query_key_value`` interleaved per head, ``[q_h; k_h; v_h]``.

The forward views the fused output as ``(…, heads, 3·head_size)`` and chunks the last dimension, so
head ``h``'s q, k and v rows sit together; cutting a head removes its ``3·head_size`` rows at once
(multi-head attention: every query head is its own key/value head). ``head_size`` is derived from
``hidden_size // num_attention_heads``, so the config cannot express fewer heads: head-pruned exports
take the per-layer (remote-code) path, MLP-only ones set ``intermediate_size``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.arch.base import LayerShape, Projection, RowBlock
from minillm.arch.structural import StructuralAdapter


class GptNeoxAdapter(StructuralAdapter):
    model_types = ("gpt_neox",)

    def _projections(self, attn: nn.Module) -> tuple[Projection, ...]:
        fused, head_dim = attn.query_key_value, attn.head_size
        heads = fused.out_features // (3 * head_dim)
        base = torch.arange(heads)[:, None] * 3 * head_dim + torch.arange(head_dim)[None, :]
        return tuple(RowBlock(fused, (base + part * head_dim).reshape(-1)) for part in range(3))

    def hidden_pruning_blocker(self, config: Any) -> str | None:
        return ("--structures hidden has no exact form for gpt_neox: its attention derives head_size = "
                "hidden_size / num_attention_heads; prune attn, mlp or layers")

    def num_kv_heads(self, config: Any) -> int:
        return int(config.num_attention_heads)

    def head_dim(self, config: Any) -> int:
        return config.hidden_size // config.num_attention_heads

    def uniform_config_update(self, config: Any, shape: LayerShape) -> dict[str, int] | None:
        if shape.num_heads != config.num_attention_heads:
            return None
        return {"intermediate_size": shape.intermediate}
