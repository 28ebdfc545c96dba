"""Sequential compensation on tiny models: mask ≡ surgery, error goes down, offloaded = in memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.sequential import compensate_sequential
from minillm.loading import load_model
from minillm.surgery import apply_plan


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(8, 16, seed=1), batch_size=4)


def _plan(model: torch.nn.Module, head_mode: str = "kv", ratio: float = 0.3):
    score = score_model(model, "magnitude", _calibration(), [0, 1])
    return plan_from_scores(model, score, ratio, "uniform", head_mode)


@pytest.mark.parametrize(("family", "mode", "select", "head_mode"),
                         [("llama", "refit", "plan", "kv"), ("llama", "bias", "plan", "query"),
                          ("qwen3", "refit", "obs", "query"), ("opt", "refit", "obs", "kv"),
                          ("opt", "bias", "plan", "kv"), ("qwen3", "none", "obs", "kv")])
def test_cut_model_equals_compensated_model_with_groups_zeroed(family: str, mode: str, select: str,
                                                               head_mode: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    plan = _plan(model, head_mode)
    options = CompensationOptions(mode=mode, select=select, head_mode=head_mode)
    result = compensate_sequential(model, adapter, plan, _calibration(), options)
    assert count_hooks(model) == 0
    cut = copy.deepcopy(model)
    apply_plan(cut, adapter, result.plan)
    assert [len(p.channels) for p in result.plan.layers] == [len(p.channels) for p in plan.layers]
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(cut(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_refit_brings_the_output_closer_to_the_dense_model() -> None:
    dense = tiny_model("llama").double()
    adapter = adapter_for(dense.config)
    plan = _plan(dense)
    ids = _calibration().input_ids
    errors = {}
    for mode in ("none", "bias", "refit"):
        model = copy.deepcopy(dense)
        compensate_sequential(model, adapter, plan, CalibrationSet(ids, 4), CompensationOptions(mode=mode))
        apply_plan(model, adapter, plan)
        with torch.no_grad():
            errors[mode] = float((model(ids).logits - dense(ids).logits).pow(2).mean())
    assert errors["refit"] < errors["none"] and errors["bias"] < errors["none"]


def test_offloaded_compensation_equals_in_memory(tmp_path: Path) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = _plan(model)
    options = CompensationOptions(mode="bias")  # bias mode: the closing projections gain a bias
    model.save_pretrained(tmp_path / "ckpt")
    disk = load_model(str(tmp_path / "ckpt"), device_map="auto", max_memory={"cpu": "30KB"}, dtype="float32",
                      offload_dir=str(tmp_path / "offload"))
    assert disk.model.layers[0].self_attn.o_proj.weight.device.type == "meta"
    streamed = compensate_sequential(disk, adapter, plan, _calibration(), options)
    compensate_sequential(model, adapter, plan, _calibration(), options)
    assert sorted(streamed.updates) == [0, 1]
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, linear in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            update = streamed.updates[index][name]
            torch.testing.assert_close(update.weight, linear.weight, rtol=0, atol=1e-6)
            torch.testing.assert_close(update.bias, linear.bias, rtol=0, atol=1e-6)
    assert disk.model.layers[0].self_attn.o_proj.bias is None  # the offloaded model is unchanged
