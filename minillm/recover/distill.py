"""Token losses of recovery (next-token CE and distillation KL) computed in chunks of tokens.

Why chunks: a batch's logits are ``tokens × vocabulary`` floats (8 × 128 × 49,152 × 4 bytes = 200 MB for
the benchmark model, 1 GB at a 262k vocabulary), and a KD step would hold the student's, the teacher's,
their softmaxes and the gradient at once. Here each model runs its own body to the final hidden states
(through its own code: ``model.base_model``), and the LM head is applied to ``chunk_size`` tokens at a
time. :class:`_ChunkedHeadLoss` is a custom autograd function that, per chunk, computes the loss and its
gradient with respect to the chunk's hidden states and the head's trainable weights, keeps only those
(``tokens × hidden`` and the head's size) and drops the chunk's logits; its backward scales them. So
neither model's full logits exist in float32, in the forward or in the backward.

The KL is Minitron's (Sreenivas et al., 2024, https://arxiv.org/abs/2408.11796) forward KL
``KL(teacher ‖ student)`` on the logits at temperature τ, averaged over target tokens and multiplied by
τ² (Hinton et al., 2015) so its gradient keeps its size when τ changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from minillm.errors import UsageError
from minillm.recover.data import IGNORE

DEFAULT_CHUNK = 256  # tokens per head application: 256 × 49,152 × 4 B = 50 MB of logits per chunk
LOSSES = ("kd", "ce", "kd+ce")
RowLoss = Callable[[torch.Tensor, int, int], torch.Tensor]  # (student logits of rows start:stop) -> sum


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers ``…ForCausalLM`` inside a peft wrapper (LoRA layers stay injected), or ``model``."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def final_hidden(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None
) -> torch.Tensor:
    """The last hidden states (after the final norm), from the model's own body (``base_model``)."""
    body = causal_lm(model).base_model
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]


