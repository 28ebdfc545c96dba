"""Hidden-unit criteria: shapes and determinism for all, the math of each checked by hand on tiny LSTMs."""

from __future__ import annotations

import copy

import pytest
import torch

import minillm.lstm.criteria.fms as fms_module
from minillm.calibration.spsa import SpsaConfig, SpsaEstimate
from minillm.lstm.calibrate import AbsMeanStats, activation_means, recording
from minillm.lstm.criteria import CRITERIA, ScoreContext
from minillm.lstm.criteria.fms import fms_per_weight
from minillm.lstm.criteria.group_lasso import group_lasso_penalty
from minillm.lstm.data import batchify, bptt_windows
from minillm.lstm.groups import unit_groups
from minillm.lstm.model import LstmLm, LstmLmConfig
from minillm.lstm.train import TrainConfig
from minillm.registry import UnknownNameError


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny(tie: bool = False, seed: int = 0) -> LstmLm:
    config = LstmLmConfig(vocab_size=25, embed_size=8 if tie else 5, hidden_sizes=(7, 8), dropout=0.0,
                          tie_weights=tie)
    return LstmLm(config, torch.Generator().manual_seed(seed)).eval()


def stream(seed: int = 1, n: int = 400) -> torch.Tensor:
    return torch.randint(25, (n,), generator=torch.Generator().manual_seed(seed))


def context(**kw) -> ScoreContext:
    calib = list(bptt_windows(batchify(stream(), 4), 6))[:3]
    return ScoreContext(calib=calib, spsa=SpsaConfig(steps=3, eps=1e-3, seed=5), **kw)


@pytest.mark.parametrize("name", CRITERIA.names())
@pytest.mark.parametrize("tie", [False, True])
def test_every_criterion_scores_every_unit_deterministically(name: str, tie: bool) -> None:
    model = tiny(tie)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = copy.deepcopy(model)
    first = CRITERIA.get(name)(model, context())
    second = CRITERIA.get(name)(twin, context())
    assert [s.shape for s in first] == [(7,), (8,)]
    assert all(bool(torch.isfinite(s).all()) for s in first)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b)
    for key, value in model.state_dict().items():  # scoring (without a training phase) leaves weights alone
        torch.testing.assert_close(value, before[key], rtol=0, atol=1e-6)


def test_registry_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError, match="Did you mean 'activation'"):
        CRITERIA.get("activaton")


def test_magnitude_is_the_norm_of_everything_a_unit_owns() -> None:
    model = tiny()
    scores = CRITERIA.get("magnitude")(model, context())
    j, hidden = 3, 7
    r0, r1 = model.rnns[0], model.rnns[1]
    rows = [j, hidden + j, 2 * hidden + j, 3 * hidden + j]
    pieces = [r0.weight_ih_l0[rows], r0.weight_hh_l0[rows], r0.bias_ih_l0[rows], r0.bias_hh_l0[rows],
              r0.weight_hh_l0[:, j], r1.weight_ih_l0[:, j]]
    expected = torch.sqrt(sum(p.detach().pow(2).sum() for p in pieces))
    torch.testing.assert_close(scores[0][j], expected)
    # last layer: its consumer is the decoder column
    k = 5
    rows1 = [k, 8 + k, 16 + k, 24 + k]
    pieces1 = [r1.weight_ih_l0[rows1], r1.weight_hh_l0[rows1], r1.bias_ih_l0[rows1], r1.bias_hh_l0[rows1],
               r1.weight_hh_l0[:, k], model.decoder.weight[:, k]]
    expected_last = torch.sqrt(sum(p.detach().pow(2).sum() for p in pieces1))
    torch.testing.assert_close(scores[1][k], expected_last)


@pytest.mark.parametrize("name", ["magnitude", "activation", "fms", "group_lasso"])
def test_a_silenced_unit_ranks_last(name: str) -> None:
    model = tiny(seed=2)
    with torch.no_grad():  # unit 4 of layer 0 owns nothing
        for piece in unit_groups(model.config)[0].slices:
            param = model.get_parameter(piece.name)
            size = param.shape[piece.dim] // piece.gates
            idx = torch.tensor([g * size + 4 for g in range(piece.gates)])
            param.index_fill_(piece.dim, idx, 0.0)
    scores = CRITERIA.get(name)(model, context())
    assert int(scores[0].argmin()) == 4
    assert float(scores[0][4]) == pytest.approx(0.0, abs=1e-6)


