"""Prune plans: the serialisable decision of which heads and channels each layer keeps.

The plan separates "how important is it" (scoring) from "how to cut it" (surgery): scores go in,
kept indices come out, and the plan is JSON that ``--dry-run`` prints and every export stores.

Head granularity with grouped-query attention (GQA):

* ``head_mode="kv"``: the unit is a whole key/value group (its k and v heads and every query head that
  reads them). With plain multi-head attention a unit is simply one head.
* ``head_mode="query"``: the unit is a *slot*: the j-th least important query head of **every** kv
  group, so each kv group keeps the same number of query heads and ``num_key_value_groups`` stays an
  integer; key/value heads are all kept.
* ``head_mode="auto"``: ``query`` when every pruned layer has a single key/value head
  (Gemma-3-270M: a kv unit would be the whole attention), ``kv`` otherwise. An explicit ``kv`` on such a
  model is refused, since it could not cut any attention.

``--ratio`` is the fraction of the model's total parameters removed (the LLM-Pruner convention).
``uniform`` allocation removes the same number of units from every pruned layer (a standard config can
express the result); ``global`` ranks units of all pruned layers together by score per parameter;
``log`` (SlimGPT's log-increasing ratios) and ``error`` (per-layer refit errors) are in
:mod:`minillm.allocation`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, get_args

import torch

from minillm.arch.base import LayerShape
from minillm.defaults import Allocation
from minillm.errors import UsageError
from minillm.plan_units import Unit, layer_capacity, remove_lowest

HeadMode = Literal["auto", "kv", "query"]
ALLOCATIONS: tuple[str, ...] = get_args(Allocation)
Structures = Literal["both", "mlp", "attn"]
PLAN_FORMAT = "minillm-prune-plan/1"
#: ``allocation="error"``'s measurement: removal orders (input columns per unit) → normalised error curves
CurveFunction = Callable[[dict[int, dict[str, list[list[int]]]]], dict[int, dict[str, torch.Tensor]]]


@dataclass
class LayerScores:
    """Importance of every group of one layer (higher = more important).

    ``heads``: one score per query head (its q rows and o columns). ``kv_heads``: one score per
    key/value head (its k and v rows). ``channels``: one score per MLP intermediate channel.
    """

    heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor


@dataclass(frozen=True)
class LayerCosts:
    """Parameters removed with one query head, one key/value head, one MLP channel of a layer."""

    query_head: int
    kv_head: int
    channel: int


@dataclass
class LayerPlan:
    """Kept indices of one layer, in the original numbering."""

    index: int
    heads: list[int]
    kv_heads: list[int]
    channels: list[int]

    def shape(self, head_dim: int) -> LayerShape:
        return LayerShape(len(self.heads), len(self.kv_heads), head_dim, len(self.channels))


@dataclass
class PrunePlan:
    """The whole decision, plus the bookkeeping a user wants to see (target vs achieved)."""

    head_mode: HeadMode
    allocation: Allocation
    layers: list[LayerPlan]
    params_before: int
    params_after: int
    target_ratio: float
    format: str = PLAN_FORMAT
    extra: dict[str, Any] = field(default_factory=dict)
    #: kept hidden channels (original indices); None = hidden size untouched
    hidden: list[int] | None = None
    #: kept decoder layers (original indices); None = every layer kept
    kept_layers: list[int] | None = None

    @property
    def achieved_ratio(self) -> float:
        return 1.0 - self.params_after / self.params_before

    def is_uniform(self) -> bool:
        return len({(len(p.heads), len(p.kv_heads), len(p.channels)) for p in self.layers}) <= 1

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["achieved_ratio"] = self.achieved_ratio
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrunePlan:
        if data.get("format") != PLAN_FORMAT:
            raise UsageError(f"not a minillm prune plan (format {data.get('format')!r}, want {PLAN_FORMAT})")
        fields = {k: v for k, v in data.items() if k not in ("achieved_ratio", "layers")}
        return cls(layers=[LayerPlan(**layer) for layer in data["layers"]], **fields)


#: what ``--structures`` may list; ``both`` is shorthand for ``attn,mlp``
STRUCTURE_NAMES = ("attn", "mlp", "hidden", "layers")


def parse_structures(text: str) -> frozenset[str]:
    """``--structures``: a comma list of attn, mlp, hidden, layers (``both`` = attn,mlp)."""
    names: set[str] = set()
    for part in str(text).split(","):
        part = part.strip()
        if part == "both":
            names |= {"attn", "mlp"}
        elif part in STRUCTURE_NAMES:
            names.add(part)
        elif part:
            raise UsageError(f"--structures takes a comma list of {', '.join(STRUCTURE_NAMES)} or both "
                             f"(got {part!r}), e.g. --structures attn,mlp,hidden")
    if not names:
        raise UsageError("--structures is empty; e.g. --structures both or --structures layers")
    return frozenset(names)


def structures_label(names: frozenset[str]) -> str:
    """The canonical spelling: ``both``/``attn``/``mlp`` as before, else the comma list in fixed order."""
    if names == {"attn", "mlp"}:
        return "both"
    return ",".join(n for n in STRUCTURE_NAMES if n in names)


def check_ratio(ratio: float) -> None:
    """The one definition of a valid ``--ratio`` (checked before any work, and again when planning)."""
    if not 0.0 < ratio < 1.0:
        raise UsageError(f"--ratio must be strictly between 0 and 1 (got {ratio}); e.g. --ratio 0.2")


def _head_units(layer: int, shape: LayerShape, scores: LayerScores, costs: LayerCosts, mode: HeadMode
                ) -> list[Unit]:
    group = shape.heads_per_kv
    heads = scores.heads.double()
    if mode == "kv" or shape.num_kv_heads == shape.num_heads:
        units = []
        for kv in range(shape.num_kv_heads):
            members = tuple(range(kv * group, (kv + 1) * group))
            score = float(heads[list(members)].sum() + scores.kv_heads.double()[kv])
            units.append(Unit(layer, "head", members, kv, score, group * costs.query_head + costs.kv_head))
        return units
    # query mode: slot j holds the j-th least important query head of every kv group
    per_group = heads.view(shape.num_kv_heads, group)
    order = torch.argsort(per_group, dim=1, stable=True)
    units = []
    for slot in range(group):
        members = tuple(int(kv * group + order[kv, slot]) for kv in range(shape.num_kv_heads))
        score = float(heads[list(members)].sum())
        units.append(Unit(layer, "head", members, None, score, shape.num_kv_heads * costs.query_head))
    return units


def _channel_units(layer: int, scores: LayerScores, costs: LayerCosts) -> list[Unit]:
    values = scores.channels.double().tolist()
    return [Unit(layer, "channel", (c,), None, v, costs.channel) for c, v in enumerate(values)]


def _layer_plan(layer: int, shape: LayerShape, removed: set[Unit]) -> LayerPlan:
    gone_heads = {m for u in removed if u.kind == "head" for m in u.members}
    gone_kv = {u.kv_member for u in removed if u.kind == "head" and u.kv_member is not None}
    gone_channels = {m for u in removed if u.kind == "channel" for m in u.members}
    return LayerPlan(
        index=layer,
        heads=[h for h in range(shape.num_heads) if h not in gone_heads],
        kv_heads=[k for k in range(shape.num_kv_heads) if k not in gone_kv],
        channels=[c for c in range(shape.intermediate) if c not in gone_channels],
    )


def resolve_head_mode(head_mode: HeadMode, shapes: list[LayerShape], structures: Structures = "both"
                      ) -> HeadMode:
    """``auto`` → ``query`` when every pruned layer has one key/value head (and several query heads),
    else ``kv``; an explicit ``kv`` there is refused with the reason."""
    single_kv = bool(shapes) and all(s.num_kv_heads == 1 < s.num_heads for s in shapes)
    if head_mode == "auto":
        return "query" if single_kv else "kv"
    if head_mode == "kv" and single_kv and structures != "mlp":
        raise UsageError(
            "--head-mode kv cannot cut attention here: every pruned layer has a single key/value head, so "
            "a kv unit is the whole attention; only query heads can go (use --head-mode query or auto)"
        )
    return head_mode


def build_plan(
    shapes: dict[int, LayerShape],
    costs: dict[int, LayerCosts],
    scores: dict[int, LayerScores],
    total_params: int,
    ratio: float,
    allocation: Allocation = "uniform",
    head_mode: HeadMode = "auto",
    structures: Structures = "both",
    expressible: Callable[[LayerShape], bool] | None = None,
    curves: CurveFunction | None = None,
) -> PrunePlan:
    """Turn group scores into a plan removing ``ratio`` of ``total_params`` from the scored layers.

    ``shapes`` and ``costs`` cover every decoder layer; layers without ``scores`` are kept whole (the
    plan still lists them, so it describes the complete architecture). ``expressible``: whether the
    stock config class can describe every layer having a shape (e.g. transformers refuses
    ``hidden_size % num_attention_heads != 0``); ``uniform`` then only keeps head counts it can, and
    the plan's ``extra["uniform_note"]`` says where the rest of the budget went. ``curves``: for
    ``allocation="error"``, maps each layer's removal order (closing-projection input columns per unit,
    :func:`minillm.allocation.removal_groups`) to its normalised refit-error curves.
    """
    check_ratio(ratio)
    if allocation not in ALLOCATIONS:
        raise UsageError(f"--allocation must be one of {', '.join(ALLOCATIONS)} (got {allocation!r})")
    if head_mode not in ("auto", "kv", "query"):
        raise UsageError(f"--head-mode must be 'auto', 'kv' or 'query' (got {head_mode!r})")
    if structures not in ("both", "mlp", "attn"):
        raise UsageError(f"--structures must be 'both', 'mlp' or 'attn' (got {structures!r})")
    target = ratio * total_params
    scored = sorted(scores)
    head_mode = resolve_head_mode(head_mode, [shapes[i] for i in scored], structures)
    head_units = {i: _head_units(i, shapes[i], scores[i], costs[i], head_mode) for i in scored}
    channel_units = {i: _channel_units(i, scores[i], costs[i]) for i in scored}
    if structures == "mlp":
        head_units = {i: [] for i in scored}
    if structures == "attn":
        channel_units = {i: [] for i in scored}
    note = ""
    if allocation == "uniform":
        removed, note = _uniform(head_units, channel_units, target, len(scored), total_params,
                                 shapes[scored[0]], expressible)
    elif allocation == "global":
        removed = _global(head_units, channel_units, target)
    elif allocation == "log":
        from minillm.allocation import log_allocation

        removed = log_allocation(head_units, channel_units, target)
    else:
        from minillm.allocation import error_allocation, removal_groups

        if curves is None:
            raise UsageError("--allocation error measures per-layer errors on calibration data; "
                             "plan it through prune (or pass curves=…)")
        groups = removal_groups(head_units, channel_units, lambda i: shapes[i].head_dim)
        removed = error_allocation(head_units, channel_units, target, curves(groups))
    layers = [_layer_plan(i, shapes[i], removed.get(i, set())) for i in sorted(shapes)]
    removed_params = sum(u.cost for units in removed.values() for u in units)
    return PrunePlan(
        head_mode=head_mode,
        allocation=allocation,
        layers=layers,
        params_before=total_params,
        params_after=total_params - removed_params,
        target_ratio=ratio,
        extra={"uniform_note": note} if note else {},
    )


def _kept_shape(shape: LayerShape, heads: list[Unit], n_heads: int) -> LayerShape:
    """The layer's shape after removing ``n_heads`` head units (channels do not matter here)."""
    if not heads or not n_heads:
        return shape
    kv_gone = n_heads if heads[0].kv_member is not None else 0
    return LayerShape(shape.num_heads - n_heads * len(heads[0].members), shape.num_kv_heads - kv_gone,
                      shape.head_dim, shape.intermediate)


