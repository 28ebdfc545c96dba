"""Defaults shared by the Python API, the CLI and recipes, in one import-light place (no torch)."""

from __future__ import annotations

from typing import Literal

#: What ``minillm prune`` uses when no criterion is named: the best by measurement in ``minillm compare``
#: on the benchmark model (docs/benchmarks.md, "Criteria compared"); MINI-LLM's ``fms`` stays available
#: by name.
DEFAULT_CRITERION = "flap"

#: How a cut is compensated (:mod:`minillm.compensation`): ``none``, ``bias`` (FLAP's mean folding) or
#: ``refit`` (least squares on the closing projections, block by block on the pruned prefix) — the best
#: measured (docs/benchmarks.md, "Error compensation").
Compensation = Literal["none", "bias", "refit"]
DEFAULT_COMPENSATION: Compensation = "refit"
#: λ of ``H + λ·mean(diag H)·I`` in every compensation solve.
DEFAULT_DAMPING = 0.01
