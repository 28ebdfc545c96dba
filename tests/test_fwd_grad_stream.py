"""``fwd-grad`` on an offloaded model walks the blocks in forward mode, one resident block at a time, and
gives the whole-model jvp's numbers (both modes; float64, 1e-6 relative)."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from conftest import random_ids, tiny_model
from helpers import offloaded

import minillm.calibration.sequential as sequential
from minillm.api import score_model
from minillm.calibration.data import CalibrationSet
from minillm.calibration.spsa import SpsaConfig


@pytest.mark.parametrize("mode", ["sequence", "token"])
def test_offloaded_fwd_grad_streams_blocks_and_matches_the_whole_model(tmp_path: Path, monkeypatch,
                                                                       mode: str) -> None:
    model = tiny_model("llama").double()
    disk = offloaded(copy.deepcopy(model), tmp_path / "ckpt", dtype="auto")
    blocks = {id(layer) for layer in disk.model.layers}
    live, most, seen = [0], [0], []
    real = sequential.resident

    @contextmanager
    def counting(module):
        block = id(module) in blocks
        if block:
            live[0] += 1
            most[0] = max(most[0], live[0])
            seen.append(id(module))
        try:
            with real(module):
                yield
        finally:
            live[0] -= block

    monkeypatch.setattr(sequential, "resident", counting)
    calibration = CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)
    spsa = SpsaConfig(steps=2, seed=0)
    options = {"mode": mode}
    streamed = score_model(disk, "fwd-grad", calibration, [0, 1], 0, spsa, options)
    assert most[0] == 1 and set(seen) == blocks  # every block, never two at once, never the whole model
    assert len(seen) == 2 * len(blocks)  # one walk per pass
    whole = score_model(model, "fwd-grad", calibration, [0, 1], 0, spsa, options)
    for index, scores in whole.scores.items():
        for kind in ("heads", "channels"):
            want = getattr(scores, kind).double()
            torch.testing.assert_close(getattr(streamed.scores[index], kind).double(), want, rtol=1e-6,
                                       atol=1e-6 * float(want.abs().max()))
