"""The pieces of the sequential executor (:mod:`minillm.calibration.sequential`), written once.

Why: a model whose weights do not fit in memory can still be calibrated if only one decoder block is
resident at a time. The pieces:

1. capture the inputs of the first decoder block (hidden states *and* the keyword arguments the
   model passes to its layers: ``position_embeddings``, ``attention_mask``, ``position_ids`` …) by
   swapping the decoder layers for recorders that stop the pass once the first layer of every
   attention kind (sliding-window / full) has been called;
2. make a block's weights resident (:func:`resident`, accelerate's ``align_module_device`` on every
   offloaded sub-module) and run every calibration batch through it (:func:`run_block`);
3. evaluate the model's own loss on the final hidden states by *replaying* them through the model
   with the decoder layers swapped out (:func:`loss_from_hidden`), so the final norm, LM head, logit
   soft-capping and loss function are the model's own code, not a copy.

Models loaded without offload (one device, or ``device_map`` over several GPUs) go through the same
code: :func:`resident` is then a no-op and accelerate's hooks (if any) move activations between devices.

Peak memory ≈ the resident part of the model (what ``max_memory`` let accelerate keep) + one block +
the calibration activations, independent of depth.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.data import CalibrationSet


class _StopForward(Exception):
    """Raised by the capture stand-ins once every attention type's inputs are recorded."""


def _to(value: Any, device: torch.device | None) -> Any:
    """``value`` with every tensor inside (tuples, lists, dicts) moved to ``device`` (None: unchanged)."""
    if device is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    if isinstance(value, list):
        return [_to(v, device) for v in value]
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    return value


@dataclass
class BlockBatch:
    """One calibration micro-batch as a decoder block sees it: hidden states + the layer call's arguments.

    ``per_kind`` holds the call arguments of every attention kind of the model (sliding-window and full
    layers get different masks, Gemma 3 different position embeddings); ``args`` / ``kwargs`` are those
    of layer 0. :meth:`call` picks the right ones for a layer.
    """

    input_ids: torch.Tensor
    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    per_kind: dict[Any, tuple[tuple[Any, ...], dict[str, Any]]] = field(default_factory=dict)

    def with_hidden(self, hidden: torch.Tensor) -> BlockBatch:
        return replace(self, hidden=hidden)

    def arguments(self, kind: Any = None) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The positional and keyword arguments (after the hidden states) of a layer of ``kind``."""
        return self.per_kind.get(kind, (self.args, self.kwargs))

    def to(self, device: torch.device | None) -> BlockBatch:
        """This batch with its hidden states and call arguments on ``device`` (None: unchanged)."""
        if device is None:
            return self
        return BlockBatch(self.input_ids, _to(self.hidden, device), _to(self.args, device),
                          _to(self.kwargs, device), _to(self.per_kind, device))


def execution_device(module: nn.Module) -> torch.device:
    """Where ``module`` computes: accelerate's execution device if it is hooked (offloaded weights sit on
    ``meta``), else the device of its first parameter."""
    hook = getattr(module, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the execution device of the input embeddings (right for offloaded
    models too, whose embedding weights may sit on ``meta``)."""
    return execution_device(model.get_input_embeddings())


def layer_kinds(model: nn.Module, adapter: ArchAdapter) -> list[Any]:
    """The attention kind of every decoder layer (``config.layer_types`` or the layer's ``attention_type``;
    ``None`` when the model has one kind only)."""
    layers = adapter.decoder_layers(model)
    declared = getattr(model.config, "layer_types", None)
    if declared is not None and len(declared) >= len(layers):
        return list(declared[: len(layers)])
    return [getattr(layer, "attention_type", None) for layer in layers]


class _Recorder(nn.Module):
    """Stands in for decoder layer ``index`` during capture: records its call, passes hidden states on."""

    def __init__(self, index: int, kind: Any, record: dict[int, Any], last: int) -> None:
        super().__init__()
        self.index, self.record, self.last = index, record, last
        if kind is not None:
            self.attention_type = kind

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.record[self.index] = (hidden_states, args, dict(kwargs))
        if self.index >= self.last:
            raise _StopForward
        return hidden_states


