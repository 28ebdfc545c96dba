"""The prune says when a cut width misses llama.cpp's fast-kernel multiple, and is quiet when it does not."""

from __future__ import annotations

import logging

from conftest import random_ids, tiny_model

from minillm.api import prune
from minillm.calibration.data import CalibrationSet


def _calibration() -> CalibrationSet:
    return CalibrationSet(random_ids(4, 16, seed=1), batch_size=2)


def test_odd_mlp_width_gets_a_round_to_hint(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="minillm"):
        result = prune(tiny_model("llama"), ratio=0.2, calib=_calibration(), dry_run=True)
    width = len(result.plan.layers[0].channels)
    assert width % 16
    assert f"MLP {width} not a multiple of 16" in caplog.text and "--round-to 64" in caplog.text


def test_rounded_widths_are_quiet(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="minillm"):
        result = prune(tiny_model("llama"), ratio=0.2, round_to=16, calib=_calibration(), dry_run=True)
    assert len(result.plan.layers[0].channels) % 16 == 0
    assert "not a multiple of 16" not in caplog.text
