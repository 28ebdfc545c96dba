"""Compensate one decoder block after its cut: the per-block step of the sequential pass.

For a block whose inputs already come from the pruned (and compensated) blocks before it:

1. attention, if it loses heads: one calibration forward gathers the moments of o_proj's inputs; with
   ``select="obs"`` the heads to remove are re-chosen by OBS (:mod:`.obs`) on those moments, keeping
   the plan's counts; then o_proj is compensated (``bias`` or ``refit``) and its removed columns zeroed;
2. MLP, if it loses channels: one more forward — through the now-compensated attention — gathers the
   moments of the closing projection's inputs; the same selection and compensation follow. With the
   block target (:mod:`.block_target`) and heads cut, this pass runs the whole block and its refit
   (even of an uncut MLP) also makes up for the attention cut's error at the block's output.

The block is changed in place with its removed groups' closing columns at zero, so it already computes
exactly what the physically cut block will (mask ≡ surgery); the caller then runs it once more to feed
the next block. Nothing here loops over blocks.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from typing import Literal

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.compensation.block_target import BlockForward, BlockReference, block_moments
from minillm.compensation.fluctuation import fluctuation_channels, fluctuation_heads
from minillm.compensation.hessian import DEFAULT_DAMPING, InputMoments, collect_moments
from minillm.compensation.obs import obs_order
from minillm.compensation.refit import fold_mean, refit_weight
from minillm.defaults import CompensationTarget, Precision
from minillm.plan import LayerPlan

Mode = Literal["none", "bias", "refit"]
#: Who chooses the groups: the plan as scored, OBS on the pruned prefix, or FLAP's fluctuation on the
#: pruned prefix (:mod:`.fluctuation`); the plan's counts stay in every case.
Select = Literal["plan", "obs", "fluctuation"]
#: MLP channels are removed by OBS in about this many rounds (a joint update per round).
OBS_CHANNEL_ROUNDS = 64


@dataclass(frozen=True)
class CompensationOptions:
    """How the cut is compensated: ``mode``, damping λ of ``H``, who chooses the groups, the dtype
    of ``H`` (``float32`` only where float64's working set does not fit: :mod:`minillm.streaming`;
    ``auto`` left unresolved means float64) and the refit's ``target``: the layer's own output on the
    pruned prefix's inputs (``pruned``), the dense model's output of that layer (``dense``,
    :mod:`.refit`), or for the MLP the dense block's output on the pruned prefix's input (``block``,
    :mod:`.block_target`)."""

    mode: Mode = "refit"
    damping: float = DEFAULT_DAMPING
    select: Select = "plan"
    precision: Precision = "float64"
    target: CompensationTarget = "pruned"

    @property
    def gram_dtype(self) -> torch.dtype:
        return torch.float32 if self.precision == "float32" else torch.float64  # auto: float64


@dataclass
class ClosingUpdate:
    """The compensated full-width weight (removed columns zero) and bias of one closing projection."""

    weight: torch.Tensor
    bias: torch.Tensor | None


def _head_columns(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def reselect_heads(plan: LayerPlan, shape: LayerShape, o: nn.Linear, moments: InputMoments,
                   options: CompensationOptions) -> LayerPlan:
    """The plan's head counts, the heads chosen by OBS on o_proj (whole kv groups, or in query mode the
    same number of query heads from every kv group)."""
    hd, group = shape.head_dim, shape.heads_per_kv
    gone_kv = shape.num_kv_heads - len(plan.kv_heads)
    gone_heads = shape.num_heads - len(plan.heads)
    if gone_heads == 0:
        return plan
    if gone_kv:  # whole kv groups (MHA: single heads)
        groups = [list(range(k * group * hd, (k + 1) * group * hd)) for k in range(shape.num_kv_heads)]
        removed = obs_order(o.weight, moments.gram, groups, gone_kv, options.damping).order
        return replace(plan, kv_heads=[k for k in range(shape.num_kv_heads) if k not in removed],
                       heads=[h for h in range(shape.num_heads) if h // group not in removed])
    groups = [list(range(h * hd, (h + 1) * hd)) for h in range(shape.num_heads)]
    families = [list(range(k * group, (k + 1) * group)) for k in range(shape.num_kv_heads)]
    removed = obs_order(o.weight, moments.gram, groups, gone_heads // shape.num_kv_heads, options.damping,
                        families=families).order
    return replace(plan, heads=[h for h in range(shape.num_heads) if h not in removed])


def reselect_channels(plan: LayerPlan, shape: LayerShape, closing: nn.Linear, moments: InputMoments,
                      options: CompensationOptions) -> LayerPlan:
    """The plan's channel count, the channels chosen by OBS on the closing projection."""
    gone = shape.intermediate - len(plan.channels)
    if gone == 0:
        return plan
    step = max(1, math.ceil(gone / OBS_CHANNEL_ROUNDS))
    removed = set(obs_order(closing.weight, moments.gram, [[c] for c in range(shape.intermediate)], gone,
                            options.damping, step=step).order)
    return replace(plan, channels=[c for c in range(shape.intermediate) if c not in removed])


