"""Taylor-gate block by block: exact gate gradients with one resident decoder block at a time.

The in-memory ``taylor-gate`` checkpoints every block; here the same idea is driven by the block
runner (:mod:`minillm.calibration.blockwise`) so that offloaded models stream too:

1. forward: run the calibration batches through the blocks one resident block at a time, keeping only
   each block's *inputs* (the calibration activations, ``blocks × tokens × hidden``);
2. loss: the model's own head on the last hidden states (decoder layers swapped out, as in
   :func:`~minillm.calibration.blockwise.loss_from_hidden`), differentiated w.r.t. those hidden states;
3. backward, last block first: make the block resident, **recompute** it from its stored input with the
   gates of that block requiring grad, back-propagate the incoming gradient, keep the gates' gradient
   and hand the input gradient to the block below (block-local recomputation).

Peak memory ≈ the resident part of the model + one block's activations + the stored block inputs, flat
in depth. Weights never require grad; only the gates (one copy per sequence, for the Fisher variant)
and the block inputs do. Same numbers as ``taylor-gate`` (tests check it).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace

import torch

from minillm.calibration.blockwise import (
    _layers_replaced,
    _Replay,
    capture_first_block_inputs,
    head_resident,
    input_device,
    resident,
    run_block,
)
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.gates import GateHolder, GateLayout, gated
from minillm.scoring.spsa import frozen
from minillm.scoring.taylor_gate import first_order


def _head_gradients(ctx: ScoringContext, last: list) -> list[torch.Tensor]:
    """∂(Σ token losses)/∂(last hidden states) for every batch, through the model's own head and loss."""
    model, layers = ctx.model, ctx.adapter.decoder_layers(ctx.model)
    device = input_device(model)
    attention_type = getattr(layers[0], "attention_type", None)
    grads = []
    with head_resident(model, ctx.adapter):
        for batch in last:
            hidden = batch.hidden.detach().requires_grad_(True)
            ids = batch.input_ids.to(device)
            with _layers_replaced(layers, _Replay(hidden, attention_type)):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            tokens = ids.numel() - ids.shape[0]
            (grad,) = torch.autograd.grad(loss * tokens, hidden)
            grads.append(grad)
    return grads


def streaming_gate_gradients(ctx: ScoringContext, layout: GateLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-loss gate gradient and per-sequence Fisher, block by block (see the module docstring)."""
    model, adapter = ctx.model, ctx.adapter
    layers = adapter.decoder_layers(model)
    first_scored = min(ctx.layers)
    ids = ctx.calibration.input_ids
    total_tokens = ids.shape[0] * (ids.shape[1] - 1)
    gradient = torch.zeros(layout.size, dtype=torch.float64)
    fisher = torch.zeros(layout.size, dtype=torch.float64)
    slices = {layer: (heads, channels) for layer, heads, channels in layout.slices()}
    with frozen(list(model.parameters())), torch.inference_mode(False):
        hidden = capture_first_block_inputs(model, adapter, ctx.calibration)
        inputs: dict[int, list] = {}
        for i, layer in enumerate(layers):
            if i >= first_scored:
                inputs[i] = hidden
            with resident(layer):
                hidden = run_block(layer, hidden)
            ctx.report("streaming forward", i + 1, len(layers))
        with torch.enable_grad():
            upstream = _head_gradients(ctx, hidden)
            for i in range(len(layers) - 1, first_scored - 1, -1):
                layer, below = layers[i], []
                one = GateLayout.from_context(_only(ctx, i)) if i in slices else None
                with resident(layer):
                    for batch, grad_out in zip(inputs[i], upstream, strict=True):
                        x = batch.hidden.detach().requires_grad_(i > first_scored)
                        targets = [x] if x.requires_grad else []
                        gates = None
                        if one is not None:
                            gates = torch.ones(
                                x.shape[0], one.size, dtype=x.dtype, device=x.device, requires_grad=True
                            )
                            targets.append(gates)
                        if not targets:
                            continue
                        hooks = (
                            gated(_only(ctx, i), one, GateHolder(gates)) if one is not None else nullcontext()
                        )
                        with hooks:
                            out = layer(x, *batch.args, **batch.kwargs)
                        out = out[0] if isinstance(out, tuple) else out
                        grads = torch.autograd.grad(out, targets, grad_out)
                        if x.requires_grad:
                            below.append(grads[0])
                        if gates is not None:
                            per_sequence = grads[-1].detach().double().cpu()
                            heads, channels = slices[i]
                            span = slice(heads.start, channels.stop)
                            gradient[span] += per_sequence.sum(0) / total_tokens
                            fisher[span] += (per_sequence / (ids.shape[1] - 1)).pow(2).sum(0)
                upstream = below
                ctx.report("streaming backward", len(layers) - i, len(layers) - first_scored)
                if i <= first_scored:
                    break
    return gradient, fisher / ids.shape[0]


def _only(ctx: ScoringContext, index: int) -> ScoringContext:
    return replace(ctx, layers=[index])


def stream_taylor_gate(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    gradient, _ = streaming_gate_gradients(ctx, layout)
    return ScoreResult(
        scores=layout.layer_scores(first_order(gradient)),
        forward_passes=2,
        backward_passes=1,
        notes={"variant": "first-order", "gates": layout.size, "streaming": True},
    )
