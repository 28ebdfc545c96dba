"""Forward hooks that can never outlive their use: installed and removed by context managers."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

InputHook = Callable[[nn.Module, torch.Tensor], None]


@contextmanager
def input_hooks(modules: Iterable[nn.Module], hook: InputHook) -> Iterator[None]:
    """Call ``hook(module, input)`` on every forward of each module; always removes the hooks."""
    handles = []

    def observe(module: nn.Module, args: tuple) -> None:
        hook(module, args[0])  # never return a value: a pre-hook's return value would replace the input

    try:
        for module in modules:
            handles.append(module.register_forward_pre_hook(observe))
        yield
    finally:
        for handle in handles:
            handle.remove()


def count_hooks(model: nn.Module) -> int:
    """Forward / pre-forward / backward hooks still attached anywhere in ``model`` (tests assert 0)."""
    total = 0
    for module in model.modules():
        total += len(module._forward_hooks) + len(module._forward_pre_hooks)
        total += len(module._backward_hooks) + len(getattr(module, "_backward_pre_hooks", {}))
    return total
