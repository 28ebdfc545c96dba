"""Gemma 1–3: the structural block, plus the one thing Gemma derives from ``hidden_size``.

Gemma multiplies the token embedding by the normaliser √hidden_size (``embed_scale``, rounded to the
weight dtype), which transformers recomputes from the config when the model is built. Cutting the
hidden size from ``h`` to ``h'`` would change it on reload, so the embedding is multiplied by
``f = √h / √h'`` (the normalisers as the forward applies them) and the product stays what it was. With a
tied LM head the same tensor also computes the logits, which ``f`` would scale: the final norm — read
only by the head, in Gemma's form ``x̂·(1 + w)`` — takes the inverse, ``1 + w' = (1 + w) / f``, so the
logits are unchanged too. Both are exact up to one rounding of each stored value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.arch.structural import StructuralAdapter


def _as_applied(value: float, dtype: torch.dtype) -> float:
    """The normaliser as Gemma's forward applies it: a float32 tensor cast to the weight dtype."""
    return float(torch.tensor(value, dtype=torch.float32).to(dtype).double())


class GemmaAdapter(StructuralAdapter):
    model_types = ("gemma", "gemma2", "gemma3_text")

    def __init__(self, model_type: str | None = None) -> None:
        super().__init__(model_type)
        self.hidden_pruning = True  # type: ignore[misc]

    def hidden_pruning_blocker(self, config: Any) -> str | None:
        return None

    @torch.no_grad()
    def hidden_size_changed(self, model: nn.Module, old: int, new: int) -> None:
        embedding = model.get_input_embeddings()
        dtype = embedding.weight.dtype
        before = float(getattr(embedding, "scalar_embed_scale", old**0.5))
        factor = _as_applied(before, dtype) / _as_applied(new**0.5, dtype)
        embedding.weight.mul_(factor)
        embedding.scalar_embed_scale = new**0.5
        if isinstance(getattr(embedding, "embed_scale", None), torch.Tensor) \
                and embedding.embed_scale.device.type != "meta":
            embedding.embed_scale.fill_(new**0.5)
        head = model.get_output_embeddings()
        if head is not None and head.weight is embedding.weight:
            norm = model.get_decoder().norm  # the final norm: x̂·(1 + w), read only by the LM head
            weight = norm.weight
            folded = (1.0 + weight.double()) / factor - 1.0
            norm.weight = nn.Parameter(folded.to(weight.dtype), requires_grad=weight.requires_grad)
