"""Per-layer allocations that compensation makes worth having: ``log`` (SlimGPT) and ``error``.

Both decide only *how many* units (head units — kv groups or query-head slots — and MLP channels) each
pruned layer loses; *which* ones follow the criterion's scores, lowest first, as in every other
allocation (:func:`minillm.plan.build_plan`). Their widths differ between layers, so the export needs
the per-layer ``auto_map`` path (``trust_remote_code`` to load); they run only when ``--allocation``
names them — asking for them is the explicit request for a per-layer export.

* ``log`` — SlimGPT's Incremental Pruning Ratio (Ling et al., NeurIPS 2024, "log_increase" in its
  code): the ``i``-th pruned layer (``i = 0 … n−1``) gets the ratio
  ``r_i = r_min + (r_max − r_min) · ln(1 + i) / ln(n)`` of its prunable parameters, so early layers,
  whose errors every later layer inherits, are cut least. SlimGPT fixes ``r_min``/``r_max`` by hand
  (0.06 / 0.30 by default, and ``ln 32`` for LLaMA-7B's 32 layers); here the shape keeps SlimGPT's
  default spread ``r_min = 0.2 · r_max`` and the scale ``r_max`` is solved (bisection) so the parameters
  removed equal ``--ratio`` of the model — a layer whose share would exceed what it can lose (one head
  unit and one channel always stay) is capped and the rest goes to the others. Each layer's budget
  becomes a head count closest to ``r_i`` of its head units that the MLP channels can complement, then
  channels; the rounding left over is closed one channel at a time (largest remainders first), so the
  total lands within one channel of the target.
* ``error`` — a global allocation from per-layer reconstruction errors: for every pruned layer and
  candidate width, the exact refit's residual on calibration data normalised by the closing projection's
  output energy, ``‖Y − Ŷ‖² / ‖Y‖²`` (:mod:`minillm.compensation.curves`, one dense walk); the widths
  then minimise the *sum* of normalised errors over attention and MLP of every layer under the parameter
  budget (a small knapsack, :func:`error_allocation`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from minillm.errors import UsageError
from minillm.plan_units import Unit, layer_capacity, remove_lowest

#: SlimGPT's default r_min / r_max (0.06 / 0.30): the first pruned layer's share of the last one's ratio
LOG_MIN_SHARE = 0.2
Curves = dict[int, dict[str, torch.Tensor]]


def log_shares(n: int) -> list[float]:
    """Relative ratios of ``n`` pruned layers, first to last: ``0.2 + 0.8 · ln(1 + i) / ln(n)``."""
    if n == 1:
        return [1.0]
    return [LOG_MIN_SHARE + (1 - LOG_MIN_SHARE) * math.log(1 + i) / math.log(n) for i in range(n)]


def removal_order(units: list[Unit]) -> list[Unit]:
    """The order in which :func:`~minillm.plan.remove_lowest` takes ``units`` (lowest score first)."""
    return [units[i] for i in sorted(range(len(units)), key=lambda i: (units[i].score, i))]


def _refuse(target: float) -> UsageError:
    return UsageError(f"cannot remove {target:,.0f} parameters from the scored layers without emptying one; "
                      "lower --ratio or prune more layers (--skip-first/--skip-last)")


# ------------------------------------------------------------------------------------------------ log
def _layer_budgets(totals: list[int], caps: list[int], shares: list[float], target: float) -> list[float]:
    """``min(s · share_i · total_i, cap_i)`` with ``s`` such that the budgets sum to ``target``."""
    if sum(caps) < target:
        raise _refuse(target)

    def budgets(scale: float) -> list[float]:
        return [min(scale * w * t, c) for w, t, c in zip(shares, totals, caps, strict=True)]

    low, high = 0.0, 1.0
    while sum(budgets(high)) < target:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if sum(budgets(middle)) < target else (low, middle)
    return budgets(high)


def _split(budget: float, heads: list[Unit], channels: list[Unit]) -> tuple[int, int, float]:
    """Head units and whole channels for one layer's budget, plus the fraction of a channel left over."""
    head_cost = heads[0].cost if heads else 0
    channel_cost = channels[0].cost if channels else 0
    max_channels = max(len(channels) - 1, 0)
    n_heads = 0
    if heads and not channels:
        n_heads = min(round(budget / head_cost), len(heads) - 1)
    elif heads:
        total = len(heads) * head_cost + len(channels) * channel_cost
        ideal = budget / total * len(heads)
        fitting = [n for n in range(len(heads))
                   if n * head_cost <= budget and budget - n * head_cost <= max_channels * channel_cost]
        n_heads = (min(fitting, key=lambda n: (abs(n - ideal), n)) if fitting
                   else min(math.ceil(budget / head_cost), len(heads) - 1))
    if not channels:
        return n_heads, 0, 0.0
    rest = max(budget - n_heads * head_cost, 0.0) / channel_cost
    n_channels = min(math.floor(rest + 1e-9), max_channels)
    return n_heads, n_channels, rest - n_channels


