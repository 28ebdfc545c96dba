"""The architecture adapter contract: the only place that knows a model family's module names.

Everything else in minillm (scoring, planning, surgery, export) talks to an :class:`ArchAdapter`.
Each decoder layer exposes two prunable structures:

* attention: ``q``/``k``/``v`` projections (rows grouped by head) and a closing ``o`` projection
  (columns grouped by head), plus any norms that act on q or k per head;
* MLP: one or more expanding projections (rows = intermediate channels; gate+up or fc1) and a closing
  projection (columns = intermediate channels; down or fc2).

A projection is either a whole ``nn.Linear`` or a :class:`RowBlock` — the rows of a fused Linear that
belong to it (the q, k or v part of a fused qkv, the gate or up half of a fused gate_up), so fused and
separate projections are scored, costed and cut by the same code.

Removing a group means slicing those rows/columns; masking a group means zeroing its columns of the
closing projection, which makes it contribute exactly nothing. That equivalence is what the tests check.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar, Union

import torch
from torch import nn


@dataclass(frozen=True, eq=False)
class RowBlock:
    """The rows of a fused Linear that form one projection, ordered unit by unit (head-major).

    ``index[j]`` is the fused row holding this projection's row ``j``; e.g. phi3's ``qkv_proj`` is
    ``[q; k; v]`` (three contiguous blocks), GPT-NeoX's ``query_key_value`` interleaves ``[q_h; k_h;
    v_h]`` per head. Scoring reads rows through it, surgery cuts the fused Linear once.
    """

    linear: nn.Linear
    index: torch.Tensor

    @property
    def in_features(self) -> int:
        return self.linear.in_features

    @property
    def out_features(self) -> int:
        return int(self.index.numel())

    @property
    def bias(self) -> torch.Tensor | None:
        return self.linear.bias


Projection = Union[nn.Linear, RowBlock]  # noqa: UP007 - a runtime alias


def holder(projection: Projection) -> nn.Linear:
    """The Linear that stores ``projection``'s weights."""
    return projection.linear if isinstance(projection, RowBlock) else projection


def projection_rows(projection: Projection, values: torch.Tensor) -> torch.Tensor:
    """``projection``'s rows of a tensor shaped like its holder's weight (an importance, a gradient)."""
    if isinstance(projection, RowBlock):
        return values.index_select(0, projection.index.to(values.device))
    return values


def holder_rows(projection: Projection, rows: torch.Tensor) -> torch.Tensor:
    """Rows of the holder Linear for ``projection``'s own rows ``rows``."""
    if isinstance(projection, RowBlock):
        return projection.index.to(rows.device)[rows]
    return rows


def fused_blocks(linear: nn.Linear, widths: list[int]) -> list[RowBlock]:
    """Contiguous row blocks of ``linear`` with the given widths (``[q; k; v]``, ``[gate; up]``)."""
    blocks, start = [], 0
    for width in widths:
        blocks.append(RowBlock(linear, torch.arange(start, start + width)))
        start += width
    if start != linear.out_features:
        raise ValueError(f"fused projection has {linear.out_features} rows, expected {start}")
    return blocks


@dataclass(frozen=True)
class HeadNorm:
    """A norm applied to q or k whose weight covers heads (``kind`` "q": query heads, "k": kv heads).

    ``spans_heads``: its statistic is taken over all heads together (OLMo2's ``q_norm`` over
    heads×head_dim), so removing a head changes the other heads' normalisation; otherwise it normalises
    each head alone (Cohere's per-head LayerNorm) and slicing it with its heads is exact. Norms over
    ``head_dim`` only (Qwen3, Gemma3) are shared by every head and are not listed.
    """

    module: nn.Module
    kind: str
    spans_heads: bool


@dataclass(frozen=True)
class AttentionLinears:
    """The projections of one attention block; ``module`` is the block itself (holds attributes)."""

    module: nn.Module
    q: Projection
    k: Projection
    v: Projection
    o: nn.Linear
    norms: tuple[HeadNorm, ...] = ()


@dataclass(frozen=True)
class MlpLinears:
    """The projections of one MLP: ``expand`` produce intermediate channels, ``closing`` consumes them."""

    module: nn.Module
    expand: tuple[Projection, ...]
    closing: nn.Linear


