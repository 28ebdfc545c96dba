"""FLOPs (conv/linear multiply-accumulates) and parameter counts against hand-computed values."""

from __future__ import annotations

import pytest
import torch
from cnn_helpers import TINY_RESNET, TINY_VGG, single_thread, tiny_model  # noqa: F401  (autouse fixture)

from minillm.vision.flops import CostModel, count_flops, count_params
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.models import build_model
from minillm.vision.plan import PrunePlan
from minillm.vision.surgery import apply_plan

SMALL_VGG = {"arch": "vgg", "name": "v", "in_channels": 1, "num_classes": 3, "cfg": [4, "M", 6]}
SMALL_RESNET = {
    "arch": "resnet",
    "name": "r",
    "in_channels": 1,
    "num_classes": 2,
    "stage_widths": [2, 3],
    "block_widths": [[3], [2]],
}


def test_vgg_counts_by_hand():
    model = build_model(SMALL_VGG, seed=0)
    x = torch.zeros(1, 1, 8, 8)
    # conv 1->4 on 8x8: 64*9*1*4; pool to 4x4; conv 4->6: 16*9*4*6; linear 6->3
    assert count_flops(model, x) == 64 * 9 * 4 + 16 * 9 * 4 * 6 + 6 * 3 == 5778
    # conv weights 36 + 216, BN 2*4 + 2*6, linear 18 + 3 bias
    assert count_params(model) == 36 + 8 + 216 + 12 + 21 == 293


def test_resnet_counts_by_hand():
    model = build_model(SMALL_RESNET, seed=0)
    x = torch.zeros(1, 1, 4, 4)
    stem = 16 * 9 * 1 * 2
    block0 = 16 * 9 * 2 * 3 + 16 * 9 * 3 * 2
    block1 = 4 * 9 * 2 * 2 + 4 * 9 * 2 * 3 + 4 * 1 * 2 * 3  # stride 2: 2x2 outputs; 1x1 projection
    assert count_flops(model, x) == stem + block0 + block1 + 3 * 2 == 2406
    params = (18 + 4) + (54 + 6 + 54 + 4) + (36 + 4 + 54 + 6 + 6 + 6) + (6 + 2)
    assert count_params(model) == params == 260


def test_vgg_pruned_counts_by_hand():
    model = build_model(SMALL_VGG, seed=0)
    x = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(model, build_graph(model, x))
    plan = PrunePlan(
        pruned={"features.0": [1], "features.4": [0, 5]}, group_sizes={g.name: g.size for g in groups}
    )
    cost = CostModel(model, groups, x)
    removed = {"features.0": 1, "features.4": 2}
    flops = 64 * 9 * 1 * 3 + 16 * 9 * 3 * 4 + 4 * 3
    params = 27 + 6 + 108 + 8 + 12 + 3
    assert cost.flops(removed) == flops == 3468
    assert cost.params(removed) == params == 164
    pruned = apply_plan(model, plan, x)
    assert count_flops(pruned, x) == flops
    assert count_params(pruned) == params


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VGG], ids=["resnet", "vgg"])
def test_cost_model_predicts_surgery(spec):
    model = tiny_model(spec, 0, torch.float32)
    x = torch.zeros(1, 1, 8, 8)
    groups = channel_groups(model, build_graph(model, x))
    cost = CostModel(model, groups, x)
    assert cost.flops() == count_flops(model, x) and cost.params() == count_params(model)
    pruned_idx = {g.name: list(range(0, g.size - 1, 2)) for g in groups}
    plan = PrunePlan(pruned=pruned_idx, group_sizes={g.name: g.size for g in groups})
    pruned = apply_plan(model, plan, x)
    removed = {k: len(v) for k, v in pruned_idx.items()}
    assert count_flops(pruned, x) == cost.flops(removed)
    assert count_params(pruned) == cost.params(removed)
    # parameters agree with Torch-Pruning's own counter
    tp = pytest.importorskip("torch_pruning")
    assert tp.utils.count_ops_and_params(pruned, x)[1] == count_params(pruned)
