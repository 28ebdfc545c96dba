"""Sequential compensation on tiny models: mask ≡ surgery, error goes down, offloaded = in memory."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import assert_cut_equals_compensated

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
    options = CompensationOptions(mode=mode, select=select)
    result = compensate_sequential(model, adapter, plan, _calibration(), options)
    assert count_hooks(model) == 0
    assert [len(p.channels) for p in result.plan.layers] == [len(p.channels) for p in plan.layers]
    assert_cut_equals_compensated(model, result.plan)


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


def _digest(folder: Path) -> str:
    import hashlib

    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


def test_same_seed_gives_a_byte_identical_compensated_export(tmp_path: Path) -> None:
    from minillm.api import prune

    for name in ("a", "b"):
        result = prune(tiny_model("qwen3"), ratio=0.3, criterion="obs", head_mode="query",
                       calib=_calibration(), out=tmp_path / name, compensation="refit")
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert result.metadata["compensation"]["mode"] == "refit"
    assert result.metadata["recipe"]["compensation"] == "refit"


def test_cli_compensation_flag_reaches_the_export(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from minillm.cli import app

    source = tmp_path / "src"
    tiny_model("llama").save_pretrained(source)
    from conftest import tiny_tokenizer, write_text

    tiny_tokenizer().save_pretrained(source)
    calib = write_text(tmp_path / "calib.txt")
    args = ["prune", "--model", str(source), "--calib", str(calib), "--calib-samples", "4", "--seq-len", "16",
            "--criterion", "magnitude", "--compensation", "bias", "--damping", "0.05", "--out",
            str(tmp_path / "out"), "-q"]
    outcome = CliRunner().invoke(app, args)
    assert outcome.exit_code == 0, outcome.output
    metadata = json.loads((tmp_path / "out" / "minillm.json").read_text())
    assert metadata["compensation"]["mode"] == "bias" and metadata["compensation"]["damping"] == 0.05
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlp_bias"] is True
    bad = CliRunner().invoke(app, [*args[:-3], "--compensation", "refti", "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and not (tmp_path / "x").exists()


def test_a_plan_that_bias_folding_keeps_from_shrinking_is_refused_before_compensation() -> None:
    from minillm.api import prune
    from minillm.errors import UsageError

    model = tiny_model("llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # two MLP channels go (384 parameters); the MLP biases bias folding adds are 508
    with pytest.raises(UsageError, match="does not shrink"):
        prune(model, ratio=0.002, criterion="magnitude", compensation="bias", calib=_calibration())
    after = dict(model.named_parameters())
    assert before.keys() == after.keys()  # no bias was added, no weight refitted: compensation never ran
    assert all(torch.equal(before[name], after[name]) for name in before)


def test_offloaded_closings_spill_to_disk_and_read_back_the_same(tmp_path: Path) -> None:
    from minillm.compensation.sequential import SpilledClosing

    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = _plan(model)
    model.save_pretrained(tmp_path / "ckpt")
    disk = load_model(str(tmp_path / "ckpt"), device_map="auto", max_memory={"cpu": "30KB"}, dtype="float32",
                      offload_dir=str(tmp_path / "offload"))
    spill = tmp_path / "spill"
    spill.mkdir()
    options = CompensationOptions(mode="bias")
    spilled = compensate_sequential(disk, adapter, plan, _calibration(), options, spill=spill)
    held = compensate_sequential(disk, adapter, plan, _calibration(), options)
    assert sorted(p.name for p in spill.iterdir()) == ["0.attn.safetensors", "0.mlp.safetensors",
                                                       "1.attn.safetensors", "1.mlp.safetensors"]
    for index, families in held.updates.items():
        for name, update in families.items():
            on_disk = spilled.updates[index][name]
            assert isinstance(on_disk, SpilledClosing)
            assert torch.equal(on_disk.weight, update.weight) and torch.equal(on_disk.bias, update.bias)
