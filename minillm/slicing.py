"""Slicing one Linear along its outputs or inputs: the cut every surgery (heads, channels, hidden) uses."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along ``dim`` of the weight (0 = outputs, also slicing the bias; 1 = inputs)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        linear.out_features = weight.shape[0]
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
    else:
        linear.in_features = weight.shape[1]
