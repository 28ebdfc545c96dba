"""``taylor-lowmem`` (weight gradients one recomputed block at a time) gives exactly ``taylor``'s scores:
in float64, for every family, for a subset of layers, and with every weight in accelerate's disk offload;
it leaves no parameter ``.grad``, no hook and no ``requires_grad`` flag behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import offloaded

from minillm.api import score_model
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)


def _assert_same_scores(result, reference, rtol: float, atol: float = 0.0) -> None:
    assert result.scores.keys() == reference.scores.keys()
    for index, scores in reference.scores.items():
        for kind in ("heads", "kv_heads", "channels"):
            torch.testing.assert_close(
                getattr(result.scores[index], kind), getattr(scores, kind), rtol=rtol, atol=atol
            )


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
@pytest.mark.parametrize("layers", [[0, 1], [1], [0]])
def test_equals_taylor_float64(family: str, layers: list[int]) -> None:
    model = tiny_model(family).double()
    flags = [p.requires_grad for p in model.parameters()]
    reference = score_model(model, "taylor", _calibration(), layers)
    result = score_model(model, "taylor-lowmem", _calibration(), layers)
    # LayerScores are float32; the float64 gradients agree far below that precision
    _assert_same_scores(result, reference, rtol=1e-6)
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert count_hooks(model) == 0


def test_streams_a_disk_offloaded_model(tmp_path: Path) -> None:
    model = tiny_model("llama")
    reference = score_model(model, "taylor", _calibration(), [0, 1])
    disk = offloaded(model, tmp_path / "ckpt")
    result = score_model(disk, "taylor-lowmem", _calibration(), [0, 1])
    _assert_same_scores(result, reference, rtol=1e-3, atol=1e-7)  # float32 model, other summation order
    assert disk.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded
    assert all(p.grad is None for p in disk.parameters())
