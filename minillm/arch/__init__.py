"""Architecture adapters, found by ``config.model_type``.

Most families are served by :class:`~minillm.arch.structural.StructuralAdapter`, which recognises a
decoder block by its modules; families whose block differs (OPT's naming and config, GPT-NeoX's
interleaved qkv, phi3's config-read head count, Gemma's embedding normaliser) keep a small file of their
own. A ``model_type`` in no list is still tried structurally: it is pruned if its blocks are recognised
and pass a mask ≡ surgery self-check on a tiny copy (:mod:`minillm.arch.probe`), and refused with one
line otherwise.
"""

from __future__ import annotations

from typing import Any

from minillm.arch.base import ArchAdapter, AttentionLinears, LayerShape, MlpLinears
from minillm.arch.gemma import GemmaAdapter
from minillm.arch.gpt_neox import GptNeoxAdapter
from minillm.arch.opt import OptAdapter
from minillm.arch.phi3 import Phi3Adapter
from minillm.arch.probe import self_check
from minillm.arch.structural import StructuralAdapter

_ADAPTERS: tuple[type[ArchAdapter], ...] = (OptAdapter, GptNeoxAdapter, Phi3Adapter, GemmaAdapter,
                                            StructuralAdapter)


def supported_model_types() -> list[str]:
    """The families tested in minillm's matrix (others are tried structurally)."""
    return sorted(t for adapter in _ADAPTERS for t in adapter.model_types)


def adapter_for(config: Any) -> ArchAdapter:
    """The adapter serving ``config.model_type``; the structural one for a family in no list."""
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter(model_type) if issubclass(adapter, StructuralAdapter) else adapter()
    structural = StructuralAdapter(model_type)
    self_check(config, structural)  # untested family: pruned only if a tiny copy cuts exactly
    return structural


__all__ = [
    "ArchAdapter",
    "AttentionLinears",
    "LayerShape",
    "MlpLinears",
    "adapter_for",
    "supported_model_types",
]
