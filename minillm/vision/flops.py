"""FLOPs and parameter counts, measured on a model and predicted for a prune plan.

Convention (the one of the ResNet and IFSO papers): "FLOPs" are multiply-accumulates of conv and linear
layers for one input image; BN, ReLU, pooling and bias additions are not counted (BN folds into the
conv at inference). Conv: ``H_out * W_out * k_h * k_w * (C_in / groups) * C_out``; linear:
``in * out``. Parameters are all trainable parameters (BN running statistics are buffers, not counted).

Why a cost model: the global ranking removes channels one at a time until a FLOPs or parameter target is
met, so the cost of a *hypothetical* plan must be cheap to evaluate. Every layer's cost is bilinear in
its kept input and output widths; :class:`CostModel` stores the coefficients once and evaluates any
``{group: channels removed}`` without touching the network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from minillm.vision.groups import ChannelGroup


@dataclass
class LayerCost:
    """Cost of one layer as ``flops = a_flops*cin*cout`` and ``params = a_par*cin*cout + b_par*cout``."""

    name: str
    cin: int
    cout: int
    a_flops: float
    a_params: float
    b_params: float

    def flops(self, cin: int, cout: int) -> float:
        return self.a_flops * cin * cout

    def params(self, cin: int, cout: int) -> float:
        return self.a_params * cin * cout + self.b_params * cout


def layer_costs(model: nn.Module, example_input: torch.Tensor) -> list[LayerCost]:
    """Per-layer cost coefficients from one forward pass on ``example_input`` (batch size 1 or more)."""
    costs: list[LayerCost] = []
    names = {m: n for n, m in model.named_modules()}
    handles = []

    def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        name = names[module]
        if isinstance(module, nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1] / module.groups
            spatial = out.shape[-1] * out.shape[-2]
            bias = 1.0 if module.bias is not None else 0.0
            costs.append(LayerCost(name, module.in_channels, module.out_channels, spatial * k, k, bias))
        elif isinstance(module, nn.Linear):
            bias = 1.0 if module.bias is not None else 0.0
            costs.append(LayerCost(name, module.in_features, module.out_features, 1.0, 1.0, bias))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            per_ch = 2.0 if module.affine else 0.0
            costs.append(LayerCost(name, module.num_features, module.num_features, 0.0, 0.0, per_ch))

    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
            handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_input[:1])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return costs


def count_flops(model: nn.Module, example_input: torch.Tensor) -> int:
    """Conv + linear multiply-accumulates for one image."""
    return round(sum(c.flops(c.cin, c.cout) for c in layer_costs(model, example_input)))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class CostModel:
    """FLOPs/params of the network after removing ``removed[group]`` channels from each group."""

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], example_input: torch.Tensor) -> None:
        self.layers = layer_costs(model, example_input)
        self.base_params = count_params(model) - sum(c.params(c.cin, c.cout) for c in self.layers)
        self.in_group: dict[str, str] = {}
        self.out_group: dict[str, str] = {}
        for g in groups:
            for name in g.consumers:
                self.in_group[name] = g.name
            for name, _ in g.producers:
                self.out_group[name] = g.name
        for c in self.layers:  # BN: its input is its output
            if c.a_flops == 0.0 and c.name in self.out_group:
                self.in_group[c.name] = self.out_group[c.name]

    def _widths(self, c: LayerCost, removed: Mapping[str, int]) -> tuple[int, int]:
        cin = c.cin - removed.get(self.in_group.get(c.name, ""), 0)
        cout = c.cout - removed.get(self.out_group.get(c.name, ""), 0)
        return cin, cout

    def flops(self, removed: Mapping[str, int] | None = None) -> float:
        removed = removed or {}
        return sum(c.flops(*self._widths(c, removed)) for c in self.layers)

    def params(self, removed: Mapping[str, int] | None = None) -> float:
        removed = removed or {}
        return self.base_params + sum(c.params(*self._widths(c, removed)) for c in self.layers)

    def metric(self, kind: str, removed: Mapping[str, int] | None = None) -> float:
        if kind == "flops":
            return self.flops(removed)
        if kind == "params":
            return self.params(removed)
        raise ValueError(f"unknown cost kind {kind!r}")
