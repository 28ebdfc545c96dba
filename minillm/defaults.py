"""Defaults shared by the Python API, the CLI and recipes, in one import-light place (no torch)."""

from __future__ import annotations

from typing import Literal

#: What ``minillm prune`` uses when no criterion is named: the best by measurement in ``minillm compare``
#: on the benchmark model (docs/benchmarks.md, "Criteria compared"); MINI-LLM's ``fms`` stays available
#: by name.
DEFAULT_CRITERION = "flap"

#: GQA head granularity of ``minillm prune`` / ``compare``: ``query`` keeps every key/value head and removes
#: the same number of query heads from each kv group — measured better than removing whole kv groups
#: once the cut is compensated (docs/benchmarks.md, "Error compensation"); on multi-head attention the
#: two modes are the same.
DEFAULT_HEAD_MODE: Literal["kv", "query"] = "query"

#: How a cut is compensated (:mod:`minillm.compensation`): ``none``, ``bias`` (FLAP's mean folding) or
#: ``refit`` (least squares on the closing projections, block by block on the pruned prefix) — the best
#: measured (docs/benchmarks.md, "Error compensation").
Compensation = Literal["none", "bias", "refit"]
#: How widths are spread over the layers (:func:`minillm.plan.build_plan`): ``uniform`` (a stock config) or
#: per-layer ``global``, ``log`` (SlimGPT) and ``error`` (:mod:`minillm.allocation`).
Allocation = Literal["uniform", "global", "log", "error"]
DEFAULT_COMPENSATION: Compensation = "refit"
#: The refit's target (``--compensation-target``): the pruned prefix's own layer outputs, the dense
#: model's, or (``block``) for the MLP the dense block's output on the pruned prefix's input.
CompensationTarget = Literal["pruned", "dense", "block"]
#: dtype of the compensation's moments ``H``: ``auto`` is float64 unless ``--streaming`` under a memory cap
#: would leave less than half of it for the weights (:func:`minillm.streaming.choose_precision`).
Precision = Literal["auto", "float64", "float32"]
#: λ of ``H + λ·mean(diag H)·I`` in every compensation solve.
DEFAULT_DAMPING = 0.01
