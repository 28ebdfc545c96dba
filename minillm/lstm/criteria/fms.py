"""FMS criterion with forward-only gradients: the LLM side's feature-map sensitivity, on LSTM units.

Per weight, FMS = |W · Ĝ · x̄| where Ĝ is the SPSA estimate of ∂L/∂W (two forward passes per
perturbation, no autograd; :func:`minillm.calibration.spsa.estimate_gradient`, reused as is) and x̄ is the
mean |activation| entering that weight's input column (1 for biases). A hidden unit's score is the sum
of FMS over its weight group (:mod:`minillm.lstm.groups`): four gate rows, its W_hh column and its
consumer's input column. Perturbed: every parameter that some group touches.

Caveat (measured in docs/benchmarks.md): a K-direction SPSA estimate has cosine ≈ √(K/d) with the true
gradient, so for d ≈ 10⁶ weights Ĝ is mostly noise and FMS behaves close to |W|·x̄ with random weights.
"""

from __future__ import annotations

import torch

from minillm.calibration.spsa import estimate_gradient
from minillm.lstm.calibrate import activation_means, window_loss
from minillm.lstm.criteria.base import ScoreContext
from minillm.lstm.groups import unit_groups, unit_sum
from minillm.lstm.model import LstmLm


def fms_per_weight(weight: torch.Tensor, grad: torch.Tensor, input_mean: torch.Tensor | None) -> torch.Tensor:
    """|W ⊙ G ⊙ x̄| with x̄ broadcast over the input columns (dim 1); x̄ = 1 when None (biases)."""
    values = (weight * grad).abs()
    if input_mean is None:
        return values
    if weight.dim() != 2 or input_mean.shape != weight.shape[1:]:
        raise ValueError(f"input mean of shape {tuple(input_mean.shape)} for weight {tuple(weight.shape)}")
    return values * input_mean[None, :]


def score(model: LstmLm, ctx: ScoreContext) -> list[torch.Tensor]:
    if not ctx.calib:
        raise ValueError("the fms criterion needs calibration windows")
    groups = unit_groups(model.config)
    means = activation_means(model, ctx.calib)
    # distinct parameters (tied weights once) and the activation feeding each one's columns
    params: dict[int, torch.Tensor] = {}
    input_key: dict[int, str | None] = {}
    for group in groups:
        for piece in group.slices:
            param = model.get_parameter(piece.name)
            if input_key.setdefault(id(param), piece.input_key) != piece.input_key:
                raise ValueError(f"{piece.name} is read by two different activations")
            params.setdefault(id(param), param)
    ordered = list(params.values())
    model.eval()
    estimate = estimate_gradient(ordered, lambda: window_loss(model, ctx.calib), ctx.spsa,
                                 on_step=None if ctx.on_step is None else
                                 (lambda k: ctx.on_step(k + 1, ctx.spsa.steps, 0.0)))  # type: ignore[misc]
    per_id: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for index, param in enumerate(ordered):
            key = input_key[id(param)]
            per_id[id(param)] = fms_per_weight(param, estimate.gradient(index, param),
                                               None if key is None else means[key])
        return [
            unit_sum(model, group, {p.name: per_id[id(model.get_parameter(p.name))] for p in group.slices})
            for group in groups
        ]
