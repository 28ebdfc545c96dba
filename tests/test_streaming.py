"""Block-by-block (streaming) scoring and export: same plans and SPSA estimate; offloaded models export."""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from helpers import offloaded
from transformers import AutoModelForCausalLM

from minillm.api import layer_shapes, prune, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.forward import mean_loss
from minillm.calibration.spsa import SpsaConfig, estimate_gradient
from minillm.compensation.layer import CompensationOptions
from minillm.compensation.sequential import compensate_sequential
from minillm.errors import UsageError
from minillm.loading import load_model
from minillm.scoring.base import ScoringContext
from minillm.streaming import (
    block_budget,
    choose_precision,
    compensation_bytes,
    prepare_streaming_load,
    streaming_max_memory,
)
from minillm.surgery import mask_plan

SPSA = SpsaConfig(steps=3, eps=1e-3, seed=0)


def calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(6, 16, seed=1), batch_size=4)


def test_same_spsa_estimate_in_memory_and_offloaded(tmp_path: Path) -> None:
    model = tiny_model("llama")
    disk = offloaded(model, tmp_path / "ckpt")
    calib = calibration()
    adapter = adapter_for(model.config)
    ctx = ScoringContext(
        model=model,
        adapter=adapter,
        layers=[0, 1],
        shapes=layer_shapes(model, adapter),
        calibration=calib,
        spsa=SPSA,
    )
    streamed_disk = score_model(disk, "fms", calib, [0, 1], 0, SPSA).notes["spsa_coefficients"]
    streamed = score_model(model, "fms", calib, [0, 1], 0, SPSA).notes["spsa_coefficients"]
    reference = tiny_model("llama")  # fresh copy: the streamed run above drifted `model` by a few ulps
    ctx.model = reference
    in_memory = estimate_gradient(
        [lin.weight for lin in ctx.linears()], lambda: mean_loss(reference, calib), SPSA
    ).coefficients
    assert streamed == in_memory  # identical arithmetic, weight by weight
    # offloaded copies start from the exact weights every step (no ulp drift): equal to float rounding
    torch.testing.assert_close(torch.tensor(streamed_disk), torch.tensor(in_memory), rtol=1e-3, atol=1e-3)


def _write_checkpoint(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def _digest(folder: Path) -> str:
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()


@pytest.mark.parametrize(
    ("criterion", "allocation", "cap", "placement", "compensation"),
    [
        ("wanda-sp", "uniform", "30KB", {"disk"}, "refit"),  # everything offloaded to disk
        ("fms", "global", "300KB", {"cpu", "disk"}, "refit"),  # a mixed map: the multi-device code path
        ("flap", "uniform", "30KB", {"disk"}, "bias"),  # bias compensation folded block by block
    ],
)
def test_offloaded_prune_exports_shards_and_mask_equals_surgery(
    tmp_path: Path, criterion: str, allocation: str, cap: str, placement: set[str], compensation: str
) -> None:
    dense = tiny_model("llama")
    source = _write_checkpoint(dense, tmp_path / "src")
    digest = _digest(source)
    disk = load_model(
        str(source),
        device_map="auto",
        max_memory={"cpu": cap},
        dtype="float32",
        offload_dir=str(tmp_path / "offload"),
    )
    assert set(disk.hf_device_map.values()) == placement
    result = prune(
        disk,
        ratio=0.3,
        out=tmp_path / "out",
        criterion=criterion,
        allocation=allocation,
        calib=calibration(),
        seed=0,
        spsa_steps=2,
        streaming=True,
        max_shard_size="40KB",
        compensation=compensation,
    )
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    remote = allocation == "global"  # per-layer widths (FLAP's biases: Llama's attention_bias / mlp_bias)
    assert (out / "modeling_minillm.py").is_file() == remote
    pruned = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    assert sum(p.numel() for p in pruned.parameters()) == result.plan.params_after < result.plan.params_before
    masked = tiny_model("llama")  # the dense model, compensated in memory, removed groups zeroed
    compensate_sequential(masked, adapter_for(masked.config), result.plan, calibration(),
                          CompensationOptions(mode=compensation))
    mask_plan(masked, adapter_for(masked.config), result.plan)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)
    assert _digest(source) == digest  # perturbations never reach the offloaded checkpoint


