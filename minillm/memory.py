"""The one place that measures memory (and wall time), the same way for prune, compare and bench.

On CUDA the peak is ``torch.cuda.max_memory_allocated`` since the block started. On CPU it is the peak
resident set size: ``VmHWM``, which Linux lets a process reset (:func:`reset_peak`), else ``ru_maxrss``,
which never goes down — then compare methods in fresh processes (``minillm compare`` does).
"""

from __future__ import annotations

import gc
import os
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch


def peak_rss_bytes() -> int:
    """Peak resident set size of this process since the last :func:`reset_peak` (Linux ``VmHWM``), else
    since it started (bytes)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int:
    """Resident set size now (Linux ``/proc/self/statm``; elsewhere the peak so far, the best available)."""
    try:
        with open("/proc/self/statm") as handle:
            pages = int(handle.read().split()[1])
        return pages * (os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096)
    except (OSError, IndexError, ValueError):
        return peak_rss_bytes()


def reset_peak() -> bool:
    """Reset this process's peak RSS to its current RSS (Linux); False where unsupported."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


@dataclass
class Measurement:
    seconds: float = 0.0
    peak_rss_bytes: int = 0
    cuda_peak_bytes: int | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return {"seconds": round(self.seconds, 3), "peak_rss_bytes": self.peak_rss_bytes,
                "cuda_peak_bytes": self.cuda_peak_bytes}


@contextmanager
def measure(reset: bool = False) -> Iterator[Measurement]:
    """Time a block and record its peak memory (CUDA peak is reset at entry; with ``reset`` the CPU
    peak too, where the platform allows)."""
    result = Measurement()
    cuda = torch.cuda.is_available()
    if reset:
        gc.collect()
        reset_peak()
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


def release_free_heap() -> bool:
    """Give the heap's free pages back to the OS now (``malloc_trim(0)``).

    Why: tokenising the calibration text makes and frees many small objects; glibc keeps the freed
    heap (about 100 MiB after a 2 MB text) for reuse, and under ``--streaming`` that unused memory would
    sit beside every block for the rest of the run. False where glibc is not available.
    """
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False  # type: ignore[attr-defined]
