"""The structural adapter: a decoder block recognised by what its modules are, not by its family name.

Most current decoders (Llama, Mistral, Qwen, Gemma 1–3, Granite, OLMo 2/3, SmolLM3, Cohere, StarCoder2,
Phi, Ministral, EXAONE 4, GLM-4, InternLM3, …) are the same block with different names and small
extras. This adapter finds, in each decoder layer:

* an attention module (``self_attn``/``attention``/``attn``) with separate ``q_proj``/``k_proj``/
  ``v_proj`` or a fused ``qkv_proj`` laid out ``[q; k; v]``, and a closing ``o_proj``/``dense``/
  ``out_proj``; q/k norms are classified from their weight shapes (per head_dim: shared, left alone;
  per head: sliced with the heads);
* an MLP (``mlp``/``feed_forward``, or the layer itself) that is gated (``gate_proj``+``up_proj`` →
  ``down_proj``, or a fused ``gate_up_proj`` halved ``[gate; up]``) or plain (``fc1``→``fc2``,
  ``c_fc``→``c_proj``, ``dense_h_to_4h``→``dense_4h_to_h``, ``up_proj``→``down_proj``).

Widths come from the weights and the config. Anything else is refused with one line naming the part
that is not understood. Families whose block differs subclass this with their own small file.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from minillm.arch.base import (
    ArchAdapter,
    AttentionLinears,
    HeadNorm,
    LayerShape,
    MlpLinears,
    Projection,
    fused_blocks,
)
from minillm.errors import UsageError

ATTENTION_NAMES = ("self_attn", "attention", "attn")
CLOSING_ATTENTION = ("o_proj", "dense", "out_proj")
Q_NORMS = ("q_norm", "q_layernorm")
K_NORMS = ("k_norm", "k_layernorm")
MLP_NAMES = ("mlp", "feed_forward")
PLAIN_MLPS = (
    ("fc1", "fc2"), ("c_fc", "c_proj"), ("dense_h_to_4h", "dense_4h_to_h"), ("up_proj", "down_proj"),
)
#: attention attributes that hold head counts in some family's forward; set when present
HEAD_COUNT_ATTRIBUTES = ("num_heads", "num_attention_heads", "num_key_value_heads", "num_key_value_groups")


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    child = getattr(module, name, None)
    return child if isinstance(child, nn.Linear) else None


class StructuralAdapter(ArchAdapter):
    """Serves any decoder whose blocks it recognises (see the module docstring)."""

    model_types = (
        "llama", "mistral", "qwen2", "qwen3", "granite", "olmo2", "olmo3",
        "smollm3", "cohere", "cohere2", "stablelm", "starcoder2", "phi", "ministral", "exaone4", "glm4",
        "internlm3",
    )
    #: ``{structure: config flag}`` that gives the stock class biases (see ``bias_config_flags``)
    bias_flags: ClassVar[dict[str, dict[str, str]]] = {
        "llama": {"attn": "attention_bias", "mlp": "mlp_bias"},
        "qwen3": {"attn": "attention_bias"},
    }

    #: families whose hidden size :mod:`minillm.surgery_hidden` cuts exactly: nothing but the widths is
    #: sized by ``hidden_size`` and ``head_dim`` is read from the config (tests/test_axes_families.py)
    hidden_pruning_types: ClassVar[frozenset[str]] = frozenset({
        "llama", "mistral", "ministral", "qwen2", "qwen3", "phi3", "phi", "granite", "olmo2", "olmo3",
        "smollm3", "cohere", "cohere2", "starcoder2", "exaone4", "glm4", "internlm3",
    })
    #: families with no closed form for a smaller hidden size, and why
    hidden_blockers: ClassVar[dict[str, str]] = {
        "stablelm": "StableLM's attention derives head_dim = hidden_size / num_attention_heads, so its stock "
                    "class cannot hold a smaller hidden size with the same heads",
    }

    def __init__(self, model_type: str | None = None) -> None:
        self.model_type = model_type
        self.hidden_pruning = model_type in self.hidden_pruning_types  # type: ignore[misc]

    def hidden_pruning_blocker(self, config: Any) -> str | None:
        model_type = getattr(config, "model_type", None)
        reason = self.hidden_blockers.get(model_type or "")
        if model_type == "phi" and getattr(config, "qk_layernorm", False):
            reason = "phi's q/k LayerNorms are sized hidden_size / num_attention_heads (qk_layernorm=True)"
        if reason:
            return (f"--structures hidden has no exact form for {model_type}: {reason}; "
                    "prune attn, mlp or layers")
        return super().hidden_pruning_blocker(config)

    def _refuse(self, part: str) -> UsageError:
        from minillm.arch import supported_model_types

        return UsageError(
            f"unsupported architecture {self.model_type!r}: {part} is not understood (minillm recognises "
            "q/k/v/o or fused qkv attention and gated or two-Linear MLPs; tested families: "
            f"{', '.join(supported_model_types())})"
        )

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        """The ModuleList of ``num_hidden_layers`` blocks that each hold an attention module."""
        count = getattr(model.config, "num_hidden_layers", None)
        for module in model.modules():
            if (isinstance(module, nn.ModuleList) and len(module) == count and len(module) > 0
                    and self._attention_module(module[0]) is not None):
                return module
        raise self._refuse("the list of decoder layers")

    def _attention_module(self, layer: nn.Module) -> nn.Module | None:
        for name in ATTENTION_NAMES:
            child = getattr(layer, name, None)
            if isinstance(child, nn.Module):
                return child
        return None

    def fused_qkv(self, attn: nn.Module, fused: nn.Linear, head_dim: int) -> tuple[Projection, ...]:
        """q, k, v parts of a fused ``qkv_proj`` laid out ``[q; k; v]``; kv heads from the module."""
        num_kv = getattr(attn, "num_key_value_heads", None)
        if not isinstance(num_kv, int):
            raise self._refuse(f"fused {type(attn).__name__}.qkv_proj without num_key_value_heads")
        num_heads = fused.out_features // head_dim - 2 * num_kv
        return tuple(fused_blocks(fused, [num_heads * head_dim, num_kv * head_dim, num_kv * head_dim]))

    def _projections(self, attn: nn.Module) -> tuple[Projection, ...]:
        separate = [_linear(attn, name) for name in ("q_proj", "k_proj", "v_proj")]
        if all(p is not None for p in separate):
            return tuple(separate)
        fused = _linear(attn, "qkv_proj")
        if fused is not None:
            return self.fused_qkv(attn, fused, self._head_dim_of(attn))
        raise self._refuse(f"the attention block {type(attn).__name__} (no q/k/v projections)")

    def _head_dim_of(self, attn: nn.Module) -> int:
        for name in ("head_dim", "head_size"):
            value = getattr(attn, name, None)
            if isinstance(value, int):
                return value
        raise self._refuse(f"the attention block {type(attn).__name__} (no head_dim)")

    def _head_norms(self, attn: nn.Module, q: Projection, k: Projection) -> tuple[HeadNorm, ...]:
        """q/k norms that cover heads. A 1-D weight of ``heads × head_dim`` spans all heads (OLMo 2), of
        ``head_dim`` is shared by every head (Qwen3, Gemma 3); with one head left the two read alike,
        so the other norm (or, failing that, "shared") decides."""
        head_dim = self._head_dim_of(attn)
        found: list[tuple[nn.Module, str, str | None]] = []  # style: spans, shared, head or None
        for names, kind, projection in ((Q_NORMS, "q", q), (K_NORMS, "k", k)):
            for name in names:
                norm = getattr(attn, name, None)
                if norm is None:
                    continue
                weight = getattr(norm, "weight", None)
                if not isinstance(weight, nn.Parameter):
                    raise self._refuse(f"{type(attn).__name__}.{name} ({type(norm).__name__})")
                if weight.dim() == 2 and weight.shape[1] == head_dim:
                    found.append((norm, kind, "head"))  # one row per head (Cohere)
                elif weight.dim() == 1 and weight.numel() == head_dim == projection.out_features:
                    found.append((norm, kind, None))  # one head left: either reading fits
                elif weight.dim() == 1 and weight.numel() == projection.out_features:
                    found.append((norm, kind, "spans"))
                elif weight.dim() == 1 and weight.numel() == head_dim:
                    found.append((norm, kind, "shared"))
                else:
                    raise self._refuse(f"{type(attn).__name__}.{name} with weight {tuple(weight.shape)}")
        decided = {style for _, _, style in found if style in ("spans", "shared")}
        fallback = "spans" if decided == {"spans"} else "shared"
        return tuple(HeadNorm(norm, kind, spans_heads=(style or fallback) == "spans")
                     for norm, kind, style in found if (style or fallback) != "shared")

    def attention(self, layer: nn.Module) -> AttentionLinears:
        attn = self._attention_module(layer)
        if attn is None:
            raise self._refuse(f"the decoder layer {type(layer).__name__} (no attention module)")
        q, k, v = self._projections(attn)
        o = next((lin for name in CLOSING_ATTENTION if (lin := _linear(attn, name)) is not None), None)
        if o is None:
            raise self._refuse(f"the attention block {type(attn).__name__} (no output projection)")
        return AttentionLinears(module=attn, q=q, k=k, v=v, o=o, norms=self._head_norms(attn, q, k))

    def mlp(self, layer: nn.Module) -> MlpLinears:
        owners = [child for name in MLP_NAMES if isinstance(child := getattr(layer, name, None), nn.Module)]
        for owner in [*owners, layer]:
            closing = _linear(owner, "down_proj")
            gate, up = _linear(owner, "gate_proj"), _linear(owner, "up_proj")
            if closing is not None and gate is not None and up is not None:
                return MlpLinears(module=owner, expand=(gate, up), closing=closing)
            fused = _linear(owner, "gate_up_proj")
            if closing is not None and fused is not None:
                halves = tuple(fused_blocks(fused, [closing.in_features] * 2))  # [gate; up]
                return MlpLinears(module=owner, expand=halves, closing=closing)
            for expand_name, closing_name in PLAIN_MLPS:
                expand, closing = _linear(owner, expand_name), _linear(owner, closing_name)
                if expand is not None and closing is not None:
                    return MlpLinears(module=owner, expand=(expand,), closing=closing)
        raise self._refuse(f"the MLP of {type(layer).__name__}")

    def attention_attributes(self, module: nn.Module, num_heads: int, num_kv_heads: int) -> dict[str, int]:
        values = {"num_heads": num_heads, "num_attention_heads": num_heads,
                  "num_key_value_heads": num_kv_heads, "num_key_value_groups": num_heads // num_kv_heads}
        present = [name for name in HEAD_COUNT_ATTRIBUTES if isinstance(getattr(module, name, None), int)]
        return {name: values[name] for name in present}

    def bias_config_flags(self, config: Any) -> dict[str, str]:
        # Llama: attention_bias (q/k/v/o) and mlp_bias (gate/up/down); Qwen3: attention_bias only; the
        # rest build fixed biases or none, with no flag.
        return self.bias_flags.get(config.model_type, {})

    def uniform_config_update(self, config: Any, shape: LayerShape) -> dict[str, int] | None:
        """Head fields only when heads changed, so MLP-only cuts stay expressible for families whose
        config derives ``head_dim`` from ``hidden_size`` (StableLM); whether the stock class really
        rebuilds the result is checked by :func:`minillm.arch.rebuild.stock_rebuilds`."""
        heads = int(config.num_attention_heads), self.num_kv_heads(config), self.head_dim(config)
        if (shape.num_heads, shape.num_kv_heads, shape.head_dim) == heads:
            return {"intermediate_size": shape.intermediate}
        return super().uniform_config_update(config, shape)
