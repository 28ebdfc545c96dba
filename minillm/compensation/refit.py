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
"""

from __future__ import annotations

import torch

from minillm.compensation.hessian import InputMoments, damped


def augmented_gram(moments: InputMoments) -> torch.Tensor:
    """``Σ z zᵀ`` for ``z = [x; 1]`` (the bias as one more input column)."""
    width = moments.gram.shape[0]
    gram = moments.gram.new_zeros(width + 1, width + 1)
    gram[:width, :width] = moments.gram
    gram[:width, width] = moments.total
    gram[width, :width] = moments.total
    gram[width, width] = float(moments.count)
    return gram


def solve_kept(b: torch.Tensor, gram: torch.Tensor, keep: torch.Tensor, damping: float) -> torch.Tensor:
    """``B'_K = B_K + H_KK⁻¹ H_KR B_R`` for ``b = Wᵀ`` (rows = inputs), float64, damped ``H``.

    Returns the new rows ``K`` only (``len(keep) × out``).
    """
    h = damped(gram.double(), damping)
    b = b.double()
    mask = torch.ones(b.shape[0], dtype=torch.bool, device=b.device)
    mask[keep] = False
    removed = mask.nonzero().squeeze(1)
    kept_b = b.index_select(0, keep)
    if removed.numel() == 0 or keep.numel() == 0:
        return kept_b
    h_kk = h.index_select(0, keep).index_select(1, keep)
    h_kr = h.index_select(0, keep).index_select(1, removed)
    factor = torch.linalg.cholesky(h_kk)
    return kept_b + torch.cholesky_solve(h_kr @ b.index_select(0, removed), factor)


@torch.no_grad()
def refit_weight(weight: torch.Tensor, moments: InputMoments, keep: torch.Tensor, damping: float,
                 bias: torch.Tensor | None = None, with_bias: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """New full-width weight (removed columns zero) and bias of a closing projection after the cut.

    ``weight``: ``out × in``; ``keep``: kept input columns. The returned tensors have ``weight``'s dtype
    and device; the dense model with these weights computes exactly what the sliced model computes.
    With ``with_bias`` the bias (created as zeros when ``bias`` is ``None``) is refitted too;
    otherwise ``bias`` is returned unchanged.
    """
    keep = keep.to(device=moments.gram.device, dtype=torch.long)
    b = weight.detach().to(moments.gram.device).double().T
    if with_bias:
        width = b.shape[0]
        old = bias.detach().to(b.device).double() if bias is not None else b.new_zeros(b.shape[1])
        b = torch.cat([b, old[None, :]])
        rows = solve_kept(b, augmented_gram(moments), torch.cat([keep, keep.new_tensor([width])]), damping)
        new_bias = rows[-1].to(device=weight.device, dtype=weight.dtype)
        rows = rows[:-1]
    else:
        rows = solve_kept(b, moments.gram, keep, damping)
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
