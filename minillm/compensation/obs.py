"""Optimal Brain Surgeon greedy group removal on a closing projection (SlimGPT / OSSCAR style).

With ``B = Wᵀ`` (rows = input columns of the closing projection) and damped input moments ``H``,
removing a group ``g`` of input rows and optimally updating the others raises the output error
``Σ ‖W x − W' x‖²`` by

    cost(g) = ½ Σ B_g ⊙ ([(H⁻¹)_gg]⁻¹ B_g)

and the optimal update of the survivors is ``B ← B − (H⁻¹)_{:g} [(H⁻¹)_gg]⁻¹ B_g``; ``H⁻¹`` of the
survivors is then ``H⁻¹ − (H⁻¹)_{:g} [(H⁻¹)_gg]⁻¹ (H⁻¹)_{g:}`` (the downdate). Greedy: remove the
cheapest group, update, repeat. After all removals ``B`` equals the exact refit of the survivors
(:func:`minillm.compensation.refit.solve_kept`), so selection and compensation optimise one objective.

``families`` makes the removal GQA-correct for query-head mode: each round removes the cheapest group
of *every* family (one query head per kv group), so every kv group keeps equally many query heads.
``step`` removes that many cheapest groups jointly per round (one joint update) — SlimGPT's batching,
used for MLP channels where one-at-a-time rounds would cost ``channels × in²``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minillm.compensation.hessian import damped


@dataclass
class ObsOrder:
    """Groups in removal order with the error each one added when it went (costs are ≥ 0)."""

    order: list[int]
    costs: list[float]


def _inverse(gram: torch.Tensor, damping: float) -> torch.Tensor:
    return torch.cholesky_inverse(torch.linalg.cholesky(damped(gram.double(), damping)))


def _costs(b: torch.Tensor, hinv: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """cost of every group in ``index`` (``groups × size``), batched."""
    h_gg = hinv[index[:, :, None], index[:, None, :]]
    b_g = b[index]
    return 0.5 * (b_g * torch.linalg.solve(h_gg, b_g)).sum((1, 2))


def _remove(b: torch.Tensor, hinv: torch.Tensor, rows: torch.Tensor) -> None:
    """OBS update of the survivors and downdate of ``H⁻¹`` for removing ``rows`` (in place)."""
    h_gg = hinv[rows][:, rows]
    columns = hinv[:, rows]
    b -= columns @ torch.linalg.solve(h_gg, b[rows])
    hinv -= columns @ torch.linalg.solve(h_gg, hinv[rows])
    b[rows] = 0
    hinv[rows] = 0
    hinv[:, rows] = 0


@torch.no_grad()
def obs_order(weight: torch.Tensor, gram: torch.Tensor, groups: Sequence[Sequence[int]], count: int,
              damping: float, families: Sequence[Sequence[int]] | None = None, step: int = 1) -> ObsOrder:
    """Greedy OBS removal of ``count`` groups (``count`` rounds of one group per family with ``families``).

    ``weight``: ``out × in`` closing projection; ``groups``: input columns of each group, all the same
    size; ``families``: group ids that must shrink together, one removed from each per round (default:
    one family of every group). Returns the removed groups in order, with their costs.
    """
    index = torch.tensor([list(g) for g in groups], dtype=torch.long, device=gram.device)
    b = weight.detach().to(gram.device).double().T.clone()
    hinv = _inverse(gram, damping)
    families = [list(range(len(groups)))] if families is None else [list(f) for f in families]
    alive = [set(f) for f in families]
    order: list[int] = []
    costs: list[float] = []
    if any(count >= len(f) for f in alive):
        raise ValueError(f"cannot remove {count} groups per family: every family must keep one")
    single = len(alive) == 1
    done = 0
    while done < count:
        take = min(step, count - done) if single else 1
        for family in alive:
            members = sorted(family)
            cost = _costs(b, hinv, index[members])
            picked = sorted(range(len(members)), key=lambda i: (float(cost[i]), members[i]))[:take]
            chosen = [members[i] for i in picked]
            _remove(b, hinv, index[chosen].reshape(-1))
            order += chosen
            costs += [float(cost[i]) for i in picked]
            family.difference_update(chosen)
        done += take
    return ObsOrder(order, costs)


@torch.no_grad()
def removal_curve(weight: torch.Tensor, gram: torch.Tensor, groups: Sequence[Sequence[int]], damping: float
                  ) -> torch.Tensor:
    """Output error after removing the first ``k`` of ``groups`` (in the given order) and refitting the rest.

    Entry ``k`` (``k = 0 … len(groups)``) is the exact refit's residual with the first ``k`` groups' inputs
    cut, in the damped metric the refit minimises: ``tr(Bᵀ H B) − tr(G_Kᵀ H_KK⁻¹ G_K)`` with ``G = H B``,
    ``B = Wᵀ`` — the same total the OBS removals above add up. The order is the caller's (e.g. the
    criterion's lowest scores first), not OBS's own choice.

    One Cholesky factor gives every ``k``: with the inputs ordered so that the groups removed *last* come
    first, every kept set is a leading block, whose Cholesky factor is the leading block of ``L``; and
    ``L_KK⁻¹ G_K`` is the leading rows of ``Z = L⁻¹ G``, so the explained part is a cumulative sum of the
    squared row norms of ``Z``. Cost: one factorisation and one triangular solve of ``in × out``.
    """
    width = gram.shape[0]
    grouped = [c for g in reversed(groups) for c in g]
    members = set(grouped)
    order = torch.tensor([c for c in range(width) if c not in members] + grouped, dtype=torch.long,
                         device=gram.device)
    h = damped(gram.double(), damping).index_select(0, order).index_select(1, order)
    b = weight.detach().to(gram.device).double().T.index_select(0, order)
    g = h @ b
    factor = torch.linalg.cholesky(h)
    z = torch.linalg.solve_triangular(factor, g, upper=False)
    explained = torch.cat([z.new_zeros(1), (z * z).sum(1).cumsum(0)])
    total = float((b * g).sum())
    size = len(groups[0]) if groups else 0
    kept = torch.tensor([width - k * size for k in range(len(groups) + 1)], dtype=torch.long,
                        device=gram.device)
    return (total - explained[kept]).clamp_min(0.0).cpu()
