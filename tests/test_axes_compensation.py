"""Compensation on the model as it will be exported (issue 17): with a plan that also cuts the hidden size
and whole layers, the sequential refit sees the cut model's inputs — the same closings as cutting hidden
and layers physically first and compensating what remains — and mask ≡ surgery still holds."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import random_ids
from helpers import four_layer_model

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.sequential import as_exported, compensate_sequential
from minillm.plan import PrunePlan
from minillm.surgery import apply_plan
from minillm.surgery_depth import remove_layers
from minillm.surgery_hidden import slice_hidden

KEPT_LAYERS = [0, 2, 3]
KEPT_HIDDEN = sorted(torch.randperm(64, generator=torch.Generator().manual_seed(3))[:48].tolist())


def calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(8, 16, seed=1), batch_size=4)


def axes_plan(model: torch.nn.Module) -> PrunePlan:
    """A uniform head/channel plan on every layer, plus a hidden cut 64 → 48 and layer 1 removed."""
    score = score_model(model, "magnitude", calibration(), [0, 1, 2, 3])
    plan = plan_from_scores(model, score, 0.3, "uniform", "kv")
    return replace(plan, hidden=KEPT_HIDDEN, kept_layers=KEPT_LAYERS)


def physically_first(model: torch.nn.Module, plan: PrunePlan,
                     options: CompensationOptions) -> torch.nn.Module:
    """The reference: cut hidden size and layers for real, renumber the remaining layers' plans, then
    compensate and cut heads and channels."""
    cut = copy.deepcopy(model)
    adapter = adapter_for(cut.config)
    slice_hidden(cut, adapter, plan.hidden)
    remove_layers(cut, adapter, plan.kept_layers)
    kept = [replace(p, index=KEPT_LAYERS.index(p.index)) for p in plan.layers if p.index in KEPT_LAYERS]
    width = replace(plan, layers=kept, hidden=None, kept_layers=None)
    compensated = compensate_sequential(cut, adapter, width, calibration(), options)
    apply_plan(cut, adapter, compensated.plan)
    return cut


@pytest.mark.parametrize(("family", "mode", "target"), [
    ("llama", "refit", "pruned"), ("gemma3", "refit", "pruned"), ("phi3", "bias", "pruned"),
    ("qwen3", "refit", "pruned"), ("llama", "refit", "block"), ("qwen3", "refit", "block")])
def test_compensation_walks_the_model_as_exported(family: str, mode: str, target: str) -> None:
    model = four_layer_model(family)
    adapter = adapter_for(model.config)
    plan = axes_plan(model)
    options = CompensationOptions(mode=mode, target=target)  # type: ignore[arg-type]
    expected_model = physically_first(model, plan, options)
    result = compensate_sequential(model, adapter, plan, calibration(), options)
    assert count_hooks(model) == 0
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad(), as_exported(model, adapter, result.plan):
        masked = model(ids).logits  # compensated, dense shapes, removed groups zero: mask ≡ surgery
    apply_plan(model, adapter, result.plan)
    with torch.no_grad():
        cut = model(ids).logits
        expected = expected_model(ids).logits
    torch.testing.assert_close(cut, masked, rtol=0, atol=1e-5)
    torch.testing.assert_close(cut, expected, rtol=0, atol=1e-5)


def test_removed_layers_are_not_compensated() -> None:
    model = four_layer_model("llama")
    adapter = adapter_for(model.config)
    plan = axes_plan(model)
    before = adapter.decoder_layers(model)[1].self_attn.o_proj.weight.detach().clone()
    compensate_sequential(model, adapter, plan, calibration(), CompensationOptions(mode="refit"))
    assert torch.equal(adapter.decoder_layers(model)[1].self_attn.o_proj.weight, before)


def test_compensation_differs_from_the_dense_walk() -> None:
    """The view matters: walking the dense model (old order) gives other closings than the exported one."""
    model = four_layer_model("llama")
    adapter = adapter_for(model.config)
    plan = axes_plan(model)
    old = copy.deepcopy(model)
    compensate_sequential(old, adapter, replace(plan, hidden=None, kept_layers=None), calibration(),
                          CompensationOptions(mode="refit"))
    compensate_sequential(model, adapter, plan, calibration(), CompensationOptions(mode="refit"))
    new_o = adapter.decoder_layers(model)[2].self_attn.o_proj.weight
    old_o = adapter.decoder_layers(old)[2].self_attn.o_proj.weight
    assert not torch.allclose(new_o, old_o, atol=1e-4)