@dataclass(frozen=True)
class LayerShape:
    """Widths of one decoder layer's prunable structures."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate: int

    @property
    def heads_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


def set_module_attribute(module: nn.Module, name: str, value: int) -> None:
    """Set a width attribute; ``config.<field>`` gives the module its own copy of the config first.

    Some attention blocks read a head count from ``self.config`` (phi3's ``query_pos``); per-layer widths
    then need a per-layer config. The export's remote-code file does the same.
    """
    if name.startswith("config."):
        if not module.__dict__.get("_minillm_own_config", False):
            module.config = copy.copy(module.config)
            module._minillm_own_config = True
        setattr(module.config, name.removeprefix("config."), value)
    else:
        setattr(module, name, value)


class ArchAdapter:
    """Base class: subclasses name the modules of one family and say how widths live in the config."""

    #: ``config.model_type`` values served by this adapter.
    model_types: ClassVar[tuple[str, ...]] = ()

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        raise NotImplementedError

    def attention(self, layer: nn.Module) -> AttentionLinears:
        raise NotImplementedError

    def mlp(self, layer: nn.Module) -> MlpLinears:
        raise NotImplementedError

    def closings(self, layer: nn.Module) -> dict[str, nn.Linear]:
        """The two projections that consume the prunable groups, keyed by structure family: attention's
        ``o`` (``"attn"``) and the MLP's closing one (``"mlp"``) — what scoring reads and compensation
        refits."""
        return {"attn": self.attention(layer).o, "mlp": self.mlp(layer).closing}

    def prunable_linears(self, layer: nn.Module) -> list[nn.Linear]:
        """Every Linear a plan cuts in ``layer``, once each, in one fixed order: q, k, v, o, expanding…,
        closing (a fused qkv or gate_up appears once)."""
        attn, mlp = self.attention(layer), self.mlp(layer)
        linears = [holder(p) for p in (attn.q, attn.k, attn.v, attn.o, *mlp.expand, mlp.closing)]
        return list(dict.fromkeys(linears))

    def head_dim(self, config: Any) -> int:
        explicit = getattr(config, "head_dim", None)
        return int(explicit) if explicit else config.hidden_size // config.num_attention_heads

    def num_kv_heads(self, config: Any) -> int:
        value = getattr(config, "num_key_value_heads", None)
        return int(value) if value else int(config.num_attention_heads)

    def intermediate_size(self, config: Any) -> int:
        return int(config.intermediate_size)

    def layer_shape(self, model: nn.Module, index: int) -> LayerShape:
        """Current widths of layer ``index``, read from its weights (so it is right after surgery too)."""
        layer = self.decoder_layers(model)[index]
        attn, mlp = self.attention(layer), self.mlp(layer)
        head_dim = self.head_dim(model.config)
        return LayerShape(
            num_heads=attn.q.out_features // head_dim,
            num_kv_heads=attn.k.out_features // head_dim,
            head_dim=head_dim,
            intermediate=mlp.closing.in_features,
        )

    def attention_attributes(self, module: nn.Module, num_heads: int, num_kv_heads: int) -> dict[str, int]:
        """Attributes of the attention block ``module`` that depend on its head counts."""
        return {"num_key_value_groups": num_heads // num_kv_heads}

    def bias_config_flags(self, config: Any) -> dict[str, str]:
        """Config flags that give a structure family ("attn": q/k/v/o, "mlp": expand + closing) biases.

        Used when bias compensation adds a bias to a closing projection: with a flag the stock class can
        rebuild it (plus zero biases on the family's other projections); without one the export needs
        the per-layer remote code. None by default.
        """
        return {}

    def uniform_config_update(self, config: Any, shape: LayerShape) -> dict[str, int] | None:
        """Config fields that express every layer having ``shape``, or ``None`` if the config cannot.

        transformers validates ``hidden_size % num_attention_heads == 0`` when a config is built, even
        with an explicit ``head_dim``; head counts that break it go through the per-layer export path.
        """
        if config.hidden_size % shape.num_heads:
            return None
        return {
            "num_attention_heads": shape.num_heads,
            "num_key_value_heads": shape.num_kv_heads,
            "head_dim": shape.head_dim,
            "intermediate_size": shape.intermediate,
        }

    # --- hidden size and depth (issue 17): the few family-specific facts those cuts need ------------

    #: config keys holding one entry per decoder layer (sliced with the kept layers when layers go).
    per_layer_config_keys: ClassVar[tuple[str, ...]] = ("layer_types", "no_rope_layers")
    #: opt-in: the family's residual stream is written only by the embedding, ``o`` and the closing MLP
    #: projection and read only through norms, and whatever derives from ``hidden_size`` besides the
    #: widths is restored by :meth:`hidden_size_changed`, so :mod:`minillm.surgery_hidden` is exact.
    hidden_pruning: ClassVar[bool] = False

    def hidden_pruning_blocker(self, config: Any) -> str | None:
        """Why this family's hidden size cannot be cut (one line), or ``None`` when it can."""
        if self.hidden_pruning:
            return None
        return (f"--structures hidden is not supported for {getattr(config, 'model_type', '?')} (its "
                "adapter does not declare hidden pruning exact); prune attn, mlp or layers instead")

    def block_hidden_norms(self, layer: nn.Module, hidden: int) -> list[nn.Module]:
        """The norms of one decoder layer acting on the residual stream (weight of ``hidden``), attention-
        internal norms (Qwen3's per-head_dim ``q_norm``/``k_norm``, OLMo 2's over all heads) excluded."""
        inside_attention = {id(m) for m in self.attention(layer).module.modules()}
        return [module for module in layer.modules() if id(module) not in inside_attention
                and _is_hidden_norm(module, hidden)]

    def hidden_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm acting on the residual stream, in module order: the blocks' then the others
        (the final norm)."""
        hidden = int(model.config.hidden_size)
        layers = self.decoder_layers(model)
        inside = {id(m) for layer in layers for m in layer.modules()}
        found = [norm for layer in layers for norm in self.block_hidden_norms(layer, hidden)]
        return found + [m for m in model.modules() if id(m) not in inside and _is_hidden_norm(m, hidden)]

    def hidden_size_changed(self, model: nn.Module, old: int, new: int) -> None:
        """Restore what the family derives from ``hidden_size`` (besides widths) after the residual stream
        was cut from ``old`` to ``new`` channels, before the config says ``new``; nothing by default."""

    def removed_layers_config_update(self, config: Any, kept: list[int]) -> dict[str, Any]:
        """Config fields after keeping only decoder layers ``kept`` (original indices, ascending)."""
        update: dict[str, Any] = {"num_hidden_layers": len(kept)}
        for key in self.per_layer_config_keys:
            value = getattr(config, key, None)
            if isinstance(value, (list, tuple)) and len(value) == config.num_hidden_layers:
                update[key] = [value[i] for i in kept]
        return update


def _is_hidden_norm(module: nn.Module, hidden: int) -> bool:
    weight = getattr(module, "weight", None)
    return type(module).__name__.endswith("Norm") and weight is not None and tuple(weight.shape) == (hidden,)
