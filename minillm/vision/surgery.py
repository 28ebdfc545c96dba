"""Apply a prune plan physically, with Torch-Pruning's pruning functions.

Each group of the plan is cut through ``DependencyGraph.get_pruning_group(root, prune_out_channels,
idxs).prune()``, which slices the root conv's filters, its BN, every coupled producer (residual
stream) and every reader's input channels. Groups touch disjoint tensor dimensions (a conv's input
channels belong to one group, its output channels to another), so all groups can be cut from one
graph traced before the first cut.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from minillm.vision.groups import build_graph, channel_groups, require_torch_pruning
from minillm.vision.plan import PrunePlan


def apply_plan(
    model: nn.Module, plan: PrunePlan, example_input: torch.Tensor, inplace: bool = False
) -> nn.Module:
    """Return ``model`` with the plan's channels removed (a deep copy unless ``inplace``)."""
    tp = require_torch_pruning()
    model = model if inplace else copy.deepcopy(model)
    graph = build_graph(model, example_input)
    groups = {g.name: g for g in channel_groups(model, graph)}
    modules = dict(model.named_modules())
    for name, idxs in plan.pruned.items():
        if name not in groups:
            raise ValueError(f"plan names group {name!r}, which this model does not have")
        if len(idxs) >= groups[name].size:
            raise ValueError(f"plan removes every channel of group {name!r}")
        root = modules[name]
        fn = tp.prune_conv_out_channels if isinstance(root, nn.Conv2d) else tp.prune_linear_out_channels
        graph.get_pruning_group(root, fn, list(idxs)).prune()
    return model