def test_streaming_export_matches_in_memory_export(tmp_path: Path) -> None:
    calib = calibration()
    kwargs = dict(ratio=0.25, criterion="magnitude", calib=calib, max_shard_size="30KB")
    dense = prune(tiny_model("llama-mha-tied"), out=tmp_path / "a", **kwargs)
    disk = offloaded(tiny_model("llama-mha-tied"), tmp_path / "ckpt")  # the shard writer's path
    streamed = prune(disk, out=tmp_path / "b", **kwargs)
    assert streamed.plan.params_after == dense.plan.params_after  # tied head counted once
    files = {p.name for p in (tmp_path / "b").glob("*.safetensors")}
    weight_map = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())["weight_map"]
    assert "lm_head.weight" not in weight_map and files == set(weight_map.values())
    # both exports load the same way (trust_remote_code is harmless when the stock config expresses them)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a", trust_remote_code=True).state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b", trust_remote_code=True).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_block_local_variant_scores_every_layer() -> None:
    model = tiny_model("qwen2")
    result = score_model(model, "fms-local", calibration(), [0, 1], 0, SPSA)
    assert set(result.scores) == {0, 1}
    assert all(
        torch.isfinite(s.channels).all() and s.channels.abs().sum() > 0 for s in result.scores.values()
    )
    assert result.notes["block_forward_passes"] == 2 * (2 * SPSA.steps + 2)


def test_max_memory_too_small_for_one_block_says_how_much(tmp_path: Path) -> None:
    source = _write_checkpoint(tiny_model("llama"), tmp_path / "src")
    with pytest.raises(UsageError, match=r"one decoder block .* give at least cpu=\d"):
        prepare_streaming_load("fms", str(source), "cpu=1MiB", None, "float32", 8, 128, 32)


def test_reserve_is_taken_from_the_cap() -> None:
    model = tiny_model("llama")
    budget = block_budget(model.config, torch.float32, 4, 16, 6, runtime_bytes=10_000)
    lean = block_budget(model.config, torch.float32, 4, 16, 6, runtime_bytes=10_000, with_loss=False)
    assert lean.head == model.model.embed_tokens.weight.numel() * 4  # largest of embeddings / head / norm
    assert budget.head > lean.head and budget.activations > lean.activations  # + LM head and logits
    tangents = block_budget(model.config, torch.float32, 4, 16, 6, runtime_bytes=10_000, forward_mode=True)
    assert tangents.activations > budget.activations  # fwd-grad: a tangent beside every activation
    assert budget.block == sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    capped = streaming_max_memory({"cpu": 10 * 1024**2}, budget)
    assert capped == {"cpu": 10 * 1024**2 - budget.reserve}


def test_compensation_shares_the_heads_room_and_narrows_h_under_a_tight_cap() -> None:
    """The refit's working set (H of the widest closing and its solve) counts against the cap: in the
    room the embeddings / head use in the other phases, float32 when float64 would take over half."""
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=20,
                         num_key_value_heads=10, intermediate_size=6912, vocab_size=49152)  # the 3B bench
    budget = block_budget(config, torch.float32, 8, 128, 8, runtime_bytes=300 * 1024**2, with_loss=False)
    wide = compensation_bytes(config, "float64", 1024)
    # H factored where it lies + the solve's in × out blocks, and one batch of float64 inputs
    assert wide == (6912**2 + 3 * 6912 * 2560) * 8 + 1024 * 6912 * 8
    assert compensation_bytes(config, "float32", 1024) == (6912**2 + 3 * 6912 * 2560) * 4 + 1024 * 6912 * 8
    tight = choose_precision(budget, config, "auto", 1024, {"cpu": "2GiB"})
    roomy = choose_precision(budget, config, "auto", 1024, {"cpu": "64GiB"})
    forced = choose_precision(budget, config, "float64", 1024, {"cpu": "2GiB"})
    assert (tight.precision, roomy.precision, forced.precision) == ("float32", "float64", "float64")
    for chosen in (tight, forced):  # the reserve holds max(head, compensation), never both
        assert chosen.reserve == budget.reserve - budget.head + max(budget.head, chosen.compensation)
    assert forced.compensation > budget.head > tight.compensation  # both sides of the max are exercised
    assert "compensation" in tight.describe()
    assert choose_precision(budget, config, "auto", 1024, None).precision == "float64"  # no cap
    paired = compensation_bytes(config, "float32", 1024, dense_tokens=4096, activation_size=2)
    extra = 2 * 6912 * 2560 * 4 + 4096 * (2560 + 6912 + 2560) * 2  # E and its copy; dense stream, inputs
    assert paired == compensation_bytes(config, "float32", 1024) + extra
    block = compensation_bytes(config, "float32", 1024, block_tokens=4096, activation_size=2)
    extra = 2 * 6912 * 2560 * 4 + 4096 * 2560 * 2 + 1024 * 2560 * 8  # E and its copy; dense block outputs
    assert block == compensation_bytes(config, "float32", 1024) + extra


