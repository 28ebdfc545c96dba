"""Dynamic Sparse Training: long-tailed STE, regulariser, reset rule, and use on a small CNN and an LSTM."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call

from minillm.lstm.dst import (
    MaskedConv2d,
    MaskedLinear,
    MaskedLSTM,
    densify,
    dst_penalty,
    dst_thresholds,
    overall_density,
    sparsify,
    sparsity_report,
)
from minillm.lstm.dst_math import LongTailedStep, long_tailed_derivative, masked_weight, sparsity_penalty


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def test_long_tailed_derivative_values() -> None:
    x = torch.tensor([0.0, 0.1, -0.2, 0.4, -0.4, 0.41, 0.7, -1.0, 1.01, -3.0])
    expected = torch.tensor([2.0, 1.6, 1.2, 0.4, 0.4, 0.4, 0.4, 0.4, 0.0, 0.0])
    torch.testing.assert_close(long_tailed_derivative(x), expected)
    leaf = x.clone().requires_grad_(True)
    out = LongTailedStep.apply(leaf)
    assert out.tolist() == [0, 1, 0, 1, 0, 1, 1, 0, 1, 0]  # strict step: S(0) = 0
    out.backward(torch.full_like(x, 3.0))
    torch.testing.assert_close(leaf.grad, 3.0 * expected)


def test_straight_through_gradients_on_tiny_linear_match_the_paper() -> None:
    layer = MaskedLinear.from_dense(nn.Linear(3, 2))
    with torch.no_grad():
        # |W| − t lands in every zone of H': peak, masked peak, beyond 1, masked middle, tail, tail
        layer.weight.copy_(torch.tensor([[0.3, -0.05, 1.5], [0.2, -1.2, 0.95]]))
        layer.threshold.copy_(torch.tensor([0.1, 0.5]))
        layer.bias.zero_()
    x = torch.tensor([[1.0, -2.0, 0.5]])
    r = torch.tensor([[0.7, -1.3]])
    (layer(x) * r).sum().backward()

    w = layer.weight.detach()
    t = layer.threshold.detach()
    z = w.abs() - t[:, None]
    mask = (z > 0).float()
    h = long_tailed_derivative(z)
    g_q = r.t() @ x  # ∂L/∂Q for y = Q x
    expected_w = g_q * mask + g_q * w * h * w.sign()
    expected_t = -(g_q * w * h).sum(dim=1)
    assert mask.tolist() == [[1, 0, 1], [0, 1, 1]]
    assert h.flatten().tolist() == pytest.approx([1.2, 1.8, 0.0, 0.8, 0.4, 0.4])
    torch.testing.assert_close(layer.weight.grad, expected_w)
    torch.testing.assert_close(layer.threshold.grad, expected_t)
    assert layer.weight.grad[0, 1] != 0  # a masked weight still learns (it can come back)


def test_sparsity_regulariser_value_and_gradient() -> None:
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    sparsify(net)
    with torch.no_grad():
        net[0].threshold.copy_(torch.tensor([0.0, 0.5, -0.2]))
        net[2].threshold.copy_(torch.tensor([1.0, 2.0]))
    alpha = 1e-2
    penalty = alpha * dst_penalty(net)
    all_t = torch.cat([t.detach() for t in dst_thresholds(net)])
    torch.testing.assert_close(penalty, alpha * torch.exp(-all_t).sum())
    penalty.backward()
    torch.testing.assert_close(net[0].threshold.grad, -alpha * torch.exp(-net[0].threshold.detach()))
    torch.testing.assert_close(net[2].threshold.grad, -alpha * torch.exp(-net[2].threshold.detach()))
    with pytest.raises(ValueError):
        sparsity_penalty([])


def test_threshold_reset_when_a_layer_keeps_at_most_one_percent() -> None:
    weight = torch.linspace(0.01, 1.0, 100).reshape(1, 100)  # distinct magnitudes
    keep_two = torch.tensor([0.985])  # keeps 0.99 and 1.0: 2 % > 1 %, no reset
    out = masked_weight(weight, keep_two.clone())
    assert int((out != 0).sum()) == 2
    threshold = torch.tensor([0.995])  # keeps only 1.0: 1 % ⇒ reset to 0, mask recomputed
    out = masked_weight(weight, threshold)
    assert threshold.item() == 0.0
    torch.testing.assert_close(out, weight)

    layer = MaskedLinear.from_dense(nn.Linear(5, 4))
    with torch.no_grad():
        layer.threshold.fill_(10.0)  # above every |w|: everything masked
    x = torch.randn(2, 5, generator=torch.Generator().manual_seed(0))
    y = layer(x)
    assert torch.equal(layer.threshold.detach(), torch.zeros(4))
    torch.testing.assert_close(y, nn.functional.linear(x, layer.weight, layer.bias))


def test_masked_lstm_masks_each_gate_row_and_resets_per_matrix() -> None:
    g = torch.Generator().manual_seed(1)
    lstm = nn.LSTM(4, 3, num_layers=2)
    masked = MaskedLSTM(lstm)
    assert set(masked.thresholds()) == {"weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"}
    assert masked.threshold_ih_l0.shape == (12,)
    with torch.no_grad():
        masked.threshold_ih_l0.uniform_(0.0, 0.4, generator=g)
        masked.threshold_hh_l1.fill_(5.0)  # collapses this matrix only
    x = torch.randn(5, 2, 4, generator=g)
    t_ih_before = masked.threshold_ih_l0.detach().clone()
    out, _ = masked(x)
    assert torch.equal(masked.threshold_hh_l1.detach(), torch.zeros(12))
    assert torch.equal(masked.threshold_ih_l0.detach(), t_ih_before)
    # forward = a plain LSTM run on W ⊙ M; threshold gradient = −Σ_j ∂L/∂Q_ij W_ij H'(|W_ij| − t_i)
    q = {n: (getattr(lstm, n) * m).detach().requires_grad_(True) for n, m in masked.masks().items()}
    ref, _ = functional_call(lstm, q, (x,), strict=False)
    torch.testing.assert_close(out, ref)
    out.sum().backward()
    ref.sum().backward()
    w = lstm.weight_ih_l0.detach()
    expected = -(q["weight_ih_l0"].grad * w * long_tailed_derivative(w.abs() - t_ih_before[:, None])).sum(1)
    torch.testing.assert_close(masked.threshold_ih_l0.grad, expected)


class SmallConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(32, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def test_sparsify_a_cnn_trains_sparse_and_densifies_back() -> None:
    net = SmallConvNet()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for param in net.parameters():
            param.uniform_(-0.3, 0.3, generator=g)
    x = torch.randn(16, 1, 8, 8, generator=g)
    labels = torch.randint(3, (16,), generator=g)
    dense_out = net(x).detach()
    swapped = sparsify(net)
    assert swapped == ["features.0", "features.2", "head"]
    assert isinstance(net.features[0], MaskedConv2d) and isinstance(net.head, MaskedLinear)
    assert net.features[2].bias is None and net.features[0].padding == (1, 1)
    torch.testing.assert_close(net(x), dense_out)  # t = 0 keeps every non-zero weight

    optimizer = torch.optim.Adam(net.parameters(), lr=0.02)
    for _ in range(30):
        loss = nn.functional.cross_entropy(net(x), labels) + 0.05 * dst_penalty(net)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    report = sparsity_report(net)
    assert [r.name for r in report] == ["features.0.weight", "features.2.weight", "head.weight"]
    assert all(r.threshold_mean > 0 for r in report)
    assert 0.01 < overall_density(report) < 0.9
    sparse_out = net(x).detach()
    densify(net)
    assert type(net.features[0]) is nn.Conv2d and type(net.head) is nn.Linear
    assert not any("threshold" in name for name, _ in net.named_parameters())
    torch.testing.assert_close(net(x), sparse_out)
    assert float((net.head.weight == 0).float().mean()) == pytest.approx(1 - report[2].density)


def test_sparsify_options_and_errors() -> None:
    net = SmallConvNet()
    assert sparsify(net, kinds=("conv2d",), skip=("features.2",)) == ["features.0"]
    assert type(net.head) is nn.Linear
    with pytest.raises(ValueError, match="unknown DST layer kinds"):
        sparsify(SmallConvNet(), kinds=("gru",))
    with pytest.raises(ValueError, match="found no"):
        sparsify(nn.Sequential(nn.ReLU()))
