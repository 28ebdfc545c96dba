"""Per-layer allocations ``log`` (SlimGPT) and ``error`` (refit-error curves): their budgets, their
errors, and that their compensated, non-uniform cuts still equal the masked model."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_config, tiny_model
from helpers import assert_cut_equals_compensated

from minillm.api import count_parameters, plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.compensation.curves import reconstruction_curves
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.obs import removal_curve
from minillm.compensation.refit import solve_kept
from minillm.groups import layer_costs


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(8, 16, seed=1), batch_size=4)


def _deep_model(layers: int = 6) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config("llama")
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def _removed(model: torch.nn.Module, plan) -> dict[int, int]:
    """Parameters each layer loses under ``plan`` (from the layer's group costs)."""
    adapter = adapter_for(model.config)
    blocks = adapter.decoder_layers(model)
    removed = {}
    for p in plan.layers:
        shape = adapter.layer_shape(model, p.index)
        costs = layer_costs(adapter, blocks[p.index], shape)
        removed[p.index] = ((shape.num_heads - len(p.heads)) * costs.query_head
                            + (shape.num_kv_heads - len(p.kv_heads)) * costs.kv_head
                            + (shape.intermediate - len(p.channels)) * costs.channel)
    return removed


@pytest.mark.parametrize("head_mode", ["query", "kv"])
def test_log_allocation_increases_with_depth_and_meets_the_target_within_one_group(head_mode: str) -> None:
    model = _deep_model()
    adapter = adapter_for(model.config)
    score = score_model(model, "magnitude", _calibration(), list(range(6)))
    plan = plan_from_scores(model, score, 0.3, "log", head_mode)
    removed = _removed(model, plan)
    shape = adapter.layer_shape(model, 0)
    costs = layer_costs(adapter, adapter.decoder_layers(model)[0], shape)
    layer_total = (shape.num_heads * costs.query_head + shape.num_kv_heads * costs.kv_head
                   + shape.intermediate * costs.channel)
    fractions = [removed[i] / layer_total for i in range(6)]
    # log-increasing with depth: each layer loses at least as much as the one before (up to one channel)
    assert all(b >= a - costs.channel / layer_total for a, b in itertools.pairwise(fractions))
    assert fractions[-1] > 2 * fractions[0]
    target = 0.3 * count_parameters(model)
    assert abs(sum(removed.values()) - target) <= costs.channel
    assert plan.allocation == "log" and not plan.is_uniform()


def test_removal_curve_is_the_refit_residual() -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, dtype=torch.float64, generator=generator)
    weight = torch.randn(5, 12, dtype=torch.float64, generator=generator)
    gram = x.T @ x
    groups = [[3, 4], [0, 1], [7, 8], [10, 11]]
    curve = removal_curve(weight, gram, groups, damping=0.0)
    for k in range(len(groups) + 1):
        removed = {c for g in groups[:k] for c in g}
        keep = torch.tensor([c for c in range(12) if c not in removed])
        refit = torch.zeros_like(weight)
        if k:
            refit[:, keep] = solve_kept(weight.T, gram, keep, 0.0).T
        else:
            refit = weight
        residual = float((x @ (weight - refit).T).pow(2).sum())
        assert float(curve[k]) == pytest.approx(residual, rel=1e-8, abs=1e-9)


def _unequal_model() -> torch.nn.Module:
    """Layer 0's MLP has 24 distinct channels, each four times (a refit removes copies for free);
    layer 1's 96 channels are all different."""
    model = tiny_model("llama").double()
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        for linear in (mlp.gate_proj, mlp.up_proj):
            linear.weight.copy_(linear.weight[:24].repeat(4, 1))
    return model


def test_error_allocation_has_less_total_normalised_error_than_uniform() -> None:
    model = _unequal_model()
    adapter = adapter_for(model.config)
    calibration = _calibration()
    score = score_model(model, "magnitude", calibration, [0, 1])
    recorded: dict = {}

    def curves(groups: dict) -> dict:
        recorded.update(reconstruction_curves(model, adapter, calibration, groups, damping=0.01))
        return recorded

    from minillm.api import layer_shapes
    from minillm.plan import build_plan

    shapes = layer_shapes(model, adapter)
    costs = {i: layer_costs(adapter, adapter.decoder_layers(model)[i], shapes[i]) for i in shapes}
    total = count_parameters(model)
    error = build_plan(shapes, costs, score.scores, total, 0.2, "error", "kv", curves=curves)
    uniform = build_plan(shapes, costs, score.scores, total, 0.2, "uniform", "kv")

    def total_error(plan) -> float:
        value = 0.0
        for p in plan.layers:
            value += float(recorded[p.index]["attn"][shapes[p.index].num_kv_heads - len(p.kv_heads)])
            value += float(recorded[p.index]["mlp"][shapes[p.index].intermediate - len(p.channels)])
        return value

    assert error.params_before - error.params_after >= 0.2 * total
    assert total_error(error) < total_error(uniform)
    channels = [len(p.channels) for p in error.layers]
    assert channels[0] < channels[1]  # the redundant MLP gives more


@pytest.mark.parametrize(("family", "allocation", "head_mode"),
                         [("llama", "log", "kv"), ("qwen3", "error", "query"), ("llama", "error", "kv"),
                          ("qwen3", "log", "query")])
def test_non_uniform_compensated_cut_equals_the_masked_model(family: str, allocation: str,
                                                             head_mode: str) -> None:
    from minillm.compensation.sequential import compensate_sequential

    model = tiny_model(family)
    adapter = adapter_for(model.config)
    calibration = _calibration()
    score = score_model(model, "magnitude", calibration, [0, 1])
    plan = plan_from_scores(model, score, 0.3, allocation, head_mode, calibration=calibration)
    assert not plan.is_uniform()
    for p in plan.layers:  # GQA-correct: whole kv groups, or equally many query heads in every kv group
        shape = adapter.layer_shape(model, p.index)
        per_group = [sum(1 for h in p.heads if h // shape.heads_per_kv == k) for k in p.kv_heads]
        assert len(set(per_group)) == 1
    result = compensate_sequential(model, adapter, plan, calibration, CompensationOptions(mode="refit"))
    assert_cut_equals_compensated(model, result.plan)


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_error_allocation_export_is_byte_identical_and_reloads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from minillm.api import prune

    for name in ("a", "b"):
        result = prune(tiny_model("qwen3"), ratio=0.3, allocation="error", head_mode="query",
                       criterion="magnitude", calib=_calibration(), out=tmp_path / name)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert result.metadata["recipe"]["allocation"] == "error"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).eval()
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, result.model(ids).logits, rtol=0, atol=1e-5)
