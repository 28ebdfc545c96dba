"""Prune plan for an LSTM LM: which hidden units each layer keeps, decided apart from the surgery.

Why a plan object: the decision (scores → kept units) and the cut (slicing tensors) are separate steps,
so ``minillm lstm prune --dry-run`` can print the plan, the export stores it, and tests can apply the
same plan twice (physically and as a mask) and compare.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class PrunePlan:
    """Kept hidden-unit indices (sorted, original numbering) for every LSTM layer.

    original_sizes: hidden sizes before pruning, for checking the plan against a model.
    keep: one sorted index list per layer.
    criterion: name of the criterion that produced the scores (informational).
    """

    original_sizes: tuple[int, ...]
    keep: tuple[tuple[int, ...], ...]
    criterion: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.keep) != len(self.original_sizes):
            raise ValueError("a prune plan needs one keep list per layer")
        for layer, (kept, size) in enumerate(zip(self.keep, self.original_sizes, strict=True)):
            if not kept:
                raise ValueError(f"layer {layer} would keep no hidden unit")
            if list(kept) != sorted(set(kept)) or kept[0] < 0 or kept[-1] >= size:
                raise ValueError(f"layer {layer}: keep indices must be sorted, unique and < {size}")

    @property
    def kept_sizes(self) -> tuple[int, ...]:
        return tuple(len(k) for k in self.keep)

    def keep_tensor(self, layer: int) -> torch.Tensor:
        return torch.tensor(self.keep[layer], dtype=torch.long)

    def to_dict(self) -> dict[str, Any]:
        return {
            "original_sizes": list(self.original_sizes),
            "kept_sizes": list(self.kept_sizes),
            "keep": [list(k) for k in self.keep],
            "criterion": self.criterion,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        return cls(
            original_sizes=tuple(data["original_sizes"]),
            keep=tuple(tuple(k) for k in data["keep"]),
            criterion=data.get("criterion", ""),
            meta=dict(data.get("meta", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> PrunePlan:
        return cls.from_dict(json.loads(text))


def kept_count(size: int, keep_ratio: float) -> int:
    """Units kept out of ``size`` at ``keep_ratio`` (rounded, at least one)."""
    if not 0.0 < keep_ratio <= 1.0:
        raise ValueError(f"keep ratio must be in (0, 1], got {keep_ratio}")
    return max(1, min(size, math.floor(size * keep_ratio + 0.5)))


def top_units(scores: torch.Tensor, count: int) -> tuple[int, ...]:
    """Indices of the ``count`` highest scores, sorted; ties broken towards the lower index."""
    order = sorted(range(scores.numel()), key=lambda i: (-float(scores[i]), i))
    return tuple(sorted(order[:count]))


def plan_from_scores(
    scores: Sequence[torch.Tensor], keep_ratio: float, criterion: str = "", meta: dict | None = None
) -> PrunePlan:
    """Keep the same fraction of every layer's units, the highest-scoring ones (uniform widths)."""
    sizes = tuple(int(s.numel()) for s in scores)
    for layer, s in enumerate(scores):
        if not bool(torch.isfinite(s).all()):
            raise ValueError(f"criterion {criterion!r} gave non-finite scores for layer {layer}")
    keep = tuple(
        top_units(s.detach().float().cpu(), kept_count(n, keep_ratio))
        for s, n in zip(scores, sizes, strict=True)
    )
    return PrunePlan(original_sizes=sizes, keep=keep, criterion=criterion, meta=dict(meta or {}))
