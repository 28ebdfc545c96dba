"""IFSO: finite-difference Hessian-vector products vs double backward, and the formula vs explicit
Hessian blocks on a tiny net."""

from __future__ import annotations

import pytest
import torch
from cnn_helpers import TINY_RESNET, single_thread, tiny_batch, tiny_model  # noqa: F401  (autouse fixture)
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from minillm.vision.criteria.base import ScoringContext
from minillm.vision.criteria.ifso import IfsoCriterion, ifso_batch_scores
from minillm.vision.groups import build_graph, channel_groups
from minillm.vision.hvp import exact_hvp, fd_hvp
from minillm.vision.masks import masked, ones_masks

MICRO_VGG = {"arch": "vgg", "name": "micro", "in_channels": 1, "num_classes": 3, "cfg": [3, "M", 4]}


def _setup(spec, n=5, size=8):
    model = tiny_model(spec, 0)
    x, y = tiny_batch(n=n, size=size, classes=spec["num_classes"])
    groups = channel_groups(model, build_graph(model, x[:1]))
    masks = ones_masks(model, groups, requires_grad=True)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    names = list(masks)

    def loss() -> torch.Tensor:
        with masked(model, masks):
            return F.cross_entropy(model(x), y)

    return model, groups, masks, names, weights, loss, x, y


@pytest.mark.parametrize("direction", ["mask->weight", "weight->mask"])
def test_fd_hvp_matches_double_backward(direction):
    _, _, masks, names, weights, loss, _, _ = _setup(TINY_RESNET)
    m = [masks[n] for n in names]
    g = torch.Generator().manual_seed(0)
    if direction == "mask->weight":  # H_wm v
        perturb, wrt = m, weights
    else:  # H_mw v
        perturb, wrt = weights, m
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in perturb]
    before = [p.detach().clone() for p in perturb]
    fd = fd_hvp(loss, perturb, wrt, v, r=1e-4)
    exact = exact_hvp(loss, perturb, wrt, v)
    assert all(torch.equal(p, b) for p, b in zip(perturb, before, strict=True))  # restored bit-exactly
    num = sum(((a - b) ** 2).sum() for a, b in zip(fd, exact, strict=True)).sqrt()
    den = sum((b**2).sum() for b in exact).sqrt()
    assert den > 0
    assert num / den < 1e-6


@pytest.mark.parametrize("include_hmm", [False, True])
def test_ifso_formula_against_explicit_hessian_blocks(include_hmm):
    """½[(α H_mm − H_mw H_ww⁻¹ H_wm) 1] with H_ww⁻¹ = I/λ, from full Hessian matrices."""
    lam = 5e-3
    model, _, masks, names, weights, loss, x, y = _setup(MICRO_VGG, n=4, size=4)
    wnames = [n for n, p in model.named_parameters() if any(p is w for w in weights)]
    params = dict(model.named_parameters())
    wshapes = [p.shape for p in weights]
    mshapes = [masks[n].shape for n in names]

    def full_loss(wflat: torch.Tensor, mflat: torch.Tensor) -> torch.Tensor:
        ws = dict(zip(wnames, torch.split(wflat, [s.numel() for s in wshapes]), strict=True))
        ws = {k: v.view(s) for (k, v), s in zip(ws.items(), wshapes, strict=True)}
        ms = dict(zip(names, torch.split(mflat, [s.numel() for s in mshapes]), strict=True))
        with masked(model, ms):
            return F.cross_entropy(functional_call(model, {**params, **ws}, (x,)), y)

    w0 = torch.cat([w.detach().flatten() for w in weights])
    m0 = torch.ones(sum(s.numel() for s in mshapes), dtype=w0.dtype)
    (_, _), (h_mw, h_mm) = torch.autograd.functional.hessian(full_loss, (w0, m0), vectorize=True)
    h_wm = h_mw.T
    ones = torch.ones_like(m0)
    expected = 0.5 * ((h_mm @ ones if include_hmm else 0) - h_mw @ (h_wm @ ones) / lam)

    got = ifso_batch_scores(loss, weights, [masks[n] for n in names], lam, "exact", include_hmm=include_hmm)
    assert torch.allclose(torch.cat([g.flatten() for g in got]), expected, rtol=1e-8, atol=1e-10)
    got_fd = ifso_batch_scores(loss, weights, [masks[n] for n in names], lam, "fd", 1e-4, include_hmm)
    assert torch.allclose(torch.cat([g.flatten() for g in got_fd]), expected, rtol=1e-4, atol=1e-6)


def test_ifso_criterion_scores_every_group_and_restores_model():
    model, groups, *_ = _setup(TINY_RESNET)
    x, y = tiny_batch(n=8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    ctx = ScoringContext(
        model=model, groups=groups, batches=[(x[:4], y[:4]), (x[4:], y[4:])], weight_decay=1e-3
    )
    crit = IfsoCriterion(hvp="fd")
    crit.calibrate(ctx)
    for g in groups:
        s = crit(g.tp_group)
        assert s.shape == (g.size,) and torch.isfinite(s).all() and (s >= 0).all()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [p.requires_grad for p in model.parameters()] == flags
    assert not any(m._forward_pre_hooks for m in model.modules())  # no hook left behind
    # λ only rescales the default (H_mm-free) score, so the ranking is λ-independent
    crit2 = IfsoCriterion(hvp="exact", weight_decay=1e-1)
    crit2.calibrate(ctx)
    crit3 = IfsoCriterion(hvp="exact", weight_decay=1e-3)
    crit3.calibrate(ctx)
    for g in groups:
        assert torch.allclose(crit2(g.tp_group) * 100, crit3(g.tp_group), rtol=1e-5)


def test_ifso_needs_weight_decay():
    model, groups, *_ = _setup(TINY_RESNET)
    x, y = tiny_batch()
    ctx = ScoringContext(model=model, groups=groups, batches=[(x, y)], weight_decay=0.0)
    with pytest.raises(ValueError, match="weight decay"):
        IfsoCriterion().calibrate(ctx)
