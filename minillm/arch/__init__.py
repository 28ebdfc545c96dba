"""Architecture adapters: one small module per model family, found by ``config.model_type``.

Adding a family = one adapter file + one line in ``_ADAPTERS``.
"""

from __future__ import annotations

from typing import Any

from minillm.arch.base import ArchAdapter, AttentionLinears, LayerShape, MlpLinears
from minillm.arch.llama import LlamaAdapter
from minillm.arch.opt import OptAdapter
from minillm.errors import UsageError

_ADAPTERS: tuple[type[ArchAdapter], ...] = (LlamaAdapter, OptAdapter)


def supported_model_types() -> list[str]:
    return sorted(t for adapter in _ADAPTERS for t in adapter.model_types)


def adapter_for(config: Any) -> ArchAdapter:
    """The adapter serving ``config.model_type``; a clear error naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    for adapter in _ADAPTERS:
        if model_type in adapter.model_types:
            return adapter()
    raise UsageError(
        f"unsupported architecture {model_type!r}: minillm supports {', '.join(supported_model_types())} "
        "(add an adapter in minillm/arch/ for another family)"
    )


__all__ = [
    "ArchAdapter",
    "AttentionLinears",
    "LayerShape",
    "MlpLinears",
    "adapter_for",
    "supported_model_types",
]
