"""What every LLM scoring criterion receives and returns.

A criterion is a function ``(ScoringContext) -> ScoreResult`` registered by name in
:mod:`minillm.scoring`. It sees the model only through the adapter and the sequential executor
``ctx.run`` (:class:`~minillm.calibration.sequential.Sequential`), which owns every walk over blocks and
batches — resident or offloaded, the criterion cannot tell — and returns one
:class:`~minillm.plan.LayerScores` per scored layer plus the passes it spent (for ``compare``).
Criterion-specific settings are a typed dataclass per criterion, read with :meth:`ScoringContext.options_as`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.data import CalibrationSet
from minillm.calibration.sequential import Sequential
from minillm.calibration.spsa import SpsaConfig
from minillm.errors import UsageError
from minillm.plan import LayerScores

Opts = TypeVar("Opts")


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
    run: Sequential = field(default=None)  # type: ignore[assignment]  # built from the fields above

    def __post_init__(self) -> None:
        if self.run is None:
            self.run = Sequential(self.model, self.adapter, self.calibration, progress=self.progress)

    def options_as(self, kind: type[Opts]) -> Opts:
        """``options`` as the criterion's typed options dataclass; unknown names are a usage error."""
        names = {f.name for f in fields(kind)}  # type: ignore[arg-type]
        unknown = sorted(set(self.options) - names)
        if unknown:
            valid = ", ".join(sorted(names)) or "none"
            raise UsageError(
                f"unknown criterion option(s) {', '.join(unknown)}; this criterion takes: {valid}"
            )
        return kind(**self.options)

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
    #: :func:`minillm.compensation.bias.fold_removed_means` before surgery or masking.
    compensation: dict[str, Any] = field(default_factory=dict)


Criterion = Callable[[ScoringContext], ScoreResult]


def closing_linears(adapter: ArchAdapter, layer: nn.Module) -> list[nn.Linear]:
    """:meth:`~minillm.arch.base.ArchAdapter.closings` as a list (o, then the MLP's closing one): the
    modules the scoring passes observe."""
    return list(adapter.closings(layer).values())
