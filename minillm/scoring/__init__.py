"""LLM scoring criteria: one file each, one line each in the registry below.

``CRITERIA.get(name)`` returns a :data:`~minillm.scoring.base.Criterion`; unknown names get a
"did you mean" error listing the choices.
"""

from __future__ import annotations

from minillm.registry import Registry
from minillm.scoring.base import Criterion, ScoreResult, ScoringContext

CRITERIA: Registry[Criterion] = Registry("criterion")
CRITERIA.register("fms", "minillm.scoring.fms:score_fms")

__all__ = ["CRITERIA", "Criterion", "ScoreResult", "ScoringContext"]
