"""Peak-memory and wall-time measurement that works the same on CPU and CUDA.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` since the block started. On CPU the only honest
figure is the process's peak resident set size (``ru_maxrss``), which never goes down: compare methods
in fresh processes (``minillm compare`` does) rather than one after another.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    cuda_peak_bytes: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"seconds": round(self.seconds, 3), "peak_rss_bytes": self.peak_rss_bytes,
                "cuda_peak_bytes": self.cuda_peak_bytes}


@contextmanager
def measure() -> Iterator[Measurement]:
    """Time a block and record its peak memory (CUDA peak is reset at entry)."""
    result = Measurement()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    try:
        yield result
    finally:
        if cuda:
            torch.cuda.synchronize()
            result.cuda_peak_bytes = int(torch.cuda.max_memory_allocated())
        result.seconds = time.perf_counter() - start
        result.peak_rss_bytes = peak_rss_bytes()


def human_bytes(value: int | None) -> str:
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{value} B"
        value /= 1024
    return str(value)