@torch.no_grad()
def compensate_closing(linear: nn.Linear, moments: InputMoments, keep: torch.Tensor,
                       options: CompensationOptions) -> ClosingUpdate:
    """Compensate ``linear`` in place for keeping only input columns ``keep`` (the others are zeroed);
    ``moments``' ``H`` is used up (freed during the refit's solve)."""
    if options.mode == "refit":
        weight, bias = refit_weight(linear.weight, moments, keep, options.damping, linear.bias, release=True)
    elif options.mode == "bias":
        weight, bias = fold_mean(linear.weight, moments, keep, linear.bias)
    else:
        weight = linear.weight.clone()
        dropped = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
        dropped[keep.to(weight.device)] = False
        weight[:, dropped] = 0
        bias = linear.bias
    linear.weight.copy_(weight)
    if bias is not None and linear.bias is None:
        linear.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    elif bias is not None:
        linear.bias.copy_(bias)
    return ClosingUpdate(linear.weight.detach(), None if linear.bias is None else linear.bias.detach())


def compensate_block(layer: nn.Module, adapter: ArchAdapter, plan: LayerPlan, shape: LayerShape,
                     forward: BlockForward, options: CompensationOptions,
                     dense: Mapping[str, Sequence[torch.Tensor]] | None = None,
                     reference: BlockReference | None = None,
                     solving: Callable[[], AbstractContextManager[object]] = nullcontext
                     ) -> tuple[LayerPlan, dict[str, ClosingUpdate]]:
    """Select (optionally), compensate and zero the removed groups of one resident block, in place.

    ``forward(module, each)`` runs every calibration batch through the block as it is now, and may stop
    each batch once ``module`` has run (the attention pass then skips the MLP); with ``module`` None the
    whole block runs and ``each(k, output)`` sees every batch's block output. ``dense`` (the refit's dense
    target): ``{"attn" | "mlp": the dense model's inputs of that closing projection, per batch}``;
    ``reference`` (the block target, when heads are cut): the uncut block's outputs per batch
    (:func:`~minillm.compensation.block_target.dense_block_outputs`). ``solving()``: the context each
    selection and solve runs in, which needs only the closing projections (the offloaded walk drops the
    rest of the loaded block meanwhile: :meth:`~minillm.calibration.sequential.Block.unloaded`).
    Returns the (possibly re-selected) layer plan and the updated closing projections,
    ``{"attn": …, "mlp": …}``.
    """
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    updates: dict[str, ClosingUpdate] = {}
    gram = options.mode == "refit" or options.select != "plan"  # bias folding needs only the means
    paired = options.mode == "refit" and options.target == "dense"
    whole = uses_block_target(options, plan, shape)
    if paired and dense is None:
        raise ValueError("the dense-output target needs the dense model's closing inputs")
    if whole and reference is None:
        raise ValueError("the block target needs the uncut block's outputs")

    def partners(linear: nn.Linear, name: str) -> dict[nn.Linear, Sequence[torch.Tensor]] | None:
        return {linear: dense[name]} if paired and dense is not None else None

    if len(plan.heads) < shape.num_heads:
        moments = collect_moments([attn.o], lambda: forward(attn.o, None), gram, options.gram_dtype,
                                  partners(attn.o, "attn"))[attn.o]
        with solving():
            if options.select == "obs":
                plan = reselect_heads(plan, shape, attn.o, moments, options)
            elif options.select == "fluctuation":
                plan = fluctuation_heads(plan, shape, attn.o, moments)
            updates["attn"] = compensate_closing(attn.o, moments, _head_columns(plan.heads, shape.head_dim),
                                                 options)
        del moments
    if len(plan.channels) < shape.intermediate or whole:
        if whole and reference is not None:
            moments = block_moments(mlp.closing, forward, reference, options.gram_dtype)
        else:
            moments = collect_moments([mlp.closing], lambda: forward(mlp.closing, None), gram,
                                      options.gram_dtype, partners(mlp.closing, "mlp"))[mlp.closing]
        with solving():
            if options.select == "obs":
                plan = reselect_channels(plan, shape, mlp.closing, moments, options)
            elif options.select == "fluctuation":
                plan = fluctuation_channels(plan, shape, mlp.closing, moments)
            updates["mlp"] = compensate_closing(mlp.closing, moments, torch.tensor(plan.channels), options)
    return plan, updates


def uses_block_target(options: CompensationOptions, plan: LayerPlan, shape: LayerShape) -> bool:
    """The block target changes anything only where the block's heads are cut (the attention's error is
    what the MLP makes up for); elsewhere it is the default refit."""
    return options.mode == "refit" and options.target == "block" and len(plan.heads) < shape.num_heads
