"""minillm: memory-efficient structured pruning of Hugging Face causal LMs (and small CNNs / LSTMs).

The Python API mirrors the CLI: ``minillm.prune(...)`` does what ``minillm prune`` does.
Heavy submodules import lazily so ``import minillm`` stays fast.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "prune": "minillm.api:prune",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module_name), attr)
    raise AttributeError(f"module 'minillm' has no attribute {name!r}")
