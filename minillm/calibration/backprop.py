"""Back-propagation through the whole resident model: the reference that ``taylor`` and ``fms-bp`` keep.

Why it is kept: it is what LLM-Pruner pays — the autograd graph of a full forward pass plus a
gradient-sized buffer for every scored weight (about 2.5 × a forward pass on SmolLM2) — and ``compare``
shows that cost. The block-local backward of :meth:`minillm.calibration.sequential.Sequential.backward`
gives the same gradients at the memory of a forward pass (``taylor-lowmem``, ``fms-lowmem``).
Only the listed weights require grad; gradients are taken with ``torch.autograd.grad`` into float32
accumulators, never into ``.grad``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.blocks import input_device
from minillm.calibration.data import CalibrationSet
from minillm.calibration.spsa import frozen


@dataclass
class Gradients:
    """∂L/∂W of the mean calibration loss per weight; ``squares``: mean of per-sequence squared gradients."""

    gradient: list[torch.Tensor]
    squares: list[torch.Tensor] | None
    forward_passes: int
    backward_passes: int


def model_gradients(
    model: nn.Module,
    calibration: CalibrationSet,
    weights: Sequence[torch.Tensor],
    per_sequence: bool = False,
    report: Callable[[str, int, int], None] | None = None,
) -> Gradients:
    """Exact gradients by back-propagation over the calibration set (one sequence at a time when
    ``per_sequence``, which also gives the squares of the per-sequence gradients: the diagonal Fisher)."""
    device = input_device(model)
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    squares = [torch.zeros_like(w, dtype=torch.float32) for w in weights] if per_sequence else None
    ids = calibration.input_ids
    total_tokens = ids.shape[0] * (ids.shape[1] - 1)
    batches = list(ids.split(1)) if per_sequence else calibration.batches()
    with frozen(list(model.parameters())), torch.inference_mode(False), torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        try:
            for done, batch in enumerate(batches):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                tokens = batch.shape[0] * (batch.shape[1] - 1)
                step = torch.autograd.grad(loss, list(weights))
                for i, g in enumerate(step):
                    grads[i].add_(g.float(), alpha=tokens / total_tokens)
                    if squares is not None:
                        squares[i].addcmul_(g.float(), g.float(), value=1.0 / ids.shape[0])
                del step, loss
                if report is not None:
                    report("back-propagation", done + 1, len(batches))
        finally:
            for w in weights:
                w.requires_grad_(False)
    passes = len(batches) if per_sequence else 1
    return Gradients(grads, squares, forward_passes=passes, backward_passes=passes)
