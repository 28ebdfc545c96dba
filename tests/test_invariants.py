"""One invariant over every registered criterion × {Llama, Qwen3, OPT}: the executor makes residency
invisible. A resident model and the same weights in accelerate's disk offload give the same scores
(float64 models, 1e-6 relative) and the same plan; neither run leaves a hook or a parameter ``.grad``."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import offloaded

from minillm.api import plan_from_scores, score_model
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.calibration.spsa import SpsaConfig
from minillm.scoring import CRITERIA

SPSA = SpsaConfig(steps=2, eps=1e-3, seed=0)


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)


def _clean(model: torch.nn.Module, hooks: int) -> None:
    assert count_hooks(model) == hooks
    assert all(p.grad is None for p in model.parameters())


@pytest.fixture(scope="module", params=["llama", "qwen3", "opt"])
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
         ) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A float64 model and the same weights disk-offloaded (shared by the criteria of one family)."""
    model = tiny_model(request.param).double()
    disk = offloaded(copy.deepcopy(model), tmp_path_factory.mktemp(request.param) / "ckpt", dtype="auto")
    assert next(disk.parameters()).dtype == torch.float64
    return model, disk


@pytest.mark.parametrize("criterion", CRITERIA.names())
def test_resident_and_offloaded_give_the_same_scores_and_plan(
    pair: tuple[torch.nn.Module, torch.nn.Module], criterion: str
) -> None:
    model, disk = pair
    hooks = (count_hooks(model), count_hooks(disk))
    resident = score_model(model, criterion, _calibration(), [0, 1], 0, SPSA)
    streamed = score_model(disk, criterion, _calibration(), [0, 1], 0, SPSA)
    assert (resident.notes["offloaded"], streamed.notes["offloaded"]) == (False, True)
    assert resident.scores.keys() == streamed.scores.keys() == {0, 1}
    for index, scores in resident.scores.items():
        for kind in ("heads", "kv_heads", "channels"):
            # 1e-6 relative to each element or to the family's largest score: transformers' loss upcasts
            # logits to float32, so scores of ~0 agree only to float32 precision of the largest ones
            want = getattr(scores, kind).double()
            torch.testing.assert_close(getattr(streamed.scores[index], kind).double(), want,
                                       rtol=1e-6, atol=1e-6 * float(want.abs().max()))
    assert resident.compensation.keys() == streamed.compensation.keys()
    for key, mean in resident.compensation.items():
        torch.testing.assert_close(streamed.compensation[key].double(), mean.double(), rtol=1e-6, atol=1e-12)
    for ratio in (0.2, 0.4):
        assert plan_from_scores(disk, streamed, ratio).to_dict()["layers"] == \
            plan_from_scores(model, resident, ratio).to_dict()["layers"]
    _clean(model, hooks[0])
    _clean(disk, hooks[1])
    adapter = adapter_for(disk.config)
    closing = adapter.mlp(adapter.decoder_layers(disk)[0]).closing
    assert closing.weight.device.type == "meta"  # still offloaded
