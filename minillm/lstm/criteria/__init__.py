"""Hidden-unit importance criteria for LSTM LMs: one file each, joined by one registry line each.

Every criterion is a function ``score(model, ctx) -> list[Tensor]`` returning one score per hidden unit
for each LSTM layer (higher = more important); :func:`minillm.lstm.plan.plan_from_scores` turns the
scores into a prune plan. Entries are lazy (``"module:attr"``), so importing this package is cheap.
"""

from __future__ import annotations

from minillm.lstm.criteria.base import Criterion, ScoreContext
from minillm.registry import Registry

CRITERIA: Registry[Criterion] = Registry("LSTM hidden-unit criterion")
CRITERIA.register("magnitude", "minillm.lstm.criteria.magnitude:score")
CRITERIA.register("group_lasso", "minillm.lstm.criteria.group_lasso:score")
CRITERIA.register("activation", "minillm.lstm.criteria.activation:score")
CRITERIA.register("fms", "minillm.lstm.criteria.fms:score")
CRITERIA.register("random", "minillm.lstm.criteria.random_baseline:score")

__all__ = ["CRITERIA", "Criterion", "ScoreContext"]
