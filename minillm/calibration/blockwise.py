"""The block-by-block calibration runner (the loop of Wanda / SparseGPT), written once for every family.

Why: a model whose weights do not fit in memory can still be calibrated if only one decoder block is
resident at a time. The runner

1. captures the inputs of the first decoder block (hidden states *and* the keyword arguments the
   model passes to its layers: ``position_embeddings``, ``attention_mask``, ``position_ids`` …) with a
   ``with_kwargs`` forward pre-hook on layer 0 that raises a private exception to stop the pass;
2. for each block: makes its weights resident (:func:`resident`, accelerate's ``align_module_device``
   on every offloaded sub-module), runs every calibration batch through it, lets the caller observe or
   perturb it, keeps its outputs as the next block's inputs, and offloads it again;
3. evaluates the model's own loss on the final hidden states by *replaying* them through the model
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
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.calibration.data import CalibrationSet
from minillm.calibration.stats import ColumnStats, collect_input_stats
from minillm.errors import UsageError


class _StopForward(Exception):
    """Raised by the capture hook on layer 0: the rest of the forward pass is not needed."""


@dataclass
class BlockBatch:
    """One calibration micro-batch as a decoder block sees it: hidden states + the layer call's arguments."""

    input_ids: torch.Tensor
    hidden: torch.Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def with_hidden(self, hidden: torch.Tensor) -> BlockBatch:
        return replace(self, hidden=hidden)


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
    """Where input ids must go: the execution device of the input embeddings."""
    return execution_device(model.get_input_embeddings())


def _attention_type(layer: nn.Module) -> Any:
    return getattr(layer, "attention_type", None)


def capture_first_block_inputs(
    model: nn.Module, adapter: ArchAdapter, calibration: CalibrationSet
) -> list[BlockBatch]:
    """Run only the embeddings for every batch and record what layer 0 receives."""
    layers = adapter.decoder_layers(model)
    if len({_attention_type(layer) for layer in layers}) > 1:
        raise UsageError(
            "block-by-block calibration needs every decoder layer to use the same attention type "
            "(this model mixes sliding-window and full attention); run without --streaming"
        )
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, dict(kwargs)))
        raise _StopForward

    device = input_device(model)
    batches: list[BlockBatch] = []
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for input_ids in calibration.batches():
                try:
                    model(input_ids=input_ids.to(device), use_cache=False)
                except _StopForward:
                    pass
                args, kwargs = captured.pop()
                if args:
                    hidden, rest = args[0], tuple(args[1:])
                else:
                    hidden, rest = kwargs.pop("hidden_states"), ()
                batches.append(BlockBatch(input_ids, hidden, rest, kwargs))
    finally:
        handle.remove()
    return batches


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
def resident(module: nn.Module) -> Iterator[None]:
    """Make every offloaded weight under ``module`` real (on its execution device) for the duration.

    A no-op for modules that are not offloaded. On exit the loaded copies are dropped (back to ``meta``);
    changes made to them are therefore never written back to the offloaded source.
    """
    with ExitStack() as stack:
        for sub in _offloaded(module):
            stack.enter_context(_held(sub))
        yield


def is_offloaded(model: nn.Module) -> bool:
    """True when some weights of ``model`` live in an accelerate offload (meta device + weights map)."""
    return bool(_offloaded(model))


def run_block(layer: nn.Module, batches: Sequence[BlockBatch]) -> list[BlockBatch]:
    """Every batch through one decoder block; the outputs become the next block's inputs."""
    outputs = []
    with torch.no_grad():
        for batch in batches:
            out = layer(batch.hidden, *batch.args, **batch.kwargs)
            outputs.append(batch.with_hidden(out[0] if isinstance(out, tuple) else out))
    return outputs


def run_block_with_stats(
    layer: nn.Module, batches: Sequence[BlockBatch], linears: Sequence[nn.Linear]
) -> tuple[list[BlockBatch], dict[nn.Linear, ColumnStats]]:
    """:func:`run_block` while recording the input statistics of ``linears`` (hooks removed afterwards)."""
    outputs: list[BlockBatch] = []
    stats = collect_input_stats(linears, lambda: outputs.extend(run_block(layer, batches)))
    return outputs, stats


class _Replay(nn.Module):
    """Stands in for the decoder layers: returns the hidden states the block runner computed."""

    def __init__(self, hidden: torch.Tensor, attention_type: Any) -> None:
        super().__init__()
        self.hidden = hidden
        if attention_type is not None:
            self.attention_type = attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.hidden.to(hidden_states.device)


@contextmanager
def _layers_replaced(layers: nn.ModuleList, stand_in: nn.Module) -> Iterator[None]:
    saved = list(layers)
    try:
        del layers[:]
        layers.append(stand_in)
        yield
    finally:
        del layers[:]
        layers.extend(saved)


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


def loss_from_hidden(model: nn.Module, adapter: ArchAdapter, batches: Sequence[BlockBatch]) -> float:
    """Token-weighted mean next-token loss from the last block's outputs, computed by the model's own head.

    The decoder layers are swapped for a module that returns the given hidden states, so this is the
    same quantity as :func:`minillm.calibration.forward.mean_loss` on a full forward pass.
    """
    layers = adapter.decoder_layers(model)
    device = input_device(model)
    total, count = 0.0, 0
    attention_type = _attention_type(layers[0])
    with torch.no_grad():
        for batch in batches:
            ids = batch.input_ids.to(device)
            with _layers_replaced(layers, _Replay(batch.hidden, attention_type)):
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
    attention_type = _attention_type(layers[0])
    grads = []
    with head_resident(model, adapter):
        for batch in batches:
            pieces = []
            for start in range(0, batch.hidden.shape[0], sequences):
                rows = slice(start, start + sequences)
                hidden = batch.hidden[rows].detach().requires_grad_(True)
                ids = batch.input_ids[rows].to(device)
                with _layers_replaced(layers, _Replay(hidden, attention_type)):
                    loss = model(input_ids=ids, labels=ids, use_cache=False).loss
                tokens = ids.numel() - ids.shape[0]
                (grad,) = torch.autograd.grad(loss * tokens, hidden)
                pieces.append(grad)
                del loss
            grads.append(torch.cat(pieces))
    return grads
