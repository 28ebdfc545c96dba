"""Training and evaluation loops for the CNN pruner (dense training, and fine-tuning after pruning).

SGD with Nesterov momentum, weight decay and a cosine learning-rate schedule stepped per batch — the
usual CIFAR recipe, short enough for a CPU. Shuffling and augmentation draw from one
``torch.Generator`` seeded from the config, so a run is reproducible without touching the global RNG.
Progress is reported through a callback, so the loop knows nothing about the terminal.

``slim_l1`` adds network slimming's sparsity penalty ``s * Σ|γ|`` on BN scales (Liu et al. 2017) as a
subgradient step, for use with the ``bn-scale`` criterion.

The weight decay ``λ`` used here is stored with the model: IFSO approximates ``H_ww⁻¹`` by ``I/λ``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from minillm.vision.data import ImageData, batches, random_shift

Progress = Callable[[int, int, dict[str, float]], None]


@dataclass(frozen=True)
class TrainConfig:
    """epochs: passes over the training split; lr: peak learning rate (cosine to 0); weight_decay: λ;
    shift: max pixels of random translation; slim_l1: BN-scale L1 penalty; seed: shuffling/augmentation."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    shift: int = 2
    slim_l1: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


def train(
    model: nn.Module, data: ImageData, cfg: TrainConfig, progress: Progress | None = None
) -> list[dict[str, float]]:
    """Train ``model`` in place; returns one ``{"epoch", "loss", "train_acc"}`` row per epoch."""
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True
    )
    steps_per_epoch = math.ceil(len(data.train_y) / cfg.batch_size)
    total = max(cfg.epochs * steps_per_epoch, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    history = []
    step = 0
    for epoch in range(cfg.epochs):
        model.train()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in batches(data.train_x, data.train_y, cfg.batch_size, gen):
            x = random_shift(x, cfg.shift, gen)
            logits = model(x)
            loss = F.cross_entropy(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.slim_l1 > 0:
                for bn in bns:
                    bn.weight.grad.add_(cfg.slim_l1 * torch.sign(bn.weight.detach()))
            opt.step()
            sched.step()
            step += 1
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if progress is not None:
                progress(step, total, {"epoch": epoch + 1, "loss": loss_sum / seen})
        history.append({"epoch": epoch + 1, "loss": loss_sum / seen, "train_acc": correct / seen})
    model.eval()
    return history


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> dict[str, float]:
    """Top-1 accuracy and mean cross-entropy in eval mode."""
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for xb, yb in batches(x, y, batch_size):
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        correct += int((logits.argmax(1) == yb).sum())
    model.train(was_training)
    return {"accuracy": correct / len(y), "loss": loss_sum / len(y)}


@torch.no_grad()
def recalibrate_bn(model: nn.Module, x: torch.Tensor, batch_size: int = 128) -> None:
    """Re-estimate BN running statistics on ``x`` with forward passes only (no weight changes).

    Why: removing channels shifts the input distribution of every later BN (most of all in a residual
    stream), so its stored statistics go stale; averaging fresh ones over a few batches ("adaptive BN",
    Li et al., ECCV 2020, EagleEye) separates a criterion's choice from this bookkeeping.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) == 0:
        return
    momenta = [bn.momentum for bn in bns]
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches below
    model.train()
    try:
        for i in range(0, len(x), batch_size):
            model(x[i : i + batch_size])
    finally:
        for bn, mom in zip(bns, momenta, strict=True):
            bn.momentum = mom
        model.train(was_training)
