"""Inference timing of an LSTM LM: the whole model and the recurrent stack alone.

Why both: with a 10k-word vocabulary the decoder matmul is a large share of the cost, and pruning the
last layer also narrows the decoder's input; timing the LSTM stack alone shows what hidden-state
pruning does to the recurrence itself. Medians of repeated runs under ``torch.inference_mode``; the
random token ids come from a seeded generator.

``clock="thread"`` times with the calling thread's CPU time instead of wall time. With
``torch.set_num_threads(1)`` all the work runs on that thread, so the figure no longer depends on how
many other processes share the cores — the only way to get stable ratios on a busy shared machine.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from minillm.lstm.model import LstmLm


@dataclass(frozen=True)
class SpeedResult:
    batch_size: int
    seq_len: int
    lm_ms: float
    lstm_ms: float

    @property
    def lm_tokens_per_s(self) -> float:
        return self.batch_size * self.seq_len / (self.lm_ms / 1000.0)


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def median_seconds(
    fn: Callable[[], object], repeats: int = 20, warmup: int = 3, clock: str = "wall"
) -> float:
    if clock not in CLOCKS:
        raise ValueError(f"unknown clock {clock!r}; choose one of {', '.join(CLOCKS)}")
    now = CLOCKS[clock]
    if clock == "thread" and torch.get_num_threads() != 1:
        raise ValueError("clock='thread' measures one thread: call torch.set_num_threads(1) first")
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


@torch.inference_mode()
def inference_speed(
    model: LstmLm,
    batch_size: int = 1,
    seq_len: int = 35,
    repeats: int = 20,
    seed: int = 0,
    clock: str = "wall",
) -> SpeedResult:
    """Median forward time (ms) of the full LM and of the LSTM stack on random ids of shape (T, B)."""
    was_training = model.training
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    device = model.decoder.weight.device
    ids = torch.randint(model.config.vocab_size, (seq_len, batch_size), generator=generator).to(device)
    embedded = model.embedding(ids)
    try:
        lm = median_seconds(lambda: model(ids), repeats, clock=clock)
        lstm = median_seconds(lambda: model.lstm_stack(embedded), repeats, clock=clock)
    finally:
        model.train(was_training)
    return SpeedResult(batch_size, seq_len, lm * 1000.0, lstm * 1000.0)
