"""Second moments ``H = Σ x xᵀ`` of a Linear's inputs over calibration tokens (float64, running sums).

Why float64 on the weights' device: ``H`` is solved against (refit, OBS), and float32 sums of tens of
thousands of tokens lose the small eigen-directions the solve depends on. Size: ``in_features²`` × 8 B
— 2.7 MB for SmolLM2-135M's o_proj (576 wide), 19 MB for its down_proj (1,536), 0.97 GB for a 7B
Llama's down_proj (11,008); the refit's solve adds the kept block, factored in place
(:class:`~minillm.compensation.refit.KeptSystem`; OBS: ``H⁻¹``). Only one closing projection's are alive
at a time. ``dtype=float32`` halves all of it: ``--streaming`` falls back to it when the float64 working
set does not fit the memory cap (:func:`minillm.streaming.compensation_bytes`); the damping then keeps
the solve well posed, as in SparseGPT, which accumulates ``H`` in float32.

Damping: solves use ``H + λ · mean(diag H) · I`` (:func:`damped`), the SparseGPT / SlimGPT convention;
λ (``DEFAULT_DAMPING`` = 0.01) keeps directions calibration never excited close to the original weights.

Target moments ``E = Σ x eᵀ`` (``in × out``), where ``e`` is how far each token's wanted output lies
from the layer's own, ``e = t − W x`` (:mod:`.refit`): the dense-output target (``--compensation-target
dense``) pairs each token's input on the pruned prefix with the same token's input in the dense model,
``e = W (x_d − x)``; the block target (``block``) hands in the block's output error ``d`` per token.
One ``in × out`` matrix beside ``H`` — for a 7B's down_proj 11,008 × 4,096, not 11,008².
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minillm.calibration.hooks import input_hooks
from minillm.calibration.stats import sample_variance
from minillm.defaults import DEFAULT_DAMPING

__all__ = ["DEFAULT_DAMPING", "InputMoments", "collect_moments", "damped", "damping_shift"]


@dataclass
class InputMoments:
    """``gram = Σ x xᵀ``, ``total = Σ x`` and the token count of one Linear's inputs; ``error = Σ x eᵀ``
    (``in × out``) when each input comes with the change ``e`` its output should make beyond ``W x``
    (:meth:`add`'s ``error``)."""

    gram: torch.Tensor
    total: torch.Tensor
    count: int = 0
    error: torch.Tensor | None = None

    @classmethod
    def zeros(cls, width: int, device: torch.device | str = "cpu", gram: bool = True,
              dtype: torch.dtype = torch.float64) -> InputMoments:
        """``gram=False``: only the mean is kept (bias folding needs no ``H``; ``gram`` is then 0 × 0).
        ``dtype``: of ``gram`` (the sums ``total`` stay float64: they are one row)."""
        side = width if gram else 0
        return cls(torch.zeros(side, side, dtype=dtype, device=device),
                   torch.zeros(width, dtype=torch.float64, device=device))

    def add(self, x: torch.Tensor, error: torch.Tensor | None = None) -> None:
        """Accumulate the inputs ``x``; ``error``: the same tokens' wanted output changes ``e`` (into
        ``error = Σ x eᵀ``, created on the first call). No float64 copy of the batch unless ``H`` is float64
        (the sums convert as they add): under ``--streaming`` this pass sets the peak."""
        flat = x.detach().reshape(-1, x.shape[-1]).to(device=self.total.device)
        if self.gram.numel():
            narrow = flat.to(self.gram.dtype)
            self.gram.addmm_(narrow.T, narrow)
            if error is not None:
                wanted = error.detach().reshape(-1, error.shape[-1]).to(device=self.gram.device,
                                                                        dtype=self.gram.dtype)
                if wanted.shape[0] != narrow.shape[0]:
                    raise ValueError(f"{wanted.shape[0]} output errors for {narrow.shape[0]} input tokens")
                if self.error is None:
                    self.error = narrow.new_zeros(narrow.shape[1], wanted.shape[1])
                self.error.addmm_(narrow.T, wanted)
        self.total += flat.sum(0, dtype=torch.float64)
        self.count += flat.shape[0]

    def release_gram(self) -> torch.Tensor:
        """``gram``, handed over: the moments keep an empty one, so the caller's solve is its only owner
        and can free it before factoring (the refit never holds ``H`` and its factor at once)."""
        gram, self.gram = self.gram, self.gram.new_zeros(0, 0)
        return gram

    def release_error(self) -> torch.Tensor | None:
        """``error`` (or None), handed over like :meth:`release_gram`."""
        error, self.error = self.error, None
        return error

    @property
    def mean(self) -> torch.Tensor:
        return self.total / max(self.count, 1)

    @property
    def variance(self) -> torch.Tensor:
        """Sample variance of every input column over the tokens, from ``H``'s diagonal and the sums."""
        return sample_variance(self.gram.diagonal().double(), self.total, self.count)


def damping_shift(gram: torch.Tensor, damping: float) -> float:
    """``damping · mean(diag gram)`` (``damping`` alone for a zero matrix): what the solves add to the
    diagonal."""
    scale = float(gram.diagonal().mean()) if gram.numel() else 0.0
    return damping * (scale if scale > 0 else 1.0)


def damped(gram: torch.Tensor, damping: float) -> torch.Tensor:
    """``gram + damping · mean(diag gram) · I`` (a new tensor; a zero matrix gets ``damping · I``)."""
    shift = damping_shift(gram, damping)
    return gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)


def collect_moments(linears: Sequence[nn.Linear], run: Callable[[], None], gram: bool = True,
                    dtype: torch.dtype = torch.float64,
                    partners: Mapping[nn.Linear, Sequence[torch.Tensor]] | None = None
                    ) -> dict[nn.Linear, InputMoments]:
    """Run ``run()`` (calibration forwards) with hooks accumulating each Linear's input moments
    (``gram`` in ``dtype``). ``partners[linear][k]``: the dense model's inputs ``x_d`` of ``linear``'s
    ``k``-th call (the same calibration batch, in the same order); the output the dense layer made from
    them is the target, ``e = W (x_d − x)`` into ``error``."""
    moments = {linear: InputMoments.zeros(linear.in_features, linear.weight.device, gram, dtype)
               for linear in linears}
    calls = dict.fromkeys(linears, 0)

    def observe(module: nn.Module, x: torch.Tensor) -> None:
        error = None
        if partners is not None and module in partners:
            dense = partners[module][calls[module]].to(x.device)
            if dense.shape != x.shape:
                raise ValueError(f"dense partner has shape {tuple(dense.shape)}, the inputs {tuple(x.shape)}")
            error = (dense.to(dtype) - x.to(dtype)) @ module.weight.detach().to(dtype).T
        calls[module] += 1
        moments[module].add(x, error)

    with input_hooks(linears, observe):
        run()
    if partners is not None:
        for linear, dense in partners.items():
            if linear in calls and calls[linear] != len(dense):
                raise ValueError(f"{calls[linear]} calls paired with {len(dense)} dense batches")
    return moments
