"""Block-local taylor-gate (one recomputed block at a time) gives the whole-model taylor-gate's gradient,
also with every weight in accelerate's disk offload, and allocates no parameter gradient."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import random_ids, tiny_model
from helpers import offloaded

from minillm.api import layer_shapes
from minillm.arch import adapter_for
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import count_hooks
from minillm.scoring.base import ScoringContext
from minillm.scoring.gates import GateLayout, block_gate_gradients, gate_gradients


def _ctx(model, layers: list[int]) -> ScoringContext:
    adapter = adapter_for(model.config)
    return ScoringContext(model=model, adapter=adapter, layers=layers, shapes=layer_shapes(model, adapter),
                          calibration=CalibrationSet(random_ids(4, 16, seed=1), batch_size=2))


def test_streaming_equals_in_memory_float64() -> None:
    model = tiny_model("llama").double()
    for layers in ([0, 1], [1]):
        ctx = _ctx(model, layers)
        layout = GateLayout.from_context(ctx)
        reference = gate_gradients(ctx, layout)
        found = block_gate_gradients(ctx, layout)
        gradient, fisher = found.gradient, found.fisher
        # the head's loss goes through HF's float32 upcast of the logits: agreement to ~1e-9 absolute
        torch.testing.assert_close(gradient, reference.gradient, atol=1e-8, rtol=0)
        torch.testing.assert_close(fisher, reference.fisher, atol=1e-12, rtol=1e-5)
    assert all(p.grad is None for p in model.parameters())
    assert count_hooks(model) == 0


def test_streaming_on_a_disk_offloaded_model(tmp_path: Path) -> None:
    model = tiny_model("llama")
    ctx = _ctx(model, [0, 1])
    reference = gate_gradients(ctx, GateLayout.from_context(ctx)).gradient
    disk = offloaded(model, tmp_path / "ckpt")
    ctx_disk = _ctx(disk, [0, 1])
    gradient = gate_gradients(ctx_disk, GateLayout.from_context(ctx_disk)).gradient  # block-local
    torch.testing.assert_close(gradient, reference, atol=1e-6, rtol=1e-3)  # float32 model
    assert disk.model.layers[0].self_attn.q_proj.weight.device.type == "meta"  # still offloaded
