"""One scalar gate per group, and the loss as a function of the gates: the machinery of gate criteria.

A *gate* multiplies one group's slice of the input of a closing projection: query head ``h`` of a
layer scales columns ``h·head_dim … (h+1)·head_dim`` of the ``o`` projection's input, MLP channel ``c``
scales column ``c`` of the closing (down / fc2) projection's input. With every gate at 1 the model is
unchanged; a gate at 0 is exactly the masked model (see :mod:`minillm.surgery`). So ``∂L/∂g`` at
``g = 1`` is the first-order loss change of removing that group, and it needs derivatives with respect
to a few thousand gates instead of ~10⁸ weights — by back-propagation (:func:`gate_gradients`,
weights frozen, activation checkpointing per decoder block), by SPSA on the gates (``fms-gate``), or
by forward-mode directional derivatives (``fwd-grad``).

Gates live in one flat vector laid out by :class:`GateLayout`. The vector may carry leading
dimensions — ``(batch, d)`` or ``(batch, tokens, d)`` — so each sequence or token gets its own gate
copy (per-sequence gradients in one backward pass; independent tangents per sequence in ``fwd-grad``).
Key/value heads get no gate: they act only through their query heads, whose gates already measure it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minillm.calibration.blocks import BlockBatch
from minillm.calibration.forward import input_device
from minillm.calibration.spsa import frozen
from minillm.plan import LayerScores
from minillm.scoring.base import ScoringContext


@dataclass(frozen=True)
class GateLayout:
    """Where each layer's head and channel gates sit in the flat gate vector."""

    layers: tuple[int, ...]
    num_heads: tuple[int, ...]
    head_dims: tuple[int, ...]
    channels: tuple[int, ...]
    kv_heads: tuple[int, ...]

    @classmethod
    def from_context(cls, ctx: ScoringContext) -> GateLayout:
        shapes = [ctx.shapes[i] for i in ctx.layers]
        return cls(tuple(ctx.layers), tuple(s.num_heads for s in shapes), tuple(s.head_dim for s in shapes),
                   tuple(s.intermediate for s in shapes), tuple(s.num_kv_heads for s in shapes))

    @property
    def size(self) -> int:
        return sum(self.num_heads) + sum(self.channels)

    def slices(self) -> Iterator[tuple[int, slice, slice]]:
        """``(layer, head slice, channel slice)`` of the flat vector, layer by layer."""
        start = 0
        for layer, heads, channels in zip(self.layers, self.num_heads, self.channels, strict=True):
            yield layer, slice(start, start + heads), slice(start + heads, start + heads + channels)
            start += heads + channels

    def layer_scores(self, values: torch.Tensor) -> dict[int, LayerScores]:
        """Split a flat per-gate score vector into :class:`LayerScores` (key/value heads score 0)."""
        values = values.detach().float().cpu()
        result = {}
        for (layer, heads, channels), kv in zip(self.slices(), self.kv_heads, strict=True):
            result[layer] = LayerScores(heads=values[heads].clone(), kv_heads=torch.zeros(kv),
                                        channels=values[channels].clone())
        return result