def log_allocation(head_units: dict[int, list[Unit]], channel_units: dict[int, list[Unit]], target: float
                   ) -> dict[int, set[Unit]]:
    """SlimGPT's log-increasing per-layer ratios, scaled to ``target`` parameters (see the module)."""
    layers = sorted(head_units)
    totals = [sum(u.cost for u in head_units[i]) + sum(u.cost for u in channel_units[i]) for i in layers]
    caps = [layer_capacity(head_units[i], channel_units[i]) for i in layers]
    budgets = _layer_budgets(totals, caps, log_shares(len(layers)), target)
    counts = {i: _split(b, head_units[i], channel_units[i]) for i, b in zip(layers, budgets, strict=True)}
    n_heads = {i: c[0] for i, c in counts.items()}
    n_channels = {i: c[1] for i, c in counts.items()}

    def done() -> int:
        return sum(n_heads[i] * (head_units[i][0].cost if head_units[i] else 0)
                   + n_channels[i] * (channel_units[i][0].cost if channel_units[i] else 0) for i in layers)

    # close the rounding gap one channel at a time: largest remainder first, then the deepest layers
    order = sorted(layers, key=lambda i: (-counts[i][2], -i)) + sorted(layers, reverse=True)
    for i in order:
        if done() >= target:
            break
        if channel_units[i] and n_channels[i] < len(channel_units[i]) - 1:
            n_channels[i] += 1
    while done() < target:  # heads only (no channels to close with), or channels exhausted
        grow = [i for i in reversed(layers) if head_units[i] and n_heads[i] < len(head_units[i]) - 1]
        if not grow:
            raise _refuse(target)
        n_heads[grow[0]] += 1
    return {i: remove_lowest(head_units[i], n_heads[i]) | remove_lowest(channel_units[i], n_channels[i])
            for i in layers}


# ---------------------------------------------------------------------------------------------- error
def removal_groups(head_units: dict[int, list[Unit]], channel_units: dict[int, list[Unit]],
                   head_dim: Callable[[int], int]) -> dict[int, dict[str, list[list[int]]]]:
    """For each layer, the closing projections' input columns of every unit, in removal order."""
    groups: dict[int, dict[str, list[list[int]]]] = {}
    for i in sorted(head_units):
        hd = head_dim(i)
        groups[i] = {
            "attn": [[m * hd + d for m in sorted(u.members) for d in range(hd)]
                     for u in removal_order(head_units[i])],
            "mlp": [list(u.members) for u in removal_order(channel_units[i])],
        }
    return groups


