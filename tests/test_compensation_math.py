"""The compensation math on small float64 problems: refit = least squares, OBS = greedy exact removal."""

from __future__ import annotations

import pytest
import torch

from minillm.compensation.hessian import InputMoments, collect_moments, damped
from minillm.compensation.obs import obs_order
from minillm.compensation.refit import fold_mean, kept_system, refit_weight, solve_kept


def _data(n: int = 400, d: int = 12, out: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=g, dtype=torch.float64)  # correlated inputs: refit has work to do
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mixing + 0.3
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    return x, w


def _moments(x: torch.Tensor) -> InputMoments:
    moments = InputMoments.zeros(x.shape[1])
    for chunk in x.split(64):  # running sums over batches
        moments.add(chunk)
    return moments


def test_moments_accumulate_exactly() -> None:
    x, _ = _data()
    moments = _moments(x)
    torch.testing.assert_close(moments.gram, x.T @ x)
    torch.testing.assert_close(moments.mean, x.mean(0))
    assert moments.count == x.shape[0]
    h = damped(moments.gram, 0.1)
    torch.testing.assert_close(h - moments.gram, 0.1 * moments.gram.diagonal().mean() * torch.eye(12,
                               dtype=torch.float64))


def test_refit_equals_closed_form_least_squares() -> None:
    x, w = _data()
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    new, bias = refit_weight(w, _moments(x), keep, damping=0.0)
    expected = torch.linalg.lstsq(x[:, keep], x @ w.T).solution  # min ‖X Wᵀ − X_K B_K‖
    torch.testing.assert_close(new[:, keep], expected.T, rtol=1e-9, atol=1e-9)
    removed = [c for c in range(12) if c not in keep.tolist()]
    assert torch.count_nonzero(new[:, removed]) == 0 and bias is None


