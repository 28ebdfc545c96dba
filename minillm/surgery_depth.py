"""Depth surgery: remove whole decoder layers and keep every per-layer piece of the config consistent.

Why it needs more than deleting list entries: transformers' KV cache is indexed by each attention
module's ``layer_idx`` (so the kept layers are renumbered 0..n-1), the model runs
``layers[: config.num_hidden_layers]``, and per-layer config lists (``layer_types`` with its
sliding-window pattern, ``no_rope_layers``) must describe the layers that remain, so that a vanilla
``from_pretrained`` of the export builds exactly this stack.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

from minillm.arch.base import ArchAdapter
from minillm.errors import UsageError


def check_kept_layers(kept: Sequence[int], num_layers: int) -> list[int]:
    """The kept layer indices, sorted; refuses an empty or out-of-range list in one line."""
    kept = sorted(set(int(i) for i in kept))
    if not kept:
        raise UsageError(
            f"the plan removes all {num_layers} decoder layers; keep at least one (lower --ratio)"
        )
    if kept[0] < 0 or kept[-1] >= num_layers:
        raise UsageError(f"kept layers {kept} do not exist in a model with {num_layers} decoder layers")
    return kept


def _parent_and_name(model: nn.Module, target: nn.Module) -> tuple[nn.Module, str]:
    for module in model.modules():
        for child_name, child in module.named_children():
            if child is target:
                return module, child_name
    raise ValueError("the decoder layer list is not a sub-module of the model")


def remove_layers(model: nn.Module, adapter: ArchAdapter, kept: Sequence[int]) -> None:
    """Keep only decoder layers ``kept`` (original indices), in place, and update the config."""
    layers = adapter.decoder_layers(model)
    kept = check_kept_layers(kept, len(layers))
    if len(kept) == len(layers):
        return
    update = adapter.removed_layers_config_update(model.config, kept)
    parent, name = _parent_and_name(model, layers)
    remaining = nn.ModuleList([layers[i] for i in kept])
    setattr(parent, name, remaining)
    for key, value in update.items():  # the config first: adapters may find the layer list by its length
        setattr(model.config, key, value)
    for new_index, layer in enumerate(remaining):
        for module in layer.modules():  # the KV cache slot of every attention (and anything else indexed)
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


@contextmanager
def skipped_layers(model: nn.Module, adapter: ArchAdapter, skipped: Sequence[int]) -> Iterator[None]:
    """Run ``model`` with decoder layers ``skipped`` passing their input through unchanged.

    Used to score a layer by the loss change of dropping it, without copying or editing the model.
    """
    layers = adapter.decoder_layers(model)
    handles = []

    def passthrough(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        hidden = args[0] if args else kwargs["hidden_states"]
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        return hidden

    try:
        for index in skipped:
            handles.append(layers[index].register_forward_hook(passthrough, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()
