"""Architecture search (``minillm prune --search``): rank uniform architectures of one size by held-out
loss after compensation, and prune to the best.

Why: the axes planner (:mod:`minillm.plan_axes`) cuts every requested axis by one common fraction, but
which mix of depth, heads, hidden size and MLP width loses least at a given size is an empirical question
(Minitron: width beats depth after distillation; on SmolLM2-135M without it, depth beat width). The
search answers it per model, on calibration data:

1. **Enumerate** every uniform architecture — decoder layers kept, query heads per kv group, kv groups
   kept, hidden size — with the MLP width solved for the budget (a multiple of ``--round-to``), and keep
   those whose exact parameter count is within ±2 % (of the model's total) of ``--ratio`` and whose stock
   config can hold them (transformers refuses a hidden size not divisible by the head count). Hidden sizes
   are multiples of ``lcm(--round-to, heads)``, with 64 in place of a ``--round-to`` of 1 (the issue's grid).
   ``--structures`` names the axes the search may cut.
2. **Choose** at most ``--max-candidates`` to rank, in two passes: first one candidate per depth (number
   of layers removed, fewest first; within a depth the most balanced cut: smallest spread of the removed
   fractions of query heads, MLP channels and — where cut — hidden channels); then the remaining slots
   go to the other layouts of the depth that scored best, then the next best (:func:`refine`). A
   heuristic, reported as such: unranked candidates are listed in the table too.
3. **Rank**: the scores (criterion, hidden channels, layers) are computed once on all calibration windows
   and shared; each candidate is planned from them on a copy of the model, compensated and cut on the
   first windows of a ``--search-calib-samples`` subset (default: the whole calibration set), and scored
   by its mean loss on the *last* quarter of the windows, which no ranking compensation sees. With
   ``--search-data`` (:mod:`minillm.search_data`) the loss is taken on windows of that text instead and
   every calibration window (of the subset) compensates each candidate, as the final prune's does.
4. The best is pruned like any plan (compensation on every calibration window, surgery, export): exactly
   ``--architecture <best>``, which the export's recipe records.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from minillm.arch.base import ArchAdapter, LayerShape
from minillm.calibration.data import CalibrationSet
from minillm.errors import UsageError
from minillm.plan import LayerPlan, LayerScores, PrunePlan, check_ratio
from minillm.plan_axes import ParamCounter
from minillm.search_data import check_search_data, split_windows

#: how far (fraction of the model's parameters) a candidate may miss ``--ratio``
SEARCH_TOLERANCE = 0.02
#: hidden-size grid when --round-to is 1
HIDDEN_MULTIPLE = 64
Progress = Callable[[str, int, int], None]
_FIELDS = ("layers", "heads", "kv_heads", "hidden", "mlp")


@dataclass(frozen=True, order=True)
class Architecture:
    """One uniform architecture: decoder layers kept, query and kv heads per layer, hidden size, MLP width."""

    layers: int
    heads: int
    kv_heads: int
    hidden: int
    mlp: int

    def label(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in _FIELDS)

    @classmethod
    def parse(cls, text: str) -> Architecture:
        """``layers=28,heads=6,kv_heads=3,hidden=576,mlp=1280`` (every field, any order)."""
        values: dict[str, int] = {}
        for part in str(text).split(","):
            key, _, value = part.partition("=")
            key = key.strip().replace("-", "_")
            if key not in _FIELDS or not value.strip().isdigit() or int(value) < 1:
                raise UsageError(f"--architecture takes {'=N,'.join(_FIELDS)}=N with positive integers "
                                 f"(got {text!r}), e.g. layers=28,heads=6,kv_heads=3,hidden=576,mlp=1280")
            values[key] = int(value)
        if set(values) != set(_FIELDS):
            missing = ", ".join(f for f in _FIELDS if f not in values)
            raise UsageError(f"--architecture is missing {missing}; give all of {', '.join(_FIELDS)}")
        return cls(**values)


@dataclass
class Candidate:
    """An enumerated architecture, its exact size and (once ranked) its held-out loss and rank."""

    architecture: Architecture
    params: int
    ratio: float
    loss: float | None = None
    rank: int | None = None
    seconds: float | None = None

    def row(self) -> dict[str, Any]:
        return {**asdict(self.architecture), "params": self.params, "ratio": round(self.ratio, 5),
                "loss": None if self.loss is None else round(self.loss, 5), "rank": self.rank,
                "seconds": None if self.seconds is None else round(self.seconds, 1)}


@dataclass
class Space:
    """What the search may change: the model's sizes, the removable layers (least important first) and
    the layers whose widths are cut (the scored ones)."""

    model: nn.Module
    adapter: ArchAdapter
    shapes: dict[int, LayerShape]
    removal_order: list[int]
    width_layers: list[int]
    hidden_scores: torch.Tensor | None
    scores: dict[int, LayerScores]
    total_params: int

    @property
    def base(self) -> LayerShape:
        return self.shapes[self.width_layers[0] if self.width_layers else min(self.shapes)]

    def removed(self, arch: Architecture) -> list[int]:
        return sorted(self.removal_order[: len(self.shapes) - arch.layers])

    def layer_shapes(self, arch: Architecture) -> dict[int, LayerShape]:
        """Shapes of the kept layers under ``arch``."""
        gone = set(self.removed(arch))
        return {i: (LayerShape(arch.heads, arch.kv_heads, s.head_dim, arch.mlp) if i in self.width_layers
                    else s) for i, s in self.shapes.items() if i not in gone}


def build_space(model: nn.Module, adapter: ArchAdapter, shapes: dict[int, LayerShape],
                scores: dict[int, LayerScores], hidden_scores: torch.Tensor | None,
                layer_scores: dict[int, float] | None, total_params: int) -> Space:
    order = sorted(layer_scores, key=lambda i: (layer_scores[i], i)) if layer_scores else []
    return Space(model, adapter, shapes, order, sorted(scores), hidden_scores, scores, total_params)


def _stock(space: Space, arch: Architecture, counter: ParamCounter, cache: dict[tuple, bool]) -> bool:
    """Whether the stock class holds ``arch``: built on the meta device from the would-be config (as
    ``from_pretrained`` would build it), it must have exactly the parameters counted for ``arch``.
    Removing layers only shortens the per-layer config lists, so the check keeps every layer."""
    key = (arch.heads, arch.kv_heads, arch.hidden, arch.mlp)
    if key not in cache:
        cache[key] = _builds(space, arch, counter)
    return cache[key]


def _builds(space: Space, arch: Architecture, counter: ParamCounter) -> bool:
    from minillm.arch.rebuild import stock_class
    from minillm.groups import count_parameters

    if arch.hidden % arch.heads:
        return False  # transformers validates hidden_size % num_attention_heads
    base = space.base
    config = copy.deepcopy(space.model.config)
    if arch.hidden != config.hidden_size:
        config.head_dim = counter.head_dim  # explicit: it no longer follows from hidden / heads
        config.hidden_size = arch.hidden
    if (arch.heads, arch.kv_heads, arch.mlp) != (base.num_heads, base.num_kv_heads, base.intermediate):
        update = space.adapter.uniform_config_update(
            config, LayerShape(arch.heads, arch.kv_heads, counter.head_dim, arch.mlp))
        if update is None:
            return False
        for name, value in update.items():
            setattr(config, name, value)
    try:
        with torch.device("meta"):
            stock = stock_class(space.model)(config)
    except (ValueError, TypeError, RuntimeError):
        return False  # the config class rejects these widths
    shapes = {i: LayerShape(arch.heads, arch.kv_heads, s.head_dim, arch.mlp) if i in space.width_layers else s
              for i, s in space.shapes.items()}
    return count_parameters(stock) == counter.total(arch.hidden, shapes)


def _hidden_options(space: Space, structures: frozenset[str], heads: int, round_to: int, ratio: float
                    ) -> list[int]:
    hidden = int(space.model.config.hidden_size)
    if "hidden" not in structures:
        return [hidden]
    step = math.lcm(round_to if round_to > 1 else HIDDEN_MULTIPLE, heads)
    lowest = (1.0 - ratio - SEARCH_TOLERANCE) * hidden  # params ~linear in hidden: cutting more overshoots
    return [hidden] + [h for h in range(hidden - hidden % step, 0, -step) if lowest <= h < hidden]


def enumerate_candidates(space: Space, ratio: float, structures: frozenset[str], round_to: int = 1
                         ) -> list[Candidate]:
    """Every stock-expressible uniform architecture within ±2 % of ``ratio`` (see the module doc).

    Refuses, in one line naming the fix, when none is.
    """
    check_ratio(ratio)
    counter = ParamCounter(space.model, space.adapter)
    base, n_layers = space.base, len(space.shapes)
    total, target = space.total_params, (1.0 - ratio) * space.total_params
    most_removed = min(len(space.removal_order), n_layers - 1) if "layers" in structures else 0
    widths = bool(space.width_layers)
    head_options = [(base.num_heads, base.num_kv_heads)]
    if "attn" in structures and widths:
        group = base.heads_per_kv
        head_options = [(q * kv, kv) for kv in range(base.num_kv_heads, 0, -1) for q in range(group, 0, -1)]
    cut_mlp = "mlp" in structures and widths
    if cut_mlp and round_to > base.intermediate:
        raise UsageError(f"--round-to {round_to} is larger than the MLP width {base.intermediate}; "
                         "use a smaller --round-to")
    stock: dict[tuple, bool] = {}
    found: list[Candidate] = []
    closest: tuple[float, Architecture | None] = (math.inf, None)

    def size(arch: Architecture) -> int:
        return counter.total(arch.hidden, space.layer_shapes(arch))

    for removed in range(most_removed + 1):
        for heads, kv in head_options:
            for hidden in _hidden_options(space, structures, heads, round_to, ratio):
                arch = Architecture(n_layers - removed, heads, kv, hidden, base.intermediate)
                if cut_mlp:  # params are linear in the MLP width: solve, then round to --round-to
                    full, empty = size(arch), size(Architecture(arch.layers, heads, kv, hidden, 0))
                    per_channel = (full - empty) / base.intermediate
                    ideal = (target - empty) / per_channel if per_channel else base.intermediate
                    options = {min(max(round_to * f(ideal / round_to), round_to), base.intermediate)
                               for f in (math.floor, math.ceil)}
                    arch = min((Architecture(arch.layers, heads, kv, hidden, int(m)) for m in options),
                               key=lambda a: abs(size(a) - target))
                params = size(arch)
                miss = abs(params - target) / total
                if params >= total or not _stock(space, arch, counter, stock):
                    continue
                if miss < closest[0]:
                    closest = (miss, arch)
                if miss <= SEARCH_TOLERANCE:
                    found.append(Candidate(arch, params, 1.0 - params / total))
    if not found:
        near = "" if closest[1] is None else \
            f" (closest: {closest[1].label()}, {1 - size(closest[1]) / total:.3f})"
        raise UsageError(
            f"no uniform architecture is within ±2 % of --ratio {ratio} with --structures "
            f"{','.join(sorted(structures))}{near}; add axes (e.g. --structures attn,mlp,hidden,layers), "
            "use a smaller --round-to or another --ratio")
    return found


def _imbalance(c: Candidate, base: LayerShape, hidden: int, structures: frozenset[str]) -> float:
    a = c.architecture
    fractions = []
    if "attn" in structures:
        fractions.append(1 - a.heads / base.num_heads)
    if "mlp" in structures:
        fractions.append(1 - a.mlp / base.intermediate)
    if a.hidden < hidden:  # (the hidden grid is coarse: an uncut hidden size does not pull the others to 0)
        fractions.append(1 - a.hidden / hidden)
    return max(fractions) - min(fractions) if fractions else 0.0


def _balanced_queues(candidates: Sequence[Candidate], space: Space, structures: frozenset[str]
                     ) -> dict[int, list[Candidate]]:
    """Candidates by number of layers kept, the most balanced width cut first within each."""
    hidden = int(space.model.config.hidden_size)
    groups: dict[int, list[Candidate]] = {}
    for c in candidates:
        groups.setdefault(c.architecture.layers, []).append(c)
    return {k: sorted(group, key=lambda c: (_imbalance(c, space.base, hidden, structures),
                                            -c.architecture.heads, -c.architecture.kv_heads,
                                            -c.architecture.hidden))
            for k, group in groups.items()}


def choose(candidates: Sequence[Candidate], space: Space, structures: frozenset[str], limit: int
           ) -> list[Candidate]:
    """The first pass: the most balanced candidate of each depth, most layers kept first, at most
    ``limit`` (see the module doc; :func:`refine` fills the remaining slots)."""
    if limit < 1:
        raise UsageError(f"--max-candidates must be >= 1 (got {limit})")
    groups = _balanced_queues(candidates, space, structures)
    return [groups[k][0] for k in sorted(groups, reverse=True)][:limit]


def refine(candidates: Sequence[Candidate], measured: Sequence[Candidate], space: Space,
           structures: frozenset[str], limit: int) -> list[Candidate]:
    """Up to ``limit`` more candidates, at the depths whose measured candidates scored best: every
    unmeasured layout of the best depth (most balanced first), then of the next best. Why: one
    candidate per depth (the first pass of :func:`choose`) tells which depth pays; the layouts of
    heads, kv groups and hidden size at that depth are what is left to compare."""
    done = {id(c) for c in measured}
    best_loss: dict[int, float] = {}
    for c in measured:
        if c.loss is not None:
            best_loss[c.architecture.layers] = min(c.loss, best_loss.get(c.architecture.layers, c.loss))
    groups = _balanced_queues([c for c in candidates if id(c) not in done], space, structures)
    chosen: list[Candidate] = []
    for depth in sorted(best_loss, key=lambda k: (best_loss[k], -k)):
        chosen.extend(groups.get(depth, [])[: limit - len(chosen)])
    return chosen


def _layer_plan(index: int, shape: LayerShape, scores: LayerScores, arch: Architecture) -> LayerPlan:
    """Kept groups of one layer: the best ``kv_heads`` kv groups (their query heads' and kv head's scores
    summed, as ``--head-mode kv`` ranks them), in each the best ``heads / kv_heads`` query heads (as
    ``query`` mode), the best ``mlp`` channels; ties go to the lower index, as in :mod:`minillm.plan`."""
    group = shape.heads_per_kv
    heads = scores.heads.double()
    kv_score = [float(heads[k * group:(k + 1) * group].sum() + scores.kv_heads.double()[k])
                for k in range(shape.num_kv_heads)]
    kept_kv = sorted(sorted(range(shape.num_kv_heads), key=lambda k: (kv_score[k], k))
                     [shape.num_kv_heads - arch.kv_heads:])
    per_kv = arch.heads // arch.kv_heads
    kept_heads: list[int] = []
    for k in kept_kv:
        order = torch.argsort(heads[k * group:(k + 1) * group], stable=True)
        kept_heads += sorted(int(k * group + j) for j in order[group - per_kv:])
    channels = list(range(shape.intermediate))
    if arch.mlp < shape.intermediate:
        order = torch.argsort(scores.channels.double(), descending=True, stable=True)
        channels = sorted(int(c) for c in order[: arch.mlp])
    return LayerPlan(index, sorted(kept_heads), kept_kv, channels)


def plan_for(space: Space, arch: Architecture, ratio: float) -> PrunePlan:
    """The plan cutting the model to ``arch``, with the groups, hidden channels and layers the scores rank
    lowest removed."""
    base, hidden = space.base, int(space.model.config.hidden_size)
    if arch.heads % arch.kv_heads or arch.heads > base.num_heads or arch.kv_heads > base.num_kv_heads \
            or arch.heads // arch.kv_heads > base.heads_per_kv:
        raise UsageError(f"--architecture {arch.label()}: the model has {base.num_heads} query heads in "
                         f"{base.num_kv_heads} kv groups; keep at most that many, evenly per kv group")
    wants = {"hidden": arch.hidden != hidden, "layers": arch.layers != len(space.shapes),
             "attn/mlp": (arch.heads, arch.kv_heads, arch.mlp) != (base.num_heads, base.num_kv_heads,
                                                                   base.intermediate)}
    ready = {"hidden": space.hidden_scores is not None, "attn/mlp": bool(space.scores),
             "layers": len(space.removal_order) >= len(space.shapes) - arch.layers}
    for axis, wanted in wants.items():
        if wanted and not ready[axis]:
            raise UsageError(f"--architecture {arch.label()} cuts {axis} beyond what --structures scores; "
                             f"add {axis.replace('/', ',')} to --structures (and check --skip-first/-last)")
    if arch.hidden > hidden or arch.mlp > base.intermediate or arch.layers > len(space.shapes):
        raise UsageError(f"--architecture {arch.label()} is larger than the model; it can only shrink it")
    counter = ParamCounter(space.model, space.adapter)
    if not _stock(space, arch, counter, {}):
        raise UsageError(f"--architecture {arch.label()}: the stock config cannot hold it (hidden size must "
                         "be divisible by the head count); pick another hidden size or head count")
    whole = lambda i, s: LayerPlan(i, list(range(s.num_heads)), list(range(s.num_kv_heads)),
                                   list(range(s.intermediate)))
    layers = [_layer_plan(i, s, space.scores[i], arch) if i in space.width_layers else whole(i, s)
              for i, s in space.shapes.items()]
    kept_hidden = None
    if arch.hidden < hidden and space.hidden_scores is not None:
        order = torch.argsort(space.hidden_scores.double(), descending=True, stable=True)
        kept_hidden = sorted(int(c) for c in order[: arch.hidden])
    removed = set(space.removed(arch))
    params = counter.total(arch.hidden, space.layer_shapes(arch))
    return PrunePlan(head_mode="kv" if arch.kv_heads < base.num_kv_heads else "query", allocation="uniform",
                     layers=layers, params_before=space.total_params, params_after=params, target_ratio=ratio,
                     hidden=kept_hidden,
                     kept_layers=[i for i in sorted(space.shapes) if i not in removed] if removed else None,
                     extra={"architecture": arch.label()})


def rank(space: Space, candidates: Sequence[Candidate], calibration: CalibrationSet,
         search_samples: int | None, compensation: str, damping: float, ratio: float,
         progress: Progress | None = None, total: int | None = None, offset: int = 0,
         held_out: CalibrationSet | None = None, select: str = "plan") -> None:
    """Fill in every candidate's held-out loss (``total``/``offset``: the progress count when the ranking
    runs in several passes; ``held_out``: the ``--search-data`` windows, see
    :func:`~minillm.search_data.split_windows`; ``select``: who chooses the groups during the compensation,
    :func:`minillm.cut.selection`)."""
    from minillm.calibration.forward import mean_loss
    from minillm.cut import cut

    fit, held = split_windows(calibration, search_samples, held_out)
    for done, candidate in enumerate(candidates, offset + 1):
        start = time.perf_counter()
        pruned = copy.deepcopy(space.model)
        # compensated and cut exactly as prune cuts a resident model
        cut(pruned, space.adapter, plan_for(space, candidate.architecture, ratio), fit, compensation, damping,
            select=select)
        candidate.loss = mean_loss(pruned, held)
        del pruned
        candidate.seconds = time.perf_counter() - start
        if progress is not None:
            progress("search: ranking candidates", done, total or len(candidates))


def assign_ranks(candidates: Sequence[Candidate]) -> None:
    """1 = lowest held-out loss; ties by the order measured."""
    order = sorted(range(len(candidates)), key=lambda i: (candidates[i].loss, i))
    for position, i in enumerate(order, 1):
        candidates[i].rank = position


def search(space: Space, calibration: CalibrationSet, ratio: float, structures: frozenset[str],
           round_to: int, max_candidates: int, search_samples: int | None, compensation: str, damping: float,
           progress: Progress | None = None, held_out: CalibrationSet | None = None,
           held_out_source: str | None = None, select: str = "plan") -> tuple[Architecture, dict[str, Any]]:
    """The best architecture and the search's record (candidate table, windows, cost) for the plan;
    ``held_out``: the windows of the ``--search-data`` text ``held_out_source``
    (:func:`~minillm.search_data.held_out_set`)."""
    start = time.perf_counter()
    found = enumerate_candidates(space, ratio, structures, round_to)
    ranked = choose(found, space, structures, max_candidates)  # one per depth first
    total = min(max_candidates, len(found))
    rank(space, ranked, calibration, search_samples, compensation, damping, ratio, progress, total,
         held_out=held_out, select=select)
    more = refine(found, ranked, space, structures, max_candidates - len(ranked))
    rank(space, more, calibration, search_samples, compensation, damping, ratio, progress, total, len(ranked),
         held_out, select)
    ranked = [*ranked, *more]
    assign_ranks(ranked)
    fit, held = split_windows(calibration, search_samples, held_out)
    best = min(ranked, key=lambda c: c.rank or 0).architecture
    rows = sorted(found, key=lambda c: (c.rank is None, c.rank or 0, -c.architecture.layers,
                                        -c.architecture.heads, -c.architecture.hidden))
    n, fitted, held_n = (int(w.input_ids.shape[0]) for w in (calibration, fit, held))
    record = {"best": best.label(), "enumerated": len(found), "ranked": len(ranked),
              "tolerance": SEARCH_TOLERANCE, "fit_windows": fitted, "held_out_windows": held_n,
              "held_out": f"last {held_n} of {n} calibration windows" if held_out is None else
                          f"{held_n} windows of --search-data {held_out_source}",
              "fit": f"all {n} calibration windows" if fitted == n else
                     f"the first {fitted} of {n} calibration windows",
              "search_data": held_out_source if held_out is not None else None,
              "seconds": round(time.perf_counter() - start, 1), "candidates": [c.row() for c in rows]}
    return best, record


def check_search_options(search_on: bool, architecture: str | None, criterion: str, allocation: str,
                         offloaded: bool, search_data: str | None = None,
                         search_data_samples: int | None = None) -> None:
    """What ``--search`` / ``--architecture`` refuse, each in one line, before any scoring."""
    check_search_data(search_on, architecture, search_data, search_data_samples)
    if not (search_on or architecture):
        return
    flag = "--search" if search_on else "--architecture"
    if search_on and architecture:
        raise UsageError("--search chooses the architecture and --architecture fixes it: drop one of them")
    if architecture:
        Architecture.parse(architecture)
    if criterion == "obs":
        raise UsageError(f"{flag} cuts fixed uniform architectures, but --criterion obs re-chooses the "
                         "groups during compensation; use another criterion (e.g. flap)")
    if allocation != "uniform":
        raise UsageError(f"{flag} plans uniform architectures only; use --allocation uniform")
    if offloaded:
        raise UsageError(f"{flag} needs the model in memory (it cuts copies of it); drop --streaming or "
                         "--max-memory/offloading")


def plan_from_run(model: nn.Module, adapter: ArchAdapter, shapes: dict[int, LayerShape],
                  scores: dict[int, LayerScores], hidden_scores: torch.Tensor | None,
                  layer_scores: dict[int, float] | None, total_params: int, calibration: CalibrationSet,
                  run: dict[str, Any], structures: frozenset[str], progress: Progress | None = None,
                  held_out: CalibrationSet | None = None) -> PrunePlan:
    """The plan of a ``--search`` or ``--architecture`` run (``run``: the recipe's settings; ``held_out``:
    the ``--search-data`` windows, :func:`~minillm.search_data.held_out_set`)."""
    from minillm.cut import selection

    space = build_space(model, adapter, shapes, scores, hidden_scores, layer_scores, total_params)
    if run["architecture"]:
        return plan_for(space, Architecture.parse(run["architecture"]), run["ratio"])
    if run["search_data"] is not None and held_out is None:
        raise UsageError("--search-data is set but its windows were not read; load them with "
                         "minillm.search_data.held_out_set and pass held_out=")
    best, record = search(space, calibration, run["ratio"], structures, run["round_to"],
                          run["max_candidates"], run["search_calib_samples"], run["compensation"],
                          run["damping"], progress, held_out, run["search_data"],
                          selection(run["criterion"], run["compensation"], run["reselect"]))
    plan = plan_for(space, best, run["ratio"])
    plan.extra["search"] = record
    return plan
