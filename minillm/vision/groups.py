"""Coupled channel groups, from Torch-Pruning's dependency graph.

Why Torch-Pruning: removing one output channel of a conv must also remove the channel from its BN, from
every layer that reads it, and — in a ResNet — from every other conv that writes into the same
residual stream. Torch-Pruning (Fang et al., CVPR 2023, "DepGraph") traces the autograd graph and
returns exactly these coupled sets; we do not hand-write graph code.

Residual coupling decision: coupled channels are **pruned together**. A ResNet stage's residual stream
is one group (the stem or projection shortcut, every block's ``conv2``/``bn2``, and every reader:
the next blocks' ``conv1``, the next stage's projection, the final ``fc``); removing stream channel
``c`` removes it from all of them. Each block's inner width is its own group. Nothing is excluded.

A :class:`ChannelGroup` lists, for one group, the *producers* (layers whose output channels are cut)
and the *consumers* (conv/linear layers whose input channels are cut). The consumer list is also where
the channel masks of :mod:`minillm.vision.masks` sit, which is what makes "masked dense model" and
"physically pruned model" the same function.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_INSTALL_HINT = "CNN pruning needs Torch-Pruning: pip install 'minillm-prune[cnn]'"


def require_torch_pruning() -> Any:
    """Import torch_pruning or fail with the extra to install."""
    try:
        import torch_pruning
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(_INSTALL_HINT) from exc
    return torch_pruning


@dataclass
class ChannelGroup:
    """One set of coupled channels.

    name: the root layer's module name (stable id used in plans).
    size: number of channels in the group.
    producers: ``(module_name, kind)`` whose output channels are removed; kind is conv/bn/linear.
    consumers: conv/linear module names whose input channels are removed (identity index mapping).
    tp_group: the Torch-Pruning group with full indices, for importances written against its API.
    """

    name: str
    size: int
    producers: list[tuple[str, str]] = field(default_factory=list)
    consumers: list[str] = field(default_factory=list)
    tp_group: Any = None


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.Conv2d):
        return "conv"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(module, nn.Linear):
        return "linear"
    return None


def output_layers(model: nn.Module) -> list[nn.Module]:
    """Layers whose output channels are the network's outputs (never pruned): the last linear."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:]


def build_graph(model: nn.Module, example_input: torch.Tensor) -> Any:
    """Trace ``model`` once with Torch-Pruning's DependencyGraph."""
    tp = require_torch_pruning()
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    model.train(was_training)
    return graph


def channel_groups(model: nn.Module, graph: Any) -> list[ChannelGroup]:
    """All prunable groups of ``model`` (the output layer excluded), in graph order."""
    tp = require_torch_pruning()
    f = tp.pruner.function
    out_fns = {f.prune_conv_out_channels, f.prune_linear_out_channels, f.prune_batchnorm_out_channels}
    in_fns = {f.prune_conv_in_channels, f.prune_linear_in_channels}
    names = {m: n for n, m in model.named_modules()}
    groups = []
    for g in graph.get_all_groups(
        ignored_layers=output_layers(model), root_module_types=(nn.Conv2d, nn.Linear)
    ):
        root = g[0].dep.target.module
        cg = ChannelGroup(name=names[root], size=len(g[0].idxs), tp_group=g)
        for item in g:
            layer, fn = item.dep.target.module, item.dep.handler
            if not isinstance(layer, nn.Module) or layer not in names:
                continue  # functional ops (add, relu, flatten) carry no parameters
            if list(item.idxs) != list(item.root_idxs):
                raise NotImplementedError(
                    f"{names[layer]}: non-identity channel index mapping (concat/split) is not supported"
                )
            if fn in out_fns:
                cg.producers.append((names[layer], _kind(layer) or "other"))
            elif fn in in_fns:
                cg.consumers.append(names[layer])
        groups.append(cg)
    return groups
