"""Recovery after pruning: distillation from the dense model or next-token training, full or LoRA.

``recover(pruned_folder, data, out)`` loads an export (per-layer-width ones too), trains it on one
accelerate loop (:mod:`minillm.recover.train`) with a chunked token loss (:mod:`minillm.recover.distill`:
KL to the teacher, CE, or both; the teacher from :mod:`minillm.recover.teacher`, optionally through a
sampled on-disk cache, :mod:`minillm.recover.teacher_cache`), or reconstructs it block by block on the
sequential executor (:mod:`minillm.recover.blocks`); LoRA adapters (:mod:`minillm.recover.lora`) are
merged back, and the result is re-exported through the same atomic :func:`minillm.export.save_pruned` as
``minillm prune``, carrying the prune plan over.
"""

from __future__ import annotations

from minillm.recover.api import RecoverResult, recover
from minillm.recover.config import RecoverConfig

__all__ = ["RecoverConfig", "RecoverResult", "recover"]
