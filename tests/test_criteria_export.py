"""FLAP's bias compensation survives export: the added closing-projection biases reload (fresh process,
transformers only) with identical logits, while criteria without compensation keep the vanilla export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from helpers import reload_in_fresh_process as _reload

from minillm.api import prune
from minillm.calibration.data import CalibrationSet


@pytest.mark.parametrize(
    ("family", "allocation", "remote"),
    [
        ("llama", "uniform", False),  # attention_bias / mlp_bias express the gained biases: vanilla load
        ("mistral", "uniform", True),  # no bias flag: the per-layer remote code records them
        pytest.param("opt", "global", True, marks=pytest.mark.slow),
    ],
)
def test_flap_export_keeps_the_compensation_bias(tmp_path: Path, family: str, allocation: str,
                                                 remote: bool) -> None:
    model = tiny_model(family)
    out = tmp_path / "pruned"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    result = prune(
        model,
        ratio=0.3,
        criterion="flap",
        calib=calibration,
        allocation=allocation,
        tokenizer=tiny_tokenizer(),
        out=out,
    )
    config = json.loads((out / "config.json").read_text())
    assert (out / "modeling_minillm.py").is_file() == remote
    if family == "llama":  # zero biases on q/k/v and gate/up let the stock class rebuild o/down's biases
        assert config["attention_bias"] is True and config["mlp_bias"] is True
        down = result.model.model.layers[0].mlp.down_proj.bias
        assert down is not None and down.abs().sum() > 0  # the compensation itself
        assert torch.count_nonzero(result.model.model.layers[0].mlp.up_proj.bias) == 0
    if family == "mistral":
        assert config["minillm_layer_shapes"]["model.layers.0.mlp.down_proj"][2] is True
        assert config["minillm_layer_shapes"]["model.layers.0.mlp.up_proj"][2] is False
    ids = random_ids(2, 10, seed=4)
    with torch.no_grad():
        expected = result.model(ids).logits
    reloaded = _reload(out, ids, remote=remote)
    assert reloaded["params"] == result.plan.params_after
    torch.testing.assert_close(reloaded["logits"], expected, atol=1e-5, rtol=0)


def test_criteria_without_compensation_keep_the_vanilla_export(tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    prune(
        tiny_model("llama"),
        ratio=0.3,
        criterion="wanda-sp",
        calib=calibration,
        tokenizer=tiny_tokenizer(),
        out=out,
    )
    assert not (out / "modeling_minillm.py").exists()
