"""Recovery after pruning: LoRA fine-tuning (peft) in an accelerate loop, merged back into a plain export.

``recover(pruned_folder, data, out)`` loads an export (per-layer-width ones too), trains LoRA adapters on
every prunable Linear, merges them (``merge_and_unload``) and re-exports through the same atomic
:func:`minillm.export.save_pruned` as ``minillm prune``, carrying the prune plan over.
"""

from __future__ import annotations

from minillm.recover.api import RecoverResult, recover
from minillm.recover.config import RecoverConfig

__all__ = ["RecoverConfig", "RecoverResult", "recover"]
