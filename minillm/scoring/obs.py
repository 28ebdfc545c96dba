"""``obs``: Optimal Brain Surgeon greedy selection on the closing projections (SlimGPT, OSSCAR).

Per block, one calibration pass gathers the input moments ``H`` of o_proj and of the MLP's closing
projection (:mod:`minillm.compensation.hessian`); :func:`~minillm.compensation.obs.obs_order` then
removes groups greedily — each time the one whose removal, after the optimal update of the others,
raises the output error least — and a group's score is the cumulative error at the moment it went,
divided by the projection's output energy ``Σ‖W x‖²`` (so layers compare under ``global``):

* ``heads``: query heads removed one per kv group per round (query-head mode's unit);
* ``kv_heads``: whole kv groups; stored as the group's cumulative error minus its query heads'
  scores, so a kv-mode unit (its heads + its kv head) scores exactly the group's error;
* ``channels``: MLP channels, in about 64 rounds of a joint update.

The plan takes the lowest scores. With ``--compensation refit`` the sequential pass re-chooses the same
number of groups by OBS on the *pruned* prefix's moments and refits the survivors — the full method.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minillm.arch.base import LayerShape
from minillm.calibration.sequential import Block, Sequential
from minillm.compensation.hessian import DEFAULT_DAMPING, InputMoments, collect_moments
from minillm.compensation.layer import OBS_CHANNEL_ROUNDS
from minillm.compensation.obs import obs_order
from minillm.plan import LayerScores
from minillm.scoring.base import ScoreResult, ScoringContext


def _ranked(weight: torch.Tensor, moments: InputMoments, groups: list[list[int]], count: int, damping: float,
            families: list[list[int]] | None = None, step: int = 1) -> torch.Tensor:
    """Cumulative relative error at which each group is removed; survivors get 1 + the last value."""
    w = weight.detach().double().to(moments.gram.device)
    energy = float((w @ moments.gram * w).sum()) or 1.0
    scores = torch.full((len(groups),), math.nan, dtype=torch.float64)
    if count > 0:
        order = obs_order(weight, moments.gram, groups, count, damping, families=families, step=step)
        total = torch.tensor(order.costs, dtype=torch.float64).cumsum(0) / energy
        scores[torch.tensor(order.order)] = total
    done = scores[~scores.isnan()]
    return torch.nan_to_num(scores, nan=1.0 + (float(done.max()) if done.numel() else 0.0))


def obs_layer_scores(o: nn.Linear, closing: nn.Linear, shape: LayerShape, attn: InputMoments,
                     mlp: InputMoments, damping: float = DEFAULT_DAMPING) -> LayerScores:
    """OBS removal order of one block's heads, kv groups and channels, as :class:`LayerScores`."""
    hd, group = shape.head_dim, shape.heads_per_kv
    heads_cols = [list(range(h * hd, (h + 1) * hd)) for h in range(shape.num_heads)]
    if group > 1:
        families = [list(range(k * group, (k + 1) * group)) for k in range(shape.num_kv_heads)]
        heads = _ranked(o.weight, attn, heads_cols, group - 1, damping, families=families)
        kv_cols = [list(range(k * group * hd, (k + 1) * group * hd)) for k in range(shape.num_kv_heads)]
        kv_total = _ranked(o.weight, attn, kv_cols, shape.num_kv_heads - 1, damping)
        kv = kv_total - heads.view(shape.num_kv_heads, group).sum(1)
    else:  # multi-head attention: a head is its own kv group
        heads = _ranked(o.weight, attn, heads_cols, shape.num_heads - 1, damping)
        kv = torch.zeros(shape.num_kv_heads, dtype=torch.float64)
    count = shape.intermediate - 1
    step = max(1, math.ceil(count / OBS_CHANNEL_ROUNDS))
    channels = _ranked(closing.weight, mlp, [[c] for c in range(shape.intermediate)], count, damping,
                       step=step)
    return LayerScores(heads=heads.float(), kv_heads=kv.float(), channels=channels.float())


def score_obs(ctx: ScoringContext) -> ScoreResult:
    """One calibration pass, one resident block at a time (so it also serves offloaded models)."""
    damping = float(ctx.options.get("damping", DEFAULT_DAMPING))

    def per_block(block: Block) -> LayerScores:
        o, closing = ctx.adapter.attention(block.layer).o, ctx.adapter.mlp(block.layer).closing
        moments = collect_moments([o, closing], lambda: block.forward(advance=True))
        return obs_layer_scores(o, closing, ctx.shapes[block.index], moments[o], moments[closing], damping)

    walk = Sequential(ctx.model, ctx.adapter, ctx.calibration, progress=ctx.progress)
    scores = walk.run(per_block, layers=ctx.layers, task="obs scores").results
    return ScoreResult(scores=scores, forward_passes=1, notes={"damping": damping})
