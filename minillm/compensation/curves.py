"""Per-layer reconstruction-error curves: how much each closing projection's output suffers, after the
exact refit, when its first ``k`` groups (in the plan's removal order) are cut.

Why: the ``error`` allocation (:mod:`minillm.allocation`) spends the parameter budget where the
*compensated* error grows least, so it needs, for every pruned layer and candidate width, the refit's
residual ``‖Y − Ŷ‖²`` normalised by the projection's output energy ``‖Y‖²`` (a layer whose attention
barely writes to the residual stream is not thereby cheap to cut: both are relative to its own output).

One walk of the **dense** model through the executor (:class:`~minillm.calibration.sequential.Sequential`):
per block one forward gathers the input moments ``H`` of o_proj and the MLP's closing projection (it is
also the pass that feeds the next block), then :func:`~minillm.compensation.obs.removal_curve` turns each
``H`` into a curve (one Cholesky factorisation gives every width's residual exactly) and ``H`` is
dropped — only one block's moments are alive at a time (19 MB for SmolLM2's down_proj, 0.97 GB for a
7B Llama's). The curves are measured on dense inputs, before the
sequential compensation pass re-fits each block on the pruned prefix: an estimate of each layer's
sensitivity, not the pass's exact result.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.data import CalibrationSet
from minillm.calibration.sequential import Block, Sequential
from minillm.compensation.hessian import collect_moments
from minillm.compensation.obs import removal_curve

Progress = Callable[[str, int, int], None]
#: removal orders per layer: ``{layer: {"attn" | "mlp": [input columns of each group, in order]}}``
Removal = dict[int, dict[str, Sequence[Sequence[int]]]]
#: normalised error curves: ``{layer: {"attn" | "mlp": tensor of len(groups) + 1}}``
Curves = dict[int, dict[str, torch.Tensor]]


def normalised_curve(linear: nn.Linear, gram: torch.Tensor, groups: Sequence[Sequence[int]],
                     damping: float) -> torch.Tensor:
    """:func:`removal_curve` divided by the output energy ``Σ ‖W x‖² = tr(W H Wᵀ)`` (undamped ``H``)."""
    weight = linear.weight.detach().to(gram.device).double()
    energy = float(torch.einsum("oi,ij,oj->", weight, gram, weight))
    curve = removal_curve(weight, gram, groups, damping)
    return curve / energy if energy > 0 else curve


def reconstruction_curves(model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet,
                          removal: Removal, damping: float, progress: Progress | None = None) -> Curves:
    """The normalised refit-error curve of every family in ``removal`` (one dense walk, see the module)."""
    layers = sorted(i for i, families in removal.items() if any(families.values()))
    if not layers:
        return {}

    def per_block(block: Block) -> dict[str, torch.Tensor]:
        attn, mlp = adapter.attention(block.layer), adapter.mlp(block.layer)
        closings = {"attn": attn.o, "mlp": mlp.closing}
        wanted = {name: linear for name, linear in closings.items() if removal[block.index].get(name)}
        moments = collect_moments(list(wanted.values()), lambda: block.forward(advance=True))
        curves = {}
        for name, linear in wanted.items():
            curves[name] = normalised_curve(linear, moments.pop(linear).gram, removal[block.index][name],
                                            damping)
        return curves

    with torch.no_grad():
        walk = Sequential(model, adapter, calibration, progress=progress).run(per_block, layers=layers,
                                                                              task="error curves")
    return walk.results
