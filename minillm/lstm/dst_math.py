"""Pure tensor math of Dynamic Sparse Training (Liu et al., ICLR 2020, arXiv:2005.06870).

The formulas, as in the paper and its public code (junjieliu2910/DynamicSparseTraining,
``models/binarization.py``), for a weight W with rows i = output units (neurons / filters / gate rows)
and a trainable threshold vector t (one entry per row, initialised to 0):

* mask      M_ij = S(|W_ij| − t_i),  S(x) = 1 if x > 0 else 0 (unit step);
* layer     Q = W ⊙ M, used in place of W in the layer's forward;
* gradient  S has zero derivative almost everywhere, so backward uses the long-tailed estimator

      H'(x) = 2 − 4|x|   for |x| ≤ 0.4
              0.4        for 0.4 < |x| ≤ 1
              0          for |x| > 1

  Autograd through Q = W ⊙ S(|W| − t) then gives exactly the paper's updates:
  ∂L/∂W_ij = ∂L/∂Q_ij·M_ij + ∂L/∂Q_ij·W_ij·H'(|W_ij| − t_i)·sign(W_ij)   (masked weights still learn),
  ∂L/∂t_i  = −Σ_j ∂L/∂Q_ij·W_ij·H'(|W_ij| − t_i);
* regulariser  L_s = Σ_layers Σ_i exp(−t_i), added as α·L_s; it pushes thresholds up (more sparsity)
  and is balanced by the task loss pulling useful weights back above the threshold;
* reset     if a layer keeps ≤ 1 % of its weights (the code's ``ratio <= 0.01``; the paper: "more than
  99 % masked"), its thresholds are set back to 0 and the mask recomputed, so no layer collapses.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

RESET_KEEP_RATIO = 0.01
_PEAK_ZONE = 0.4
_TAIL_ZONE = 1.0
_TAIL_VALUE = 0.4


def long_tailed_derivative(x: torch.Tensor) -> torch.Tensor:
    """H'(x): the surrogate derivative of the unit step used by DST's backward pass."""
    ax = x.abs()
    peak = 2.0 - 4.0 * ax
    return torch.where(ax <= _PEAK_ZONE, peak, torch.where(ax <= _TAIL_ZONE, _TAIL_VALUE, 0.0)).to(x.dtype)


class LongTailedStep(torch.autograd.Function):
    """Forward: S(x) = 1[x > 0]. Backward: grad · H'(x) (long-tailed straight-through estimator)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        return (x > 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad_output * long_tailed_derivative(x)


def threshold_mask(weight: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
    """M = S(|W| − t) with t broadcast over everything but the first (output) axis; differentiable."""
    if threshold.shape != weight.shape[:1]:
        raise ValueError(f"threshold of shape {tuple(threshold.shape)} for weight {tuple(weight.shape)}")
    shaped = threshold.view(-1, *([1] * (weight.dim() - 1)))
    return LongTailedStep.apply(weight.abs() - shaped)


def keep_ratio(mask: torch.Tensor) -> float:
    return float(mask.detach().sum()) / max(mask.numel(), 1)


def masked_weight(weight: torch.Tensor, threshold: torch.Tensor, reset: bool = True) -> torch.Tensor:
    """Q = W ⊙ M, applying the reset rule first when ``reset`` (thresholds are zeroed in place)."""
    mask = threshold_mask(weight, threshold)
    if reset and keep_ratio(mask) <= RESET_KEEP_RATIO:
        with torch.no_grad():
            threshold.zero_()
        mask = threshold_mask(weight, threshold)
    return weight * mask


def sparsity_penalty(thresholds: Iterable[torch.Tensor]) -> torch.Tensor:
    """L_s = Σ exp(−t) over every threshold entry of every masked layer (multiply by α yourself)."""
    total: torch.Tensor | None = None
    for t in thresholds:
        term = torch.exp(-t).sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no thresholds given: the model has no DST-masked layer")
    return total
