"""First-order Taylor channel scores (Molchanov et al., ICLR 2017, "Pruning Convolutional Neural
Networks for Resource Efficient Inference").

Zeroing channel ``c`` changes the loss by ``ΔL ≈ −Σ_k ∂L/∂m_{k,c}`` to first order, where the sum runs
over every reader ``k`` of the channel (:mod:`minillm.vision.masks`); ``∂L/∂m_{k,c}`` is the sum over the
batch and positions of activation × gradient, i.e. Molchanov's criterion computed on the same masks
IFSO uses. Score = mean over calibration batches of ``|Σ_k ∂L_batch/∂m_{k,c}|``. It is the first-order
term of the expansion whose second-order, after-retraining term IFSO keeps, which makes the pair a
direct comparison.
"""

from __future__ import annotations

import torch

from minillm.vision.criteria.base import MaskCriterion, ScoringContext, check_batches
from minillm.vision.masks import masked, ones_masks


def mask_gradients(loss: torch.Tensor, masks: list[torch.Tensor]) -> list[torch.Tensor]:
    """``∂L/∂m`` for each mask: the per-channel first-order loss change of scaling its input."""
    return [g.detach() for g in torch.autograd.grad(loss, masks)]


class TaylorCriterion(MaskCriterion):
    absolute_first = False  # sum the readers' signed gradients, then |.|: the group's first-order ΔL

    def calibrate(self, ctx: ScoringContext) -> None:
        check_batches(ctx, "taylor")
        model = ctx.model
        was_training = model.training
        model.eval()
        self._names = {m: n for n, m in model.named_modules()}
        masks = ones_masks(model, ctx.groups, requires_grad=True)
        names = list(masks)
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        try:
            with masked(model, masks), torch.enable_grad():
                for x, y in ctx.batches:
                    grads = mask_gradients(ctx.loss_fn(model(x), y), [masks[n] for n in names])
                    for n, g in zip(names, grads, strict=True):
                        rows[n].append(g.double().cpu())
        finally:
            model.train(was_training)
        self.per_batch = {n: torch.stack(r) for n, r in rows.items()}
