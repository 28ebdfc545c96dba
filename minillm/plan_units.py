"""The removable units a planner allocates: kv groups, query-head slots and MLP channels.

Why a module of its own: every allocation (``uniform`` and ``global`` in :mod:`minillm.plan`, ``log`` and
``error`` in :mod:`minillm.allocation`) removes the same units by the same rules; keeping them below both
lets the planner dispatch to the allocations without an import circle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Unit:
    """One removable unit of the allocation: a kv group, a query-head slot, or a channel."""

    layer: int
    kind: Literal["head", "channel"]
    members: tuple[int, ...]  # query heads (kv mode: plus the kv head in kv_member) or channels
    kv_member: int | None
    score: float
    cost: int


def remove_lowest(units: list[Unit], count: int) -> set[Unit]:
    """The ``count`` lowest-scored units (ties: the earlier unit goes first)."""
    order = sorted(range(len(units)), key=lambda i: (units[i].score, i))
    return {units[i] for i in order[:count]}


def layer_capacity(head_units: list[Unit], channel_units: list[Unit]) -> int:
    """Most parameters one layer can lose while keeping at least one head unit and one channel."""
    heads = sum(u.cost for u in head_units[:-1]) if head_units else 0
    channels = sum(u.cost for u in channel_units[:-1]) if channel_units else 0
    return heads + channels
