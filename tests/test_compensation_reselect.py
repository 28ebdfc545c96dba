"""FLAP's choice re-made on the pruned prefix during the compensation pass (``select="fluctuation"``)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import assert_cut_equals_compensated

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.compensation.hessian import InputMoments
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.sequential import compensate_sequential
from minillm.cut import selection


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(8, 16, seed=1), batch_size=4)


def _flap_plan(model: torch.nn.Module, head_mode: str, ratio: float = 0.3):
    score = score_model(model, "flap", _calibration(), [0, 1])
    return plan_from_scores(model, score, ratio, "uniform", head_mode)


def test_moments_variance_is_the_sample_variance() -> None:
    x = torch.randn(300, 7, dtype=torch.float64) * torch.arange(1, 8) + 2.0
    moments = InputMoments.zeros(7)
    for chunk in x.split(50):
        moments.add(chunk)
    torch.testing.assert_close(moments.variance, x.var(0), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("family", "head_mode"), [("llama", "query"), ("qwen3", "query"), ("opt", "kv"),
                                                   ("llama", "kv")])
def test_reselected_cut_equals_compensated_model_with_groups_zeroed(family: str, head_mode: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    plan = _flap_plan(model, head_mode)
    result = compensate_sequential(model, adapter, plan, _calibration(),
                                   CompensationOptions(mode="refit", select="fluctuation"))
    assert count_hooks(model) == 0
    for before, after in zip(plan.layers, result.plan.layers, strict=True):  # the counts never change
        assert (len(after.heads), len(after.kv_heads), len(after.channels)) == \
               (len(before.heads), len(before.kv_heads), len(before.channels))
        per_group = {h // adapter.layer_shape(model, after.index).heads_per_kv for h in after.heads}
        assert per_group == set(after.kv_heads)  # GQA-exact: heads only from kept kv groups
    assert_cut_equals_compensated(model, result.plan)


@pytest.mark.parametrize("head_mode", ["query", "kv"])
def test_first_block_attention_keeps_flaps_own_choice(head_mode: str) -> None:
    """Block 0's attention sees the dense inputs, so FLAP's metric there picks what FLAP's scoring picked;
    later choices may differ (the prefix is cut)."""
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = _flap_plan(model, head_mode)
    result = compensate_sequential(model, adapter, plan, _calibration(),
                                   CompensationOptions(mode="refit", select="fluctuation"))
    assert result.plan.layers[0].heads == plan.layers[0].heads
    assert result.plan.layers[0].kv_heads == plan.layers[0].kv_heads


def test_selection_follows_the_criterion_and_the_switch() -> None:
    assert selection("flap", "refit", True) == "fluctuation"
    assert selection("flap", "refit", False) == "plan"
    assert selection("flap", "none", True) == "plan"
    assert selection("flap", "bias", True) == "plan"  # re-chosen groups measured worse under bias
    assert selection("obs", "refit", False) == "obs"
    assert selection("wanda-sp", "refit", True) == "plan"


def test_offloaded_reselection_equals_in_memory(tmp_path) -> None:
    from helpers import offloaded

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = _flap_plan(model, "query")
    options = CompensationOptions(mode="refit", select="fluctuation")
    disk = offloaded(copy.deepcopy(model), tmp_path / "ckpt")
    streamed = compensate_sequential(disk, adapter, plan, _calibration(), options)
    resident = compensate_sequential(model, adapter, plan, _calibration(), options)
    assert streamed.plan == resident.plan
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, linear in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            torch.testing.assert_close(streamed.updates[index][name].weight, linear.weight, rtol=0, atol=1e-5)


def test_prune_records_who_chose_the_groups() -> None:
    from minillm.api import prune

    chosen = {}
    for reselect in (True, False):
        result = prune(tiny_model("llama"), ratio=0.3, calib=_calibration(), reselect=reselect)
        chosen[reselect] = (result.metadata["compensation"]["select"], result.metadata["recipe"]["reselect"])
    assert chosen == {True: ("fluctuation", True), False: ("plan", False)}
