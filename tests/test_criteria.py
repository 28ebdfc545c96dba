"""Every scoring criterion: valid plans for both allocations, determinism, pruned ≡ masked (with FLAP's
bias compensation), known answers for Taylor, and the SPSA estimator's quality and graph-freedom."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.calibration.spsa import SpsaConfig
from minillm.scoring.compensation import fold_removed_means
from minillm.surgery import apply_plan, mask_plan, validate_layer_plan

MY_CRITERIA = [
    "random",
    "magnitude",
    "magnitude-l2",
    "wanda-sp",
    "flap",
    "taylor",
    "taylor-fisher",
    "taylor-vector",
    "taylor-lowmem",
    "fms",
    "fms-bp",
    "fms-gate",
    "taylor-gate",
    "taylor-gate-fisher",
    "taylor-gate-fms",
    "fwd-grad",
]


def _calibration(seed: int = 1) -> CalibrationSet:
    return CalibrationSet(random_ids(4, 16, seed=seed), batch_size=2)


def _score(model, criterion: str, seed: int = 0):
    return score_model(
        model, criterion, _calibration(), [0, 1], seed=seed, spsa=SpsaConfig(steps=3, seed=seed)
    )


@pytest.mark.parametrize("criterion", MY_CRITERIA)
def test_plans_valid_deterministic_and_surgery_equals_masking(criterion: str) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    first, second = _score(model, criterion), _score(model, criterion)
    assert count_hooks(model) == 0
    assert not any(p.requires_grad is False for p in model.parameters())  # flags restored
    assert all(p.grad is None for p in model.parameters())
    for allocation in ("uniform", "global"):
        plan = plan_from_scores(model, first, 0.25, allocation)
        again = plan_from_scores(model, second, 0.25, allocation)
        assert plan.to_dict() == again.to_dict(), "identical seeds must give identical plans"
        for layer in plan.layers:
            validate_layer_plan(layer, 4, 2)
        assert abs(plan.achieved_ratio - 0.25) < 0.1
        pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
        for target in (pruned, masked):
            if first.compensation:
                fold_removed_means(target, adapter, plan, first.compensation)
        mask_plan(masked, adapter, plan)
        apply_plan(pruned, adapter, plan)
        ids = random_ids(2, 12, seed=5)
        with torch.no_grad():
            torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)


_FAST_OTHERS = [("opt", "flap"), ("opt", "taylor-gate"), ("opt", "fwd-grad"), ("qwen3", "flap")]
_SLOW_OTHERS = [
    (f, c)
    for f in ("opt", "qwen3", "qwen2", "mistral")
    for c in ("flap", "taylor-gate", "fwd-grad", "fms-gate", "taylor-vector", "wanda-sp", "taylor-fisher")
    if (f, c) not in _FAST_OTHERS
]


@pytest.mark.parametrize(
    ("family", "criterion"), _FAST_OTHERS + [pytest.param(*fc, marks=pytest.mark.slow) for fc in _SLOW_OTHERS]
)
def test_other_families(family: str, criterion: str) -> None:
    model = tiny_model(family)
    result = _score(model, criterion)
    plan = plan_from_scores(model, result, 0.2, "global")
    masked = copy.deepcopy(model)
    adapter = adapter_for(model.config)
    for target in (model, masked):
        if result.compensation:
            fold_removed_means(target, adapter, plan, result.compensation)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, masked(ids).logits, atol=1e-5, rtol=0)


def test_different_seeds_change_random_scores() -> None:
    model = tiny_model("llama")
    a, b = _score(model, "random", seed=0), _score(model, "random", seed=1)
    assert not torch.equal(a.scores[0].channels, b.scores[0].channels)


@pytest.mark.parametrize(
    "criterion", ["taylor", "taylor-fisher", "taylor-vector", "magnitude", "magnitude-l2", "fms-bp"]
)
def test_group_zeroed_by_hand_scores_zero(criterion: str) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    layer = adapter.decoder_layers(model)[1]
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    with torch.no_grad():
        for linear in mlp.expand:
            linear.weight[7] = 0
        mlp.closing.weight[:, 7] = 0
        attn.q.weight[16:32] = 0  # query head 1 (head_dim 16)
        attn.o.weight[:, 16:32] = 0
    scores = _score(model, criterion).scores[1]
    assert scores.channels[7] == 0 and scores.heads[1] == 0
    assert (scores.channels > 0).sum() == 95 and (scores.heads > 0).sum() == 3


def test_taylor_gradient_matches_finite_differences() -> None:
    """The back-propagated ∂L/∂W that Taylor scores use, checked against central differences.

    OPT in float64 (LayerNorm keeps the dtype); the finite differences use a float64 cross-entropy. The
    backprop side goes through HF's loss, which upcasts logits only to float32, hence rtol 1e-4.
    """
    from minillm.calibration.backprop import model_gradients

    model = tiny_model("opt").double()
    adapter = adapter_for(model.config)
    calibration = _calibration()
    down = adapter.mlp(adapter.decoder_layers(model)[1]).closing
    grads = model_gradients(model, calibration, [down.weight]).gradient[0]
    ids = calibration.input_ids

    def loss() -> float:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
            flat = logits[:, :-1].reshape(-1, logits.shape[-1])
            return float(torch.nn.functional.cross_entropy(flat, ids[:, 1:].reshape(-1)))

    eps = 1e-5
    for i, j in [(0, 0), (5, 17), (63, 95)]:
        with torch.no_grad():
            down.weight[i, j] += eps
            plus = loss()
            down.weight[i, j] -= 2 * eps
            minus = loss()
            down.weight[i, j] += eps
        numeric, analytic = (plus - minus) / (2 * eps), float(grads[i, j])
        assert abs(numeric - analytic) < 1e-8 + 1e-4 * abs(numeric)


def test_taylor_formulas_on_a_linear_model_with_analytic_gradient() -> None:
    """For L = ½·mean‖Wx − t‖², ∂L/∂W = (WX − T)Xᵀ/N; the Taylor saliences use exactly that."""
    from minillm.scoring.taylor import elementwise

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    x = torch.randn(5, 40, generator=generator, dtype=torch.float64)
    t = torch.randn(3, 40, generator=generator, dtype=torch.float64)
    analytic = (weight @ x - t) @ x.T / 40
    w = weight.clone().requires_grad_(True)
    (0.5 * ((w @ x - t) ** 2).sum(0).mean()).backward()
    torch.testing.assert_close(w.grad, analytic)
    torch.testing.assert_close(
        elementwise(weight, analytic).double(), (weight * analytic).abs(), atol=1e-6, rtol=0
    )
    # a zero weight has zero salience whatever its gradient; second order subtracts ½W²F
    fisher = analytic.pow(2)
    expected = (weight * analytic - 0.5 * weight * fisher * weight).abs()
    torch.testing.assert_close(elementwise(weight, analytic, fisher).double(), expected, atol=1e-6, rtol=0)


def test_flap_compensation_preserves_the_mean_output() -> None:
    """After folding, the closing projection's mean output over the calibration tokens is unchanged."""
    model = tiny_model("llama").double()
    adapter = adapter_for(model.config)
    calibration = _calibration()
    result = score_model(model, "flap", calibration, [1])
    plan = plan_from_scores(model, result, 0.1, "uniform", structures="mlp")
    closing = adapter.mlp(adapter.decoder_layers(model)[1]).closing
    outputs: list[torch.Tensor] = []
    handle = closing.register_forward_hook(
        lambda m, a, out: outputs.append(out.detach().reshape(-1, out.shape[-1]))
    )
    with torch.no_grad():
        model(calibration.input_ids)
        fold_removed_means(model, adapter, plan, result.compensation)
        mask_plan(model, adapter, plan)
        model(calibration.input_ids)
    handle.remove()
    assert closing.bias is not None
    torch.testing.assert_close(outputs[1].mean(0), outputs[0].mean(0), atol=1e-9, rtol=0)
    assert not torch.allclose(outputs[1], outputs[0])


