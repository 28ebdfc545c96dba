"""What every LLM scoring criterion receives and returns.

A criterion is a function ``(ScoringContext) -> ScoreResult`` registered by name in
:mod:`minillm.scoring`. It sees the model only through the adapter and the calibration set, and returns
one :class:`~minillm.plan.LayerScores` per scored layer plus the passes it spent (for ``compare``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.data import CalibrationSet
from minillm.calibration.spsa import SpsaConfig
from minillm.plan import LayerScores


@dataclass
class ScoringContext:
    """Inputs shared by all criteria. ``options`` carries criterion-specific settings."""

    model: nn.Module
    adapter: ArchAdapter
    layers: list[int]
    shapes: dict[int, LayerShape]
    calibration: CalibrationSet
    seed: int = 0
    spsa: SpsaConfig = field(default_factory=SpsaConfig)
    options: dict[str, Any] = field(default_factory=dict)
    progress: Callable[[str, int, int], None] | None = None

    def report(self, task: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(task, done, total)

    def layer(self, index: int) -> nn.Module:
        return self.adapter.decoder_layers(self.model)[index]

    def linears(self) -> list[nn.Linear]:
        """Every prunable Linear of the scored layers, in a fixed order (q, k, v, o, expand…, closing)."""
        result: list[nn.Linear] = []
        for index in self.layers:
            result += self.adapter.prunable_linears(self.layer(index))
        return result


@dataclass
class ScoreResult:
    """Group scores per scored layer, and the cost of getting them."""

    scores: dict[int, LayerScores]
    forward_passes: int = 0
    backward_passes: int = 0
    notes: dict[str, Any] = field(default_factory=dict)
    #: Per-layer mean input of the closing projections, ``{"<layer>.attn" | "<layer>.mlp": tensor}``, for
    #: criteria that fold removed groups' mean output into a bias (FLAP); applied by
    #: :func:`minillm.scoring.compensation.fold_removed_means` before surgery or masking.
    compensation: dict[str, Any] = field(default_factory=dict)


Criterion = Callable[[ScoringContext], ScoreResult]
