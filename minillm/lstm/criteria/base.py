"""What a hidden-unit criterion receives: the calibration windows and the knobs of every criterion.

Why one context object rather than per-criterion signatures: the CLI and the benchmark call every
criterion the same way (``CRITERIA.get(name)(model, ctx)``), as lm-eval does with its registries; a
criterion reads only the fields it needs and documents them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from minillm.calibration.spsa import SpsaConfig
from minillm.lstm.model import LstmLm
from minillm.lstm.train import TrainConfig

Window = tuple[torch.Tensor, torch.Tensor]


@dataclass
class ScoreContext:
    """Inputs shared by the criteria.

    calib: calibration BPTT windows (consecutive, state carried across them) for activation / FMS.
    train_ids: training token stream, for criteria that train (group lasso); None if unavailable.
    regularize: training settings of the group-lasso phase (its ``max_steps`` bounds the phase; 0 steps
        means the model was already trained with the penalty, e.g. ``minillm lstm train --group-lasso``).
    group_lasso: λ of the group-lasso penalty λ·Σ_units ‖group‖₂.
    spsa: settings of the forward-only gradient estimate used by ``fms``.
    seed: seed of criteria that draw random numbers (``random``).
    on_step: progress callback ``(done, total, value)`` for criteria that loop.
    """

    calib: Sequence[Window]
    train_ids: torch.Tensor | None = None
    regularize: TrainConfig | None = None
    group_lasso: float = 5e-3
    spsa: SpsaConfig = field(default_factory=SpsaConfig)
    seed: int = 0
    on_step: Callable[[int, int, float], None] | None = None


class Criterion(Protocol):
    def __call__(self, model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]: ...
