"""LLM-Pruner's Taylor importance from back-propagated gradients (Ma et al., 2023).

Registry names and formulas (per weight, then per group):

* ``taylor``: element-wise first order ``Σ_group |W ⊙ G|``.
* ``taylor-fisher``: element-wise with the second-order term, LLM-Pruner's ``param_mix``:
  ``Σ_group |W ⊙ G − ½ W ⊙ F ⊙ W|`` where ``F`` (the diagonal Fisher standing in for the Hessian) is
  the mean over calibration sequences of the squared per-sequence gradient.
* ``taylor-vector``: vector-wise ``Σ_linear |Σ_{group slice of that linear} W ⊙ G|`` — the first-order
  loss change of removing the group's whole slice of each projection, then summed over projections.

``G`` is the gradient of the mean calibration loss, by plain back-propagation through the resident
model (:mod:`minillm.calibration.backprop`) or one block at a time (``taylor-lowmem``, or option
``whole_model=false``; :meth:`minillm.calibration.sequential.Sequential.weight_gradients`).
Paper: "LLM-Pruner: On the Structural Pruning of Large Language Models", https://arxiv.org/abs/2305.11627
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.sequential import Block
from minillm.groups import sum_by_group
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def elementwise(weight: torch.Tensor, gradient: torch.Tensor, fisher: torch.Tensor | None = None
                ) -> torch.Tensor:
    """``|W ⊙ G|`` or, with ``fisher``, ``|W ⊙ G − ½ W ⊙ F ⊙ W|``."""
    w = weight.float()
    salience = w * gradient
    if fisher is not None:
        salience = salience - 0.5 * w * fisher * w
    return salience.abs()


def vectorwise_scores(adapter: ArchAdapter, layer: nn.Module, shape: LayerShape,
                      signed: dict[nn.Linear, torch.Tensor]) -> LayerScores:
    """Sum the signed ``W ⊙ G`` over each group's slice of each Linear, take |·|, add over Linears."""
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    heads = signed[attn.q].reshape(shape.num_heads, -1).sum(1).abs()
    heads = heads + signed[attn.o].reshape(-1, shape.num_heads, shape.head_dim).sum((0, 2)).abs()
    kv = signed[attn.k].reshape(shape.num_kv_heads, -1).sum(1).abs()
    kv = kv + signed[attn.v].reshape(shape.num_kv_heads, -1).sum(1).abs()
    channels = signed[mlp.closing].sum(0).abs()
    for linear in mlp.expand:
        channels = channels + signed[linear].sum(1).abs()
    return LayerScores(heads=heads.float().cpu(), kv_heads=kv.float().cpu(), channels=channels.float().cpu())


@dataclass(frozen=True)
class TaylorOptions:
    """Options of the taylor criteria.

    whole_model: back-propagate through the whole resident model (LLM-Pruner's way: the autograd graph of
        a full forward pass, about 2.5 × a forward pass's memory — kept to show that cost); ``False``
        computes the same gradients one block at a time (``taylor-lowmem``). Offloaded models always go
        block by block.
    """

    whole_model: bool = True


def _score(ctx: ScoringContext, variant: str, whole_model: bool | None = None) -> ScoreResult:
    options = ctx.options_as(TaylorOptions)
    whole = options.whole_model if whole_model is None else whole_model

    def per_block(block: Block, grads: dict[nn.Linear, torch.Tensor],
                  squares: dict[nn.Linear, torch.Tensor] | None) -> LayerScores:
        layer, shape = block.layer, ctx.shapes[block.index]
        if variant == "vector":
            signed = {lin: lin.weight.float() * grads[lin] for lin in ctx.adapter.prunable_linears(layer)}
            return vectorwise_scores(ctx.adapter, layer, shape, signed)

        def importance(linear: nn.Linear) -> torch.Tensor:
            return elementwise(linear.weight, grads[linear], squares[linear] if squares is not None else None)

        return sum_by_group(ctx.adapter, layer, shape, importance)

    scores, passes = ctx.run.weight_gradients(ctx.adapter.prunable_linears, per_block, ctx.layers,
                                              whole_model=whole, per_sequence=variant == "fisher")
    backprop = "whole model" if whole and not ctx.run.offloaded else "block-local"
    return ScoreResult(scores=scores, forward_passes=passes, backward_passes=passes if whole else 1,
                       notes={"variant": variant, "backprop": backprop})


def score_taylor(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, "element")


def score_taylor_fisher(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, "fisher")


def score_taylor_vector(ctx: ScoringContext) -> ScoreResult:
    return _score(ctx, "vector")


def score_taylor_lowmem(ctx: ScoringContext) -> ScoreResult:
    """``taylor``'s scores from the block-local backward pass (memory of a forward pass)."""
    return _score(ctx, "element", whole_model=False)
