"""What every CNN channel criterion shares: the scoring context and the Torch-Pruning group walk.

A criterion is a Torch-Pruning importance: ``criterion(tp_group) -> Tensor`` with one score per root
channel of the group (higher = more important to keep), so it also works inside Torch-Pruning's own
pruners. Data-driven criteria first see calibration batches through ``calibrate(ctx)``.

Mask-based criteria (``taylor``, ``ifso``) compute, per calibration batch, one value per input channel
of every conv/linear reader (see :mod:`minillm.vision.masks`) and keep them per batch; the group walk
then sums readers of the same channel and averages over batches, in the order each method prescribes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from minillm.vision.groups import ChannelGroup, require_torch_pruning


@dataclass
class ScoringContext:
    """Everything a criterion may read. ``batches`` are (images, labels) pairs; ``weight_decay`` is the
    λ the network was trained with; randomness comes only from ``generator``."""

    model: nn.Module
    groups: list[ChannelGroup]
    batches: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    weight_decay: float = 0.0
    generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy


def group_items(group: Any) -> Iterator[tuple[nn.Module, str, list[int], list[int]]]:
    """Yield ``(layer, "out" | "in", idxs, root_idxs)`` for the parameterised layers of a tp group."""
    f = require_torch_pruning().pruner.function
    out_fns = {f.prune_conv_out_channels, f.prune_linear_out_channels, f.prune_batchnorm_out_channels}
    in_fns = {f.prune_conv_in_channels, f.prune_linear_in_channels}
    for item in group:
        layer, fn = item.dep.target.module, item.dep.handler
        if not isinstance(layer, nn.Module):
            continue
        kind = "out" if fn in out_fns else "in" if fn in in_fns else None
        if kind is not None:
            yield layer, kind, list(item.idxs), list(item.root_idxs)


def root_size(group: Any) -> int:
    return len(group[0].idxs)


class MaskCriterion:
    """Base for criteria defined on reader-input masks. Subclasses fill ``per_batch[name]`` with a
    ``[batches, in_channels]`` tensor per reader in :meth:`calibrate`.

    absolute_first: True → mean over batches of Σ_readers |x|; False → mean over batches of |Σ_readers x|.
    """

    absolute_first = True
    needs_data = True

    def __init__(self) -> None:
        self.per_batch: dict[str, torch.Tensor] = {}
        self._names: dict[nn.Module, str] = {}

    def calibrate(self, ctx: ScoringContext) -> None:
        raise NotImplementedError

    def __call__(self, group: Any) -> torch.Tensor:
        if not self.per_batch:
            raise RuntimeError(f"{type(self).__name__}: call calibrate() before scoring")
        acc: torch.Tensor | None = None
        for layer, kind, idxs, root_idxs in group_items(group):
            name = self._names.get(layer)
            if kind != "in" or name not in self.per_batch:
                continue
            x = self.per_batch[name][:, idxs]
            if acc is None:
                acc = torch.zeros(x.shape[0], root_size(group), dtype=torch.float64)
            acc[:, root_idxs] += x.abs() if self.absolute_first else x
        if acc is None:
            raise ValueError("group has no conv/linear reader with a mask")
        return (acc if self.absolute_first else acc.abs()).mean(0).float()


def check_batches(ctx: ScoringContext, name: str) -> None:
    if not ctx.batches:
        raise ValueError(f"criterion {name!r} needs calibration batches")