def output_head(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden → logits exactly as the model's forward does: LM head, then the config's generic logit
    transforms (``logit_scale``, ``final_logit_softcapping``) when it has them."""
    lm = causal_lm(model)
    head = lm.get_output_embeddings()
    config = lm.config
    scale = getattr(config, "logit_scale", None)
    softcap = getattr(config, "final_logit_softcapping", None)

    def logits(hidden: torch.Tensor) -> torch.Tensor:
        out = head(hidden.to(execution_device(head)))
        if scale is not None:
            out = out * scale
        if softcap is not None:
            out = torch.tanh(out / softcap) * softcap
        return out

    return logits


def execution_device(module: nn.Module) -> torch.device:
    """Where a module computes: its weights' device, or accelerate's execution device when offloaded."""
    hook = getattr(module, "_hf_hook", None)  # accelerate-offloaded: weights arrive on the execution device
    if hook is not None and getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return next(module.parameters()).device


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The LM head's trainable tensors (inputs of the chunked loss, so their gradients flow)."""
    head = causal_lm(model).get_output_embeddings()
    return [p for p in head.parameters() if p.requires_grad]


def check_logit_path(model: nn.Module, input_ids: torch.Tensor, name: str = "model") -> None:
    """Refuse a model whose forward computes logits differently from body → head (an unusual head)."""
    with torch.no_grad():
        expected = model(input_ids=input_ids).logits.float()
        got = output_head(model)(final_hidden(model, input_ids, None)).float()
    tolerance = 1e-3 * (1.0 + expected.abs().max().item())
    if got.shape != expected.shape or (got.to(expected.device) - expected).abs().max().item() > tolerance:
        raise UsageError(
            f"the {name}'s logits are not its LM head applied to its final hidden states; chunked "
            "losses do not support this architecture yet (open an issue with its model_type)"
        )


class _ChunkedHeadLoss(torch.autograd.Function):
    """sum over rows of ``row_loss(head(hidden rows))``; gradients computed chunk by chunk in forward."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, row_loss: RowLoss, chunk: int, *params: torch.Tensor) -> Any:
        want_hidden = ctx.needs_input_grad[0]
        wanted = [p for p, need in zip(params, ctx.needs_input_grad[3:], strict=True) if need]
        grad_hidden = torch.zeros_like(hidden) if want_hidden else None
        grad_params = [torch.zeros_like(p) for p in wanted]
        total = torch.zeros((), dtype=torch.float64, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            stop = min(start + chunk, hidden.shape[0])
            with torch.enable_grad():
                rows = hidden[start:stop].detach().requires_grad_(want_hidden)
                loss = row_loss(rows, start, stop)
                inputs = ([rows] if want_hidden else []) + wanted
                grads = torch.autograd.grad(loss, inputs) if inputs else ()
            total += loss.detach().double()
            if want_hidden:
                grad_hidden[start:stop] = grads[0]  # type: ignore[index]
            for acc, grad in zip(grad_params, grads[int(want_hidden):], strict=True):
                acc += grad
            del loss, grads, rows
        ctx.want = [want_hidden, *(need for need in ctx.needs_input_grad[3:])]
        ctx.save_for_backward(*([grad_hidden] if want_hidden else []), *grad_params)
        return total.to(hidden.dtype if hidden.dtype == torch.float64 else torch.float32)

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> Any:
        saved = list(ctx.saved_tensors)
        grad_hidden = saved.pop(0) * grad_out if ctx.want[0] else None
        grads = [saved.pop(0) * grad_out if need else None for need in ctx.want[1:]]
        return (grad_hidden, None, None, *grads)


def chunked_head_loss(
    hidden_rows: torch.Tensor, row_loss: RowLoss, chunk: int, params: list[nn.Parameter]
) -> torch.Tensor:
    """Σ_rows loss, never holding more than ``chunk`` rows of logits (see the module docstring)."""
    if not (torch.is_grad_enabled() and (hidden_rows.requires_grad or any(p.requires_grad for p in params))):
        with torch.no_grad():
            total = sum(
                (row_loss(hidden_rows[s : s + chunk], s, min(s + chunk, len(hidden_rows))).double()
                 for s in range(0, hidden_rows.shape[0], chunk)),
                torch.zeros((), dtype=torch.float64, device=hidden_rows.device),
            )
        return total.to(torch.float64 if hidden_rows.dtype == torch.float64 else torch.float32)
    return _ChunkedHeadLoss.apply(hidden_rows, row_loss, chunk, *params)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    return logits if logits.dtype == torch.float64 else logits.float()


def kl_sum(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """τ² · Σ_rows KL(softmax(t/τ) ‖ softmax(s/τ))."""
    log_q = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    log_p = torch.log_softmax(_upcast(teacher_logits).to(log_q.dtype) / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum() * temperature**2


def ce_sum(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(_upcast(student_logits), targets, reduction="sum")


def sampled_kl_sum(
    student_logits: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Unbiased estimate of :func:`kl_sum` from a cached sample of the teacher's distribution.

    ``ids``/``weights`` (rows × K): tokens drawn from a proposal r with weights p/(K·r), so that
    E[Σ_k w_k f(x_k)] = Σ_v p_v f(v); with the teacher entropy H(p) stored exactly,
    KL(p ‖ q) = −Σ_v p_v log q_v − H(p) is estimated by −Σ_k w_k log q(x_k) − H(p) (Anshumann et al., 2025,
    "sparse logit sampling"; a top-k cache would be biased).
    """
    log_q = torch.log_softmax(_upcast(student_logits) / temperature, dim=-1)
    picked = log_q.gather(-1, ids.long().to(log_q.device))
    cross = -(weights.to(log_q.dtype).to(log_q.device) * picked).sum()
    return (cross - entropy.to(log_q.dtype).to(log_q.device).sum()) * temperature**2


def target_rows(
    hidden: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hidden states of the positions that predict a target token, the targets, and the boolean mask."""
    mask = labels[:, 1:] != IGNORE
    return hidden[:, :-1][mask], labels[:, 1:][mask], mask


class TokenLoss(nn.Module):
    """The student and its training objective in one module, so ``accelerator.prepare`` (DDP) wraps the
    whole forward. ``forward`` returns the mean loss per target token; the teacher's part (hidden rows or
    cached samples) is computed outside and passed in, so the teacher is never part of this module."""

    def __init__(self, student: nn.Module, loss: str = "ce", temperature: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK) -> None:
        super().__init__()
        if loss not in LOSSES:
            raise UsageError(f"--loss must be one of {', '.join(LOSSES)} (got {loss!r})")
        self.student = student
        self.loss = loss
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.teacher_head: Callable[[torch.Tensor], torch.Tensor] | None = None  # set by the caller for kd

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        teacher_rows: torch.Tensor | None = None,
        sample_ids: torch.Tensor | None = None,
        sample_weights: torch.Tensor | None = None,
        entropy: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        hidden = final_hidden(self.student, input_ids, attention_mask)
        rows, targets, _ = target_rows(hidden, labels)
        head = output_head(self.student)
        kd = self.loss in ("kd", "kd+ce")
        if kd and teacher_rows is None and sample_ids is None:
            raise UsageError("--loss kd needs a teacher: pass --teacher DENSE (or --cache-teacher DIR)")
        teacher_head, tau = self.teacher_head, self.temperature

        def row_loss(student_rows: torch.Tensor, start: int, stop: int) -> torch.Tensor:
            logits = head(student_rows)
            total = ce_sum(logits, targets[start:stop]) if self.loss != "kd" else logits.new_zeros(())
            if kd and teacher_rows is not None:
                assert teacher_head is not None, "TokenLoss.teacher_head is set together with teacher rows"
                with torch.no_grad():
                    teacher_logits = teacher_head(teacher_rows[start:stop]).to(logits.device)
                total = total + kl_sum(logits, teacher_logits, tau)
            elif kd:
                total = total + sampled_kl_sum(logits, sample_ids[start:stop], sample_weights[start:stop],  # type: ignore[index]
                                               entropy[start:stop], tau)  # type: ignore[index]
            return total

        total = chunked_head_loss(rows, row_loss, self.chunk_size, head_parameters(self.student))
        if reduction == "sum":
            return total
        return total / max(1, targets.numel())
