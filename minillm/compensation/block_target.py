"""The block target (``--compensation-target block``): the MLP's closing projection also makes up for what
the *same block's* attention cut left, so the block's output on the pruned prefix's input is fitted to what
the dense block makes of that same input.

Why: with the default target (``pruned``) each closing projection only reproduces its own output, so the
attention cut's error passes into the residual stream untouched. The dense-output target (``dense``)
asks every layer for the dense *model's* output, so its kept columns are spent on the drift that earlier
blocks' cuts caused, which the residual stream carries on regardless (measured much worse). The block
target sits between: the reference is the dense block run on the pruned prefix's own input, so nothing
of the earlier drift is asked back, only this block's own error.

Derivation, per block with input ``x`` (the pruned prefix's): ``y_d`` = the block as yet uncut on ``x``
(:func:`dense_block_outputs`, one pass before anything in it changes); after o_proj's refit, the MLP
moments pass runs the *whole* block with the attention compensated and the MLP uncut, giving down_proj's
inputs ``u`` and the block output ``y'``. When the block adds down_proj's output to its own output
(a pre-norm residual block, possibly scaled by a constant ``α``, Granite's ``residual_multiplier``),
changing down_proj from ``W`` to ``W'`` moves the output to ``y' + α (W' − W) u``, so matching ``y_d``
means fitting ``W'_K u_K`` to ``W u + d / α`` with ``d = y_d − y'``:

    B'_K = B_K + (H_KK + δI)⁻¹ (H_KR B_R + Σ u_K dᵀ / α)

(:mod:`.refit`'s target moments ``E = Σ u dᵀ / α``, ``in × out``). o_proj's refit is the default one:
its target already is the dense attention on ``x``. :func:`dense_block_outputs` measures ``α`` once per
block by shifting down_proj's output on one batch, by a small and a large random vector; a block that
normalises the MLP's output after down_proj (post-feed-forward norms: Gemma 2/3, OLMo 2/3, GLM-4,
EXAONE 4 among the tested families; a post-norm block such as OPT-350m's) is not linear in ``W'`` — near
one point it may look linear, but not with the same ``α`` at both sizes — and is refused. Cost: one more
block pass per block whose heads are cut, the MLP pass runs the whole block (not stopping at
down_proj), and the dense block's outputs for every calibration batch, kept where the executor keeps
activations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.hooks import input_hooks
from minillm.calibration.sequential import Block
from minillm.compensation.hessian import InputMoments
from minillm.errors import UsageError

#: ``forward(stop_after, each)``: every calibration batch through the block as it is now, stopping each
#: batch after ``stop_after`` has run (None: the whole block); ``each(k, output)`` receives batch ``k``'s
#: block output (whole-block passes only).
BlockForward = Callable[[nn.Module | None, Callable[[int, torch.Tensor], None] | None], object]
#: How far (relative to the probe shift) the block's output may move otherwise than by ``α`` times it.
ADDITIVE_TOLERANCE = 0.05
#: The probe shifts' sizes, relative to the larger RMS of the block's and down_proj's outputs.
PROBE_SIZES = (0.1, 10.0)


def _rms(tensor: torch.Tensor) -> float:
    return float(tensor.detach().double().pow(2).mean().sqrt())


@dataclass
class BlockReference:
    """The uncut block's outputs ``y_d`` per calibration batch, and ``scale`` = ``α``: how much the block's
    output moves per unit that down_proj's output moves."""

    outputs: list[torch.Tensor]
    scale: float


@torch.no_grad()
def _response(block: Block, closing: nn.Linear, first: torch.Tensor, relative: float) -> tuple[float, float]:
    """Shift ``closing``'s output on the first batch by a fixed random vector of ``relative`` times the
    larger RMS of the block's and its outputs: ``α`` (least squares) and how far the block's output moved
    otherwise than by ``α`` times the shift (relative)."""
    shifts: list[torch.Tensor] = []

    def shifted(_module: nn.Module, _args: object, output: torch.Tensor) -> torch.Tensor:
        size = relative * max(_rms(first), _rms(output)) or relative
        generator = torch.Generator().manual_seed(0)
        shifts.append((torch.randn(output.shape[-1], generator=generator) * size).to(output.device,
                                                                                     output.dtype))
        return output + shifts[-1]

    handle = closing.register_forward_hook(shifted)
    try:
        moved = (block.call(block.inputs[0]) - first).double()
    finally:
        handle.remove()
    wide = shifts[0].expand_as(first).double()
    scale = float((moved * wide).sum() / (wide * wide).sum())
    return scale, float((moved - scale * wide).norm() / (abs(scale) * wide.norm())) if scale else float("inf")


@torch.no_grad()
def dense_block_outputs(block: Block, closing: nn.Linear) -> BlockReference:
    """The block's outputs for every calibration batch as it is now (call before anything in it
    changes), kept where the executor keeps activations, and ``α``; refuses a block whose output does not
    move by the same ``α`` times what ``closing``'s output moves for a small and a large shift (probed on
    the first batch: a normalisation after down_proj is linear near any point, to first order, but not
    with the same ``α`` at both sizes)."""
    outputs = [batch.hidden for batch in block.forward()]
    first = outputs[0].to(block.device)
    (small, near), (large, far) = (_response(block, closing, first, size) for size in PROBE_SIZES)
    error = max(near, far, abs(small - large) / max(abs(large), 1e-30))
    if error > ADDITIVE_TOLERANCE:
        raise UsageError(f"--compensation-target block needs blocks that add the MLP's output to the "
                         f"residual stream ({type(block.layer).__name__} {block.index} transforms it first: "
                         f"relative deviation {error:.2f}); use --compensation-target pruned")
    return BlockReference(outputs, large)


def block_moments(closing: nn.Linear, forward: BlockForward, reference: BlockReference,
                  dtype: torch.dtype) -> InputMoments:
    """``H`` of ``closing``'s inputs ``u`` and the target moments ``E = Σ u dᵀ / α``, ``d = y_d − y'`` per
    token, from one whole-block pass (``reference.outputs[k]``: batch ``k``'s dense block output)."""
    moments = InputMoments.zeros(closing.in_features, closing.weight.device, True, dtype)
    pending: list[torch.Tensor] = []

    def finished(k: int, output: torch.Tensor) -> None:
        if len(pending) != 1:
            raise ValueError(f"{type(closing).__name__} ran {len(pending)} times in one block call")
        wanted = reference.outputs[k].to(output.device, torch.float64) - output.double()
        moments.add(pending.pop(), wanted / reference.scale)

    with input_hooks([closing], lambda _module, x: pending.append(x.detach())):
        forward(None, finished)
    return moments
