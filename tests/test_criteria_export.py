"""FLAP's bias compensation survives export: the added closing-projection biases reload (fresh process,
transformers only) with identical logits, while criteria without compensation keep the vanilla export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from test_export import _reload

from minillm.api import prune
from minillm.calibration.data import CalibrationSet


@pytest.mark.parametrize(
    ("family", "allocation"), [("llama", "uniform"), pytest.param("opt", "global", marks=pytest.mark.slow)]
)
def test_flap_export_keeps_the_compensation_bias(tmp_path: Path, family: str, allocation: str) -> None:
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
    if family == "llama":  # down_proj / o_proj gained a bias the stock Llama config cannot express
        assert (out / "modeling_minillm.py").is_file()
        assert config["minillm_layer_shapes"]["model.layers.0.mlp.down_proj"][2] is True
        assert config["minillm_layer_shapes"]["model.layers.0.mlp.up_proj"][2] is False
        assert not config.get("mlp_bias")  # no zero biases forced onto every projection
    ids = random_ids(2, 10, seed=4)
    with torch.no_grad():
        expected = result.model(ids).logits
    reloaded = _reload(out, ids, remote=(out / "modeling_minillm.py").is_file())
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
