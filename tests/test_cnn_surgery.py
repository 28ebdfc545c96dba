"""Physical removal equals the masked dense model; exports rebuild the pruned net exactly."""

from __future__ import annotations

import pytest
import torch
from cnn_helpers import TINY_RESNET, TINY_VGG, single_thread, tiny_batch, tiny_model  # noqa: F401  (autouse fixture)

from minillm.vision.export import load_model, save_model
from minillm.vision.flops import CostModel
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.masks import masked, plan_masks
from minillm.vision.models import arch_spec, build_model, default_spec
from minillm.vision.plan import PrunePlan, global_plan
from minillm.vision.surgery import apply_plan


def _random_plan(groups, seed: int, frac: float) -> PrunePlan:
    g = torch.Generator().manual_seed(seed)
    pruned = {}
    for grp in groups:
        k = max(1, min(grp.size - 1, int(frac * grp.size)))
        pruned[grp.name] = sorted(torch.randperm(grp.size, generator=g)[:k].tolist())
    return PrunePlan(pruned=pruned, group_sizes={grp.name: grp.size for grp in groups})


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VGG], ids=["resnet", "vgg"])
@pytest.mark.parametrize("seed", [0, 1])
def test_pruned_equals_masked_dense(spec, seed):
    model = tiny_model(spec, seed)
    x, _ = tiny_batch(seed=seed)
    groups = channel_groups(model, build_graph(model, x[:1]))
    plan = _random_plan(groups, seed, 0.4)
    pruned = apply_plan(model, plan, x[:1])
    with torch.no_grad():
        with masked(model, plan_masks(model, groups, plan.pruned)):
            ref = model(x)
        out = pruned(x)
        dense = model(x)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert not torch.allclose(out, dense, atol=1e-3)  # the plan did change the function
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())


def test_resnet_residual_stream_is_one_group():
    """Residual-coupled channels are pruned together: each stage stream is one group."""
    model = tiny_model(TINY_RESNET)
    x, _ = tiny_batch()
    groups = {g.name: g for g in channel_groups(model, build_graph(model, x[:1]))}
    stream0 = groups["conv1"]
    producers = {name for name, _ in stream0.producers}
    assert {"conv1", "bn1", "stages.0.0.conv2", "stages.0.1.conv2", "stages.0.1.bn2"} <= producers
    assert {"stages.0.0.conv1", "stages.0.1.conv1", "stages.1.0.conv1", "stages.1.0.shortcut.0"} <= set(
        stream0.consumers
    )
    last = groups["stages.2.0.shortcut.0"]
    assert "fc" in last.consumers and "stages.2.1.conv1" in last.consumers
    # 3 streams + one inner group per block (5 blocks); the output layer is never a group
    assert len(groups) == 3 + 5
    assert all("fc" != name for g in groups.values() for name, _ in g.producers)


@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VGG], ids=["resnet", "vgg"])
def test_export_round_trip_rebuilds_pruned_net(spec, tmp_path):
    model = tiny_model(spec, 3).float()
    x, _ = tiny_batch(dtype=torch.float32)
    groups = channel_groups(model, build_graph(model, x[:1]))
    cost = CostModel(model, groups, x)
    scores = {g.name: torch.arange(g.size, dtype=torch.float32) for g in groups}
    plan = global_plan(scores, groups, cost, 0.4)
    pruned = apply_plan(model, plan, x[:1])
    out_dir = save_model(pruned, tmp_path / "export", {"plan": plan.__dict__}, name=spec["name"])
    loaded, config = load_model(out_dir)
    assert config["spec"] == arch_spec(pruned, spec["name"])
    assert config["spec"] != spec  # widths changed
    assert PrunePlan(**config["meta"]["plan"]) == plan
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned.eval()(x))
    # overwriting an export is atomic and leaves no temporary folders behind
    save_model(pruned, out_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_export_refuses_foreign_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        save_model(tiny_model(TINY_VGG), tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("arch", ["resnet20", "resnet32", "resnet56", "vgg11", "vgg16"])
def test_named_architectures(arch):
    spec = default_spec(arch, in_channels=3, num_classes=10)
    model = build_model(spec, seed=0)
    assert arch_spec(model, arch) == spec
    n_params = sum(p.numel() for p in model.parameters())
    # ResNet-20/32/56 with projection shortcuts: the paper's 0.27M/0.46M/0.85M plus two 1x1 convs + BN
    expected = {"resnet20": 272474, "resnet32": 466906, "resnet56": 855770}
    if arch in expected:
        assert n_params == expected[arch]


def test_build_model_does_not_touch_global_rng():
    torch.manual_seed(123)
    a = torch.rand(1)
    torch.manual_seed(123)
    build_model(default_spec("resnet20"), seed=7)
    assert torch.equal(torch.rand(1), a)
    w1 = build_model(default_spec("resnet20"), seed=7).conv1.weight
    w2 = build_model(default_spec("resnet20"), seed=7).conv1.weight
    assert torch.equal(w1, w2)
