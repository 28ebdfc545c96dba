"""Hidden size and depth on offloaded models (issue 17): scores come from the executor's walk, the cut
from the block-by-block shard writer; the plan and the exported model equal the in-memory run's."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_ids
from helpers import four_layer_model, offloaded

from minillm.api import prune
from minillm.calibration.data import CalibrationSet


@pytest.mark.parametrize(("family", "structures", "layer_score"), [
    ("llama-mha-tied", "attn,mlp,hidden", "influence"),
    ("gemma3", "hidden,layers", "loss"),
    ("phi3", "mlp,hidden,layers", "influence"),
])
def test_streaming_hidden_and_layers_equal_in_memory(family: str, structures: str, layer_score: str,
                                                     tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    calibration = CalibrationSet(random_ids(4, 12, seed=1), batch_size=2)
    kwargs = dict(ratio=0.35, calib=calibration, structures=structures, layer_score=layer_score,
                  criterion="magnitude", max_shard_size="30KB")
    memory = prune(four_layer_model(family, random_biases=True), out=tmp_path / "a", **kwargs)
    disk = offloaded(four_layer_model(family, random_biases=True), tmp_path / "ckpt")
    streamed = prune(disk, out=tmp_path / "b", **kwargs)
    assert streamed.plan.to_dict() == memory.plan.to_dict()
    plan = memory.plan
    assert (plan.hidden is not None) == ("hidden" in structures)
    assert (plan.kept_layers is not None) == ("layers" in structures)
    index = tmp_path / "b" / "model.safetensors.index.json"
    if index.exists() and disk.config.tie_word_embeddings:
        assert "lm_head.weight" not in json.loads(index.read_text())["weight_map"]
    ids = random_ids(2, 10, seed=9)
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a", dtype=torch.float32).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b", dtype=torch.float32).eval()
    assert a.state_dict().keys() == b.state_dict().keys()
    assert (b.get_output_embeddings().weight is b.get_input_embeddings().weight) == \
        bool(b.config.tie_word_embeddings)
    with torch.no_grad():
        torch.testing.assert_close(b(ids).logits, a(ids).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(a(ids).logits, memory.model(ids).logits, rtol=0, atol=0)
