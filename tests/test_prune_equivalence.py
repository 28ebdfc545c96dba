"""Physical pruning equals masking: for every family, both allocations and both GQA head modes."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import FAMILIES, random_ids, tiny_model

from minillm.api import prune
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.surgery import apply_plan, mask_plan


def _dry_plan(model, allocation: str, head_mode: str, ratio: float = 0.3, seed: int = 0):
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    return prune(model, ratio=ratio, calib=calibration, allocation=allocation, head_mode=head_mode,
                 spsa_steps=3, seed=seed, dry_run=True).plan


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("allocation", ["uniform", "global"])
@pytest.mark.parametrize("head_mode", ["kv", "query"])
def test_surgery_equals_masking(family: str, allocation: str, head_mode: str) -> None:
    model = tiny_model(family)
    plan = _dry_plan(model, allocation, head_mode)
    assert any(len(p.channels) < 96 for p in plan.layers)
    adapter = adapter_for(model.config)
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    # params_after counts the export, FLAP's compensation biases included; this bare surgery adds none
    added = plan.extra.get("compensation_params", 0)
    assert sum(p.numel() for p in model.parameters()) + added == plan.params_after
    ids = random_ids(2, 12, seed=7)
    with torch.no_grad():
        expected = masked(ids).logits
        actual = model(ids).logits
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_kv_cache_after_pruning(family: str) -> None:
    model = tiny_model(family)
    plan = _dry_plan(model, "global", "kv")
    adapter = adapter_for(model.config)
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter, plan)
    apply_plan(model, adapter, plan)
    prompt = random_ids(1, 5, seed=3)
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        reference = masked.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, reference)
    assert torch.equal(cached, uncached)


def test_query_mode_keeps_every_kv_head_and_even_groups() -> None:
    model = tiny_model("llama")
    plan = _dry_plan(model, "uniform", "query")
    for layer in plan.layers:
        assert layer.kv_heads == [0, 1]
        per_group = [sum(1 for h in layer.heads if h // 2 == kv) for kv in (0, 1)]
        assert per_group[0] == per_group[1] >= 1


def test_kv_mode_removes_whole_groups() -> None:
    model = tiny_model("llama")
    plan = _dry_plan(model, "uniform", "kv")
    for layer in plan.layers:
        assert len(layer.kv_heads) == 1
        assert layer.heads == [2 * layer.kv_heads[0], 2 * layer.kv_heads[0] + 1]


def test_same_seed_same_plan_and_no_hooks_left() -> None:
    model = tiny_model("qwen2")
    first = _dry_plan(model, "global", "kv", seed=11)
    second = _dry_plan(model, "global", "kv", seed=11)
    assert first.to_dict() == second.to_dict()
    assert count_hooks(model) == 0
    assert all(p.requires_grad for p in model.parameters())  # scoring froze and restored them


def test_spsa_leaves_weights_unchanged_up_to_rounding() -> None:
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _dry_plan(model, "uniform", "kv")
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)


def test_uniform_plan_updates_config() -> None:
    model = tiny_model("mistral")
    plan = _dry_plan(model, "uniform", "kv")
    apply_plan(model, adapter_for(model.config), plan)
    assert model.config.num_key_value_heads == 1
    assert model.config.num_attention_heads == 2
    assert model.config.intermediate_size == len(plan.layers[0].channels)
    assert model.config.head_dim == 16


def test_ratio_is_met_within_one_percent() -> None:
    model = tiny_model("llama")
    for allocation in ("uniform", "global"):
        plan = _dry_plan(model, allocation, "query", ratio=0.2)
        assert abs(plan.achieved_ratio - 0.2) < 0.01