def _options(units: list[Unit], curve: torch.Tensor) -> list[int]:
    """Candidate unit counts of one family: every count for heads and small layers, else about 128
    evenly spaced channel counts (the fix-up afterwards moves single channels)."""
    largest = curve.numel() - 1
    step = max(1, largest // 128) if units[0].kind == "channel" else 1
    return sorted({*range(0, largest + 1, step), largest})


def error_allocation(head_units: dict[int, list[Unit]], channel_units: dict[int, list[Unit]],
                     target: float, curves: Curves) -> dict[int, set[Unit]]:
    """Widths minimising the sum of normalised refit errors for at least ``target`` parameters removed.

    A knapsack over families (each layer's attention and MLP): dynamic programming over the removed
    parameters counted in units of the smallest group's cost (head units rounded to it), then single
    channels are moved where the error changes least until the exact total is within one channel of
    ``target``. Greedy by marginal error per parameter is not enough: it spends the budget on many
    small channels before it sees that one whole head unit would have cost less error.
    """
    families: list[tuple[int, list[Unit], torch.Tensor]] = []
    for i in sorted(head_units):
        for kind, units in (("attn", head_units[i]), ("mlp", channel_units[i])):
            if len(units) > 1:
                families.append((i, units, curves[i][kind][: len(units)].double().cpu()))  # one stays
    if not families:
        raise _refuse(target)
    quantum = min(units[0].cost for _, units, _ in families)
    budget = math.ceil(target / quantum - 1e-9)
    best = torch.full((budget + 1,), math.inf, dtype=torch.float64)
    best[0] = 0.0
    sources = torch.arange(budget + 1)
    choices = []  # per family: (options, chosen option index per reached budget, previous budget)
    for _, units, curve in families:
        options = _options(units, curve)
        step = round(units[0].cost / quantum)
        new = torch.full_like(best, math.inf)
        pick = torch.zeros(budget + 1, dtype=torch.long)
        previous = torch.zeros(budget + 1, dtype=torch.long)
        for o, count in enumerate(options):
            size, error = min(count * step, budget), float(curve[count])
            moved = best[: budget + 1 - size] + error  # reaches size … budget (the last slot: ≥ budget)
            source = sources[: budget + 1 - size].clone()
            lowest, at = best[budget - size:].min(0)  # from budget - size on, everything reaches the budget
            moved[-1], source[-1] = lowest + error, budget - size + at
            better = moved < new[size:]
            new[size:] = torch.where(better, moved, new[size:])
            pick[size:].masked_fill_(better, o)
            previous[size:] = torch.where(better, source, previous[size:])
        best = new
        choices.append((options, pick, previous))
    if not math.isfinite(float(best[budget])):
        raise _refuse(target)
    taken, reached = [0] * len(families), budget
    for f in reversed(range(len(families))):
        options, pick, previous = choices[f]
        taken[f] = options[int(pick[reached])]
        reached = int(previous[reached])
    _fix_up(families, taken, target)
    removed: dict[int, set[Unit]] = {i: set() for i in head_units}
    for (i, units, _), count in zip(families, taken, strict=True):
        removed[i] |= remove_lowest(units, count)
    return removed


def _fix_up(families: list[tuple[int, list[Unit], torch.Tensor]], taken: list[int], target: float) -> None:
    """Single channels in or out (least error change first) until target ≤ removed < target + a channel."""
    channels = [f for f, (_, units, _) in enumerate(families) if units[0].kind == "channel"]
    if not channels:
        return
    cost = families[channels[0]][1][0].cost

    def removed() -> int:
        return sum(units[0].cost * taken[f] for f, (_, units, _) in enumerate(families))

    while removed() < target:
        open_ = [f for f in channels if taken[f] < families[f][2].numel() - 1]
        if not open_:
            return
        f = min(open_, key=lambda f: (float(families[f][2][taken[f] + 1] - families[f][2][taken[f]]), f))
        taken[f] += 1
    while removed() - cost >= target:
        back = [f for f in channels if taken[f] > 0]
        if not back:
            return
        f = max(back, key=lambda f: (float(families[f][2][taken[f]] - families[f][2][taken[f] - 1]), -f))
        taken[f] -= 1


def total_error(curves: Curves, counts: dict[int, Sequence[int]]) -> float:
    """Σ over layers of the attention and MLP curves at ``counts[layer] = (head units, channels)``."""
    return sum(float(curves[i]["attn"][h]) + float(curves[i]["mlp"][c]) for i, (h, c) in counts.items())
