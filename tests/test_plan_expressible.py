"""``uniform`` means "loads anywhere": on multi-head attention the plan keeps only head counts the stock
config can express (transformers validates ``hidden_size % num_attention_heads == 0``)."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_ids

from minillm.api import prune
from minillm.calibration.data import CalibrationSet


def _mha_llama() -> torch.nn.Module:
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=8,
                            num_key_value_heads=8, intermediate_size=96, max_position_embeddings=256)
    return tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def test_uniform_mha_plan_keeps_an_expressible_head_count(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    result = prune(_mha_llama(), ratio=0.2, calib=calibration, criterion="magnitude", out=tmp_path / "p")
    heads = {len(p.heads) for p in result.plan.layers}
    assert len(heads) == 1 and 64 % heads.pop() == 0  # 6 of 8 would need remote code
    note = result.plan.extra["uniform_note"]
    assert "MLP channels" in note and "cannot express" in note
    assert abs(result.plan.achieved_ratio - 0.2) < 0.02  # the budget moved, it did not vanish
    assert not (tmp_path / "p" / "modeling_minillm.py").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")  # stock class, no remote code
    assert reloaded.config.num_attention_heads == len(result.plan.layers[0].heads)


def test_global_allocation_may_still_choose_any_head_count() -> None:
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    result = prune(_mha_llama(), ratio=0.3, calib=calibration, criterion="magnitude", allocation="global",
                   dry_run=True)
    assert "uniform_note" not in result.plan.extra
