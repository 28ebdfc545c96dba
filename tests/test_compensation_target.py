"""The refit's dense-output and block targets (``--compensation-target dense|block``) on the sequential
pass."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer, write_text
from helpers import assert_cut_equals_compensated

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks, input_hooks
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.sequential import compensate_sequential
from minillm.errors import UsageError
from minillm.loading import load_model


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(8, 16, seed=1), batch_size=4)


def _plan(model: torch.nn.Module, head_mode: str = "query", ratio: float = 0.3):
    score = score_model(model, "magnitude", _calibration(), [0, 1])
    return plan_from_scores(model, score, ratio, "uniform", head_mode)


@pytest.mark.parametrize("target", ["dense", "block"])
@pytest.mark.parametrize(("family", "select", "head_mode"),
                         [("llama", "plan", "query"), ("qwen3", "obs", "query"), ("opt", "plan", "kv"),
                          ("llama", "fluctuation", "query")])
def test_target_cut_model_equals_compensated_model_with_groups_zeroed(family: str, select: str,
                                                                      head_mode: str, target: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    plan = _plan(model, head_mode)
    options = CompensationOptions(mode="refit", select=select, target=target)
    result = compensate_sequential(model, adapter, plan, _calibration(), options)
    assert count_hooks(model) == 0
    assert not any(p.grad is not None for p in model.parameters())
    assert_cut_equals_compensated(model, result.plan)


def _closing_io(model: torch.nn.Module, linear: torch.nn.Linear, ids: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """``linear``'s inputs and outputs over ``ids`` (every token)."""
    seen: list[torch.Tensor] = []
    with torch.no_grad(), input_hooks([linear], lambda _, x: seen.append(x.reshape(-1, x.shape[-1]))):
        model(ids)
        inputs = torch.cat(seen)
        return inputs, inputs @ linear.weight.T


def _compensated(dense: torch.nn.Module, plan, calibration, targets: tuple[str, ...]
                 ) -> dict[str, torch.nn.Module]:
    """A copy of ``dense`` refitted (almost undamped) toward each of ``targets``."""
    fitted = {}
    for target in targets:
        model = copy.deepcopy(dense)
        compensate_sequential(model, adapter_for(dense.config), plan, calibration,
                              CompensationOptions(mode="refit", target=target, damping=1e-9))
        fitted[target] = model
    return fitted


def test_dense_target_fits_the_dense_layer_output_better_than_the_pruned_target() -> None:
    """Block 0: its attention sees the same inputs either way (identical refits); its MLP then fits the
    dense MLP's output, which the pruned target can only match worse (least squares on the same inputs)."""
    dense = tiny_model("llama").double()
    adapter = adapter_for(dense.config)
    plan = _plan(dense)
    calibration = _calibration()
    fitted = _compensated(dense, plan, calibration, ("pruned", "dense"))
    first = {t: adapter.decoder_layers(m)[0] for t, m in fitted.items()}
    torch.testing.assert_close(adapter.attention(first["dense"]).o.weight,
                               adapter.attention(first["pruned"]).o.weight, rtol=1e-9, atol=1e-9)
    dense_mlp = adapter.mlp(adapter.decoder_layers(dense)[0]).closing
    _, wanted = _closing_io(dense, dense_mlp, calibration.input_ids)
    errors = {}
    for target, model in fitted.items():
        _, got = _closing_io(model, adapter.mlp(first[target]).closing, calibration.input_ids)
        errors[target] = float((got - wanted).pow(2).sum())
    assert errors["dense"] < errors["pruned"]


@pytest.mark.parametrize("target", ["dense", "block"])
def test_target_offloaded_equals_in_memory(tmp_path: Path, target: str) -> None:
    model = tiny_model("llama")
    adapter = adapter_for(model.config)
    plan = _plan(model)
    options = CompensationOptions(mode="refit", target=target)
    model.save_pretrained(tmp_path / "ckpt")
    disk = load_model(str(tmp_path / "ckpt"), device_map="auto", max_memory={"cpu": "30KB"}, dtype="float32",
                      offload_dir=str(tmp_path / "offload"))
    streamed = compensate_sequential(disk, adapter, plan, _calibration(), options)
    compensate_sequential(model, adapter, plan, _calibration(), options)
    for index, layer in enumerate(adapter.decoder_layers(model)):
        for name, linear in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            torch.testing.assert_close(streamed.updates[index][name].weight, linear.weight, rtol=0, atol=1e-5)