class GateHolder:
    """The gate tensor the hooks read; criteria swap ``value`` (plain, perturbed, dual or per-sequence)."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value


def _expand(gate: torch.Tensor, x: torch.Tensor, repeat: int) -> torch.Tensor:
    """Broadcast a gate slice (``(n,)``, ``(B, n)`` or ``(B, T, n)``) onto an input ``(B, T, n·repeat)``.

    Some families (OPT's MLP) flatten tokens to ``(B·T, n·repeat)``; per-sequence or per-token gates
    are then flattened the same way.
    """
    if repeat > 1:
        gate = gate.repeat_interleave(repeat, dim=-1)
    if gate.dim() == 2:
        gate = gate[:, None, :]
    if gate.dim() == 3 and x.dim() == 2:
        tokens = x.shape[0] // gate.shape[0]
        gate = gate.expand(gate.shape[0], tokens, gate.shape[-1]).reshape(x.shape[0], gate.shape[-1])
    return gate.to(x.dtype)


@contextmanager
def gated(ctx: ScoringContext, layout: GateLayout, holder: GateHolder) -> Iterator[None]:
    """Multiply each group's slice of the closing projections' inputs by its gate; hooks always removed."""
    handles = []

    def hook(sl: slice, repeat: int):
        def pre(module: nn.Module, args: tuple) -> tuple:
            x = args[0]
            gate = holder.value[..., sl]
            return (x * _expand(gate, x, repeat), *args[1:])

        return pre

    try:
        for (layer, heads, channels), head_dim in zip(layout.slices(), layout.head_dims, strict=True):
            block = ctx.layer(layer)
            attn, mlp = ctx.adapter.attention(block), ctx.adapter.mlp(block)
            handles.append(attn.o.register_forward_pre_hook(hook(heads, head_dim)))
            handles.append(mlp.closing.register_forward_pre_hook(hook(channels, 1)))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def checkpointed_blocks(ctx: ScoringContext, enabled: bool = True) -> Iterator[None]:
    """Recompute every decoder block in the backward pass: only block inputs are kept in between."""
    layers = list(ctx.adapter.decoder_layers(ctx.model)) if enabled else []
    saved = []
    try:
        for block in layers:
            saved.append(block.__dict__.get("forward"))
            inner = block.forward

            def forward(*args, _inner=inner, **kwargs):
                return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            block.forward = forward
        yield
    finally:
        for block, old in zip(layers, saved, strict=False):  # saved may be shorter after an error
            if old is None:
                del block.forward
            else:
                block.forward = old


def token_losses(model: nn.Module, input_ids: torch.Tensor, chunk: int = 32, save_memory: bool = True,
                 last_hidden: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token NLL of every position ``(B, T-1)``, computing logits a few positions at a time.

    With ``save_memory`` each chunk's logits are recomputed in the backward pass instead of being kept,
    so back-propagating through the loss never holds a ``tokens × vocabulary`` tensor. ``last_hidden``:
    the base model's output when it is already known (a block-by-block walk), else the model runs.
    """
    hidden = model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state \
        if last_hidden is None else last_hidden
    head = model.get_output_embeddings()
    targets = input_ids[:, 1:]
    hidden = hidden[:, :-1]

    def piece(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = head(h)
        logits = logits if logits.dtype == torch.float64 else logits.float()
        flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
        return flat.view(y.shape)

    parts = []
    for start in range(0, hidden.shape[1], chunk):
        h, y = hidden[:, start : start + chunk], targets[:, start : start + chunk]
        parts.append(checkpoint(piece, h, y, use_reentrant=False) if save_memory else piece(h, y))
    return torch.cat(parts, dim=1)


@dataclass
class GateGradients:
    """Mean-loss gradient of every gate, the mean of per-sequence squared gradients, and the cost."""

    gradient: torch.Tensor
    fisher: torch.Tensor
    forward_passes: int
    backward_passes: int


def gate_gradients(ctx: ScoringContext, layout: GateLayout, use_checkpoint: bool = True) -> GateGradients:
    """Exact ∂L/∂g at g = 1 by back-propagation to the gates only (every weight frozen, no ``.grad``).

    Gates get one copy per sequence, so a single backward pass also yields per-sequence gradients: their
    squares, averaged, are the diagonal (empirical) Fisher of the gates. Resident models back-propagate
    through the whole model (every block checkpointed when ``use_checkpoint``); offloaded models through
    one recomputed block at a time (:meth:`~minillm.calibration.sequential.Sequential.backward`).
    """
    if ctx.run.offloaded:
        return block_gate_gradients(ctx, layout)
    model = ctx.model
    device = input_device(model)
    dtype = ctx.adapter.mlp(ctx.layer(layout.layers[0])).closing.weight.dtype
    total_tokens = ctx.calibration.input_ids.shape[0] * (ctx.calibration.input_ids.shape[1] - 1)
    gradient = torch.zeros(layout.size, dtype=torch.float64)
    fisher = torch.zeros(layout.size, dtype=torch.float64)
    holder = GateHolder(torch.ones(layout.size, dtype=dtype, device=device))
    batches = ctx.calibration.batches()
    with frozen(list(model.parameters())), torch.inference_mode(False), torch.enable_grad(), \
            gated(ctx, layout, holder), checkpointed_blocks(ctx, use_checkpoint):
        for done, batch in enumerate(batches):
            batch = batch.to(device)
            gates = torch.ones(batch.shape[0], layout.size, dtype=dtype, device=device, requires_grad=True)
            holder.value = gates
            losses = token_losses(model, batch, save_memory=use_checkpoint)
            (per_sequence,) = torch.autograd.grad(losses.sum(), gates)
            per_sequence = per_sequence.detach().double().cpu()
            gradient += per_sequence.sum(0) / total_tokens
            fisher += (per_sequence / losses.shape[1]).pow(2).sum(0)
            ctx.report("gate gradients", done + 1, len(batches))
    holder.value = torch.ones(1)
    n = ctx.calibration.input_ids.shape[0]
    return GateGradients(gradient, fisher / n, forward_passes=2 if use_checkpoint else 1, backward_passes=1)


class _GateProbe:
    """Attaches one gate per (sequence, group) of the block being recomputed; sums their gradients."""

    def __init__(self, ctx: ScoringContext, layout: GateLayout) -> None:
        self.ctx = ctx
        ids = ctx.calibration.input_ids
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.tokens_per_sequence = ids.shape[1] - 1
        self.gradient = torch.zeros(layout.size, dtype=torch.float64)
        self.fisher = torch.zeros(layout.size, dtype=torch.float64)
        self.spans = {layer: slice(heads.start, channels.stop) for layer, heads, channels in layout.slices()}
        self.layer_gates: dict[int, tuple[ScoringContext, GateLayout]] = {}

    def _layer_gates(self, index: int) -> tuple[ScoringContext, GateLayout]:
        """The context and gate layout of block ``index`` alone, built once per block, not per batch."""
        if index not in self.layer_gates:
            only = replace(self.ctx, layers=[index], run=self.ctx.run)
            self.layer_gates = {index: (only, GateLayout.from_context(only))}
        return self.layer_gates[index]

    @contextmanager
    def attach(self, index: int, layer: nn.Module, batch: BlockBatch) -> Iterator[list[torch.Tensor]]:
        if index not in self.spans:
            yield []
            return
        only, one = self._layer_gates(index)
        x = batch.hidden
        gates = torch.ones(x.shape[0], one.size, dtype=x.dtype, device=x.device, requires_grad=True)
        with gated(only, one, GateHolder(gates)):
            yield [gates]

    def receive(self, index: int, batch: BlockBatch, gradients: Sequence[torch.Tensor]) -> None:
        if not gradients:
            return
        per_sequence = gradients[0].detach().double().cpu()
        span = self.spans[index]
        self.gradient[span] += per_sequence.sum(0) / self.total_tokens
        self.fisher[span] += (per_sequence / self.tokens_per_sequence).pow(2).sum(0)

    def finish(self, index: int, layer: nn.Module) -> None:
        pass


def block_gate_gradients(ctx: ScoringContext, layout: GateLayout) -> GateGradients:
    """:func:`gate_gradients` one recomputed block at a time (same numbers; any model, offloaded too)."""
    probe = _GateProbe(ctx, layout)
    ctx.run.backward(probe, min(layout.layers), "gate gradients")
    n = ctx.calibration.input_ids.shape[0]
    return GateGradients(probe.gradient, probe.fisher / n, forward_passes=2, backward_passes=1)
