"""Defaults shared by the Python API, the CLI and recipes, in one import-light place (no torch)."""

from __future__ import annotations

#: What ``minillm prune`` uses when no criterion is named: the best by measurement in ``minillm compare``
#: on the benchmark model (docs/benchmarks.md, "Criteria compared"); MINI-LLM's ``fms`` stays available
#: by name.
DEFAULT_CRITERION = "flap"
