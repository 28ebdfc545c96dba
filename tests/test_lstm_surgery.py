"""Hidden-unit surgery on LSTMs: the smaller model must compute exactly what the masked dense one does."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from minillm.lstm.groups import per_unit, unit_groups, unit_positions
from minillm.lstm.model import LstmLm, LstmLmConfig
from minillm.lstm.plan import PrunePlan, kept_count, plan_from_scores
from minillm.lstm.surgery import apply_plan, check_fused, mask_plan, prune_lstm, reference_lstm


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The box is shared: OpenMP barriers across busy cores make tiny LSTM calls 100× slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_lm(tie: bool, seed: int = 0, hidden: tuple[int, ...] = (12, 8)) -> LstmLm:
    embed = hidden[-1] if tie else 6
    config = LstmLmConfig(vocab_size=30, embed_size=embed, hidden_sizes=hidden, dropout=0.0, tie_weights=tie)
    return LstmLm(config, torch.Generator().manual_seed(seed)).eval()


def random_plan(model: LstmLm, keep_ratio: float, seed: int) -> PrunePlan:
    g = torch.Generator().manual_seed(seed)
    return plan_from_scores([torch.rand(h, generator=g) for h in model.config.hidden_sizes], keep_ratio)


def ids(seed: int, steps: int = 9, batch: int = 3) -> torch.Tensor:
    return torch.randint(30, (steps, batch), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("keep_ratio", [0.75, 0.5, 0.25])
def test_pruned_lm_equals_masked_dense_lm(tie: bool, keep_ratio: float) -> None:
    model = tiny_lm(tie, seed=1)
    plan = random_plan(model, keep_ratio, seed=2)
    pruned, masked = apply_plan(model, plan), mask_plan(model, plan)
    assert pruned.config.hidden_sizes == tuple(kept_count(h, keep_ratio) for h in (12, 8))
    assert [rnn.hidden_size for rnn in pruned.rnns] == list(plan.kept_sizes)
    x = ids(3)
    # carry the state over two windows: the removed units must stay silent across windows too
    out_p, state_p = pruned(x)
    out_m, state_m = masked(x)
    out_p2, _ = pruned(x.flip(0), state_p)
    out_m2, _ = masked(x.flip(0), state_m)
    assert out_p.dtype == torch.float32
    torch.testing.assert_close(out_p, out_m, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_p2, out_m2, rtol=0, atol=1e-5)
    # the kept units' hidden states are the masked model's states at the kept positions
    for layer, ((h_p, c_p), (h_m, c_m)) in enumerate(zip(state_p, state_m, strict=True)):
        keep = plan.keep_tensor(layer)
        torch.testing.assert_close(h_p, h_m[..., keep], rtol=0, atol=1e-6)
        torch.testing.assert_close(c_p, c_m[..., keep], rtol=0, atol=1e-6)


def test_zeroing_gate_rows_alone_silences_units_exactly() -> None:
    """σ(0)=½, tanh(0)=0 ⇒ c and h of a unit with zero gate rows stay 0: removal is exact (untied)."""
    model = tiny_lm(tie=False, seed=4)
    plan = random_plan(model, 0.5, seed=5)
    rows_only = mask_plan(model, plan, only_rows=True)
    _, state = rows_only(ids(6))
    for layer, (h, c) in enumerate(state):
        dropped = sorted(set(range(model.config.hidden_sizes[layer])) - set(plan.keep[layer]))
        assert h[..., dropped].abs().max() == 0 and c[..., dropped].abs().max() == 0
    torch.testing.assert_close(apply_plan(model, plan)(ids(6))[0], rows_only(ids(6))[0], rtol=0, atol=1e-5)


def test_multilayer_nn_lstm_surgery_keeps_gate_layout() -> None:
    g = torch.Generator().manual_seed(7)
    lstm = nn.LSTM(5, 10, num_layers=3)
    with torch.no_grad():
        for p in lstm.parameters():
            p.uniform_(-0.5, 0.5, generator=g)
    keep = [torch.tensor(k) for k in ([0, 3, 4, 8], [1, 2, 6, 9], [0, 5, 7, 9])]
    keep_input = torch.tensor([0, 2, 4])
    small = prune_lstm(lstm, keep, keep_input)
    assert (small.input_size, small.hidden_size, small.num_layers) == (3, 4, 3)
    # masked reference: zero the dropped units' gate rows, the dropped inputs' columns
    masked = nn.LSTM(5, 10, num_layers=3)
    masked.load_state_dict(lstm.state_dict())
    with torch.no_grad():
        dropped_in = torch.tensor([1, 3])
        masked.weight_ih_l0[:, dropped_in] = 0
        for layer, kept in enumerate(keep):
            dropped = torch.tensor(sorted(set(range(10)) - set(kept.tolist())))
            rows = unit_positions(dropped, 10, 4)
            for kind in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(masked, f"{kind}_l{layer}")[rows] = 0
    x = torch.randn(6, 2, 5, generator=g)
    out_small, (h_small, _) = small(x[..., keep_input])
    out_masked, (h_masked, _) = masked(x)
    torch.testing.assert_close(out_small, out_masked[..., keep[-1]], rtol=0, atol=1e-6)
    for layer, kept in enumerate(keep):
        torch.testing.assert_close(h_small[layer], h_masked[layer][:, kept], rtol=0, atol=1e-6)
    assert max(check_fused(small).values()) < 1e-5


def test_multilayer_surgery_rejects_uneven_widths() -> None:
    lstm = nn.LSTM(4, 6, num_layers=2)
    with pytest.raises(ValueError, match="equal widths"):
        prune_lstm(lstm, [torch.tensor([0, 1]), torch.tensor([0, 1, 2])])
    with pytest.raises(NotImplementedError):
        prune_lstm(nn.LSTM(4, 6, bidirectional=True), [torch.tensor([0])])


def test_reference_cell_matches_fused_kernel_and_detects_wrong_layout() -> None:
    g = torch.Generator().manual_seed(8)
    lstm = nn.LSTM(3, 5)
    x = torch.randn(4, 2, 3, generator=g)
    weights = (lstm.weight_ih_l0.detach(), lstm.weight_hh_l0.detach(), lstm.bias_ih_l0.detach(),
               lstm.bias_hh_l0.detach())
    torch.testing.assert_close(reference_lstm(x, [weights]), lstm(x)[0].detach(), rtol=0, atol=1e-6)
    # slicing rows without the gate stride (rows 0..k instead of g*H + j) must be caught by the check
    bad = nn.LSTM(3, 2)
    with torch.no_grad():
        bad.weight_ih_l0.copy_(lstm.weight_ih_l0[:8])
        bad.weight_hh_l0.copy_(lstm.weight_hh_l0[:8, :2])
        bad.bias_ih_l0.copy_(lstm.bias_ih_l0[:8])
        bad.bias_hh_l0.copy_(lstm.bias_hh_l0[:8])
    good = prune_lstm(lstm, [torch.tensor([0, 1])])
    assert not torch.allclose(good(x)[0], bad(x)[0], atol=1e-3)


def test_pruned_model_can_be_pruned_again_with_uneven_widths() -> None:
    model = tiny_lm(tie=False, seed=9, hidden=(12, 10, 8))
    first = PrunePlan((12, 10, 8), (tuple(range(0, 12, 2)), tuple(range(7)), tuple(range(8))))
    once = apply_plan(model, first)
    assert once.config.hidden_sizes == (6, 7, 8)
    twice = apply_plan(once, PrunePlan((6, 7, 8), ((0, 5), (1, 2, 3), (0, 7))))
    assert twice.config.hidden_sizes == (2, 3, 2)
    with pytest.raises(ValueError, match="plan was made for"):
        apply_plan(once, PrunePlan((12, 10, 8), ((0,), (0,), (0,))))


def test_tied_model_narrows_embedding_with_last_layer() -> None:
    model = tiny_lm(tie=True, seed=10)
    pruned = apply_plan(model, random_plan(model, 0.5, seed=11))
    assert pruned.config.embed_size == pruned.config.hidden_sizes[-1] == 4
    assert pruned.decoder.weight is pruned.embedding.weight
    assert pruned.rnns[0].input_size == 4


def test_per_unit_collects_all_four_gate_rows() -> None:
    hidden = 3
    rows = torch.arange(4 * hidden * 2, dtype=torch.float32).reshape(4 * hidden, 2)
    units = per_unit(rows, dim=0, gates=4)
    assert units.shape == (3, 8)
    # unit 1 owns rows 1, 4, 7, 10
    assert units[1].tolist() == rows[[1, 4, 7, 10]].flatten().tolist()
    cols = per_unit(rows.t(), dim=1, gates=4)
    assert torch.equal(cols, units)
    assert unit_positions(torch.tensor([0, 2]), hidden, 4).tolist() == [0, 2, 3, 5, 6, 8, 9, 11]


def test_groups_cover_consumers_and_tied_embedding() -> None:
    untied = unit_groups(LstmLmConfig(vocab_size=10, embed_size=4, hidden_sizes=(5, 6)))
    assert [s.name for s in untied[0].slices][-1] == "rnns.1.weight_ih_l0"
    assert [s.name for s in untied[1].slices][-1] == "decoder.weight"
    tied = unit_groups(LstmLmConfig(vocab_size=10, embed_size=6, hidden_sizes=(5, 6), tie_weights=True))
    assert {"decoder.weight", "rnns.0.weight_ih_l0"} <= {s.name for s in tied[1].slices if s.dim == 1}


def test_plan_round_trips_and_validates() -> None:
    plan = plan_from_scores([torch.tensor([0.3, 0.1, 0.9, 0.5]), torch.tensor([1.0, 2.0])], 0.5, "magnitude",
                            meta={"keep_ratio": 0.5})
    assert plan.keep == ((2, 3), (1,))
    assert PrunePlan.from_json(plan.to_json()) == plan
    with pytest.raises(ValueError):
        PrunePlan((4,), ((3, 1),))
    with pytest.raises(ValueError):
        PrunePlan((4,), ((),))
    with pytest.raises(ValueError, match="non-finite"):
        plan_from_scores([torch.tensor([float("nan"), 1.0])], 0.5)
    with pytest.raises(ValueError):
        kept_count(10, 0.0)


SHARED_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "text" / "ptb-style"


@pytest.mark.slow
@pytest.mark.skipif(not SHARED_CORPUS.is_dir(), reason="needs ../shared/data/text/ptb-style")
def test_pruned_equals_masked_on_the_real_corpus_after_training() -> None:
    """A briefly trained LM on the PTB-style corpus: surgery is exact on real text, every criterion."""
    from minillm.lstm.api import PruneSettings, calibration_windows, score_units
    from minillm.lstm.data import Corpus, batchify, bptt_windows
    from minillm.lstm.train import TrainConfig, train_lm

    corpus = Corpus.load(SHARED_CORPUS)
    assert len(corpus.vocab) == 10_001
    config = LstmLmConfig(vocab_size=len(corpus.vocab), embed_size=32, hidden_sizes=(48, 40), dropout=0.1)
    model = LstmLm(config, torch.Generator().manual_seed(0))
    train_lm(model, corpus.train, TrainConfig(epochs=1, max_steps=30, batch_size=16, bptt=20))
    settings = PruneSettings(calib_windows=2, group_lasso_steps=0)
    window = next(iter(bptt_windows(batchify(corpus.test, 4), 20)))[0]
    assert calibration_windows(corpus, settings)
    for criterion in ("magnitude", "activation", "fms"):
        settings.criterion = criterion
        plan = plan_from_scores(score_units(model, corpus, settings), 0.5, criterion)
        torch.testing.assert_close(apply_plan(model, plan)(window)[0], mask_plan(model, plan)(window)[0],
                                   rtol=0, atol=1e-5)
