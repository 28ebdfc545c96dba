"""Exact least-squares refit of a closing projection's kept input columns.

A closing projection (o_proj, down_proj) computes ``y = W x``. Cutting the input columns ``R`` and
keeping ``K`` changes the output by ``W_R x_R``; the kept columns can absorb the part of it that is
linear in ``x_K``. With ``B = Wᵀ`` and calibration second moments ``H = Σ x xᵀ`` the minimiser of
``Σ ‖W x − W'_K x_K‖²`` solves the normal equations ``H_KK B'_K = (H B)_K``, i.e.

    B'_K = B_K + H_KK⁻¹ H_KR B_R

(the same update Optimal Brain Surgeon applies when it removes ``R``). ``H`` is damped
(:func:`~minillm.compensation.hessian.damped`) so the solve exists when calibration leaves directions
unexcited; with damping the update shrinks towards the original weights, not towards zero.

``with_bias``: the constant input 1 is appended to ``x`` (its moments are the token count and ``Σ x``),
so the refit also moves the bias — FLAP's bias compensation is the special case ``K = ∅``.

Other targets: each token's wanted output is ``t = W x + e`` instead of ``W x`` (``e``: what the layer
should also make up for), and only the target moments ``E = Σ x eᵀ`` (``in × out``) are needed; with the
damping as a pull towards the old rows (``δ ‖B'_K − B_K‖²``) the minimiser of ``Σ ‖t − W'_K x_K‖²`` is

    B'_K = B_K + (H_KK + δI)⁻¹ (H_KR B_R + E_K),

the formula above plus one term. The dense-output target (``--compensation-target dense``) has
``e = W (x_d − x)``, ``x_d`` the same token's input in the dense model: the kept columns on the pruned
prefix's inputs are fitted to what the *dense* layer produced, ``Σ ‖W x_d − W'_K x_K‖²`` (with the
cross moments ``C = Σ x x_dᵀ``, ``H_KR B_R + E_K = (C B)_K − H_KK B_K``). The block target (``block``,
down_proj only) has ``e = d``, the block's output error with its MLP still uncut (:mod:`.block_target`).
Either also changes a layer where nothing of it is removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.compensation.hessian import InputMoments, damping_shift


def augmented_gram(moments: InputMoments) -> torch.Tensor:
    """``Σ z zᵀ`` for ``z = [x; 1]`` (the bias as one more input column)."""
    width = moments.gram.shape[0]
    gram = moments.gram.new_zeros(width + 1, width + 1)
    gram[:width, :width] = moments.gram
    gram[:width, width] = moments.total
    gram[width, :width] = moments.total
    gram[width, width] = float(moments.count)
    return gram


@dataclass
class KeptSystem:
    """The normal equations of the kept rows, taken out of ``H``: ``factor`` (damped ``H_KK``, factored
    in place by :meth:`solve`), ``rhs = H_KR B_R`` and the old rows ``B_K``; no ``factor`` when nothing
    is removed or nothing kept (the rows stay as they are)."""

    factor: torch.Tensor | None
    rhs: torch.Tensor | None
    kept_b: torch.Tensor

    def solve(self) -> torch.Tensor:
        """``B_K + H_KK⁻¹ H_KR B_R``; ``factor`` is overwritten by its Cholesky factor, ``kept_b`` by the
        result."""
        if self.factor is None or self.rhs is None:
            return self.kept_b
        torch.linalg.cholesky(self.factor, out=self.factor)
        return self.kept_b.add_(torch.cholesky_solve(self.rhs, self.factor))


def kept_system(b: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float,
                error: torch.Tensor | None = None) -> KeptSystem:
    """What the solve needs from ``gram`` (and the target moments ``error`` = ``E``, ``in × out``), in
    ``gram``'s dtype. Once this returns, both may be freed: the solve never holds ``H``, a damped copy of
    it and the factor at once (:func:`refit_weight`)."""
    dtype = gram.dtype
    mask = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    mask[keep] = False
    removed = mask.nonzero().squeeze(1)
    kept_b = b.index_select(0, keep).to(dtype)
    if keep.numel() == 0 or (removed.numel() == 0 and error is None):
        return KeptSystem(None, None, kept_b)
    rows = keep.unsqueeze(1)
    factor = gram[rows, keep]  # H_KK, a fresh tensor (advanced indexing copies)
    rhs = gram[rows, removed] @ b.index_select(0, removed).to(dtype)  # H_KR B_R
    if error is not None:
        rhs += error.index_select(0, keep).to(dtype)  # + E_K
    factor.diagonal().add_(damping_shift(gram, damping))
    return KeptSystem(factor, rhs, kept_b)


def solve_kept(b: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """``B'_K = B_K + H_KK⁻¹ H_KR B_R`` for ``b = Wᵀ`` (rows = inputs), in ``gram``'s dtype, damped ``H``
    (equal to solving against :func:`~minillm.compensation.hessian.damped` ``(gram)``).

    Returns the new rows ``K`` only (``len(keep) × out``).
    """
    return kept_system(b, gram, keep, damping).solve()


@torch.no_grad()
def refit_weight(weight: torch.Tensor, moments: InputMoments, keep: torch.Tensor, damping: float,
                 bias: torch.Tensor | None = None, with_bias: bool = False, release: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New full-width weight (removed columns zero) and bias of a closing projection after the cut.

    ``weight``: ``out × in``; ``keep``: kept input columns. The returned tensors have ``weight``'s dtype
    and device; the dense model with these weights computes exactly what the sliced model computes.
    With ``with_bias`` the bias (created as zeros when ``bias`` is ``None``) is refitted too;
    otherwise ``bias`` is returned unchanged. ``release``: ``moments``' ``H`` is freed once its kept
    blocks are taken out (:meth:`InputMoments.release_gram`; the moments keep their mean), so the
    factorisation does not sit beside it.
    """
    keep = keep.to(device=moments.gram.device, dtype=torch.long)
    gram = moments.release_gram() if release else moments.gram
    error = moments.release_error() if release else moments.error
    b = weight.detach().to(gram.device).T  # a view: only the rows the solve takes are converted
    if with_bias and error is not None:
        raise ValueError("the dense-output and block targets refit weights only (no with_bias)")
    if with_bias:
        old = bias.detach().to(b.device) if bias is not None else b.new_zeros(b.shape[1])
        keep = torch.cat([keep, keep.new_tensor([b.shape[0]])])
        b = torch.cat([b.to(gram.dtype), old.to(gram.dtype)[None, :]])
        gram = augmented_gram(InputMoments(gram, moments.total, moments.count))
    system = kept_system(b, gram, keep, damping, error)
    del gram, error
    rows = system.solve()
    if with_bias:
        new_bias, rows, keep = rows[-1].to(device=weight.device, dtype=weight.dtype), rows[:-1], keep[:-1]
    else:
        new_bias = bias
    new = torch.zeros_like(weight)
    new[:, keep.to(weight.device)] = rows.T.to(device=weight.device, dtype=weight.dtype)
    return new, new_bias


@torch.no_grad()
def fold_mean(weight: torch.Tensor, moments: InputMoments, keep: torch.Tensor,
              bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP's bias compensation from the same moments: removed columns zero, ``W_R x̄_R`` into the bias."""
    keep = keep.to(weight.device, dtype=torch.long)
    removed = torch.ones(weight.shape[1], dtype=torch.bool, device=weight.device)
    removed[keep] = False
    mean = moments.mean.to(weight.device)
    shift = weight[:, removed].double() @ mean[removed]
    new_bias = (bias.double() if bias is not None else torch.zeros_like(shift)) + shift
    new = weight.clone()
    new[:, removed] = 0
    return new, new_bias.to(weight.dtype)