def capture_first_block_inputs(
    model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet,
    store: torch.device | None = None,
) -> list[BlockBatch]:
    """Run only the embeddings (and the model's own mask / position code) for every batch and record
    what layer 0 receives, plus the call arguments of the first layer of every other attention kind.

    The decoder layers are swapped for recorders, so no block weight is touched (nor loaded when
    offloaded). ``store``: where to keep the captured tensors (None: where the model made them).
    """
    layers = adapter.decoder_layers(model)
    kinds = layer_kinds(model, adapter)
    firsts = {}
    for index, kind in enumerate(kinds):
        firsts.setdefault(kind, index)
    record: dict[int, Any] = {}
    stand_ins = [_Recorder(i, kinds[i], record, max(firsts.values())) for i in range(len(layers))]
    device = input_device(model)
    batches: list[BlockBatch] = []
    with torch.no_grad(), _layers_swapped(layers, stand_ins):
        for input_ids in calibration.batches():
            record.clear()
            try:
                model(input_ids=input_ids.to(device), use_cache=False)
            except _StopForward:
                pass
            hidden, args, kwargs = record[0]
            per_kind = {kind: (record[i][1], record[i][2]) for kind, i in firsts.items()}
            batch = BlockBatch(input_ids, hidden, args, kwargs, per_kind if len(per_kind) > 1 else {})
            batches.append(batch.to(store))
    return batches


@contextmanager
def _layers_swapped(layers: nn.ModuleList, stand_ins: Sequence[nn.Module]) -> Iterator[None]:
    saved = list(layers)
    try:
        del layers[:]
        layers.extend(stand_ins)
        yield
    finally:
        del layers[:]
        layers.extend(saved)


def _offloaded(module: nn.Module) -> list[nn.Module]:
    from accelerate.utils import has_offloaded_params

    return [sub for sub in module.modules() if has_offloaded_params(sub)]


@contextmanager
def _held(module: nn.Module) -> Iterator[None]:
    """Load one offloaded module's weights and keep them through any number of forward calls.

    ``align_module_device`` loads the weights (accelerate's ``pre_forward``); while inside, the hook's
    ``offload`` flag is turned off so forward calls neither reload them (which would discard in-place
    perturbations) nor send them back to ``meta``; the flag is restored before accelerate offloads.
    """
    from accelerate.utils import align_module_device

    with align_module_device(module):
        hook = module._hf_hook
        hook.offload = False
        try:
            yield
        finally:
            hook.offload = True


@contextmanager
def resident(module: nn.Module) -> Iterator[list[nn.Module]]:
    """Make every offloaded weight under ``module`` real (on its execution device) for the duration;
    yields the submodules it holds (for :func:`unloaded`).

    A no-op for modules that are not offloaded. On exit the loaded copies are dropped (back to ``meta``);
    changes made to them are therefore never written back to the offloaded source.
    """
    held = _offloaded(module)
    with ExitStack() as stack:
        for sub in held:
            stack.enter_context(_held(sub))
        yield held


@contextmanager
def unloaded(held: Sequence[nn.Module]) -> Iterator[None]:
    """Drop the loaded weights of ``held`` (modules :func:`resident` holds) for the duration; they are read
    again from the offload on exit.

    Why: a step that needs only part of a resident block (error compensation's solve needs the closing
    projections, not the rest of the block) need not keep the rest loaded beside its own working set.
    Only for modules whose loaded weights were not changed: a change would be lost. A no-op for an empty
    list (nothing offloaded).
    """
    for sub in held:
        sub._hf_hook.offload = True
        sub._hf_hook.post_forward(sub, None)  # back to meta
    try:
        yield
    finally:
        for sub in held:
            sub._hf_hook.pre_forward(sub)  # loaded again, as _held loaded it
            sub._hf_hook.offload = False


def is_offloaded(model: nn.Module) -> bool:
    """True when some weights of ``model`` live in an accelerate offload (meta device + weights map)."""
    return bool(_offloaded(model))


def run_block(
    layer: nn.Module, batches: Sequence[BlockBatch], kind: Any = None, store: torch.device | None = None
) -> list[BlockBatch]:
    """Every batch through one decoder block of attention ``kind``; the outputs become the next block's
    inputs. With ``store`` the batches are kept there and moved to the block's device only to run."""
    outputs = []
    device = execution_device(layer) if store is not None else None
    with torch.no_grad():
        for batch in batches:
            out = call_block(layer, batch.to(device), kind)
            outputs.append(batch.with_hidden(out.to(store) if store is not None else out))
    return outputs