def test_spsa_on_gates_approaches_the_true_gradient() -> None:
    """SPSA with K Gaussian directions in d dimensions has E[cos] ≈ sqrt(K / (K + d + 1)) for a smooth loss.

    Here the d = 100 gates of one layer and K = 60 perturbations, so the expected cosine is ≈ 0.61 (its
    spread at these sizes is ≈ 0.06); we require 0.4 (> 3 spreads below), which also leaves room for the
    curvature of the loss at ε = 1e-3. The exact gradient is taylor-gate's (checked against backprop).
    """
    from minillm.scoring.base import ScoringContext
    from minillm.scoring.fms_gate import gate_spsa
    from minillm.scoring.gates import GateLayout, gate_gradients

    model = tiny_model("llama").double()
    adapter = adapter_for(model.config)
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=4)
    ctx = ScoringContext(
        model=model,
        adapter=adapter,
        layers=[1],
        shapes={i: adapter.layer_shape(model, i) for i in range(2)},
        calibration=calibration,
        spsa=SpsaConfig(steps=60, eps=1e-3),
    )
    layout = GateLayout.from_context(ctx)
    estimate, gates = gate_spsa(ctx, layout)
    approx = estimate.gradient(0, torch.ones_like(gates)).double()
    exact = gate_gradients(ctx, layout).gradient
    cosine = torch.nn.functional.cosine_similarity(approx, exact, dim=0)
    assert cosine > 0.4


@pytest.mark.parametrize("criterion", ["fms", "fms-gate", "fwd-grad"])
def test_forward_only_estimators_never_build_an_autograd_graph(criterion: str) -> None:
    model = tiny_model("llama")
    seen: list[str] = []

    def check(module, args, output):
        tensors = (
            [output]
            if isinstance(output, torch.Tensor)
            else [o for o in output if isinstance(o, torch.Tensor)]
            if isinstance(output, tuple)
            else []
        )
        for tensor in tensors:
            if tensor.requires_grad or tensor.grad_fn is not None:
                seen.append(type(module).__name__)

    handles = [m.register_forward_hook(check) for m in model.modules()]
    try:
        _score(model, criterion)
    finally:
        for handle in handles:
            handle.remove()
    assert seen == []
    assert all(p.grad is None for p in model.parameters())
