"""Back-propagation one decoder block at a time: exact loss gradients at the memory of inference.

Why: gradient criteria (LLM-Pruner's Taylor, exact gate gradients) need ∂L/∂(something inside every
block). Back-propagating through the whole model keeps the autograd graph of every block and a gradient
buffer for every weight — 2.5 × the peak of a plain forward pass, measured on SmolLM2. The same numbers
come out of a block-local loop (the block runner of :mod:`minillm.calibration.blocks`):

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

from minillm.calibration.sequential import BlockProbe, Sequential
from minillm.scoring.base import ScoringContext

__all__ = ["BlockProbe", "backward_block_by_block"]


def backward_block_by_block(ctx: ScoringContext, probe: BlockProbe) -> None:
    """:meth:`Sequential.backward` down to the lowest scored block."""
    run = Sequential(ctx.model, ctx.adapter, ctx.calibration, progress=ctx.progress)
    run.backward(probe, min(ctx.layers))
