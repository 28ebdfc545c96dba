"""CNN channel criteria: one file each, one registry line each.

Every criterion is a Torch-Pruning importance (``criterion(tp_group) -> Tensor``, higher = keep) with a
``calibrate(ScoringContext)`` step for the data-driven ones; see :mod:`minillm.vision.criteria.base`.
"""

from __future__ import annotations

from minillm.registry import Registry

CRITERIA: Registry[type] = Registry("CNN criterion")
CRITERIA.register("ifso", "minillm.vision.criteria.ifso:IfsoCriterion")
CRITERIA.register("l1", "minillm.vision.criteria.l1:L1Criterion")
CRITERIA.register("bn-scale", "minillm.vision.criteria.bn_scale:BNScaleCriterion")
CRITERIA.register("taylor", "minillm.vision.criteria.taylor:TaylorCriterion")
CRITERIA.register("random", "minillm.vision.criteria.random_scores:RandomCriterion")

__all__ = ["CRITERIA"]