def call_block(layer: nn.Module, batch: BlockBatch, kind: Any = None) -> torch.Tensor:
    """One batch through one block (grad mode as the caller set it); the output hidden states."""
    args, kwargs = batch.arguments(kind)
    out = layer(batch.hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


class _Replay(nn.Module):
    """Stands in for the decoder layers: returns the hidden states the block runner computed."""

    def __init__(self, hidden: torch.Tensor, attention_type: Any) -> None:
        super().__init__()
        self.hidden = hidden
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden.to(hidden_states.device)


def non_block_modules(model: nn.Module, adapter: ArchAdapter) -> list[nn.Module]:
    """Top-level modules that hold no decoder block (embeddings, final norm, LM head …)."""
    layers = adapter.decoder_layers(model)
    blocks = {id(layer) for layer in layers}
    inside = {id(m) for layer in layers for m in layer.modules()} | {id(layers)}
    result = []
    for module in model.modules():
        if id(module) in inside or id(module) in blocks:
            continue
        if any(True for _ in module.parameters(recurse=False)) or any(
            True for _ in module.buffers(recurse=False)
        ):
            result.append(module)
    return result


@contextmanager
def head_resident(model: nn.Module, adapter: ArchAdapter) -> Iterator[None]:
    """Keep the embeddings, final norm and LM head loaded (used while evaluating many losses)."""
    with ExitStack() as stack:
        for module in non_block_modules(model, adapter):
            stack.enter_context(resident(module))
        yield


def last_hidden_state(model: nn.Module, adapter: ArchAdapter, input_ids: torch.Tensor,
                      hidden: torch.Tensor) -> torch.Tensor:
    """The base model's ``last_hidden_state`` (after its final norm) when the last block output
    ``hidden``, by the model's own code with the decoder layers replayed (in the caller's grad mode;
    ``hidden`` may be a forward-mode dual tensor)."""
    kind = layer_kinds(model, adapter)[0]
    with _layers_swapped(adapter.decoder_layers(model), [_Replay(hidden, kind)]):
        return model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state


def loss_from_hidden(model: nn.Module, adapter: ArchAdapter, batches: Sequence[BlockBatch]) -> float:
    """Token-weighted mean next-token loss from the last block's outputs, computed by the model's own head.

    The decoder layers are swapped for a module that returns the given hidden states, so this is the
    same quantity as :func:`minillm.calibration.forward.mean_loss` on a full forward pass.
    """
    layers = adapter.decoder_layers(model)
    device = input_device(model)
    total, count = 0.0, 0
    attention_type = layer_kinds(model, adapter)[0]
    with torch.no_grad():
        for batch in batches:
            ids = batch.input_ids.to(device)
            with _layers_swapped(layers, [_Replay(batch.hidden, attention_type)]):
                loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            tokens = ids.numel() - ids.shape[0]
            total += float(loss) * tokens
            count += tokens
    return total / count


def head_gradients(
    model: nn.Module, adapter: ArchAdapter, batches: Sequence[BlockBatch], sequences: int = 1
) -> list[torch.Tensor]:
    """∂(Σ token losses)/∂(last hidden states) per batch, through the model's own head and loss.

    The gradient counterpart of :func:`loss_from_hidden`. ``sequences`` at a time go through the head,
    so only their logits exist at once (one sequence: ``tokens × vocabulary``, not a whole batch's).
    """
    layers = adapter.decoder_layers(model)
    device = input_device(model)
    attention_type = layer_kinds(model, adapter)[0]
    grads = []
    with head_resident(model, adapter):
        for batch in batches:
            pieces = []
            for start in range(0, batch.hidden.shape[0], sequences):
                rows = slice(start, start + sequences)
                hidden = batch.hidden[rows].detach().requires_grad_(True)
                ids = batch.input_ids[rows].to(device)
                with _layers_swapped(layers, [_Replay(hidden, attention_type)]):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                tokens = ids.numel() - ids.shape[0]
                (grad,) = torch.autograd.grad(loss * tokens, hidden)
                pieces.append(grad)
                del loss
            grads.append(torch.cat(pieces))
    return grads
