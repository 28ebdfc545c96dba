"""Streaming frees a block's tensors after every block: with the fixed mmap threshold that memory goes back
to the OS at once instead of fragmenting the heap (the cause of peak RSS growing in streaming runs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from minillm.memory import _glibc

PROBE = textwrap.dedent(
    """
    import sys, torch
    from minillm.memory import return_large_frees_to_the_os
    from minillm.memory import rss_bytes as current_rss_bytes
    if sys.argv[1] == "fixed":
        assert return_large_frees_to_the_os()
    warm = torch.ones(8 * 1024**2 // 4); del warm  # a large free: glibc would raise its dynamic threshold
    before = current_rss_bytes()
    keep, big = [], []
    for _ in range(10):
        big.append(torch.ones(4 * 1024**2 // 4))  # 4 MiB, like one streamed block's matrices
        keep.append(torch.ones(64))  # small long-lived objects allocated between them
    big.clear()
    print((current_rss_bytes() - before) / 1024**2)
    """
)


def _retained_mib(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return float(run.stdout.strip())


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt is Linux/glibc only")
def test_freed_block_tensors_leave_the_process() -> None:
    assert _retained_mib("fixed") < 1.0  # 40 MiB allocated and freed: nothing stays resident


def test_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    import minillm.memory as memory

    monkeypatch.setattr(memory, "_glibc", lambda: None)
    assert memory.return_large_frees_to_the_os() is False
