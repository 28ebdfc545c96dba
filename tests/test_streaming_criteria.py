"""``--streaming`` works with every registered criterion: an offloaded model is scored through the same
executor, cut and written block by block, and ``PruneResult.model`` is the pruned model (its logits equal
the dense model with the same groups masked); the report's parameter curve drops at "pruned"."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model, tiny_tokenizer
from helpers import offloaded

from minillm.api import prune
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.scoring import CRITERIA
from minillm.scoring.compensation import compensate
from minillm.surgery import mask_plan


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_streaming_prune_returns_the_pruned_model(tmp_path: Path, criterion: str) -> None:
    dense = tiny_model("llama")
    disk = offloaded(copy.deepcopy(dense), tmp_path / "ckpt")
    calib = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    result = prune(disk, ratio=0.3, criterion=criterion, calib=calib, spsa_steps=2, streaming=True,
                   out=tmp_path / "out", tokenizer=tiny_tokenizer())
    assert result.out == tmp_path / "out"
    pruned = result.model
    assert pruned is not disk
    assert sum(p.numel() for p in pruned.parameters()) == result.plan.params_after < result.plan.params_before
    masked = copy.deepcopy(dense)
    compensate(masked, adapter_for(masked.config), result.plan, result.score.compensation)
    mask_plan(masked, adapter_for(masked.config), result.plan)
    ids = random_ids(2, 12, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(pruned(ids).logits, masked(ids).logits, rtol=1e-4, atol=1e-5)
    params = {s.stage: s.params for s in result.timeline.samples if s.params is not None}
    assert params["loaded"] == result.plan.params_before > params["pruned"] == result.plan.params_after
