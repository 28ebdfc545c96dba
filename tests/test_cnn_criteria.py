"""Every registered CNN criterion: one row of a parametrised matrix, plus each one's defining property."""

from __future__ import annotations

import pytest
import torch
from cnn_helpers import TINY_RESNET, TINY_VGG, single_thread, tiny_batch, tiny_model  # noqa: F401
from torch import nn
from torch.nn import functional as F

from minillm.registry import UnknownNameError
from minillm.vision.criteria import CRITERIA
from minillm.vision.criteria.base import ScoringContext
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.masks import masked, plan_masks


def _ctx(spec, seed=0, dtype=torch.float64):
    model = tiny_model(spec, seed, dtype)
    x, y = tiny_batch(n=8, seed=seed, dtype=dtype)
    groups = channel_groups(model, build_graph(model, x[:1]))
    return ScoringContext(
        model=model,
        groups=groups,
        batches=[(x[:4], y[:4]), (x[4:], y[4:])],
        weight_decay=1e-3,
        generator=torch.Generator().manual_seed(seed),
        loss_fn=F.cross_entropy,
    )


@pytest.mark.parametrize("name", CRITERIA.names())
@pytest.mark.parametrize("spec", [TINY_RESNET, TINY_VGG], ids=["resnet", "vgg"])
def test_every_criterion_scores_every_group(name, spec):
    ctx = _ctx(spec)
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    crit = CRITERIA.get(name)()
    crit.calibrate(ctx)
    for g in ctx.groups:
        s = crit(g.tp_group)
        assert s.shape == (g.size,)
        assert torch.isfinite(s).all() and (s >= 0).all()
    assert all(torch.equal(v, ctx.model.state_dict()[k]) for k, v in before.items())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in ctx.model.modules())


def test_registry_suggests_close_names():
    with pytest.raises(UnknownNameError, match="Did you mean 'ifso'"):
        CRITERIA.get("ifs0")
    assert CRITERIA.names() == ["bn-scale", "ifso", "l1", "random", "taylor"]


def test_l1_is_filter_norm_over_group_mean():
    ctx = _ctx(TINY_VGG)
    crit = CRITERIA.get("l1")()
    g = next(g for g in ctx.groups if g.name == "features.0")
    w = dict(ctx.model.named_modules())["features.0"].weight
    raw = w.abs().sum(dim=(1, 2, 3))
    assert torch.allclose(crit(g.tp_group).double(), raw / raw.mean(), rtol=1e-6)
    assert torch.allclose(CRITERIA.get("l1")(normalise=False)(g.tp_group).double(), raw, rtol=1e-6)


def test_l1_averages_producers_of_a_residual_stream():
    ctx = _ctx(TINY_RESNET)
    g = next(g for g in ctx.groups if g.name == "conv1")
    mods = dict(ctx.model.named_modules())
    convs = [n for n, k in g.producers if k == "conv"]
    expected = torch.stack([mods[n].weight.abs().flatten(1).sum(1) for n in convs]).mean(0)
    got = CRITERIA.get("l1")(normalise=False)(g.tp_group)
    assert torch.allclose(got.double(), expected, rtol=1e-6)


def test_bn_scale_is_mean_abs_gamma():
    ctx = _ctx(TINY_RESNET)
    g = next(g for g in ctx.groups if g.name == "conv1")
    mods = dict(ctx.model.named_modules())
    bns = [n for n, k in g.producers if k == "bn"]
    expected = torch.stack([mods[n].weight.abs() for n in bns]).mean(0)
    assert torch.allclose(CRITERIA.get("bn-scale")()(g.tp_group).double(), expected, rtol=1e-6)


def test_taylor_is_first_order_loss_change_of_removing_a_channel():
    """|ΔL| of zeroing one channel at all its readers ≈ Taylor score (checked by finite difference)."""
    ctx = _ctx(TINY_RESNET)
    ctx.batches = ctx.batches[:1]
    crit = CRITERIA.get("taylor")()
    crit.calibrate(ctx)
    x, y = ctx.batches[0]
    for g in ctx.groups[:3]:
        score = crit(g.tp_group)
        for c in range(g.size):
            masks = plan_masks(ctx.model, ctx.groups, {})
            eps = 1e-6  # scale channel c by (1 - eps) at every reader: ΔL ≈ -eps * Σ_k ∂L/∂m_kc
            for name in g.consumers:
                masks[name][c] = 1 - eps
            with torch.no_grad(), masked(ctx.model, masks):
                moved = F.cross_entropy(ctx.model(x), y)
            base = F.cross_entropy(ctx.model(x), y).detach()
            assert abs(float(moved - base) / eps) == pytest.approx(float(score[c]), rel=1e-3, abs=1e-7)


def test_random_is_reproducible_from_the_generator_only():
    def run(seed):
        ctx = _ctx(TINY_VGG)
        ctx.generator = torch.Generator().manual_seed(seed)
        crit = CRITERIA.get("random")()
        crit.calibrate(ctx)
        return torch.cat([crit(g.tp_group) for g in ctx.groups])

    torch.manual_seed(0)
    a = run(5)
    torch.manual_seed(1)
    assert torch.equal(a, run(5))
    assert not torch.equal(a, run(6))


def test_data_criteria_need_batches():
    ctx = _ctx(TINY_VGG)
    ctx.batches = []
    for name in ("ifso", "taylor"):
        with pytest.raises(ValueError, match="calibration batches"):
            CRITERIA.get(name)().calibrate(ctx)
    assert isinstance(ctx.model, nn.Module)