def _uniform(head_units: dict[int, list[Unit]], channel_units: dict[int, list[Unit]], target: float,
             n_layers: int, total_params: int, shape: LayerShape,
             expressible: Callable[[LayerShape], bool] | None = None) -> tuple[dict[int, set[Unit]], str]:
    first = min(head_units)
    heads, channels = head_units[first], channel_units[first]
    per_layer = target / n_layers
    capacity = layer_capacity(heads, channels)
    if per_layer > capacity:
        reachable = capacity * n_layers / total_params
        raise UsageError(
            f"this ratio would empty a layer: each pruned layer must lose {per_layer:,.0f} parameters "
            f"but can lose at most {capacity:,.0f}; use --ratio below {reachable:.3f} or prune more layers "
            "(lower --skip-first/--skip-last)"
        )
    layer_total = sum(u.cost for u in heads) + sum(u.cost for u in channels)
    fraction = per_layer / layer_total
    ideal = min(round(fraction * len(heads)), max(len(heads) - 1, 0)) if heads else 0
    head_cost = heads[0].cost if heads else 0
    channel_cost = channels[0].cost if channels else 0
    max_channels = max(len(channels) - 1, 0)
    if not channels:
        ideal = min(math.ceil(per_layer / head_cost - 1e-9), len(heads) - 1)

    def fits(n: int) -> bool:  # the channels can carry what the heads leave
        rest = per_layer - n * head_cost
        return rest <= 0 or (channels and math.ceil(rest / channel_cost - 1e-9) <= max_channels)

    candidates = [n for n in range(len(heads)) if fits(n)] if heads else [0]
    if expressible is not None:
        stock = [n for n in candidates if expressible(_kept_shape(shape, heads, n))]
        candidates = stock or candidates
    # the expressible head count closest to the ideal one, fewer removed on a tie (budget to the MLP)
    n_heads = min(candidates, key=lambda n: (abs(n - ideal), n))
    rest = per_layer - n_heads * head_cost
    n_channels = min(max(math.ceil(rest / channel_cost - 1e-9), 0), max_channels) if channels else 0
    note = ""
    if n_heads != ideal:
        kept = _kept_shape(shape, heads, n_heads)
        moved = (ideal - n_heads) * head_cost
        where = "to MLP channels" if moved > 0 else "from MLP channels"
        note = (f"uniform keeps {kept.num_heads} of {shape.num_heads} heads per layer (not "
                f"{_kept_shape(shape, heads, ideal).num_heads}, which the stock config cannot express); "
                f"{abs(moved):,} parameters per layer moved {where} ({n_channels} channels removed)")
    removed = {
        i: remove_lowest(head_units[i], n_heads) | remove_lowest(channel_units[i], n_channels)
        for i in head_units
    }
    return removed, note


