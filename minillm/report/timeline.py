"""A light record of a run's stages: wall time, memory and parameter count at each step.

Why: the prune report plots "params and memory over time", and the CLI prints per-stage timings at the
end. Recording is a list append plus one read of ``/proc/self/statm`` per event, so :func:`minillm.api.prune`
keeps one always (no thread to stop, nothing to clean up on errors). Progress callbacks are wrapped so
every scoring step (SPSA perturbation, scored layer) becomes a sample too.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from minillm.memory import rss_bytes

Progress = Callable[[str, int, int], None]


def _cuda_allocated() -> int | None:
    import torch

    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else None


@dataclass
class Sample:
    """One point of the timeline: ``stage`` is a mark ("loaded") or a progress task ("FMS scores")."""

    seconds: float
    stage: str
    rss_bytes: int
    cuda_bytes: int | None = None
    params: int | None = None


@dataclass
class Timeline:
    """Samples since construction; :meth:`progress` forwards to the wrapped callback after recording."""

    forward: Progress | None = None
    samples: list[Sample] = field(default_factory=list)
    start: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        self.mark("start")

    def mark(self, stage: str, params: int | None = None) -> None:
        """Record a stage boundary, with the model's (distinct) parameter count when given."""
        self.samples.append(
            Sample(time.perf_counter() - self.start, stage, rss_bytes(), _cuda_allocated(), params)
        )

    def progress(self, task: str, done: int, total: int) -> None:
        self.samples.append(
            Sample(time.perf_counter() - self.start, task, rss_bytes(), _cuda_allocated())
        )
        if self.forward is not None:
            self.forward(task, done, total)

    def stage_seconds(self) -> dict[str, float]:
        """Seconds from the previous mark to each mark (progress samples belong to the stage they end in)."""
        marks = [s for s in self.samples if s.stage in _MARKS or s is self.samples[0]]
        return {b.stage: b.seconds - a.seconds for a, b in itertools.pairwise(marks)}

    def to_dict(self) -> dict[str, Any]:
        return {"samples": [asdict(s) for s in self.samples]}


#: Stage marks :func:`minillm.api.prune` sets, in order (anything else in a timeline is a progress task).
_MARKS = ("start", "loaded", "scored", "pruned", "exported")
