"""The sequential compensation pass: cut and compensate block after block on the pruned prefix.

Why sequential: block ``i``'s compensation is fitted to the inputs it will really see — the outputs of
blocks ``0…i−1`` *after* they were cut and compensated — so later blocks correct what earlier cuts
left (SlimGPT, OSSCAR, ZipLM). For each block in order: :func:`~minillm.compensation.layer.compensate_block`
(attention, then MLP), then the changed block runs once more to make the next block's inputs.

On the model as it will be exported: a plan that also cuts the hidden size or whole layers is walked
through :func:`as_exported` — removed layers pass their input through (and are not compensated), and
every residual-stream norm sees only the kept hidden channels — so each closing's moments ``H`` are
those of the exported model and the refit targets what remains.

Where compensation has a closed form: removed heads and MLP channels (their closing projection's
columns), by bias folding or the least-squares refit. Hidden channels and whole layers have none
beyond that refit of the remaining closing projections on the cut model's inputs: the refit's target
is each closing's own output, which is row-separable (removing hidden rows of ``o``/``down`` changes no
other row's solution) and unchanged when no input column goes.

Dense-output target (``--compensation-target dense``): a second stream of calibration activations runs
through the *dense* blocks beside the pruned one; each block first runs it (recording the dense inputs of
its closing projections, per batch), and the refit then pairs every token's pruned-prefix input with its
dense one (:mod:`.refit`). It costs one more block pass per block and the dense closing inputs of one
block; plans that cut the hidden size or whole layers are refused (their dense stream would be another
model).

Block target (``--compensation-target block``, :mod:`.block_target`): before anything in a block whose
heads are cut changes, the block runs once more as it is, and its outputs (the dense block on the pruned
prefix's input) are the MLP refit's reference; no second stream, so it works with every plan.

Offloaded blocks (``--streaming``): their loaded weights are dropped when the walk leaves them, so the
compensated closing projections are kept and handed to the export — the o_proj and down_proj of every
pruned block, about a third of the block weights (3.9 GB for a 7B Llama in fp16). With ``spill`` (a
folder; ``prune`` uses one under the offload folder) each is written there as safetensors at once and
read back only when the shard writer reaches its block (:class:`SpilledClosing`), so they never pile
up in memory; without it they stay on CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.blocks import BlockBatch, is_offloaded, run_block
from minillm.calibration.data import CalibrationSet
from minillm.calibration.hooks import input_hooks
from minillm.calibration.sequential import Block, Sequential
from minillm.compensation.block_target import dense_block_outputs
from minillm.compensation.layer import ClosingUpdate, CompensationOptions, compensate_block, uses_block_target
from minillm.plan import PrunePlan

Progress = Callable[[str, int, int], None]


@dataclass
class CompensationResult:
    """The plan as cut (re-selected groups under ``select="obs"``) and, for offloaded blocks, their
    compensated closing projections ``{layer: {"attn" | "mlp": update}}``."""

    plan: PrunePlan
    updates: dict[int, dict[str, ClosingUpdate | SpilledClosing]] = field(default_factory=dict)
    forward_passes: int = 0


class _Stop(Exception):
    """Raised after the module whose inputs are being measured: the rest of the block is not needed."""


@contextmanager
def _stopping_after(module: nn.Module) -> Iterator[None]:
    def stop(*_: object) -> None:
        raise _Stop

    handle = module.register_forward_hook(stop)
    try:
        yield
    finally:
        handle.remove()


def _changes(plan: PrunePlan, model: nn.Module, adapter: ArchAdapter) -> list[int]:
    """Layers whose heads or channels are cut and that stay in the export."""
    shapes = {p.index: adapter.layer_shape(model, p.index) for p in plan.layers}
    kept = None if plan.kept_layers is None else set(plan.kept_layers)
    return [p.index for p in plan.layers if (kept is None or p.index in kept) and (
            len(p.heads) < shapes[p.index].num_heads or len(p.channels) < shapes[p.index].intermediate)]


@contextmanager
def as_exported(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan) -> Iterator[None]:
    """Run the dense model as ``plan``'s export will, for its hidden size and depth: the layers it
    removes pass their input through, the hidden channels it removes are never read (heads and
    channels stay as the caller has them)."""
    from minillm.surgery_depth import skipped_layers
    from minillm.surgery_hidden import kept_channels_only

    with ExitStack() as stack:
        if plan.hidden is not None:
            stack.enter_context(kept_channels_only(model, adapter, plan.hidden))
        if plan.kept_layers is not None:
            removed = sorted(set(range(len(adapter.decoder_layers(model)))) - set(plan.kept_layers))
            stack.enter_context(skipped_layers(model, adapter, removed))
        yield


def _to_cpu(update: ClosingUpdate) -> ClosingUpdate:
    return ClosingUpdate(update.weight.to("cpu", copy=True),
                         None if update.bias is None else update.bias.to("cpu", copy=True))


class SpilledClosing:
    """A compensated closing projection in a safetensors file: ``weight`` / ``bias`` read it on access
    (the meta skeleton asks only whether there is a bias, which reads just the bias)."""

    def __init__(self, path: Path, update: ClosingUpdate) -> None:
        from safetensors.torch import save_file

        self.path, self.has_bias = path, update.bias is not None
        tensors = {"weight": update.weight.detach().to("cpu").contiguous()}
        if update.bias is not None:
            tensors["bias"] = update.bias.detach().to("cpu").contiguous()
        save_file(tensors, str(path))

    def _read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as handle:
            return handle.get_tensor(name)

    @property
    def weight(self) -> torch.Tensor:
        return self._read("weight")

    @property
    def bias(self) -> torch.Tensor | None:
        return self._read("bias") if self.has_bias else None


def spill_folder(offload_dir: str | Path | None) -> Path:
    """A fresh folder for spilled closings (inside ``offload_dir`` when given), removed at exit."""
    import atexit
    import shutil
    import tempfile

    if offload_dir is not None:
        Path(offload_dir).mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="minillm-closings-", dir=offload_dir))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def compensate_sequential(model: nn.Module, adapter: ArchAdapter, plan: PrunePlan,
                          calibration: CalibrationSet, options: CompensationOptions,
                          progress: Progress | None = None, in_place: bool = True,
                          spill: Path | None = None) -> CompensationResult:
    """Compensate every block ``plan`` cuts, in order.

    ``in_place``: the model keeps the compensated closing projections (dense shapes; removed groups'
    columns zero, so :func:`~minillm.surgery.apply_plan` afterwards changes nothing the model computes).
    Otherwise — and always for offloaded blocks — each block is restored after it fed the next one and
    its compensated closings are returned in :attr:`CompensationResult.updates` (for the block-by-block
    export), so the source model is left as it was; with ``spill`` they are written to that folder
    (:class:`SpilledClosing`) instead of being held in memory.
    """
    changed = _changes(plan, model, adapter)
    result = CompensationResult(plan=plan)
    if not changed or (options.mode == "none" and options.select == "plan"):
        return result
    dense_target = options.mode == "refit" and options.target == "dense"
    if dense_target and (plan.hidden is not None or plan.kept_layers is not None):
        raise ValueError("the dense-output target needs a plan that keeps the hidden size and every layer")
    layer_plans = {p.index: p for p in plan.layers}
    offloaded = {i: is_offloaded(adapter.decoder_layers(model)[i]) for i in changed}  # before resident()
    passes = 0
    dense_stream: list[BlockBatch] | None = None  # the dense blocks' outputs (dense target only)
    changed_layers = set(changed)

    def run_dense(block: Block) -> dict[str, list[torch.Tensor]]:
        """Advance the dense stream through ``block`` (still dense); its closings' inputs per batch."""
        nonlocal dense_stream, passes
        closings = adapter.closings(block.layer)
        seen: dict[nn.Module, list[torch.Tensor]] = {linear: [] for linear in closings.values()}
        keep = (lambda x: x.detach().to(block.store)) if block.store is not None else (lambda x: x.detach())
        with input_hooks(list(closings.values()), lambda module, x: seen[module].append(keep(x))):
            dense_stream = run_block(block.layer, block.inputs if dense_stream is None else dense_stream,
                                     block.kind, block.store)
        passes += 1
        return {name: seen[linear] for name, linear in closings.items()}

    def per_block(block: Block) -> None:
        nonlocal passes
        dense = run_dense(block) if dense_target else None
        if block.index not in changed_layers:
            return  # walked only to advance the dense stream

        def forward(stop_after: nn.Module | None,
                    each: Callable[[int, torch.Tensor], None] | None = None) -> None:
            nonlocal passes
            with torch.no_grad(), ExitStack() as stack:
                if stop_after is not None:
                    stack.enter_context(_stopping_after(stop_after))
                for k, batch in enumerate(block.inputs):
                    try:
                        output = block.call(batch)
                    except _Stop:
                        continue
                    if each is not None:
                        each(k, output)
            passes += 1

        i, layer = block.index, block.layer
        closings = adapter.closings(layer)
        record = offloaded[i] or not in_place
        had_bias = {name: linear.bias is not None for name, linear in closings.items()}
        # an offloaded block's loaded copy is dropped when the walk leaves it: no values to put back
        saved = {name: (linear.weight.detach().clone(),
                        None if linear.bias is None else linear.bias.detach().clone())
                 for name, linear in closings.items() if record and not offloaded[i]}
        shape = adapter.layer_shape(model, i)
        reference = None
        if uses_block_target(options, layer_plans[i], shape):  # the block as yet uncut, on these inputs
            reference = dense_block_outputs(block, closings["mlp"])
            passes += 1
        layer_plans[i], updates = compensate_block(
            layer, adapter, layer_plans[i], shape, forward, options, dense, reference,
            solving=lambda: block.unloaded(keep=list(closings.values())))
        del reference
        block.forward(advance=True)  # the compensated block feeds the next one
        passes += 1
        if record:  # keep the result, put the block back as it was (an offloaded copy goes back to meta)
            result.updates[i] = {name: _to_cpu(u) if spill is None
                                 else SpilledClosing(spill / f"{i}.{name}.safetensors", u)
                                 for name, u in updates.items()}
            for name, linear in closings.items():
                if not had_bias[name]:
                    linear.bias = None  # one bias folding added belongs to the update, not the model
            for name, (weight, bias) in saved.items():
                closings[name].weight.data.copy_(weight)
                if bias is not None:
                    closings[name].bias.data.copy_(bias)

    with as_exported(model, adapter, plan):
        walked = range(max(changed) + 1) if dense_target else changed
        Sequential(model, adapter, calibration, progress=progress).run(per_block, layers=walked,
                                                                       task="compensation")
    result.plan = replace(plan, layers=[layer_plans[p.index] for p in plan.layers])
    result.forward_passes = passes + max(changed) + 1 - len(changed)
    return result
