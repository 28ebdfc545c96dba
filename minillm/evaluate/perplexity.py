"""Perplexity on non-overlapping windows: the protocol of the structured-pruning literature.

The text is tokenised as one stream (with a leading BOS where the tokenizer has one), cut into
``len // seq_len`` windows of ``seq_len`` tokens with no overlap and no carried context, and
``exp(mean NLL)`` is taken over every predicted token (``seq_len - 1`` per window). With
``--ppl-bos window`` every window is the BOS + ``seq_len - 1`` tokens instead
(:func:`~minillm.calibration.data.evaluation_windows`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from minillm.calibration.forward import input_device

#: Where the BOS goes: one at the start of the text's stream, or one in front of every window.
PplBos = Literal["stream", "window"]


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    windows: int
    seq_len: int
    tokens: int
    #: every window starts with the BOS (``--ppl-bos window``) instead of one BOS leading the stream
    bos_per_window: bool = False

    @property
    def protocol(self) -> str:
        bos = "the BOS + " if self.bos_per_window else ""
        return (f"{self.windows} non-overlapping windows of {bos}{self.seq_len - bool(self.bos_per_window)} "
                f"tokens, no context carried, exp(mean NLL) over {self.tokens} predicted tokens")


def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 8,
               on_batch: Callable[[int, int], None] | None = None) -> PerplexityResult:
    device = input_device(model)
    nll, count = 0.0, 0
    batches = windows.split(batch_size)
    with torch.inference_mode():
        for done, batch in enumerate(batches):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits.float()
            loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            nll += float(loss)
            count += batch[:, 1:].numel()
            if on_batch is not None:
                on_batch(done + 1, len(batches))
    return PerplexityResult(math.exp(nll / count), windows.shape[0], windows.shape[1], count)