def test_activation_is_mean_absolute_hidden_output() -> None:
    model = tiny(seed=3)
    ctx = context()
    scores = CRITERIA.get("activation")(model, ctx)
    outputs = [[], []]
    with torch.no_grad():
        state = None
        for inputs, _ in ctx.calib:
            x = model.embedding(inputs)
            new_state = []
            for layer, rnn in enumerate(model.rnns):
                x, s = rnn(x, None if state is None else state[layer])
                outputs[layer].append(x)
                new_state.append(s)
            state = new_state
    for layer in range(2):
        expected = torch.cat(outputs[layer]).abs().reshape(-1, outputs[layer][0].shape[-1]).mean(0)
        torch.testing.assert_close(scores[layer], expected)


def test_fms_reuses_spsa_and_sums_w_g_xbar_over_the_group(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny(seed=4)
    ctx = context()
    calls: list[tuple[list[torch.Tensor], SpsaEstimate]] = []
    real = fms_module.estimate_gradient

    def spy(params, loss_fn, config, on_step=None):
        estimate = real(params, loss_fn, config, on_step)
        calls.append((list(params), estimate))
        return estimate

    monkeypatch.setattr(fms_module, "estimate_gradient", spy)
    scores = CRITERIA.get("fms")(model, ctx)
    assert len(calls) == 1
    params, estimate = calls[0]
    assert estimate.forward_passes == 2 * ctx.spsa.steps
    grads = {id(p): estimate.gradient(i, p) for i, p in enumerate(params)}
    means = activation_means(model, ctx.calib)

    def fms(param, xbar=None):
        value = (param.detach() * grads[id(param)]).abs()
        return value if xbar is None else value * xbar[None, :]

    j, hidden = 2, 7
    rows = [j, hidden + j, 2 * hidden + j, 3 * hidden + j]
    r0, r1 = model.rnns[0], model.rnns[1]
    expected = (
        fms(r0.weight_ih_l0, means["rnn0.in"])[rows].sum()
        + fms(r0.weight_hh_l0, means["rnn0.out"])[rows].sum()
        + fms(r0.bias_ih_l0)[rows].sum()
        + fms(r0.bias_hh_l0)[rows].sum()
        + fms(r0.weight_hh_l0, means["rnn0.out"])[:, j].sum()
        + fms(r1.weight_ih_l0, means["rnn1.in"])[:, j].sum()
    )
    torch.testing.assert_close(scores[0][j], expected, rtol=1e-5, atol=1e-8)


def test_fms_per_weight_by_hand() -> None:
    w = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    g = torch.tensor([[0.1, 0.2], [-0.4, 3.0]])
    x = torch.tensor([2.0, 0.5])
    torch.testing.assert_close(fms_per_weight(w, g, x), torch.tensor([[0.2, 0.2], [0.4, 0.0]]))
    torch.testing.assert_close(fms_per_weight(w, g, None), torch.tensor([[0.1, 0.4], [0.2, 0.0]]))
    with pytest.raises(ValueError):
        fms_per_weight(w, g, torch.ones(3))


def test_group_lasso_phase_shrinks_unit_groups() -> None:
    model = tiny(seed=5)
    groups = unit_groups(model.config)
    regularize = TrainConfig(epochs=1, max_steps=15, lr=5e-3, batch_size=4, bptt=6)
    plain, regularised = copy.deepcopy(model), copy.deepcopy(model)
    CRITERIA.get("group_lasso")(plain, context(train_ids=stream(7), regularize=regularize, group_lasso=0.0))
    scores = CRITERIA.get("group_lasso")(regularised, context(train_ids=stream(7), regularize=regularize,
                                                              group_lasso=0.05))
    with torch.no_grad():
        shrunk, reference = group_lasso_penalty(regularised, groups), group_lasso_penalty(plain, groups)
    assert float(shrunk) < 0.9 * float(reference)
    torch.testing.assert_close(scores[0], CRITERIA.get("magnitude")(regularised, context())[0])
    with pytest.raises(ValueError, match="training data"):
        CRITERIA.get("group_lasso")(tiny(), context(regularize=regularize))


def test_calibration_hooks_are_always_removed() -> None:
    model = tiny()

    def hook_count() -> int:
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    activation_means(model, context().calib)
    assert hook_count() == 0
    with pytest.raises(IndexError):
        with recording(model, AbsMeanStats()):
            assert hook_count() == 3
            model(torch.full((3, 2), 99))  # out-of-range id raises inside the hooked forward
    assert hook_count() == 0
