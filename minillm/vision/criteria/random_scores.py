"""Random scores: the baseline every criterion has to beat. Draws come from the context's generator
(never the global RNG), so a seed reproduces a plan."""

from __future__ import annotations

from typing import Any

import torch

from minillm.vision.criteria.base import ScoringContext, root_size


class RandomCriterion:
    needs_data = False

    def __init__(self) -> None:
        self._generator: torch.Generator | None = None

    def calibrate(self, ctx: ScoringContext) -> None:
        self._generator = ctx.generator

    def __call__(self, group: Any) -> torch.Tensor:
        if self._generator is None:
            raise RuntimeError("RandomCriterion: call calibrate() to hand it a generator")
        return torch.rand(root_size(group), generator=self._generator)
