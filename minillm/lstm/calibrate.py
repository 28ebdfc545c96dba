"""Calibration passes over a few BPTT windows: activation statistics and the forward-only loss.

Why here and not in each criterion: the activation criterion and FMS both need the mean absolute
activation entering every weight, so one hooked pass collects them all under the keys of
:mod:`minillm.lstm.groups` (``rnn{l}.in``, ``rnn{l}.out``, ``decoder.in``). Hooks are installed by a
context manager that always removes them, even when the forward pass raises.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F

from minillm.lstm.groups import DECODER_INPUT_KEY, rnn_input_key, rnn_output_key
from minillm.lstm.model import LstmLm, detach_state

Window = tuple[torch.Tensor, torch.Tensor]


class AbsMeanStats:
    """Running mean of |x| over all positions, per feature, for several named activations."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        flat = x.detach().abs().reshape(-1, x.shape[-1]).to(torch.float64)
        self.sums[key] = self.sums.get(key, 0) + flat.sum(dim=0)
        self.counts[key] = self.counts.get(key, 0) + flat.shape[0]

    def means(self) -> dict[str, torch.Tensor]:
        return {k: (s / self.counts[k]).float() for k, s in self.sums.items()}


@contextmanager
def recording(model: LstmLm, stats: AbsMeanStats) -> Iterator[AbsMeanStats]:
    """Record mean |input| and |output| of every LSTM layer and mean |input| of the decoder."""
    handles = []

    def lstm_hook(layer: int):
        def hook(module: nn.Module, args: tuple, output: tuple) -> None:
            stats.add(rnn_input_key(layer), args[0])
            stats.add(rnn_output_key(layer), output[0])

        return hook

    def decoder_hook(module: nn.Module, args: tuple) -> None:
        stats.add(DECODER_INPUT_KEY, args[0])

    try:
        for layer, rnn in enumerate(model.rnns):
            handles.append(rnn.register_forward_hook(lstm_hook(layer)))
        handles.append(model.decoder.register_forward_pre_hook(decoder_hook))
        yield stats
    finally:
        for handle in handles:
            handle.remove()


@torch.no_grad()
def window_loss(model: LstmLm, windows: Sequence[Window]) -> float:
    """Mean next-word cross-entropy over ``windows``, carrying the state across them (eval mode)."""
    was_training = model.training
    model.eval()
    try:
        state = None
        total, count = 0.0, 0
        for inputs, targets in windows:
            logits, state = model(inputs, state)
            state = detach_state(state)
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                           reduction="sum"))
            count += targets.numel()
        return total / max(count, 1)
    finally:
        model.train(was_training)


def activation_means(model: LstmLm, windows: Sequence[Window]) -> dict[str, torch.Tensor]:
    """Mean |activation| per feature for every key of :mod:`minillm.lstm.groups`, over ``windows``."""
    with recording(model, AbsMeanStats()) as stats:
        window_loss(model, windows)
    return stats.means()