def test_refit_with_bias_equals_affine_least_squares() -> None:
    x, w = _data()
    b = torch.randn(5, dtype=torch.float64)
    keep = torch.tensor([1, 4, 6, 9])
    new, bias = refit_weight(w, _moments(x), keep, damping=0.0, bias=b, with_bias=True)
    design = torch.cat([x[:, keep], torch.ones(x.shape[0], 1, dtype=torch.float64)], 1)
    expected = torch.linalg.lstsq(design, x @ w.T + b).solution
    torch.testing.assert_close(new[:, keep], expected[:-1].T, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(bias, expected[-1], rtol=1e-9, atol=1e-9)


def _error(x: torch.Tensor, w: torch.Tensor, new: torch.Tensor, b: torch.Tensor | None = None,
           new_b: torch.Tensor | None = None) -> float:
    target = x @ w.T + (b if b is not None else 0)
    return float(((x @ new.T + (new_b if new_b is not None else 0)) - target).pow(2).sum())


@pytest.mark.parametrize("damping", [0.0, 0.01, 0.1])
def test_compensation_never_raises_the_calibration_error(damping: float) -> None:
    x, w = _data()
    moments = _moments(x)
    keep = torch.tensor([0, 1, 4, 5, 6, 10])
    sliced = w.clone()
    sliced[:, [c for c in range(12) if c not in keep.tolist()]] = 0
    plain = _error(x, w, sliced)
    folded, folded_bias = fold_mean(w, moments, keep, None)
    refit, _ = refit_weight(w, moments, keep, damping)
    affine, affine_bias = refit_weight(w, moments, keep, damping, with_bias=True)
    torch.testing.assert_close(folded, sliced)
    assert _error(x, w, folded, None, folded_bias) <= plain
    assert _error(x, w, refit) <= plain
    assert _error(x, w, affine, None, affine_bias) <= _error(x, w, folded, None, folded_bias)


def test_solve_kept_is_the_obs_update() -> None:
    """B'_K = B_K + H_KK⁻¹ H_KR B_R: the same as solving H_KK B'_K = (H B)_K."""
    x, w = _data()
    h = damped(x.T @ x, 0.05)
    keep = torch.tensor([3, 4, 5, 6, 7])
    rows = solve_kept(w.T, x.T @ x, keep, 0.05)
    expected = torch.linalg.solve(h[keep][:, keep], (h @ w.T)[keep])
    torch.testing.assert_close(rows, expected)


def test_obs_removes_a_zero_group_first() -> None:
    x, w = _data(d=12)
    groups = [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    w[:, 6:9] = 0  # group 2 contributes nothing: exactly removable
    result = obs_order(w, x.T @ x, groups, count=2, damping=0.01)
    assert result.order[0] == 2 and result.costs[0] == 0.0
    assert len(result.order) == 2 and result.costs[1] > 0


def test_obs_removes_an_exactly_redundant_channel_first() -> None:
    x, w = _data(d=8)
    x[:, 5] = 2.0 * x[:, 1] - x[:, 3]  # any one of channels 1, 3, 5 is the others' combination
    result = obs_order(w, x.T @ x, [[c] for c in range(8)], count=1, damping=1e-10)
    assert result.order[0] in (1, 3, 5)
    assert result.costs[0] < 1e-6 * float((x @ w.T).pow(2).sum())


def test_obs_final_weights_equal_the_refit_of_the_survivors() -> None:
    """Greedy removal with updates ends where the exact refit of what it kept is."""
    from minillm.compensation import obs as obs_module

    x, w = _data(d=10)
    gram = x.T @ x
    b = w.T.clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(damped(gram, 0.01)))
    for rows in ([2], [7, 8], [4]):
        obs_module._remove(b, hinv, torch.tensor(rows))
    keep = torch.tensor([0, 1, 3, 5, 6, 9])
    torch.testing.assert_close(b[keep], solve_kept(w.T, gram, keep, 0.01), rtol=1e-8, atol=1e-8)


def test_obs_families_shrink_together() -> None:
    """Query-head mode: every kv group (family) loses one query head per round."""
    x, w = _data(d=12)
    groups = [[c, c + 1] for c in range(0, 12, 2)]  # six heads of two columns
    families = [[0, 1, 2], [3, 4, 5]]  # two kv groups of three query heads
    result = obs_order(w, x.T @ x, groups, count=2, damping=0.01, families=families)
    assert len(result.order) == 4
    assert sum(g < 3 for g in result.order) == 2 and sum(g >= 3 for g in result.order) == 2
    with pytest.raises(ValueError):
        obs_order(w, x.T @ x, groups, count=3, damping=0.01, families=families)


def test_obs_steps_remove_the_requested_count() -> None:
    x, w = _data(d=12)
    result = obs_order(w, x.T @ x, [[c] for c in range(12)], count=7, damping=0.01, step=3)
    assert len(result.order) == 7 == len(set(result.order))


def test_collect_moments_hooks_a_linear() -> None:
    linear = torch.nn.Linear(6, 3).double()
    x = torch.randn(4, 5, 6, dtype=torch.float64)
    moments = collect_moments([linear], lambda: linear(x))
    flat = x.reshape(-1, 6)
    torch.testing.assert_close(moments[linear].gram, flat.T @ flat)
    assert not linear._forward_pre_hooks


@pytest.mark.parametrize("with_bias", [False, True])
def test_released_moments_give_the_same_refit_and_free_h(with_bias: bool) -> None:
    x, w = _data()
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    kept, released = _moments(x), _moments(x)
    expected = refit_weight(w, kept, keep, 0.01, with_bias=with_bias)
    got = refit_weight(w, released, keep, 0.01, with_bias=with_bias, release=True)
    assert torch.equal(got[0], expected[0]) and (got[1] is None or torch.equal(got[1], expected[1]))
    assert released.gram.numel() == 0 and kept.gram.shape == (12, 12)  # H freed; the mean stays
    torch.testing.assert_close(released.mean, x.mean(0))


def test_solve_kept_equals_solving_against_the_damped_h() -> None:
    x, w = _data()
    gram, keep = _moments(x).gram, torch.tensor([1, 4, 6, 9, 10])
    removed = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    h = damped(gram, 0.05)
    b = w.T
    expected = b[keep] + torch.linalg.solve(h[keep][:, keep], h[keep][:, removed] @ b[removed])
    original = gram.clone()
    torch.testing.assert_close(solve_kept(b, gram, keep, 0.05), expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(gram, original)  # not consumed: the caller's H is left as it was


def test_a_consumed_h_is_factored_where_it_lies() -> None:
    """With ``consume`` the system is built and factored inside ``H``'s own storage (no second
    ``in × in`` matrix: what lets a 3B model's refit fit a 2 GiB streaming cap) and solves the same."""
    x, w = _data()
    gram, keep = _moments(x).gram, torch.tensor([1, 4, 6, 9, 10])
    expected = solve_kept(w.T, gram, keep, 0.05)
    system = kept_system(w.T, gram, keep, 0.05, consume=True)
    assert system.factor is not None and system.factor.data_ptr() == gram.data_ptr()
    torch.testing.assert_close(system.solve(), expected, rtol=1e-10, atol=1e-10)
    assert system.factor is None  # released before the result is gathered


def test_float32_moments_refit_close_to_float64() -> None:
    """``--compensation-precision float32`` (streaming under a tight cap): the damped solve in float32
    stays within float32 rounding of the float64 refit on well-conditioned data."""
    x, w = _data()
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    narrow = InputMoments.zeros(12, dtype=torch.float32)
    for chunk in x.split(64):
        narrow.add(chunk)
    assert narrow.gram.dtype == torch.float32
    wide, _ = refit_weight(w, _moments(x), keep, 0.01)
    close, _ = refit_weight(w, narrow, keep, 0.01)
    torch.testing.assert_close(close, wide, rtol=1e-3, atol=1e-3)


def _paired_moments(x: torch.Tensor, dense: torch.Tensor, w: torch.Tensor) -> InputMoments:
    """The moments a layer of weight ``w`` gathers with its dense partners (in batches, via hooks)."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, dtype=torch.float64)
    with torch.no_grad():
        linear.weight.copy_(w)
    chunks = x.split(64)
    return collect_moments([linear], lambda: [linear(chunk) for chunk in chunks],
                           partners={linear: list(dense.split(64))})[linear]


def test_target_moments_accumulate_exactly_per_token_pair() -> None:
    x, w = _data()
    dense = x + 0.2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    moments = _paired_moments(x, dense, w)
    torch.testing.assert_close(moments.error, x.T @ ((dense - x) @ w.T))  # Σ x eᵀ, e = W (x_d − x)
    torch.testing.assert_close(moments.gram, x.T @ x)


def test_dense_target_refit_equals_least_squares_towards_the_dense_outputs() -> None:
    x, w = _data()
    dense = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    new, _ = refit_weight(w, _paired_moments(x, dense, w), keep, damping=0.0)
    expected = torch.linalg.lstsq(x[:, keep], dense @ w.T).solution  # min ‖X_d Wᵀ − X_K B_K‖
    torch.testing.assert_close(new[:, keep], expected.T, rtol=1e-9, atol=1e-9)
    removed = [c for c in range(12) if c not in keep.tolist()]
    assert torch.count_nonzero(new[:, removed]) == 0


def test_dense_target_target_moments_give_the_cross_moment_formula() -> None:
    """``E = Σ x (W (x_d − x))ᵀ`` solves what the cross moments ``C = Σ x x_dᵀ`` did:
    ``B'_K = B_K + (H_KK + δI)⁻¹ ((C B)_K − H_KK B_K)``, damping included."""
    x, w = _data()
    dense = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    keep = torch.tensor([1, 2, 5, 6, 9, 11])
    new, _ = refit_weight(w, _paired_moments(x, dense, w), keep, damping=0.01)
    h, c, b = x.T @ x, x.T @ dense, w.T
    h_kk = h[keep][:, keep]
    shift = 0.01 * h.diagonal().mean()
    expected = b[keep] + torch.linalg.solve(h_kk + shift * torch.eye(len(keep), dtype=torch.float64),
                                            (c @ b)[keep] - h_kk @ b[keep])
    torch.testing.assert_close(new[:, keep], expected.T, rtol=1e-10, atol=1e-10)


def test_dense_target_with_identical_inputs_is_the_pruned_target_refit() -> None:
    x, w = _data()
    keep = torch.tensor([1, 4, 6, 9, 10])
    plain, _ = refit_weight(w, _moments(x), keep, damping=0.01)
    paired, _ = refit_weight(w, _paired_moments(x, x, w), keep, damping=0.01, release=True)
    torch.testing.assert_close(paired, plain, rtol=1e-10, atol=1e-10)


def test_dense_target_corrects_drifted_inputs_even_with_nothing_removed() -> None:
    x, w = _data()
    dense = 1.1 * x  # the prefix's cuts shrank every input
    every = torch.arange(12)
    new, _ = refit_weight(w, _paired_moments(x, dense, w), every, damping=0.0)
    torch.testing.assert_close(new, 1.1 * w, rtol=1e-9, atol=1e-9)
    unchanged, _ = refit_weight(w, _moments(x), every, damping=0.0)
    torch.testing.assert_close(unchanged, w)


def _block_moments(u: torch.Tensor, d: torch.Tensor) -> InputMoments:
    moments = InputMoments.zeros(u.shape[1])
    for chunk, error in zip(u.split(64), d.split(64), strict=True):
        moments.add(chunk, error)
    return moments


@pytest.mark.parametrize("damping", [0.0, 0.01])
def test_block_target_refit_equals_least_squares_towards_the_block_output(damping: float) -> None:
    """The block target: fit ``W'_K u_K`` to ``W u + d`` (``d``: the block output's error with the MLP
    uncut); with damping, ridge towards the old rows: ``min ‖U_K B' − (U B + D)‖² + δ ‖B' − B_K‖²``."""
    u, w = _data()
    d = 0.7 * torch.randn(u.shape[0], w.shape[0], generator=torch.Generator().manual_seed(5),
                          dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 5, 7, 8, 11])
    new, _ = refit_weight(w, _block_moments(u, d), keep, damping=damping)
    delta = damping * float((u.T @ u).diagonal().mean())
    ridge = (delta ** 0.5) * torch.eye(len(keep), dtype=torch.float64)
    design = torch.cat([u[:, keep], ridge])
    wanted = torch.cat([u @ w.T + d, ridge @ w.T[keep]])
    expected = torch.linalg.lstsq(design, wanted).solution
    torch.testing.assert_close(new[:, keep], expected.T, rtol=1e-9, atol=1e-9)
    removed = [c for c in range(12) if c not in keep.tolist()]
    assert torch.count_nonzero(new[:, removed]) == 0
    plain, _ = refit_weight(w, _moments(u), keep, damping=damping)
    fitted = {name: float((u @ w.T + d - u @ weight.T).pow(2).sum()) for name, weight in
              (("block", new), ("pruned", plain))}
    assert fitted["block"] < fitted["pruned"]


def test_block_target_moves_an_uncut_layer_only_by_the_error() -> None:
    u, w = _data()
    every = torch.arange(12)
    still, _ = refit_weight(w, _block_moments(u, torch.zeros(u.shape[0], w.shape[0], dtype=torch.float64)),
                            every, damping=0.01)
    torch.testing.assert_close(still, w, rtol=1e-12, atol=1e-12)
    shift = torch.randn(w.shape[0], 12, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    moved, _ = refit_weight(w, _block_moments(u, u @ shift.T), every, damping=0.0)
    torch.testing.assert_close(moved, w + shift, rtol=1e-9, atol=1e-9)  # d linear in u: absorbed exactly
