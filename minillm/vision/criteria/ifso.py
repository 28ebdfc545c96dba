"""IFSO: influence-function second-order channel scores (Cheng, Zhang & Shi, TPAMI 2024,
"Influence Function Based Second-Order Channel Pruning: Evaluating True Loss Changes for Pruning is
Possible Without Retraining", arXiv:2308.06755; code: github.com/hrcheng1066/IFSO).

Derivation (what the scores estimate). Let ``w`` be the conv/linear weights and ``m`` the channel masks
on the inputs of every conv/linear reader (``m = 1`` is the dense net; :mod:`minillm.vision.masks`).
Training minimised ``J(w, m) = L(w, m) + λ/2 ||w||²``. Changing the masks by ``Δm`` (``Δm = −e_c``
removes channel ``c``) and *retraining* moves the optimum by ``Δw = −H_ww⁻¹ H_wm Δm`` (implicit function
theorem / influence function), so the loss change after retraining is, to second order,

    ΔL* ≈ g_mᵀ Δm + ½ Δmᵀ (H_mm − H_mw H_ww⁻¹ H_wm) Δm,

with ``H`` the Hessian of the training loss. IFSO approximates ``H_ww⁻¹ ≈ (1/λ) I`` and scores all
channels at once by taking ``Δm = 1`` (all masks) and reading off each channel's own row of the
quadratic form, so one pair of Hessian-vector products prices every channel.

What the released code computes (``tools/pruning_conv_fc_norm_sqrt.py``, ``before_train_iter``), and
what ``IfsoCriterion()`` computes by default:

    per batch:  u = H_wm · 1            (finite difference of ∇_w L, masks moved by ±R·1)
                t = H_mw · (u / λ)      (finite difference of ∇_m L, weights moved by ±R'·u/λ)
    score_c  =  mean over batches of  Σ_{readers k of c} ½ |t_k,c|

with ``R = r / ||v||``, ``r = 1e-2``; ``w`` the conv and linear weights only (not BN, not biases); the
loss is the plain cross-entropy (weight decay is applied by the optimiser, not in the loss). The code
*drops* the ``g_m`` and ``H_mm`` terms and takes an absolute value, so the score is the magnitude of the
retraining correction ``H_mw H_ww⁻¹ H_wm`` alone; with ``H_mm`` dropped, ``λ`` only rescales every score
and does not change the ranking. (The ½ is ours, to match the quadratic form; it does not change the
ranking either.) ``include_hmm=True`` keeps the ``H_mm`` term, ``½ |[(H_mm − H_mw H_ww⁻¹ H_wm) 1]_c|``,
for free (the same two passes give ``H_mm · 1``). ``hvp="exact"`` replaces the finite differences by
double backward.

Differences from the released pipeline, on purpose: (1) the code prunes iteratively during training
(one channel every 10 iterations, FisherPruning's schedule, 2 batches per score); here scores are
computed once on the trained net and ranked globally, which is the "without retraining" claim the
paper makes and the issue asks to test; (2) the code divides scores by sqrt(ΔFLOPs) — available for any
criterion as ``cost_norm="sqrt-flops"`` in :func:`minillm.vision.plan.global_plan`; (3) BN runs in
eval mode (running statistics) so scoring has no side effects on the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from minillm.vision.criteria.base import MaskCriterion, ScoringContext, check_batches
from minillm.vision.hvp import exact_hvp, fd_hvp
from minillm.vision.masks import masked, ones_masks


def ifso_batch_scores(
    loss,
    weights: Sequence[torch.Tensor],
    masks: Sequence[torch.Tensor],
    weight_decay: float,
    hvp: Literal["fd", "exact"] = "fd",
    fd_radius: float = 1e-2,
    include_hmm: bool = False,
) -> list[torch.Tensor]:
    """Signed per-mask values ``½ [(α H_mm − H_mw (1/λ) H_wm) · 1]`` for one batch (α = include_hmm).

    ``loss`` recomputes the batch loss from the current weights and masks; ``masks`` must require grad.
    """
    if not weight_decay > 0:
        raise ValueError("IFSO needs the training weight decay λ > 0 (it approximates H_ww⁻¹ by I/λ)")
    ones = [torch.ones_like(m) for m in masks]
    wrt = [*weights, *masks] if include_hmm else list(weights)
    if hvp == "fd":
        first = fd_hvp(loss, masks, wrt, ones, fd_radius)
    elif hvp == "exact":
        first = exact_hvp(loss, masks, wrt, ones)
    else:
        raise ValueError(f"hvp must be 'fd' or 'exact', got {hvp!r}")
    h_wm_1 = first[: len(weights)]
    direction = [u / weight_decay for u in h_wm_1]
    if hvp == "fd":
        corr = fd_hvp(loss, weights, masks, direction, fd_radius)
    else:
        corr = exact_hvp(loss, weights, masks, direction)
    if include_hmm:
        h_mm_1 = first[len(weights) :]
        return [0.5 * (a - b) for a, b in zip(h_mm_1, corr, strict=True)]
    return [-0.5 * b for b in corr]


class IfsoCriterion(MaskCriterion):
    """IFSO scores as Torch-Pruning importance; see the module docstring for the exact formula."""

    absolute_first = True  # |.| per reader, then summed over readers, as the released code does

    def __init__(
        self,
        hvp: Literal["fd", "exact"] = "fd",
        fd_radius: float = 1e-2,
        include_hmm: bool = False,
        weight_decay: float | None = None,
    ) -> None:
        super().__init__()
        self.hvp = hvp
        self.fd_radius = fd_radius
        self.include_hmm = include_hmm
        self.weight_decay = weight_decay

    def calibrate(self, ctx: ScoringContext) -> None:
        check_batches(ctx, "ifso")
        lam = self.weight_decay if self.weight_decay is not None else ctx.weight_decay
        model = ctx.model
        was_training = model.training
        model.eval()
        self._names = {m: n for n, m in model.named_modules()}
        weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        flags = [p.requires_grad for p in model.parameters()]
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights:
            w.requires_grad_(True)
        masks = ones_masks(model, ctx.groups, requires_grad=True)
        names = list(masks)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        try:
            with masked(model, masks), torch.enable_grad():
                for x, y in ctx.batches:

                    def loss(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                        return ctx.loss_fn(model(x), y)

                    vals = ifso_batch_scores(
                        loss,
                        weights,
                        [masks[n] for n in names],
                        lam,
                        self.hvp,
                        self.fd_radius,
                        self.include_hmm,
                    )
                    for n, v in zip(names, vals, strict=True):
                        rows[n].append(v.detach().double().cpu())
        finally:
            for p, f in zip(model.parameters(), flags, strict=True):
                p.requires_grad_(f)
            model.train(was_training)
        self.per_batch = {n: torch.stack(r) for n, r in rows.items()}