def test_streaming_prune_records_the_compensation_precision(tmp_path: Path) -> None:
    source = _write_checkpoint(tiny_model("llama"), tmp_path / "src")
    memory, _, precision = prepare_streaming_load("flap", str(source), "cpu=4GiB", str(tmp_path / "off"),
                                                  "float32", 2, 16, 4, gram=True)
    assert precision == "float64" and memory["cpu"] < 4 * 1024**3
    result = prune(str(source), ratio=0.2, streaming=True, max_memory="cpu=4GiB", calib=calibration(),
                   compensation_precision="float32", out=tmp_path / "out", offload_dir=str(tmp_path / "off"))
    assert result.metadata["recipe"]["compensation_precision"] == "float32"
    resident = prune(tiny_model("llama"), ratio=0.2, calib=calibration(), out=tmp_path / "resident")
    assert resident.metadata["recipe"]["compensation_precision"] == "float64"  # auto, resolved and recorded


def test_cli_too_small_max_memory_is_one_line_and_exit_2(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from minillm.cli import app

    source = _write_checkpoint(tiny_model("llama"), tmp_path / "src")
    out = tmp_path / "out"
    args = ["prune", "-m", str(source), "--streaming", "--max-memory", "cpu=10MiB", "--out", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    assert "too small for block-by-block pruning" in result.output and "give at least cpu=" in result.output
    assert not out.exists()  # nothing half-written


def test_offloaded_model_switches_to_streaming(tmp_path: Path) -> None:
    source = _write_checkpoint(tiny_model("llama"), tmp_path / "src")
    disk = load_model(str(source), max_memory={"cpu": "30KB"}, offload_dir=str(tmp_path / "off"))
    result = prune(disk, ratio=0.2, criterion="wanda-sp", calib=calibration(), out=tmp_path / "out")
    assert result.score.notes["offloaded"] is True
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out") is not None
    assert sum(p.numel() for p in result.model.parameters()) == result.plan.params_after  # the pruned model


def test_block_local_criterion_prunes_with_and_without_the_flag(tmp_path: Path) -> None:
    """``fms-local`` is an ordinary registered criterion: ``prune`` runs it on a resident model and under
    ``streaming=True`` (export loads, mask ≡ surgery); a typo gets a did-you-mean."""
    model = tiny_model("llama")
    result = prune(copy.deepcopy(model), ratio=0.25, criterion="fms-local", calib=calibration(),
                   streaming=True, spsa_steps=2, out=tmp_path / "out", compensation="none")
    assert result.plan.achieved_ratio > 0.1
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    masked = copy.deepcopy(model)
    mask_plan(masked, adapter_for(model.config), result.plan)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)
    resident = prune(copy.deepcopy(model), ratio=0.25, criterion="fms-local", calib=calibration(),
                     spsa_steps=2, dry_run=True)
    assert resident.plan.to_dict()["layers"] == result.plan.to_dict()["layers"]
    with pytest.raises(KeyError, match="Did you mean 'fms-local'"):
        prune(model, ratio=0.2, criterion="fms-locl", calib=calibration(), streaming=True, dry_run=True)


def test_input_device_of_an_offloaded_model_is_where_it_computes(tmp_path: Path) -> None:
    """The embeddings of a disk-offloaded model sit on ``meta``; input ids must go to the execution device
    (the bug: ``calibration.forward.input_device`` returned ``meta``), so a plain loss runs on it."""
    from minillm.calibration.forward import input_device

    model = tiny_model("llama")
    disk = offloaded(copy.deepcopy(model), tmp_path / "ckpt")
    assert disk.get_input_embeddings().weight.device.type == "meta"
    assert input_device(disk).type == "cpu"
    assert mean_loss(disk, calibration()) == pytest.approx(mean_loss(model, calibration()), rel=1e-5)
