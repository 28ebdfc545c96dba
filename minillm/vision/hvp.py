"""Mixed Hessian-vector products ``(∂²L / ∂b ∂a) · v``: by finite differences of gradients, or exactly.

Why both: IFSO (like DARTS before it) estimates Hessian-vector products with a central difference of
two gradients, which costs two forward/backward passes and no second-order graph. The exact version,
by double backward, is the reference the finite-difference one is tested against, and an option for
small networks.

Both take ``loss``, a closure that recomputes the scalar loss from the *current* values of the tensors,
``perturb`` (the a's, moved along ``v``) and ``wrt`` (the b's, differentiated). ``perturb`` tensors are
moved in place and restored bit-exactly from a saved copy, never by adding and subtracting.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Loss = Callable[[], torch.Tensor]


def _norm(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum((v.detach().double() ** 2).sum() for v in vectors))


def fd_hvp(
    loss: Loss,
    perturb: Sequence[torch.Tensor],
    wrt: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
    r: float = 1e-2,
) -> list[torch.Tensor]:
    """Central difference ``[∇_b L(a + R v) − ∇_b L(a − R v)] / 2R`` with ``R = r / ||v||``.

    The step is scaled by ``||v||`` (as in IFSO's and DARTS' code) so that the total displacement of
    ``a`` is ``r`` whatever the size of ``v``; the truncation error is O(r²).
    """
    norm = float(_norm(v))
    if norm == 0.0:
        return [torch.zeros_like(b) for b in wrt]
    step = r / norm
    saved = [a.detach().clone() for a in perturb]
    try:
        with torch.no_grad():
            for a, a0, d in zip(perturb, saved, v, strict=True):
                a.copy_(a0 + step * d)
        g_plus = torch.autograd.grad(loss(), list(wrt), allow_unused=True)
        with torch.no_grad():
            for a, a0, d in zip(perturb, saved, v, strict=True):
                a.copy_(a0 - step * d)
        g_minus = torch.autograd.grad(loss(), list(wrt), allow_unused=True)
    finally:
        with torch.no_grad():
            for a, a0 in zip(perturb, saved, strict=True):
                a.copy_(a0)
    return [
        torch.zeros_like(b) if gp is None else (gp - gm) / (2.0 * step)
        for b, gp, gm in zip(wrt, g_plus, g_minus, strict=True)
    ]


def exact_hvp(
    loss: Loss,
    perturb: Sequence[torch.Tensor],
    wrt: Sequence[torch.Tensor],
    v: Sequence[torch.Tensor],
) -> list[torch.Tensor]:
    """``∇_b (∇_a L · v)`` by double backward: the exact mixed Hessian-vector product."""
    grads = torch.autograd.grad(loss(), list(perturb), create_graph=True)
    dot = sum((g * d.detach()).sum() for g, d in zip(grads, v, strict=True))
    out = torch.autograd.grad(dot, list(wrt), allow_unused=True)
    return [torch.zeros_like(b) if o is None else o.detach() for b, o in zip(wrt, out, strict=True)]
