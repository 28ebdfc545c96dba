"""Back-propagated weight gradients of the calibration loss: what LLM-Pruner (and ``fms-bp``) pay for.

Only the prunable Linear weights of the scored layers require grad; gradients are taken with
``torch.autograd.grad`` into our own float32 accumulators (one weight-sized buffer each, plus one more
for the Fisher variant), so the cost over inference is the autograd graph of a full forward pass plus
one (or two) gradient-sized copies of the pruned weights — the memory a gradient-free method avoids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.forward import input_device
from minillm.calibration.spsa import frozen
from minillm.scoring.base import ScoringContext


@dataclass
class WeightGradients:
    """∂L/∂W of the mean calibration loss per Linear; ``fisher``: mean of per-sequence squared gradients."""

    gradient: dict[nn.Linear, torch.Tensor]
    fisher: dict[nn.Linear, torch.Tensor] | None
    forward_passes: int
    backward_passes: int


def weight_gradients(ctx: ScoringContext, linears: list[nn.Linear], fisher: bool = False) -> WeightGradients:
    """Exact gradients by back-propagation over the calibration set (per sequence when ``fisher``)."""
    model = ctx.model
    device = input_device(model)
    weights = [linear.weight for linear in linears]
    grads = [torch.zeros_like(w, dtype=torch.float32) for w in weights]
    squares = [torch.zeros_like(w, dtype=torch.float32) for w in weights] if fisher else None
    ids = ctx.calibration.input_ids
    total_tokens = ids.shape[0] * (ids.shape[1] - 1)
    batches = list(ids.split(1)) if fisher else ctx.calibration.batches()
    with frozen(list(model.parameters())), torch.inference_mode(False), torch.enable_grad():
        for w in weights:
            w.requires_grad_(True)
        try:
            for done, batch in enumerate(batches):
                batch = batch.to(device)
                loss = model(input_ids=batch, labels=batch, use_cache=False).loss
                tokens = batch.shape[0] * (batch.shape[1] - 1)
                step = torch.autograd.grad(loss, weights)
                for i, g in enumerate(step):
                    grads[i].add_(g.float(), alpha=tokens / total_tokens)
                    if squares is not None:
                        squares[i].addcmul_(g.float(), g.float(), value=1.0 / ids.shape[0])
                del step, loss
                ctx.report("back-propagation", done + 1, len(batches))
        finally:
            for w in weights:
                w.requires_grad_(False)
    return WeightGradients(
        gradient=dict(zip(linears, grads, strict=True)),
        fisher=dict(zip(linears, squares, strict=True)) if squares is not None else None,
        forward_passes=len(batches) if fisher else 1,
        backward_passes=len(batches) if fisher else 1,
    )
