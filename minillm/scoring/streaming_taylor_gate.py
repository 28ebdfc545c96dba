"""Taylor-gate block by block: exact gate gradients with one resident decoder block at a time.

The in-memory ``taylor-gate`` checkpoints every block; here the gates are differentiated by the
block-local backward loop of :mod:`minillm.scoring.block_backward`, so that offloaded models stream
too: each block is recomputed from its stored inputs with that block's gates requiring grad (one copy
per sequence, for the Fisher variant), and only the gates and the block inputs ever require grad.
Same numbers as ``taylor-gate`` (tests check it).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from minillm.calibration.blocks import BlockBatch
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.block_backward import backward_block_by_block
from minillm.scoring.gates import GateHolder, GateLayout, gated
from minillm.scoring.taylor_gate import first_order


class _GateProbe:
    """Attaches one gate per (sequence, group) of the block being recomputed; sums their gradients."""

    def __init__(self, ctx: ScoringContext, layout: GateLayout) -> None:
        self.ctx = ctx
        ids = ctx.calibration.input_ids
        self.total_tokens = ids.shape[0] * (ids.shape[1] - 1)
        self.tokens_per_sequence = ids.shape[1] - 1
        self.sequences = ids.shape[0]
        self.gradient = torch.zeros(layout.size, dtype=torch.float64)
        self.fisher = torch.zeros(layout.size, dtype=torch.float64)
        self.spans = {layer: slice(heads.start, channels.stop) for layer, heads, channels in layout.slices()}
        self.layer_gates: dict[int, tuple[ScoringContext, GateLayout]] = {}

    def _layer_gates(self, index: int) -> tuple[ScoringContext, GateLayout]:
        """The context and gate layout of block ``index`` alone, built once per block, not per batch."""
        if index not in self.layer_gates:
            only = replace(self.ctx, layers=[index])
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


def streaming_gate_gradients(ctx: ScoringContext, layout: GateLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean-loss gate gradient and per-sequence Fisher, block by block."""
    probe = _GateProbe(ctx, layout)
    backward_block_by_block(ctx, probe)
    return probe.gradient, probe.fisher / probe.sequences


def stream_taylor_gate(ctx: ScoringContext) -> ScoreResult:
    layout = GateLayout.from_context(ctx)
    gradient, _ = streaming_gate_gradients(ctx, layout)
    return ScoreResult(
        scores=layout.layer_scores(first_order(gradient)),
        forward_passes=2,
        backward_passes=1,
        notes={"variant": "first-order", "gates": layout.size, "streaming": True},
    )
