"""Channel masks on the *inputs* of conv/linear layers, installed by a context manager.

Why inputs: a mask ``m`` multiplying the input channels of every layer that reads a channel group is the
IFSO parametrisation (the released IFSO code, after FisherPruning, puts ``in_mask`` on each conv/fc
input), and it is also exactly what physical removal does: zeroing channel ``c`` at every reader makes
the channel invisible downstream, even in a residual stream where the dense tensor still carries a value
for ``c``. So ``masked(model, masks)`` with 0/1 masks is the reference the surgery is tested against,
and with masks of ones that require grad it exposes dL/dm and the mixed Hessian blocks IFSO needs.

Hooks are forward pre-hooks, always removed on exit (also on error).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from minillm.vision.groups import ChannelGroup


def _shape_for(module: nn.Module, mask: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return mask.view(1, -1, 1, 1)
    return mask.view(1, -1)


@contextmanager
def masked(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Multiply the input of each named module by its per-channel mask while inside the block."""
    modules = dict(model.named_modules())
    handles = []
    try:
        for name, mask in masks.items():
            module = modules[name]

            def hook(mod: nn.Module, args: tuple, mask: torch.Tensor = mask) -> tuple:
                return (args[0] * _shape_for(mod, mask).to(args[0].dtype), *args[1:])

            handles.append(module.register_forward_pre_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


def ones_masks(
    model: nn.Module, groups: list[ChannelGroup], requires_grad: bool = False
) -> dict[str, torch.Tensor]:
    """A mask of ones for every consumer of every group."""
    modules = dict(model.named_modules())
    masks = {}
    for g in groups:
        for name in g.consumers:
            module = modules[name]
            n = module.in_channels if isinstance(module, nn.Conv2d) else module.in_features
            p = next(module.parameters())
            masks[name] = torch.ones(n, dtype=p.dtype, device=p.device, requires_grad=requires_grad)
    return masks


def plan_masks(
    model: nn.Module, groups: list[ChannelGroup], pruned: Mapping[str, list[int]]
) -> dict[str, torch.Tensor]:
    """0/1 masks equivalent to removing ``pruned[group_name]`` channels of each group."""
    masks = ones_masks(model, groups)
    for g in groups:
        idx = pruned.get(g.name, [])
        if idx:
            for name in g.consumers:
                masks[name][torch.as_tensor(idx, dtype=torch.long)] = 0.0
    return masks
