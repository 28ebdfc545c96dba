"""Truncated-BPTT training and perplexity evaluation of :class:`~minillm.lstm.model.LstmLm`.

One loop serves dense training, fine-tuning after pruning, group-lasso training and DST: the variants
differ only in the extra loss term passed in (``α·Σexp(−t)`` for DST, ``λ·Σ‖group‖₂`` for group lasso).
Adam with a cosine decay to ``min_lr_ratio·lr``, gradient-norm clipping, the hidden state carried
across windows and detached between them (Zaremba et al. 2014). Dropout masks come from a generator
seeded with ``config.seed``, so two runs with the same seed are identical.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from minillm.lstm.data import batchify, bptt_windows, count_windows
from minillm.lstm.model import LstmLm, detach_state

ExtraLoss = Callable[[nn.Module], torch.Tensor]
StepCallback = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run.

    epochs: passes over the training stream (ignored once ``max_steps`` is reached).
    max_steps: stop after this many optimizer steps (None = run all epochs).
    lr: peak Adam learning rate; it decays by a cosine to ``min_lr_ratio·lr`` over the run.
    batch_size: parallel streams; bptt: truncation length in tokens.
    clip: max global gradient norm.
    seed: seeds the dropout generator.
    """

    epochs: int = 2
    max_steps: int | None = None
    lr: float = 2e-3
    min_lr_ratio: float = 0.1
    batch_size: int = 32
    bptt: int = 35
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs < 1 or (self.max_steps is not None and self.max_steps < 1):
            raise ValueError("epochs and max_steps must be >= 1")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("lr must be > 0 and min_lr_ratio in [0, 1]")


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    final_loss: float
    final_extra: float


def total_steps(train_ids: torch.Tensor, config: TrainConfig) -> int:
    per_epoch = count_windows(batchify(train_ids, config.batch_size), config.bptt)
    steps = per_epoch * config.epochs
    return steps if config.max_steps is None else min(steps, config.max_steps)


def train_lm(
    model: LstmLm,
    train_ids: torch.Tensor,
    config: TrainConfig,
    extra_loss: ExtraLoss | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train ``model`` in place on the token stream ``train_ids``; returns step/token counts and losses.

    ``extra_loss(model)`` is added to the cross-entropy at every step (regularisers); ``on_step(step,
    total, loss)`` reports progress.
    """
    source = batchify(train_ids, config.batch_size)
    total = total_steps(train_ids, config)
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    optimizer = torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    floor = config.min_lr_ratio

    def lr_factor(step: int) -> float:
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(config.seed)
    model.train()
    step, tokens, loss_value, extra_value = 0, 0, float("nan"), 0.0
    started = time.perf_counter()
    while step < total:
        state = None
        for inputs, targets in bptt_windows(source, config.bptt):
            if step >= total:
                break
            logits, state = model(inputs, state, generator=generator)
            state = detach_state(state)
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            objective = loss
            if extra_loss is not None:
                extra = extra_loss(model)
                objective = loss + extra
                extra_value = float(extra.detach())
            optimizer.zero_grad(set_to_none=True)
            objective.backward()
            nn.utils.clip_grad_norm_(params, config.clip)
            optimizer.step()
            scheduler.step()
            step += 1
            tokens += targets.numel()
            loss_value = float(loss.detach())
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"training loss became {loss_value} at step {step}")
            if on_step is not None:
                on_step(step, total, loss_value)
    model.eval()
    return TrainResult(step, tokens, time.perf_counter() - started, loss_value, extra_value)


@torch.no_grad()
def evaluate_nll(
    model: LstmLm,
    ids: torch.Tensor,
    batch_size: int = 10,
    bptt: int = 35,
    max_windows: int | None = None,
    on_step: StepCallback | None = None,
) -> float:
    """Mean next-word negative log-likelihood (nats/token) over a token stream, state carried over."""
    source = batchify(ids, batch_size)
    total = count_windows(source, bptt)
    if max_windows is not None:
        total = min(total, max_windows)
    was_training = model.training
    model.eval()
    nll, count, state = 0.0, 0, None
    try:
        for index, (inputs, targets) in enumerate(bptt_windows(source, bptt)):
            if index >= total:
                break
            logits, state = model(inputs, state)
            nll += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         reduction="sum"))
            count += targets.numel()
            if on_step is not None:
                on_step(index + 1, total, nll / count)
    finally:
        model.train(was_training)
    return nll / max(count, 1)


def perplexity(nll: float) -> float:
    return math.exp(min(nll, 700.0))
