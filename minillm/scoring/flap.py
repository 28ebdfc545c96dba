"""``flap``: FLAP — fluctuation-based structured pruning with bias compensation (An et al., AAAI 2024).

1. Fluctuation metric per input channel ``j`` of a closing projection: the sample variance of ``x_j``
   over calibration tokens times the squared norm of weight column ``j``: ``Var(x_j) · ‖W[:, j]‖²``
   (``o`` for attention — a head's score is the mean over its ``head_dim`` channels — and down / fc2
   for the MLP).
2. Standardisation per structure type: attention channels of all scored layers together, MLP channels
   together, ``z = (s − mean) / std``, which makes heads and channels comparable.
3. Adaptive structure search: FLAP ranks all heads and channels of all layers by ``z`` alone and cuts
   below one global threshold. We emit ``score = cost × z`` (cost = parameters of the unit), so the
   plan's ``global`` allocation — which ranks units by score per parameter — ranks them by ``z`` exactly
   as FLAP does, with the parameter budget filled the same way. Under ``uniform`` it is FLAP's UL-UM.
4. Bias compensation: the calibration mean of every removed channel is folded into a bias of the
   closing projection (:mod:`minillm.scoring.compensation`).

Paper: https://arxiv.org/abs/2312.11983
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.sequential import Block
from minillm.calibration.stats import ColumnStats
from minillm.groups import layer_costs
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext, closing_linears


def fluctuation(weight: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """``Var(x_j) · ‖W[:, j]‖²`` for every input column j."""
    return variance.double().cpu() * weight.detach().double().pow(2).sum(0).cpu()


def standardise(values: list[torch.Tensor]) -> list[torch.Tensor]:
    """Z-score a family of tensors with the mean and std of all their elements together."""
    flat = torch.cat([v.reshape(-1) for v in values])
    mean, std = flat.mean(), flat.std().clamp_min(1e-30)
    return [(v - mean) / std for v in values]


@dataclass(frozen=True)
class LayerFluctuation:
    """What FLAP keeps of one layer: raw fluctuation and calibration mean of both closing projections.

    Small (one value per input channel): collected while each block is resident, standardised across
    layers at the end.
    """

    attn: torch.Tensor
    mlp: torch.Tensor
    attn_mean: torch.Tensor
    mlp_mean: torch.Tensor


def layer_fluctuation(
    o: nn.Linear, closing: nn.Linear, stats: dict[nn.Linear, ColumnStats]
) -> LayerFluctuation:
    return LayerFluctuation(
        attn=fluctuation(o.weight, stats[o].variance),
        mlp=fluctuation(closing.weight, stats[closing].variance),
        attn_mean=stats[o].mean.float().cpu(),
        mlp_mean=stats[closing].mean.float().cpu(),
    )


def flap_result(ctx: ScoringContext, per_layer: dict[int, LayerFluctuation], **notes: object) -> ScoreResult:
    """Standardise per structure type over all scored layers, weight by cost, attach the compensation."""
    attn_z = standardise([per_layer[i].attn for i in ctx.layers])
    mlp_z = standardise([per_layer[i].mlp for i in ctx.layers])
    scores, compensation = {}, {}
    for index, az, mz in zip(ctx.layers, attn_z, mlp_z, strict=True):
        shape = ctx.shapes[index]
        costs = layer_costs(ctx.adapter, ctx.layer(index), shape)
        heads = az.view(shape.num_heads, shape.head_dim).mean(1)
        kv = heads.view(shape.num_kv_heads, shape.heads_per_kv).mean(1)
        scores[index] = LayerScores(heads=(heads * costs.query_head).float(),
                                    kv_heads=(kv * costs.kv_head).float(),
                                    channels=(mz * costs.channel).float())
        compensation[f"{index}.attn"] = per_layer[index].attn_mean
        compensation[f"{index}.mlp"] = per_layer[index].mlp_mean
    return ScoreResult(scores=scores, forward_passes=1, compensation=compensation,
                       notes={"bias_compensation": True, **notes})


def score_flap(ctx: ScoringContext) -> ScoreResult:
    def per_block(block: Block, stats: dict[nn.Linear, ColumnStats]) -> LayerFluctuation:
        return layer_fluctuation(*closing_linears(ctx.adapter, block.layer), stats)

    per_layer = ctx.run.observe(lambda layer: closing_linears(ctx.adapter, layer), per_block, ctx.layers,
                                "flap")
    return flap_result(ctx, per_layer)
