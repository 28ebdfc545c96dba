"""Gate criteria: taylor-gate is the exact gate gradient (checkpointed or not), obeys the W·∂L/∂W identity,
allocates no parameter gradient; fwd-grad estimates the same gradient without any autograd graph."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_model

from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.scoring.base import ScoringContext
from minillm.scoring.gates import GateHolder, GateLayout, gate_gradients, gated


def _context(model, steps: int = 3, batch_size: int = 2) -> ScoringContext:
    from minillm.calibration.spsa import SpsaConfig

    adapter = adapter_for(model.config)
    n = len(adapter.decoder_layers(model))
    return ScoringContext(
        model=model,
        adapter=adapter,
        layers=list(range(n)),
        shapes={i: adapter.layer_shape(model, i) for i in range(n)},
        calibration=CalibrationSet(random_ids(4, 16, seed=1), batch_size=batch_size),
        spsa=SpsaConfig(steps=steps),
    )


def _loss64(model, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL from the full logits in float64 (HF's own loss upcasts only to float32)."""
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )


def _plain_backprop_gate_gradient(ctx: ScoringContext, layout: GateLayout) -> torch.Tensor:
    """Reference: gates that require grad, full logits, no checkpointing, weights left trainable."""
    gates = torch.ones(layout.size, dtype=torch.float64, requires_grad=True)
    with gated(ctx, layout, GateHolder(gates)):
        loss = _loss64(ctx.model, ctx.calibration.input_ids)
    (grad,) = torch.autograd.grad(loss, gates)
    return grad


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_taylor_gate_equals_plain_backprop_and_checkpointing_changes_nothing(family: str) -> None:
    model = tiny_model(family).double()
    ctx = _context(model)
    layout = GateLayout.from_context(ctx)
    reference = _plain_backprop_gate_gradient(ctx, layout)
    checkpointed = gate_gradients(ctx, layout, use_checkpoint=True)
    plain = gate_gradients(ctx, layout, use_checkpoint=False)
    torch.testing.assert_close(checkpointed.gradient, reference, atol=1e-6, rtol=0)
    torch.testing.assert_close(plain.gradient, checkpointed.gradient, atol=1e-10, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # restored
    assert count_hooks(model) == 0


@pytest.mark.parametrize(("family", "rtol"), [("opt", 0.0), ("llama", 1e-5)])
def test_gate_gradient_is_the_signed_sum_of_w_times_grad_over_the_closing_columns(
    family: str, rtol: float
) -> None:
    """∂L/∂g_c = Σ_i W_ic ∂L/∂W_ic for channel c (down / fc2), and per head over its o columns.

    OPT (LayerNorm in the model's dtype) is float64 end to end, so the identity holds to 1e-10. Llama's
    RMSNorm casts to float32 even in a float64 model, so gradients through it carry float32 rounding,
    which differs between the chunked gate loss and the reference: there we allow a relative 1e-5.
    """
    model = tiny_model(family).double()
    ctx = _context(model, batch_size=4)
    layout = GateLayout.from_context(ctx)
    gates = gate_gradients(ctx, layout).gradient
    _loss64(model, ctx.calibration.input_ids).backward()  # ordinary backprop, for the reference only
    for (layer, heads, channels), head_dim in zip(layout.slices(), layout.head_dims, strict=True):
        block = ctx.layer(layer)
        down, o = ctx.adapter.mlp(block).closing, ctx.adapter.attention(block).o
        per_channel = (down.weight * down.weight.grad).sum(0)
        per_head = (o.weight * o.weight.grad).sum(0).view(-1, head_dim).sum(1)
        torch.testing.assert_close(gates[channels], per_channel.detach(), atol=1e-10, rtol=rtol)
        torch.testing.assert_close(gates[heads], per_head.detach(), atol=1e-10, rtol=rtol)


def test_checkpointing_recomputes_blocks_and_keeps_no_parameter_grad() -> None:
    model = tiny_model("llama")
    ctx = _context(model)
    layout = GateLayout.from_context(ctx)
    calls = {"n": 0}
    block = ctx.adapter.decoder_layers(model)[0]
    handle = block.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    try:
        gate_gradients(ctx, layout, use_checkpoint=True)
        with_checkpoint = calls["n"]
        calls["n"] = 0
        gate_gradients(ctx, layout, use_checkpoint=False)
    finally:
        handle.remove()
    batches = len(ctx.calibration.batches())
    assert calls["n"] == batches
    # non-reentrant checkpointing re-runs the block's forward (not its module hooks) in backward:
    # the block must no longer carry our wrapper afterwards either way
    assert with_checkpoint == batches
    assert "forward" not in block.__dict__
    assert all(p.grad is None for p in model.parameters())


def test_fisher_variant_uses_per_sequence_gradients() -> None:
    model = tiny_model("llama").double()
    ctx = _context(model)
    layout = GateLayout.from_context(ctx)
    grads = gate_gradients(ctx, layout)
    # reference: per-sequence mean-loss gradients one sequence at a time
    per_sequence = []
    for row in ctx.calibration.input_ids:
        ids = row[None]
        gates = torch.ones(layout.size, dtype=torch.float64, requires_grad=True)
        with gated(ctx, layout, GateHolder(gates)):
            loss = _loss64(model, ids)
        per_sequence.append(torch.autograd.grad(loss, gates)[0])
    stacked = torch.stack(per_sequence)
    # batch of 2 vs 1 sequence: Llama's float32 RMSNorm rounds differently (relative ~1e-6, see above)
    torch.testing.assert_close(grads.fisher, stacked.pow(2).mean(0), atol=1e-12, rtol=1e-5)
    torch.testing.assert_close(grads.gradient, stacked.mean(0), atol=1e-12, rtol=1e-5)


def test_forward_mode_directional_derivatives_are_exact() -> None:
    """One jvp pass gives, per sequence, the autograd per-sequence gradient dotted with its tangent.

    Forward mode runs the eager attention (fused SDPA has no forward-mode derivative), whose softmax is
    computed in float32 even in a float64 model: so agreement is to float32 rounding (relative 1e-6).
    """
    from minillm.scoring.fwd_grad import directional_derivatives, eager_attention

    model = tiny_model("opt").double()
    ctx = _context(model)
    layout = GateLayout.from_context(ctx)
    ids = ctx.calibration.input_ids
    tangent = torch.randn(
        ids.shape[0], layout.size, generator=torch.Generator().manual_seed(0), dtype=torch.float64
    )
    holder = GateHolder(torch.ones(layout.size, dtype=torch.float64))
    with torch.no_grad(), gated(ctx, layout, holder), eager_attention(model):
        directional = directional_derivatives(model, holder, ids, tangent, "sequence")
    gates = torch.ones(ids.shape[0], layout.size, dtype=torch.float64, requires_grad=True)
    with gated(ctx, layout, GateHolder(gates)):
        logits = model(input_ids=ids).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
    (per_sequence,) = torch.autograd.grad(nll.sum(), gates)
    torch.testing.assert_close(directional, (per_sequence * tangent).sum(1), atol=1e-10, rtol=1e-6)
    assert count_hooks(model) == 0


def test_forward_gradient_converges_like_sqrt_k_over_d() -> None:
    """With sequences that agree (one sequence repeated), B·K independent tangents in d dimensions give a
    cosine of about sqrt(BK / (BK + d)): here B = 4, K = 16, d = 100 gates of one layer → ≈ 0.62. We
    require 0.4 (the cosine's spread at these sizes is ≈ 0.05) and a rise from 2 to 16 passes."""
    from minillm.scoring.fwd_grad import forward_gradient

    model = tiny_model("llama").double()
    ctx = _context(model)
    ctx.layers = [1]
    ctx.calibration = CalibrationSet(random_ids(1, 16, seed=1).repeat(4, 1), batch_size=4)
    layout = GateLayout.from_context(ctx)
    exact = gate_gradients(ctx, layout).gradient
    history = forward_gradient(ctx, layout, passes=16)
    cos = [float(torch.nn.functional.cosine_similarity(h, exact, dim=0)) for h in history]
    assert cos[15] > 0.4
    assert cos[15] > cos[1]
    assert count_hooks(model) == 0


def test_forward_gradient_token_mode_runs_and_restores_attention() -> None:
    from minillm.scoring.fwd_grad import forward_gradient

    model = tiny_model("llama").double()
    before = model.config._attn_implementation
    ctx = _context(model)
    layout = GateLayout.from_context(ctx)
    history = forward_gradient(ctx, layout, passes=2, mode="token")
    assert model.config._attn_implementation == before
    assert torch.isfinite(history[-1]).all() and history[-1].abs().sum() > 0
