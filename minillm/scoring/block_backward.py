"""Back-propagation one decoder block at a time: exact loss gradients at the memory of inference.

Why: gradient criteria (LLM-Pruner's Taylor, exact gate gradients) need ∂L/∂(something inside every
block). Back-propagating through the whole model keeps the autograd graph of every block and a gradient
buffer for every weight — 2.5 × the peak of a plain forward pass, measured on SmolLM2. The same numbers
come out of a block-local loop (the block runner of :mod:`minillm.calibration.blockwise`):

1. forward: the calibration batches go through the blocks one (resident) block at a time with no graph,
   keeping only the inputs of the blocks the backward pass will visit;
2. head: ∂(Σ token losses)/∂(last hidden states) through the model's own final norm, LM head and loss
   function, a few sequences at a time, so no ``batch × tokens × vocabulary`` logits tensor of a whole
   batch lives at once;
3. backward, last block first: recompute the block from its stored inputs with autograd on,
   back-propagate the incoming gradient to the block's input and to whatever a :class:`BlockProbe`
   attaches (the block's gates, its weights), and hand the input gradient to the block below.

Peak memory ≈ the resident weights + the stored block inputs (``blocks × tokens × hidden``) + one
block's activations for one batch + what the probe keeps for one block. Offloaded models go through the
same loop: each block is resident only while it is run or recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Protocol

import torch
from torch import nn

from minillm.calibration.blockwise import (
    BlockBatch,
    capture_first_block_inputs,
    head_gradients,
    resident,
    run_block,
)
from minillm.scoring.base import ScoringContext
from minillm.scoring.spsa import frozen


class BlockProbe(Protocol):
    """What a criterion differentiates inside each block (see :func:`backward_block_by_block`)."""

    def attach(
        self, index: int, layer: nn.Module, batch: BlockBatch
    ) -> AbstractContextManager[list[torch.Tensor]]:
        """Leaf tensors to differentiate while ``layer`` recomputes ``batch`` (``[]`` for none)."""
        ...

    def receive(self, index: int, batch: BlockBatch, gradients: Sequence[torch.Tensor]) -> None:
        """∂(Σ token losses)/∂(each attached tensor) for one batch."""
        ...

    def finish(self, index: int, layer: nn.Module) -> None:
        """Every batch of block ``index`` is done; the block is still resident (weights readable)."""
        ...


def backward_block_by_block(ctx: ScoringContext, probe: BlockProbe) -> None:
    """Run the three steps of the module docstring, down to the lowest scored block.

    Every weight stays frozen except what the probe itself turns on inside :meth:`BlockProbe.attach`.
    """
    model, adapter = ctx.model, ctx.adapter
    layers = adapter.decoder_layers(model)
    first = min(ctx.layers)
    with frozen(list(model.parameters())), torch.inference_mode(False):
        hidden = capture_first_block_inputs(model, adapter, ctx.calibration)
        inputs: dict[int, list[BlockBatch]] = {}
        for i, layer in enumerate(layers):
            if i >= first:
                inputs[i] = hidden
            with resident(layer):
                hidden = run_block(layer, hidden)
            ctx.report("block-wise forward", i + 1, len(layers))
        with torch.enable_grad():
            upstream = head_gradients(model, adapter, hidden)
            del hidden
            for i in range(len(layers) - 1, first - 1, -1):
                layer, below = layers[i], []
                with resident(layer):
                    for batch, grad_out in zip(inputs.pop(i), upstream, strict=True):
                        x = batch.hidden.detach().requires_grad_(i > first)
                        with probe.attach(i, layer, batch) as attached:
                            targets = ([x] if x.requires_grad else []) + list(attached)
                            if not targets:
                                continue
                            out = layer(x, *batch.args, **batch.kwargs)
                            out = out[0] if isinstance(out, tuple) else out
                            grads = torch.autograd.grad(out, targets, grad_out)
                        if x.requires_grad:
                            below.append(grads[0])
                        probe.receive(i, batch, grads[1:] if x.requires_grad else grads)
                        del out, grads
                    probe.finish(i, layer)
                upstream = below
                ctx.report("block-wise backward", len(layers) - i, len(layers) - first)
