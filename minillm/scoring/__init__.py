"""LLM scoring criteria: one file each, one line each in the registry below.

``CRITERIA.get(name)`` returns a :data:`~minillm.scoring.base.Criterion`; unknown names get a
"did you mean" error listing the choices.
"""

from __future__ import annotations

from minillm.registry import Registry
from minillm.scoring.base import Criterion, ScoreResult, ScoringContext

CRITERIA: Registry[Criterion] = Registry("criterion")
CRITERIA.register("fms", "minillm.scoring.fms:score_fms")
CRITERIA.register("random", "minillm.scoring.random_baseline:score_random")
CRITERIA.register("magnitude", "minillm.scoring.magnitude:score_magnitude_l1")
CRITERIA.register("magnitude-l2", "minillm.scoring.magnitude:score_magnitude_l2")
CRITERIA.register("wanda-sp", "minillm.scoring.wanda_sp:score_wanda_sp")
CRITERIA.register("flap", "minillm.scoring.flap:score_flap")
CRITERIA.register("taylor", "minillm.scoring.taylor:score_taylor")
CRITERIA.register("taylor-fisher", "minillm.scoring.taylor:score_taylor_fisher")
CRITERIA.register("taylor-vector", "minillm.scoring.taylor:score_taylor_vector")
CRITERIA.register("taylor-blockwise", "minillm.scoring.taylor_blockwise:score_taylor_blockwise")
CRITERIA.register("fms-bp", "minillm.scoring.fms_bp:score_fms_bp")
CRITERIA.register("fms-gate", "minillm.scoring.fms_gate:score_fms_gate")
CRITERIA.register("taylor-gate", "minillm.scoring.taylor_gate:score_taylor_gate")
CRITERIA.register("taylor-gate-fisher", "minillm.scoring.taylor_gate:score_taylor_gate_fisher")
CRITERIA.register("taylor-gate-fms", "minillm.scoring.taylor_gate:score_taylor_gate_fms")
CRITERIA.register("fwd-grad", "minillm.scoring.fwd_grad:score_fwd_grad")

__all__ = ["CRITERIA", "Criterion", "ScoreResult", "ScoringContext"]
