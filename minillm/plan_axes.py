"""Uniform plans over every axis: heads, MLP width, hidden size and whole layers, with ``--round-to``.

Why one knob and a filler: the export must stay a stock config, so each axis is cut uniformly. Every
requested axis gives up about the same fraction ``f`` of its units (kv groups or query-head slots, MLP
channels, hidden channels, whole layers), rounded to what the config can hold (``--round-to N`` widths,
a hidden size divisible by the head count); the finest axis (MLP width, else hidden size) is then set to
the count that brings the exact parameter count closest to ``--ratio`` of the model's total. Among the
``f`` landing within 1 % of the target, the one cutting every requested axis and with the filler's
fraction closest to ``f`` wins (balanced cuts); otherwise the closest count wins.
Which units go within an axis follows the scores (lowest first).
The parameter count is computed from the model's modules, not from a formula per family, so biases,
tied heads and per-head norms are counted as the surgery will leave them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape, holder
from minillm.errors import UsageError
from minillm.plan import (
    HeadMode,
    LayerCosts,
    LayerPlan,
    LayerScores,
    PrunePlan,
    _head_units,
    _layer_plan,
    check_ratio,
)
from minillm.plan_units import Unit, remove_lowest

#: how far the achieved ratio may miss the target before --round-to is refused as incompatible
ROUND_TO_TOLERANCE = 0.02
#: achieved ratios this close to the target count as on target (then the most balanced cut wins)
ON_TARGET = 0.01


@dataclass(frozen=True)
class Widths:
    """One candidate architecture: per-axis unit counts removed / kept."""

    head_units: int  # head units removed per pruned layer
    channels: int | None  # kept MLP channels per pruned layer (None: untouched)
    hidden: int  # kept hidden size
    layers_removed: int


class ParamCounter:
    """Exact parameter count of the model after a uniform cut, read from its modules."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter) -> None:
        self.hidden = int(model.config.hidden_size)
        self.head_dim = adapter.head_dim(model.config)
        norms = {id(p) for n in adapter.hidden_norms(model) for p in n.parameters(recurse=False)}
        embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
        self.vocab_columns = embedding.weight.shape[0]
        tied = head is not None and (head.weight is embedding.weight or (  # accelerate's offload may
            getattr(model.config, "tie_word_embeddings", False)          # hold a copy of the tied side
            and head.weight.shape == embedding.weight.shape))
        if head is not None and not tied:
            self.vocab_columns += head.weight.shape[0]
        self.layers: list[tuple[list[tuple[str, int, int]], int]] = []
        in_layers: set[int] = set()
        for layer in adapter.decoder_layers(model):
            roles = _roles(adapter, layer, self.head_dim)
            entries, constant = [], 0
            for p in layer.parameters():
                in_layers.add(id(p))
                role = roles.get(id(p)) or (("hidden_vector", 1, 0) if id(p) in norms else None)
                if role is None:
                    constant += p.numel()
                else:
                    entries.append(role)
            self.layers.append((entries, constant))
        self._cache: dict[tuple, int] = {}
        self.outer_hidden_vectors = 0
        self.outer_constant = 0
        for p in model.parameters():
            if id(p) in in_layers or p is embedding.weight or (head is not None and p is head.weight):
                continue
            if id(p) in norms:
                self.outer_hidden_vectors += 1
            else:
                self.outer_constant += p.numel()

    def layer(self, index: int, hidden: int, heads: int, kv_heads: int, channels: int) -> int:
        entries, constant = self.layers[index]
        key = (tuple(entries), constant, hidden, heads, kv_heads, channels)
        if key not in self._cache:
            self._cache[key] = self._layer(index, hidden, heads, kv_heads, channels)
        return self._cache[key]

    def _layer(self, index: int, hidden: int, heads: int, kv_heads: int, channels: int) -> int:
        hd = self.head_dim
        entries, constant = self.layers[index]
        total = constant
        for role, a, b in entries:  # (role, multiplicities): see _roles
            if role == "attn_in":
                total += (a * heads + b * kv_heads) * hd * hidden
            elif role == "attn_in_bias":
                total += (a * heads + b * kv_heads) * hd
            elif role == "o":
                total += hidden * heads * hd
            elif role == "expand":
                total += a * channels * hidden
            elif role == "channel_vector":
                total += a * channels
            elif role == "closing":
                total += hidden * channels
            elif role == "hidden_vector":
                total += hidden
            elif role == "head_norm":
                total += (heads if a else kv_heads) * b
        return total

    def total(self, hidden: int, shapes: dict[int, LayerShape]) -> int:
        body = sum(self.layer(i, hidden, s.num_heads, s.num_kv_heads, s.intermediate)
                   for i, s in shapes.items())
        return body + self.vocab_columns * hidden + self.outer_hidden_vectors * hidden + self.outer_constant