def _global(head_units: dict[int, list[Unit]], channel_units: dict[int, list[Unit]], target: float
            ) -> dict[int, set[Unit]]:
    pool = [u for units in (*head_units.values(), *channel_units.values()) for u in units]
    pool.sort(key=lambda u: (u.score / u.cost, u.layer, u.kind, u.members))
    left_heads = {i: len(units) for i, units in head_units.items()}
    left_channels = {i: len(units) for i, units in channel_units.items()}
    removed: dict[int, set[Unit]] = {i: set() for i in head_units}
    done = 0
    skipped: list[Unit] = []

    def take(unit: Unit) -> bool:
        nonlocal done
        left = left_heads if unit.kind == "head" else left_channels
        if left[unit.layer] <= 1:
            return False
        left[unit.layer] -= 1
        removed[unit.layer].add(unit)
        done += unit.cost
        return True

    for unit in pool:  # least important first; a unit that would overshoot the target waits
        if done >= target:
            break
        if done + unit.cost > target:
            skipped.append(unit)
            continue
        take(unit)
    # close the last gap (smaller than any unit left) with the cheapest unit, least important first,
    # so the overshoot is at most one small unit
    for unit in sorted(skipped, key=lambda u: (u.cost, u.score / u.cost)):
        if done >= target:
            break
        take(unit)
    if done < target:
        raise UsageError(
            f"cannot remove {target:,.0f} parameters from the scored layers without emptying one; "
            "lower --ratio or prune more layers (--skip-first/--skip-last)"
        )
    return removed
