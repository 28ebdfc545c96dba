"""Forward-only gradient estimation by SPSA with seed-regenerated perturbations (the MeZO trick).

Why this shape: the estimate of dL/dθ for ``d`` parameters must never cost a copy of θ or an autograd
graph, otherwise the memory advantage over back-propagation is gone. So for k = 1..K we

1. draw z_k ~ N(0, I) one tensor at a time from a generator seeded by ``(seed, k, tensor index)``,
2. perturb θ in place to θ + εz_k, measure L+, move to θ − εz_k, measure L−, move back to θ,
3. keep only the scalar ``c_k = (L+ − L−) / 2ε``.

The gradient estimate ``Ĝ = (1/K) Σ_k c_k z_k`` is never stored for the whole model: callers ask for it
one tensor at a time with :meth:`SpsaEstimate.gradient`, which regenerates the z_k from the same seeds.
Peak memory is that of inference plus one parameter-sized buffer.

The estimator is generic (any list of tensors and any scalar loss closure) so the LLM, LSTM and
gate-based criteria share it. A random-direction estimator agrees with the true gradient only to a
cosine of about sqrt(K/d); see docs/benchmarks.md for what that means in practice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

_SEED_STRIDE_STEP = 1_000_003
_SEED_STRIDE_TENSOR = 7_919


@dataclass(frozen=True)
class SpsaConfig:
    """Settings of the SPSA estimator.

    steps: number of random perturbations K (each costs two forward passes).
    eps: perturbation size ε, in the units of the parameters.
    seed: base seed; identical seeds give identical estimates.
    """

    steps: int = 16
    eps: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"spsa steps must be >= 1, got {self.steps}")
        if not self.eps > 0:
            raise ValueError(f"spsa eps must be > 0, got {self.eps}")


def _direction(param: torch.Tensor, seed: int, step: int, index: int) -> torch.Tensor:
    """Regenerate the perturbation z for one tensor at one step, deterministically from the seed."""
    generator = torch.Generator(device=param.device)
    generator.manual_seed(seed * 31 + step * _SEED_STRIDE_STEP + index * _SEED_STRIDE_TENSOR)
    return torch.randn(param.shape, generator=generator, device=param.device, dtype=param.dtype)


@torch.no_grad()
def shift_indexed(indexed: Iterable[tuple[int, torch.Tensor]], scale: float, seed: int, step: int) -> None:
    """θ ← θ + scale·z_step, in place, one tensor at a time (z regenerated, never stored).

    Each tensor comes with its position in the full parameter list, so a caller that holds only part
    of the model at a time (block-by-block streaming) perturbs exactly as the in-memory run does.
    """
    for index, param in indexed:
        param.add_(_direction(param, seed, step, index), alpha=scale)


@dataclass
class SpsaEstimate:
    """The K scalars of an SPSA run; the gradient of any tensor is regenerated on demand."""

    config: SpsaConfig
    coefficients: list[float] = field(default_factory=list)
    forward_passes: int = 0

    def gradient(self, index: int, param: torch.Tensor) -> torch.Tensor:
        """Ĝ for the tensor at position ``index`` of the list given to :func:`estimate_gradient`."""
        total = torch.zeros_like(param)
        for step, coefficient in enumerate(self.coefficients):
            total.add_(_direction(param, self.config.seed, step, index), alpha=coefficient)
        return total.div_(max(len(self.coefficients), 1))


@contextmanager
def frozen(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Turn ``requires_grad`` off for the duration, so no autograd graph can ever be built."""
    previous = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(False)
        yield
    finally:
        for p, flag in zip(params, previous, strict=True):
            p.requires_grad_(flag)


def estimate_gradient(
    params: Sequence[torch.Tensor],
    loss_fn: Callable[[], float],
    config: SpsaConfig,
    on_step: Callable[[int], None] | None = None,
) -> SpsaEstimate:
    """Run K two-sided perturbations of ``params`` and return the scalar coefficients.

    ``loss_fn`` evaluates the calibration loss at the current (perturbed) parameters; it is called
    2K times. The parameters are restored after every step (up to floating-point rounding of
    ``θ + εz − 2εz + εz``, a few ulps of the weights).
    """
    return estimate_indexed(list(enumerate(params)), loss_fn, config, on_step)


def estimate_indexed(
    indexed: Sequence[tuple[int, torch.Tensor]],
    loss_fn: Callable[[], float],
    config: SpsaConfig,
    on_step: Callable[[int], None] | None = None,
) -> SpsaEstimate:
    """:func:`estimate_gradient` for tensors that carry their position in a longer list (the seed of
    their direction), so a part of the model perturbs exactly as the whole model would."""
    estimate = SpsaEstimate(config=config)
    with frozen([param for _, param in indexed]), torch.inference_mode(False):
        for step in range(config.steps):
            shift_indexed(indexed, config.eps, config.seed, step)
            loss_plus = float(loss_fn())
            shift_indexed(indexed, -2.0 * config.eps, config.seed, step)
            loss_minus = float(loss_fn())
            shift_indexed(indexed, config.eps, config.seed, step)
            estimate.coefficients.append((loss_plus - loss_minus) / (2.0 * config.eps))
            estimate.forward_passes += 2
            if on_step is not None:
                on_step(step)
    return estimate