def _cli(tmp_path: Path, *extra: str) -> tuple[object, Path]:
    from typer.testing import CliRunner

    from minillm.cli import app

    source = tmp_path / "src"
    if not source.exists():
        tiny_model("llama").save_pretrained(source)
        tiny_tokenizer().save_pretrained(source)
    calib = write_text(tmp_path / "calib.txt")
    out = tmp_path / f"out{len(list(tmp_path.iterdir()))}"
    args = ["prune", "--model", str(source), "--calib", str(calib), "--calib-samples", "4", "--seq-len", "16",
            "--criterion", "magnitude", "--out", str(out), "-q", *extra]
    return CliRunner().invoke(app, args), out


@pytest.mark.parametrize(("target", "extra"), [("dense", ()), ("block", ()),
                                               ("block", ("--structures", "attn,mlp,hidden,layers"))])
def test_cli_target_reaches_the_export_recipe(tmp_path: Path, target: str, extra: tuple[str, ...]) -> None:
    outcome, out = _cli(tmp_path, "--compensation-target", target, *extra)
    assert outcome.exit_code == 0, outcome.output
    metadata = json.loads((out / "minillm.json").read_text())
    assert metadata["recipe"]["compensation_target"] == target
    assert metadata["compensation"]["target"] == target and metadata["compensation"]["select"] == "plan"


@pytest.mark.parametrize(("target", "extra", "message"), [
    ("dense", ("--compensation", "bias"), "--compensation refit"),
    ("block", ("--compensation", "bias"), "--compensation refit"),
    ("dense", ("--structures", "attn,mlp,hidden"), "attn/mlp cuts only"),
])
def test_cli_refuses_target_where_it_has_no_meaning(tmp_path: Path, target: str, extra: tuple[str, ...],
                                                    message: str) -> None:
    outcome, out = _cli(tmp_path, "--compensation-target", target, *extra)
    assert outcome.exit_code != 0 and not out.exists()
    assert message in " ".join(outcome.output.split())


def _block_outputs(model: torch.nn.Module, layer: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda _m, _a, out: seen.append(out[0] if isinstance(out, tuple)
                                                                         else out))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        handle.remove()
    return seen[0]


def test_block_target_fits_the_dense_block_output_better_than_the_pruned_target() -> None:
    """Block 0 sees the same inputs either way and gets the same o_proj refit; its down_proj then fits the
    dense block's output, which the pruned target (a feasible point of the same least squares) can only
    match worse."""
    dense = tiny_model("llama").double()
    adapter = adapter_for(dense.config)
    plan = _plan(dense)
    calibration = _calibration()
    fitted = {target: adapter.decoder_layers(model)[0]
              for target, model in _compensated(dense, plan, calibration, ("pruned", "block")).items()}
    torch.testing.assert_close(adapter.attention(fitted["block"]).o.weight,
                               adapter.attention(fitted["pruned"]).o.weight, rtol=1e-9, atol=1e-9)
    wanted = _block_outputs(dense, adapter.decoder_layers(dense)[0], calibration.input_ids)
    errors = {}
    for target, layer in fitted.items():
        with torch.no_grad():  # the compensated block alone, on the dense model's (= its own) inputs
            original = adapter.decoder_layers(dense)[0]
            adapter.decoder_layers(dense)[0] = layer
            try:
                got = _block_outputs(dense, layer, calibration.input_ids)
            finally:
                adapter.decoder_layers(dense)[0] = original
        errors[target] = float((got - wanted).pow(2).sum())
    assert errors["block"] < errors["pruned"]


def test_block_target_refit_of_a_scaled_residual_block_is_exact_to_the_cut() -> None:
    """Granite scales the MLP's output (``residual_multiplier`` 0.5) before the residual add: the probe
    measures the scale and the cut model still equals the compensated one."""
    model = tiny_model("granite")
    adapter = adapter_for(model.config)
    plan = _plan(model)
    result = compensate_sequential(model, adapter, plan, _calibration(), CompensationOptions(target="block"))
    assert_cut_equals_compensated(model, result.plan)


@pytest.mark.parametrize("family", ["gemma2", "olmo2"])
def test_block_target_refuses_a_block_that_normalises_the_mlp_output(family: str) -> None:
    model = tiny_model(family)
    adapter = adapter_for(model.config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    plan = _plan(model)
    with pytest.raises(UsageError, match="--compensation-target pruned"):
        compensate_sequential(model, adapter, plan, _calibration(), CompensationOptions(target="block"))
    assert count_hooks(model) == 0  # refused at the first cut block, before anything in it changed
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0)
