"""Scores -> prune plan: global ranking under a FLOPs or parameter target, and its JSON form.

The plan is the decision ("which channels of which group go"), kept apart from the surgery that carries
it out, so it can be printed (``--dry-run``), stored in the export, and replayed.

Global ranking: every channel of every group competes on one list, lowest score first. Channels are
removed one at a time until the remaining FLOPs (or parameters) reach ``(1 - target) *`` the dense cost.
A group never loses more than ``max_group_ratio`` of its channels (and always keeps one), so no layer
disappears. Optionally the score of a channel is divided by the square root of the FLOPs its removal
saves (``cost_norm="sqrt-flops"``), the normalisation IFSO's released code applies (after FisherPruning)
so that cheap-to-keep channels are not removed just because they are cheap.

``allocation="uniform"`` replaces each group's scores by their within-group rank fraction
``(rank + 1) / size`` before the ranking, so every group loses (nearly) the same fraction of channels and
the criterion only decides *which* channels go inside a layer, not how many per layer. Comparing the two
allocations separates a criterion's within-layer ranking from its cross-layer calibration.
"""

from __future__ import annotations

import heapq
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from minillm.vision.flops import CostModel
from minillm.vision.groups import ChannelGroup


@dataclass
class PrunePlan:
    """Channels to remove per group (by group name), and how they were chosen."""

    pruned: dict[str, list[int]]
    group_sizes: dict[str, int]
    criterion: str = ""
    target_kind: str = "flops"
    target_ratio: float = 0.0
    achieved_ratio: float = 0.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls(**json.loads(text))

    def summary_rows(self) -> list[tuple[str, int, int]]:
        """(group, kept, total) per group, for ``--dry-run`` tables."""
        return [(g, n - len(self.pruned.get(g, [])), n) for g, n in self.group_sizes.items()]


def channel_savings(cost: CostModel, groups: list[ChannelGroup], kind: str) -> dict[str, float]:
    """Cost saved by removing one channel of each group from the dense network."""
    full = cost.metric(kind)
    return {g.name: full - cost.metric(kind, {g.name: 1}) for g in groups}


def within_group_rank(scores: torch.Tensor) -> torch.Tensor:
    """``(rank + 1) / size`` of each score inside its group (ties by index): a scale-free score."""
    order = torch.sort(scores, stable=True).indices
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(len(scores))
    return (ranks.double() + 1.0) / len(scores)


def global_plan(
    scores: Mapping[str, torch.Tensor],
    groups: list[ChannelGroup],
    cost: CostModel,
    target_ratio: float,
    target_kind: str = "flops",
    max_group_ratio: float = 0.9,
    cost_norm: str = "none",
    criterion: str = "",
    allocation: str = "global",
) -> PrunePlan:
    """Remove the globally lowest-scoring channels until ``target_ratio`` of the cost is gone."""
    if not 0.0 < target_ratio < 1.0:
        raise ValueError(f"target ratio must be in (0, 1), got {target_ratio}")
    if cost_norm not in ("none", "sqrt-flops"):
        raise ValueError(f"cost_norm must be 'none' or 'sqrt-flops', got {cost_norm!r}")
    if allocation not in ("global", "uniform"):
        raise ValueError(f"allocation must be 'global' or 'uniform', got {allocation!r}")
    savings = channel_savings(cost, groups, "flops") if cost_norm == "sqrt-flops" else {}
    heap: list[tuple[float, int, str, int]] = []
    order = 0
    for g in groups:
        s = scores[g.name].detach().double().cpu()
        if s.shape != (g.size,):
            raise ValueError(f"group {g.name}: expected {g.size} scores, got {tuple(s.shape)}")
        if allocation == "uniform":
            s = within_group_rank(s)
        if cost_norm == "sqrt-flops":
            s = s / math.sqrt(max(savings[g.name], 1.0))
        for c in range(g.size):
            heap.append((float(s[c]), order, g.name, c))
            order += 1  # ties broken by graph order, deterministically
    heapq.heapify(heap)
    limit = {g.name: min(g.size - 1, math.floor(max_group_ratio * g.size)) for g in groups}
    removed: dict[str, list[int]] = {g.name: [] for g in groups}
    counts = {g.name: 0 for g in groups}
    dense = cost.metric(target_kind)
    goal = (1.0 - target_ratio) * dense
    current = dense
    while current > goal and heap:
        _, _, name, c = heapq.heappop(heap)
        if counts[name] >= limit[name]:
            continue
        counts[name] += 1
        removed[name].append(c)
        current = cost.metric(target_kind, counts)
    if current > goal:
        raise ValueError(
            f"cannot remove {target_ratio:.0%} of {target_kind} while keeping at least "
            f"{1 - max_group_ratio:.0%} of every group (reached {1 - current / dense:.1%})"
        )
    return PrunePlan(
        pruned={k: sorted(v) for k, v in removed.items() if v},
        group_sizes={g.name: g.size for g in groups},
        criterion=criterion,
        target_kind=target_kind,
        target_ratio=target_ratio,
        achieved_ratio=1.0 - current / dense,
        meta={"cost_norm": cost_norm, "allocation": allocation, "max_group_ratio": max_group_ratio},
    )