def _roles(adapter: ArchAdapter, layer: nn.Module, head_dim: int) -> dict[int, tuple[str, int, int]]:
    """How each width-dependent parameter of ``layer`` scales: ``{id: (role, a, b)}``. A fused holder
    (phi3's qkv, gate_up) counts once with its parts as multiplicities (``attn_in``: ``a`` query and
    ``b`` key/value parts); per-head norms scale with their heads (``head_norm``: ``a`` = 1 for query
    heads, ``b`` entries per head)."""
    attn, mlp = adapter.attention(layer), adapter.mlp(layer)
    roles: dict[int, tuple[str, int, int]] = {}
    parts: dict[nn.Linear, list[int]] = {}
    for projection, is_q in ((attn.q, 1), (attn.k, 0), (attn.v, 0)):
        counts = parts.setdefault(holder(projection), [0, 0])
        counts[0 if is_q else 1] += 1
    for linear, (q_parts, kv_parts) in parts.items():
        roles[id(linear.weight)] = ("attn_in", q_parts, kv_parts)
        if linear.bias is not None:
            roles[id(linear.bias)] = ("attn_in_bias", q_parts, kv_parts)
    expand: dict[nn.Linear, int] = {}
    for projection in mlp.expand:
        expand[holder(projection)] = expand.get(holder(projection), 0) + 1
    for linear, count in expand.items():
        roles[id(linear.weight)] = ("expand", count, 0)
        if linear.bias is not None:
            roles[id(linear.bias)] = ("channel_vector", count, 0)
    roles[id(attn.o.weight)] = ("o", 0, 0)
    roles[id(mlp.closing.weight)] = ("closing", 0, 0)
    for linear in (attn.o, mlp.closing):
        if linear.bias is not None:
            roles[id(linear.bias)] = ("hidden_vector", 1, 0)
    for norm in attn.norms:
        heads = (attn.q if norm.kind == "q" else attn.k).out_features // head_dim
        for param in norm.module.parameters(recurse=False):
            roles[id(param)] = ("head_norm", int(norm.kind == "q"), param.numel() // heads)
    return roles


def _uncut(w: Widths, structures: frozenset[str], first: LayerShape, hidden: int) -> int:
    """How many requested axes this candidate leaves whole."""
    whole = {"attn": w.head_units == 0, "mlp": w.channels in (None, first.intermediate),
             "hidden": w.hidden == hidden, "layers": w.layers_removed == 0}
    return sum(1 for name in structures if whole[name])


def _kept(size: int, fraction: float, step: int) -> int:
    """Units kept when ``fraction`` of ``size`` goes, as a multiple of ``step`` (at least one step)."""
    if fraction <= 0:
        return size
    kept = max(step, round((1.0 - fraction) * size / step) * step)
    return size if kept >= size else kept


def build_axes_plan(
    model: nn.Module,
    adapter: ArchAdapter,
    shapes: dict[int, LayerShape],
    scores: dict[int, LayerScores],
    total_params: int,
    ratio: float,
    structures: frozenset[str],
    head_mode: HeadMode = "kv",
    round_to: int = 1,
    hidden_scores: torch.Tensor | None = None,
    layer_scores: dict[int, float] | None = None,
) -> PrunePlan:
    """A uniform plan cutting every axis in ``structures`` by one common fraction (see the module doc).

    ``scores`` covers the width-pruned layers (attn/mlp); ``layer_scores`` the layers that may be removed.
    """
    check_ratio(ratio)
    if round_to < 1:
        raise UsageError(f"--round-to must be >= 1 (got {round_to})")
    counter = ParamCounter(model, adapter)
    hidden = counter.hidden
    n_layers = len(shapes)
    first = shapes[min(shapes)]
    width_layers = sorted(scores) if structures & {"attn", "mlp"} else []
    zero_costs = LayerCosts(0, 0, 0)
    units = {i: _head_units(i, shapes[i], scores[i], zero_costs, head_mode) for i in width_layers} \
        if "attn" in structures else {}
    n_units = len(next(iter(units.values()))) if units else 0
    if "mlp" in structures and width_layers and round_to > first.intermediate:
        raise UsageError(f"--round-to {round_to} is larger than the MLP width {first.intermediate}; "
                         "use a smaller --round-to")
    if "hidden" in structures:
        if hidden_scores is None:
            raise UsageError("--structures hidden needs hidden-channel scores")
        if (blocker := adapter.hidden_pruning_blocker(model.config)) is not None:
            raise UsageError(blocker)
    candidates = sorted(layer_scores) if "layers" in structures and layer_scores else []
    if "layers" in structures and not candidates:
        raise UsageError("--structures layers needs layer scores for at least one layer")

    def heads_after(removed_units: int) -> tuple[int, int]:
        if not units or removed_units == 0:
            return first.num_heads, first.num_kv_heads
        unit = next(iter(units.values()))[0]
        gone = len(unit.members) * removed_units
        kv_gone = removed_units if unit.kv_member is not None else 0
        return first.num_heads - gone, first.num_kv_heads - kv_gone

    def widths_for(f: float) -> Widths:
        """Every requested axis gives up (about) fraction ``f`` of its units."""
        head_units = min(round(f * n_units), max(n_units - 1, 0)) if units else 0
        channels = _kept(first.intermediate, f, round_to) if "mlp" in structures and width_layers else None
        heads, _ = heads_after(head_units)
        kept_hidden = _kept(hidden, f, math.lcm(round_to, heads)) if "hidden" in structures else hidden
        removed = min(round(f * n_layers), len(candidates), n_layers - 1) if candidates else 0
        return Widths(head_units, channels, kept_hidden, removed)

    def filled(w: Widths) -> tuple[Widths, float]:
        """``w`` with its finest axis (MLP width, else hidden size) set to the count closest to the target;
        returns it and that axis's removed fraction."""
        if "mlp" in structures and width_layers:
            size, step = first.intermediate, round_to
            make = lambda kept: replace(w, channels=kept)
        elif "hidden" in structures:
            size, step = hidden, math.lcm(round_to, heads_after(w.head_units)[0])
            make = lambda kept: replace(w, hidden=kept)
        else:
            return w, 0.0
        options = [size] + [k for k in range(size - size % step or size - step, 0, -step) if k < size]
        options.sort()
        lo, hi = 0, len(options) - 1
        while lo < hi:  # params grow with the kept count: the first option keeping >= target's remainder
            mid = (lo + hi) // 2
            if total_params - count(make(options[mid])) <= target:
                hi = mid
            else:
                lo = mid + 1
        pick = min({max(lo - 1, 0), lo}, key=lambda i: abs(total_params - count(make(options[i])) - target))
        return make(options[pick]), 1.0 - options[pick] / size

    def new_shapes(w: Widths) -> dict[int, LayerShape]:
        heads, kv = heads_after(w.head_units)
        out = {}
        for i, s in shapes.items():
            if i in width_layers:
                out[i] = LayerShape(heads if units else s.num_heads, kv if units else s.num_kv_heads,
                                    s.head_dim, w.channels if w.channels is not None else s.intermediate)
            else:
                out[i] = s
        return out

    def removed_layers(w: Widths) -> list[int]:
        order = sorted(candidates, key=lambda i: (layer_scores[i], i))  # type: ignore[index]
        return sorted(order[: w.layers_removed])

    def params_after(w: Widths) -> int:
        gone = set(removed_layers(w))
        kept_shapes = {i: s for i, s in new_shapes(w).items() if i not in gone}
        return counter.total(w.hidden, kept_shapes)

    target = ratio * total_params
    seen: dict[Widths, int] = {}

    def count(w: Widths) -> int:
        if w not in seen:
            seen[w] = params_after(w)
        return seen[w]

    # (miss, axes left whole, imbalance, widths): on-target candidates (miss within ON_TARGET) prefer
    # cutting every requested axis, then the filler axis's fraction closest to the others'
    best: tuple[float, int, float, Widths] | None = None
    for step in range(400):
        f = step / 400
        w, fill_fraction = filled(widths_for(f))
        miss = abs((total_params - count(w)) - target) / total_params
        key = (max(miss, ON_TARGET), _uncut(w, structures, first, hidden), abs(fill_fraction - f), w)
        if best is None or key[:3] < best[:3]:
            best = key
    assert best is not None
    chosen = best[3]
    after = seen[chosen]
    miss = abs((total_params - after) - target) / total_params
    achieved = 1.0 - after / total_params
    if round_to > 1 and miss > ROUND_TO_TOLERANCE:
        raise UsageError(
            f"--round-to {round_to} cannot reach --ratio {ratio} (closest: {achieved:.3f}); "
            "use a smaller --round-to or another --ratio"
        )
    if after == total_params:
        raise UsageError(f"--ratio {ratio} removes nothing with --structures {','.join(sorted(structures))}; "
                         "raise --ratio or add structures")
    return _assemble(chosen, shapes, new_shapes(chosen), units, scores, width_layers, hidden_scores,
                     removed_layers(chosen), head_mode, total_params, after, ratio)


def _assemble(w: Widths, shapes: dict[int, LayerShape], after_shapes: dict[int, LayerShape],
              units: dict[int, list[Unit]], scores: dict[int, LayerScores], width_layers: Sequence[int],
              hidden_scores: torch.Tensor | None, removed: list[int], head_mode: HeadMode,
              total_params: int, params_after: int, ratio: float) -> PrunePlan:
    layers: list[LayerPlan] = []
    for i, shape in shapes.items():
        gone: set[Unit] = set()
        if i in units:
            gone |= remove_lowest(units[i], w.head_units)
        plan = _layer_plan(i, shape, gone)
        if i in width_layers and after_shapes[i].intermediate < shape.intermediate:
            order = torch.argsort(scores[i].channels.double(), descending=True, stable=True)
            plan.channels = sorted(int(c) for c in order[: after_shapes[i].intermediate])
        layers.append(plan)
    hidden_size = len(hidden_scores) if hidden_scores is not None else None
    kept_hidden = None
    if hidden_scores is not None and hidden_size is not None and w.hidden < hidden_size:
        order = torch.argsort(hidden_scores.double(), descending=True, stable=True)
        kept_hidden = sorted(int(c) for c in order[: w.hidden])
    kept_layers = [i for i in sorted(shapes) if i not in set(removed)] if removed else None
    return PrunePlan(head_mode=head_mode, allocation="uniform", layers=layers, params_before=total_params,
                     params_after=params_after, target_ratio=ratio, hidden=kept_hidden,
                     kept_layers=kept_layers)
