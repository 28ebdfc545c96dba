"""``fwd-grad``: forward-mode gate gradients with activity perturbation — exact directional derivatives.

Instead of SPSA's finite differences, ``torch.func.jvp`` gives the exact directional derivative
``∇L · v`` along a tangent ``v`` in one forward-mode pass (memory of about two forward passes, no ε
to tune, no autograd graph). One direction per pass would still suffer the ``sqrt(K/d)`` law, so each
sequence of a batch gets **its own copy of the gates and its own tangent** (activity perturbation):
the per-sequence summed losses ``L_b`` give ``(∇_{g_b} L_b · v_b) v_b``, an unbiased estimate of
``∇ L_b`` — ``B`` independent directions per pass instead of one. Averaged over sequences and passes:

    Ĝ = (1/N) Σ_passes Σ_b (∇_{g_b} L_b · v_b) v_b / passes,   v_b ~ N(0, I),  N = predicted tokens.

``mode="token"`` goes further — one gate copy and tangent per token, paired with that token's own
loss — which cuts variance again but is biased: it keeps only each gate's effect on the loss at the
same position (attention carries effects to later positions). Option ``mode``
(:class:`FwdGradOptions`: ``sequence`` default or ``token``); ``--spsa-steps`` sets the number of
passes over the calibration set.
Score: ``|Ĝ|`` as in ``taylor-gate``, whose exact gradient this estimates.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.func import jvp

from minillm.calibration.forward import input_device
from minillm.calibration.spsa import frozen
from minillm.scoring.base import ScoreResult, ScoringContext
from minillm.scoring.gates import GateHolder, GateLayout, gated, token_losses

_SEED_STRIDE = 1_000_003


def _tangent(shape: tuple[int, ...], seed: int, step: int, batch: int, dtype: torch.dtype,
             device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed * 31 + step * _SEED_STRIDE + batch)
    return torch.randn(shape, generator=generator, dtype=dtype, device=device)


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Plain-PyTorch attention for the duration: fused SDPA kernels have no forward-mode derivative."""
    previous = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def directional_derivatives(model: nn.Module, holder: GateHolder, batch: torch.Tensor, tangent: torch.Tensor,
                            mode: str) -> torch.Tensor:
    """Exact ``∇_{g_b} L_b · v_b`` per sequence (``(B,)``) or per token (``(B, T-1)``), by one jvp pass.

    ``tangent`` has the shape of the gate copies: ``(B, d)`` per sequence or ``(B, T, d)`` per token.
    """

    def losses(gates: torch.Tensor) -> torch.Tensor:
        holder.value = gates
        per_token = token_losses(model, batch, save_memory=False)
        return per_token.sum(1) if mode == "sequence" else per_token

    _, directional = jvp(losses, (torch.ones_like(tangent),), (tangent,))
    return directional


def _walked_derivatives(ctx: ScoringContext, holder: GateHolder, tangents: list[torch.Tensor],
                        mode: str) -> list[torch.Tensor]:
    """:func:`directional_derivatives` for every batch by one forward-mode walk through the blocks
    (:meth:`~minillm.calibration.sequential.Sequential.forward_mode`): one resident block at a time."""

    def bind(gates: torch.Tensor | None) -> None:
        holder.value = gates if gates is not None else torch.ones(1)

    def losses(ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        per_token = token_losses(ctx.model, ids, save_memory=False, last_hidden=last)
        return per_token.sum(1) if mode == "sequence" else per_token

    return ctx.run.forward_mode(bind, [torch.ones_like(t) for t in tangents], tangents, losses,
                                "forward-mode walk")


def forward_gradient(ctx: ScoringContext, layout: GateLayout, passes: int, mode: str = "sequence",
                     on_pass: object = None) -> list[torch.Tensor]:
    """Running estimates of ∂L/∂gates after each pass (float64, CPU): ``result[k-1]`` uses k passes.

    A resident model takes one jvp through the whole model per batch; an offloaded one walks its blocks
    in forward mode (same tangents, same numbers), one resident block at a time."""
    if mode not in ("sequence", "token"):
        raise ValueError(f"fwd-grad mode must be 'sequence' or 'token', got {mode!r}")
    model = ctx.model
    device = input_device(model)
    dtype = ctx.adapter.mlp(ctx.layer(layout.layers[0])).closing.weight.dtype
    ids = ctx.calibration.input_ids
    total_tokens = ids.shape[0] * (ids.shape[1] - 1)
    holder = GateHolder(torch.ones(layout.size, dtype=dtype, device=device))
    running = torch.zeros(layout.size, dtype=torch.float64)
    history = []
    with frozen(list(model.parameters())), torch.inference_mode(False), torch.no_grad(), \
            gated(ctx, layout, holder), eager_attention(model):
        for step in range(passes):
            batches = [batch.to(device) for batch in ctx.calibration.batches()]
            leads = [(b.shape[0],) if mode == "sequence" else (b.shape[0], b.shape[1]) for b in batches]
            tangents = [_tangent((*lead, layout.size), ctx.seed, step, b, dtype, device)
                        for b, lead in enumerate(leads)]
            if ctx.run.offloaded:
                found = _walked_derivatives(ctx, holder, tangents, mode)
            else:
                found = [directional_derivatives(model, holder, batch, tangent, mode)
                         for batch, tangent in zip(batches, tangents, strict=True)]
            for directional, tangent in zip(found, tangents, strict=True):
                if mode == "token":
                    tangent = tangent[:, :-1]  # the last position predicts nothing
                weighted = directional.double()[..., None] * tangent.to(directional.device).double()
                weighted = weighted.reshape(-1, layout.size).sum(0)
                running += weighted.cpu() / total_tokens
            history.append(running / (step + 1))
            ctx.report("forward-gradient passes", step + 1, passes)
    holder.value = torch.ones(1)
    return history


@dataclass(frozen=True)
class FwdGradOptions:
    """Options of ``fwd-grad``.

    mode: ``sequence`` (one gate copy and tangent per sequence: unbiased) or ``token`` (one per token,
        paired with that token's loss: lower variance, biased).
    """

    mode: Literal["sequence", "token"] = "sequence"


def score_fwd_grad(ctx: ScoringContext) -> ScoreResult:
    """Forward mode needs no backward pass, so an offloaded model streams: (hidden, tangent) pairs walk
    the blocks one resident block at a time (activations twice, one block's weights)."""
    layout = GateLayout.from_context(ctx)
    mode = ctx.options_as(FwdGradOptions).mode
    history = forward_gradient(ctx, layout, ctx.spsa.steps, mode)
    return ScoreResult(scores=layout.layer_scores(history[-1].abs()), forward_passes=ctx.spsa.steps,
                       notes={"jvp_passes": ctx.spsa.steps, "mode": mode, "gates": layout.size,
                              "directions_per_pass": ctx.calibration.input_ids.shape[0]
                              * (1 if mode == "sequence" else ctx.calibration.input_ids.shape[1] - 1)})
