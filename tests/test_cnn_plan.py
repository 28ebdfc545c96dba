"""Global ranking under FLOPs/parameter targets, and the plan's JSON round trip."""

from __future__ import annotations

import pytest
import torch
from cnn_helpers import TINY_RESNET, TINY_VGG, single_thread, tiny_model  # noqa: F401

from minillm.vision.flops import CostModel
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.plan import PrunePlan, global_plan


def _setup(spec):
    model = tiny_model(spec, 0, torch.float32)
    x = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(model, build_graph(model, x))
    return groups, CostModel(model, groups, x)


@pytest.mark.parametrize("kind", ["flops", "params"])
@pytest.mark.parametrize("ratio", [0.2, 0.5])
def test_plan_reaches_target_and_no_further_than_one_channel(kind, ratio):
    groups, cost = _setup(TINY_RESNET)
    g = torch.Generator().manual_seed(0)
    scores = {grp.name: torch.rand(grp.size, generator=g) for grp in groups}
    plan = global_plan(scores, groups, cost, ratio, kind)
    removed = {k: len(v) for k, v in plan.pruned.items()}
    dense = cost.metric(kind)
    assert cost.metric(kind, removed) <= (1 - ratio) * dense
    assert plan.achieved_ratio == pytest.approx(1 - cost.metric(kind, removed) / dense)
    # the last channel taken was needed: putting it back misses the target
    last_group = max(plan.pruned, key=lambda k: max(float(scores[k][i]) for i in plan.pruned[k]))
    fewer = dict(removed, **{last_group: removed[last_group] - 1})
    assert cost.metric(kind, fewer) > (1 - ratio) * dense
    for grp in groups:
        assert len(plan.pruned.get(grp.name, [])) <= int(0.9 * grp.size)


def test_plan_removes_globally_lowest_scores_first():
    groups, cost = _setup(TINY_VGG)
    # distinct scores: group i gets values i*100 + c, so whole low groups go first
    scores = {grp.name: torch.arange(grp.size, dtype=torch.float32) + 100 * i for i, grp in enumerate(groups)}
    plan = global_plan(scores, groups, cost, 0.1, max_group_ratio=0.5)
    first = groups[0]
    assert plan.pruned[first.name] == list(range(len(plan.pruned[first.name])))
    taken = [float(scores[k][i]) for k, v in plan.pruned.items() for i in v]
    kept_first = [float(s) for s in scores[first.name][len(plan.pruned[first.name]) :]]
    # everything taken from later groups scores above the kept channels of the first only if the cap hit
    if any(k != first.name for k in plan.pruned):
        assert len(plan.pruned[first.name]) == int(0.5 * first.size)
    assert max(taken) >= min(taken) and kept_first


def test_sqrt_flops_normalisation_changes_order_by_cost():
    groups, cost = _setup(TINY_VGG)
    scores = {grp.name: torch.ones(grp.size) for grp in groups}
    plain = global_plan(scores, groups, cost, 0.05)
    normed = global_plan(scores, groups, cost, 0.05, cost_norm="sqrt-flops")
    assert normed.meta["cost_norm"] == "sqrt-flops"
    # with equal scores, sqrt-flops prefers the channels that save the most FLOPs
    first_normed = next(iter(normed.pruned))
    savings = {g.name: cost.flops() - cost.flops({g.name: 1}) for g in groups}
    assert savings[first_normed] == max(savings.values())
    assert plain.pruned != normed.pruned or len(groups) == 1


def test_plan_json_round_trip_and_errors():
    groups, cost = _setup(TINY_RESNET)
    scores = {grp.name: torch.linspace(0, 1, grp.size) for grp in groups}
    plan = global_plan(scores, groups, cost, 0.3, criterion="l1")
    again = PrunePlan.from_json(plan.to_json())
    assert again == plan and again.to_json() == plan.to_json()
    with pytest.raises(ValueError, match="in \\(0, 1\\)"):
        global_plan(scores, groups, cost, 1.0)
    with pytest.raises(ValueError, match="cannot remove"):
        global_plan(scores, groups, cost, 0.95, max_group_ratio=0.5)
    with pytest.raises(ValueError, match="expected"):
        global_plan({**scores, groups[0].name: torch.ones(1)}, groups, cost, 0.3)


def test_uniform_allocation_cuts_every_group_alike():
    groups, cost = _setup(TINY_RESNET)
    g = torch.Generator().manual_seed(1)
    # wildly different scales per group: the global ranking would empty the low-scale groups first
    scores = {grp.name: torch.rand(grp.size, generator=g) * 10.0**i for i, grp in enumerate(groups)}
    plan = global_plan(scores, groups, cost, 0.3, allocation="uniform")
    fractions = [len(plan.pruned.get(grp.name, [])) / grp.size for grp in groups]
    assert max(fractions) - min(fractions) <= max(1 / grp.size for grp in groups) + 1e-9
    # inside a group the lowest-scoring channels go
    for grp in groups:
        idx = plan.pruned.get(grp.name, [])
        if idx:
            kept = [c for c in range(grp.size) if c not in idx]
            assert scores[grp.name][idx].max() <= scores[grp.name][kept].min()
    assert plan.meta["allocation"] == "uniform"
    with pytest.raises(ValueError, match="allocation"):
        global_plan(scores, groups, cost, 0.3, allocation="layerwise")
