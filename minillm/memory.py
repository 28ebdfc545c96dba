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


def _glibc() -> object | None:
    """glibc through ctypes (Linux), or None elsewhere (musl, macOS, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def return_large_frees_to_the_os(threshold_bytes: int = 1024**2) -> bool:
    """Serve allocations ≥ ``threshold_bytes`` by ``mmap`` so freeing them returns the memory at once.

    Why: glibc raises its mmap threshold dynamically (up to 32 MiB) after large frees, after which the
    weight matrices of each streamed block (a few MiB to tens of MiB) come from the heap; interleaved
    with long-lived small objects they fragment it, so peak RSS grows with every block although only
    one is alive. A fixed threshold (``mallopt(M_MMAP_THRESHOLD)``, which also turns the dynamic
    adjustment off) keeps block-sized tensors out of the heap. False where glibc is not available.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_mmap_threshold = -3
    return bool(libc.mallopt(m_mmap_threshold, int(threshold_bytes)))  # type: ignore[attr-defined]

