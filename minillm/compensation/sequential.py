"""The sequential compensation pass: cut and compensate block after block on the pruned prefix.

Why sequential: block ``i``'s compensation is fitted to the inputs it will really see — the outputs of
blocks ``0…i−1`` *after* they were cut and compensated — so later blocks correct what earlier cuts
left (SlimGPT, OSSCAR, ZipLM). For each block in order: :func:`~minillm.compensation.layer.compensate_block`
(attention, then MLP), then the changed block runs once more to make the next block's inputs.

Offloaded blocks (``--streaming``): their loaded weights are dropped when the walk leaves them, so the
compensated closing projections are kept (on CPU, in the model's dtype) and handed to the export —
the o_proj and down_proj of every pruned block, about a third of the block weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.blockwise import capture_first_block_inputs, is_offloaded, resident, run_block
from minillm.calibration.data import CalibrationSet
from minillm.compensation.layer import ClosingUpdate, CompensationOptions, compensate_block
from minillm.plan import PrunePlan

Progress = Callable[[str, int, int], None]


@dataclass
class CompensationResult:
    """The plan as cut (re-selected groups under ``select="obs"``) and, for offloaded blocks, their
    compensated closing projections ``{layer: {"attn" | "mlp": update}}``."""

    plan: PrunePlan
    updates: dict[int, dict[str, ClosingUpdate]] = field(default_factory=dict)
    forward_passes: int = 0


def _changes(plan: PrunePlan, model: nn.Module, adapter: ArchAdapter) -> list[int]:
    shapes = {p.index: adapter.layer_shape(model, p.index) for p in plan.layers}
    return [p.index for p in plan.layers
            if len(p.heads) < shapes[p.index].num_heads or len(p.channels) < shapes[p.index].intermediate]


def _to_cpu(update: ClosingUpdate) -> ClosingUpdate:
    return ClosingUpdate(update.weight.to("cpu", copy=True),
                         None if update.bias is None else update.bias.to("cpu", copy=True))


def compensate_sequential(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
                          calibration: CalibrationSet, options: CompensationOptions,
                          progress: Progress | None = None) -> CompensationResult:
    """Compensate every block ``plan`` cuts, in order, in place (the dense shapes stay; removed groups'
    closing columns become zero, so :func:`~minillm.surgery.apply_plan` afterwards changes nothing
    the model computes)."""
    changed = _changes(plan, model, adapter)
    result = CompensationResult(plan=plan)
    if not changed or (options.mode == "none" and options.select == "plan"):
        return result
    layer_plans = {p.index: p for p in plan.layers}
    layers = adapter.decoder_layers(model)
    batches = capture_first_block_inputs(model, adapter, calibration)
    passes = 0

    def forward() -> None:
        nonlocal passes
        run_block(layer, batches)
        passes += 1

    for i in range(max(changed) + 1):
        layer = layers[i]
        offloaded = is_offloaded(layer)  # before resident(): a loaded copy no longer counts as offloaded
        with resident(layer):
            added = []
            if i in changed:
                shape = adapter.layer_shape(model, i)
                closings = {"attn": adapter.attention(layer).o, "mlp": adapter.mlp(layer).closing}
                added = [name for name, linear in closings.items() if linear.bias is None]
                layer_plans[i], updates = compensate_block(layer, adapter, layer_plans[i], shape, forward,
                                                           options)
                if offloaded:
                    result.updates[i] = {name: _to_cpu(u) for name, u in updates.items()}
            batches = run_block(layer, batches)
            passes += 1
            if offloaded:  # the loaded copy goes back to meta: a bias added to it must not outlive it
                for name in added:
                    closings[name].bias = None
        if progress is not None:
            progress("compensation", i + 1, max(changed) + 1)
    result.plan = replace(plan, layers=[layer_plans[p.index] for p in plan.layers])
    result.forward_passes = passes
    return result
