"""Exports reload in a fresh process with nothing but transformers, with identical logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from helpers import reload_in_fresh_process as _reload

from minillm.api import count_parameters, prune
from minillm.calibration.data import CalibrationSet


@pytest.mark.parametrize(
    ("family", "allocation", "remote"),
    [
        ("llama", "uniform", False), ("qwen3", "global", True),
        ("opt", "uniform", True), ("qwen2", "global", True),
    ],
)
def test_export_round_trip(tmp_path: Path, family: str, allocation: str, remote: bool) -> None:
    model = tiny_model(family)
    out = tmp_path / "pruned"
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    result = prune(model, ratio=0.3, calib=calibration, allocation=allocation, spsa_steps=2,
                   tokenizer=tiny_tokenizer(), out=out)
    metadata = json.loads((out / "minillm.json").read_text())
    assert metadata["params_after"] == count_parameters(result.model) == result.plan.params_after
    assert metadata["plan"]["allocation"] == allocation
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert (out / "README.md").read_text().startswith("---")
    assert (out / "modeling_minillm.py").is_file() == remote
    ids = random_ids(2, 10, seed=4)
    with torch.no_grad():
        expected = result.model(ids).logits
    reloaded = _reload(out, ids, remote)
    assert reloaded["params"] == result.plan.params_after
    torch.testing.assert_close(reloaded["logits"], expected, atol=1e-5, rtol=0)


def test_tied_embeddings_stay_tied(tmp_path: Path) -> None:
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(tiny_config("llama-mha-tied")).eval()
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    prune(model, ratio=0.2, calib=calibration, spsa_steps=2, out=tmp_path / "p", tokenizer=tiny_tokenizer())
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p", trust_remote_code=True)
    assert (
        reloaded.get_output_embeddings().weight.data_ptr()
        == reloaded.get_input_embeddings().weight.data_ptr()
    )


def test_failed_export_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import minillm.remote_code as remote_code  # the generated modeling file both writers add

    model = tiny_model("llama")
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(remote_code, "_remote_code", boom)
    with pytest.raises(RuntimeError):
        prune(model, ratio=0.3, allocation="global", calib=calibration, spsa_steps=1, out=tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
