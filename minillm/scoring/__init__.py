"""LLM scoring criteria: one file each, one line each in the registry below.

``CRITERIA.get(name)`` returns a :data:`~minillm.scoring.base.Criterion`; unknown names get a
"did you mean" error listing the choices.
"""

from __future__ import annotations

from minillm.registry import Registry
from minillm.scoring.base import Criterion, ScoreResult, ScoringContext

CRITERIA: Registry[Criterion] = Registry("criterion")
_ENTRIES = [
    ("fms", "fms:score_fms",
     "MINI-LLM: |W|·|x|·|gradient|, gradient by forward-only SPSA (memory of inference)"),
    ("random", "random_baseline:score_random", "random scores (a baseline)"),
    ("magnitude", "magnitude:score_magnitude_l1", "L1 norm of the group's weights"),
    ("magnitude-l2", "magnitude:score_magnitude_l2", "L2 norm of the group's weights"),
    ("wanda-sp", "wanda_sp:score_wanda_sp", "Wanda-sp: |W|·‖X‖ over the closing projection's columns"),
    ("flap", "flap:score_flap",
     "FLAP: input fluctuation × weight norm, standardised, with bias compensation (one forward)"),
    ("taylor", "taylor:score_taylor",
     "LLM-Pruner: Σ|W·∂L/∂W| by plain back-propagation (about 2.5 × the memory of a forward)"),
    ("taylor-fisher", "taylor:score_taylor_fisher", "LLM-Pruner, second order with the diagonal Fisher"),
    ("taylor-vector", "taylor:score_taylor_vector", "LLM-Pruner, vector-wise first order"),
    ("taylor-lowmem", "taylor:score_taylor_lowmem",
     "LLM-Pruner's taylor scores, weight gradients one recomputed block at a time (memory of a forward)"),
    ("fms-local", "fms:score_fms_local",
     "FMS with block-local SPSA on each block's output reconstruction error (no full forward per step)"),
    ("fms-bp", "fms_bp:score_fms_bp", "FMS with back-propagated gradients (ablation of fms)"),
    ("fms-lowmem", "fms_bp:score_fms_lowmem",
     "MINI-LLM's |W|·|x|·|g| with exact gradients from the block-local backward (memory of a forward)"),
    ("fms-gate", "fms_gate:score_fms_gate", "SPSA on one gate per head / channel"),
    ("taylor-gate", "taylor_gate:score_taylor_gate",
     "exact ∂L/∂gate per head / channel, weights frozen, checkpointed blocks"),
    ("taylor-gate-fisher", "taylor_gate:score_taylor_gate_fisher", "taylor-gate, second order (gate Fisher)"),
    ("taylor-gate-fms", "taylor_gate:score_taylor_gate_fms", "taylor-gate × FMS's weight·activation factor"),
    ("fwd-grad", "fwd_grad:score_fwd_grad", "forward-mode jvp on the gates, one tangent per sequence"),
]
for _name, _target, _summary in _ENTRIES:
    CRITERIA.register(_name, f"minillm.scoring.{_target}", _summary)

__all__ = ["CRITERIA", "Criterion", "ScoreResult", "ScoringContext"]
