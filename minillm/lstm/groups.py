"""Where a hidden unit of :class:`~minillm.lstm.model.LstmLm` lives: its coupled weight slices.

This is the LSTM's "architecture adapter": the only module (with :mod:`minillm.lstm.surgery`) that knows
parameter names. Criteria score a unit from the slices listed here and surgery removes exactly these
slices, so "what is scored" and "what is cut" cannot drift apart.

Hidden unit j of layer l (width H) lives in
* rows ``j, H+j, 2H+j, 3H+j`` of ``weight_ih``, ``weight_hh``, ``bias_ih``, ``bias_hh`` — PyTorch stacks
  the four gates (input, forget, cell, output) along dim 0 in that order;
* column j of ``weight_hh`` (the unit's h_{t-1} feeds every gate of its own layer);
* column j of the consumer: the next layer's ``weight_ih``, or the decoder for the last layer;
* with tied weights, for the last layer, also column j of the embedding (= the decoder matrix) and
  therefore column j of the first layer's ``weight_ih`` (which reads the embedding).

Every slice names the activation that multiplies its columns (``input_key``), which activation-aware
criteria (FMS) need; biases have none (their input is the constant 1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from minillm.lstm.model import LstmLmConfig

GATES = 4  # i, f, g, o


def rnn_input_key(layer: int) -> str:
    return f"rnn{layer}.in"


def rnn_output_key(layer: int) -> str:
    return f"rnn{layer}.out"


DECODER_INPUT_KEY = "decoder.in"


@dataclass(frozen=True)
class GroupSlice:
    """The entries of one parameter that belong to the units of a layer.

    name: parameter name in the model (``model.get_parameter(name)``).
    dim: axis along which the units are laid out (0 = rows / outputs, 1 = columns / inputs).
    gates: how many gate blocks are stacked along ``dim`` (4 for LSTM rows, 1 for a plain column).
    input_key: statistic key of the activation multiplying this weight's columns; None for biases.
    """

    name: str
    dim: int
    gates: int
    input_key: str | None


@dataclass(frozen=True)
class UnitGroup:
    """All the slices holding the ``size`` hidden units of LSTM layer ``layer``."""

    layer: int
    size: int
    slices: tuple[GroupSlice, ...]


def lstm_param(layer: int, kind: str) -> str:
    """Name of ``weight_ih`` / ``weight_hh`` / ``bias_ih`` / ``bias_hh`` of layer ``layer``."""
    return f"rnns.{layer}.{kind}_l0"


def unit_groups(config: LstmLmConfig) -> list[UnitGroup]:
    """One group per LSTM layer, listing every slice that a hidden unit of that layer occupies."""
    groups = []
    last = config.num_layers - 1
    for layer, size in enumerate(config.hidden_sizes):
        own_in, own_out = rnn_input_key(layer), rnn_output_key(layer)
        slices = [
            GroupSlice(lstm_param(layer, "weight_ih"), 0, GATES, own_in),
            GroupSlice(lstm_param(layer, "weight_hh"), 0, GATES, own_out),
            GroupSlice(lstm_param(layer, "bias_ih"), 0, GATES, None),
            GroupSlice(lstm_param(layer, "bias_hh"), 0, GATES, None),
            GroupSlice(lstm_param(layer, "weight_hh"), 1, 1, own_out),
        ]
        if layer < last:
            slices.append(GroupSlice(lstm_param(layer + 1, "weight_ih"), 1, 1, rnn_input_key(layer + 1)))
        else:
            slices.append(GroupSlice("decoder.weight", 1, 1, DECODER_INPUT_KEY))
            if config.tie_weights:  # embedding column j = decoder column j, read by layer 0's inputs
                slices.append(GroupSlice(lstm_param(0, "weight_ih"), 1, 1, rnn_input_key(0)))
        groups.append(UnitGroup(layer=layer, size=size, slices=tuple(slices)))
    return groups


def per_unit(tensor: torch.Tensor, dim: int, gates: int) -> torch.Tensor:
    """Rearrange ``tensor`` so that row j holds every entry belonging to unit j: shape (H, k).

    Along ``dim`` the tensor has ``gates`` blocks of H units each; entries of unit j are at positions
    ``g*H + j`` for g < gates.
    """
    moved = tensor.movedim(dim, 0)
    size = moved.shape[0]
    if size % gates:
        raise ValueError(f"axis of size {size} does not split into {gates} gates")
    hidden = size // gates
    return moved.reshape(gates, hidden, -1).transpose(0, 1).reshape(hidden, -1)


def unit_positions(keep: torch.Tensor, hidden: int, gates: int) -> torch.Tensor:
    """Indices along a gate-stacked axis of the kept units: ``[g*H + j for g in gates for j in keep]``."""
    offsets = torch.arange(gates, device=keep.device) * hidden
    return (offsets[:, None] + keep[None, :]).reshape(-1)


def group_params(model: nn.Module, groups: Sequence[UnitGroup]) -> list[torch.Tensor]:
    """The distinct parameters touched by ``groups``, in a stable order (tied weights appear once)."""
    seen: dict[int, torch.Tensor] = {}
    for group in groups:
        for piece in group.slices:
            param = model.get_parameter(piece.name)
            seen.setdefault(id(param), param)
    return list(seen.values())


def unit_sum(
    model: nn.Module, group: UnitGroup, per_weight: dict[str, torch.Tensor] | None = None
) -> torch.Tensor:
    """Σ over the group's slices of a per-weight quantity, one value per unit (shape (H,)).

    ``per_weight`` maps parameter names to tensors of the same shape (e.g. FMS values); by default
    the squared weights themselves, which makes this the squared group norm.
    """
    total = torch.zeros(group.size, device=model.get_parameter(group.slices[0].name).device)
    for piece in group.slices:
        values = (
            per_weight[piece.name] if per_weight is not None else model.get_parameter(piece.name).pow(2)
        )
        total = total + per_unit(values, piece.dim, piece.gates).sum(dim=1)
    return total


def group_norms(model: nn.Module, groups: Sequence[UnitGroup]) -> list[torch.Tensor]:
    """L2 norm of each unit's weight group, per layer; differentiable (the group-lasso penalty uses it)."""
    return [unit_sum(model, group).clamp_min(1e-12).sqrt() for group in groups]
